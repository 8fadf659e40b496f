"""On-prem inference with the fine-tuned adapter: kept encrypted at rest, served by the
node sandbox on loopback behind a token, journaled as counts and digests only.

Real components throughout: the key broker over TLS, the sandbox's attestation and key
release, the aggregator sandbox (``server/sandbox.py``) sealing instructions to the
node's attested channel, the sandbox's real ``serve()`` with its gRPC socket and its
uvicorn HTTP server on a real loopback port.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.adapters import AdapterKey, AdapterStore
from clients.sandbox import NodeSandbox
from clients.service import serve
from clients.shuttle import sandbox_client
from protos.ark.v1 import nodesandbox_pb2 as pb
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import AdapterStoreError, InferenceUnavailable, SandboxUnavailable
from sandbox.journal import read_journal
from sandbox.ops.federation import free_port
from sandbox.ops.inference_client import InferenceClient
from sandbox.ops.provision import LoopbackDeployment, provision_loopback
from tests.conftest import make_spec
from tests.sealed_run import drive_sealed_run, key_broker

RUN_ID = 7
# A text that must never appear in a journal, a log line or an error.
CANARY = "ticket 4f1c: my card number is 4111-1111-1111-1111"
LABELS = ("a", "b")


@dataclasses.dataclass
class Trained:
    deployment: LoopbackDeployment
    spec: RunSpec
    alpine: NodeConfig
    coastal: NodeConfig


def _rows(n: int) -> str:
    return "".join(
        json.dumps({"text": f"row {i} {'good' if i % 2 else 'bad'}", "label": LABELS[i % 2]}) + "\n"
        for i in range(n)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Iterator[Trained]:
    """A provisioned provider, its key broker on loopback, and node alpine that took part
    in one sealed run (its adapters stored); node coastal took part in none."""
    root = tmp_path_factory.mktemp("infer")
    data = {}
    for name in ("alpine", "coastal"):
        data[name] = root / f"{name}.jsonl"
        data[name].write_text(_rows(20), encoding="utf-8")
    deployment = provision_loopback(
        root, model_dir=tiny_bert_dir, node_data=data, key_broker_port=free_port(), model_id="tiny"
    )
    spec = make_spec(tiny_bert_dir, labels=LABELS, model_id="tiny", local_steps=1)
    alpine = NodeConfig.load(deployment.node_configs["alpine"])
    with key_broker(deployment):
        sandbox = NodeSandbox(alpine)
        sandbox.start()
        drive_sealed_run(sandbox, deployment, spec, RUN_ID)
        yield Trained(deployment, spec, alpine, NodeConfig.load(deployment.node_configs["coastal"]))


@dataclasses.dataclass
class Served:
    node: NodeConfig
    url: str
    token: str

    def post(self, path: str, body: Any, token: str | None = None) -> httpx.Response:
        headers = {} if token == "" else {"Authorization": f"Bearer {token or self.token}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture
def served(request: pytest.FixtureRequest, trained: Trained) -> Iterator[Served]:
    """A fresh sandbox process's ``serve()`` (it attests again) for the node named by the
    test's ``node`` parameter (alpine unless set)."""
    name = getattr(request, "param", "alpine")
    node: NodeConfig = getattr(trained, name)
    stop, ready = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve(node, stop, on_ready=lambda _: ready.set())
        except BaseException as exc:
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60)
    assert not failed, failed
    address = json.loads(node.inference_address_path().read_text(encoding="utf-8"))
    token = node.inference_token_path().read_text(encoding="ascii")
    try:
        yield Served(node, address["url"], token)
    finally:
        stop.set()
        thread.join(30)
    assert not node.inference_token_path().exists(), "the token outlived the sandbox"


def _journal(node: NodeConfig) -> list[dict[str, Any]]:
    assert node.journal_path is not None
    return read_journal(node.journal_path)


def test_adapters_are_kept_sealed_0600_and_unreadable_without_the_sandbox_key(
    trained: Trained,
) -> None:
    folder = AdapterStore.directory_of(trained.alpine.workspace())
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"run-{RUN_ID}-baseline.sealed", f"run-{RUN_ID}-final.sealed"]
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # Plaintext safetensors would name its tensors in clear; the sealed file does not.
        assert b"lora_A" not in path.read_bytes()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # The same content key under another code measurement derives another key.
    released = NodeSandbox(trained.alpine)
    released.start()
    assert released._held is not None
    good = released._store(released._held)
    assert good.load(RUN_ID, "final").spec.labels == LABELS  # the negative control's control
    other = AdapterStore(
        folder,
        dataclasses.replace(good._key, code="00" * 32),
        model_path=trained.spec.model_path,
    )
    with pytest.raises(AdapterStoreError, match=f"run-{RUN_ID}-final.sealed"):
        other.load(RUN_ID, "final")


@pytest.mark.parametrize("served", ["coastal"], indirect=True)
def test_inference_before_any_adapter_is_refused_clearly(served: Served) -> None:
    reply = served.post("/v1/classify", {"texts": [CANARY]})
    assert reply.status_code == 404
    assert reply.json()["error"] == "no-adapter"
    assert "no stored final adapter" in reply.json()["message"]
    assert CANARY not in reply.text
    assert _journal(served.node)[-1]["kind"] == "inference_refused"


def test_a_fresh_sandbox_serves_the_stored_adapters(served: Served, trained: Trained) -> None:
    with InferenceClient(served.url, served.token) as client:
        final = client.classify(["row 1 good", "row 2 bad"])
        baseline = client.classify(["row 1 good", "row 2 bad"], adapter="baseline", run_id=RUN_ID)
        status = client.status()
    assert final["run_id"] == RUN_ID
    assert final["adapter"] == "final"
    for prediction in final["predictions"]:
        assert set(prediction["scores"]) == set(LABELS)
        assert prediction["label"] in LABELS
        assert abs(sum(prediction["scores"].values()) - 1.0) < 1e-5
    # Two different adapters: different scores from the same model and texts.
    assert final["predictions"] != baseline["predictions"]
    assert status["adapters"] == {"final": [RUN_ID], "baseline": [RUN_ID]}
    with sandbox_client(served.node) as grpc_client:
        reply: pb.StatusReply = grpc_client.status()
    assert list(reply.adapters) == [RUN_ID]
    assert reply.inference_url == served.url
    assert reply.attested


def test_a_request_without_the_token_is_refused(served: Served) -> None:
    body = {"texts": ["row 1 good"]}
    assert served.post("/v1/classify", body).status_code == 200  # the control
    for token in ("", "0" * 64, served.token + "0"):
        reply = served.post("/v1/classify", body, token=token)
        assert (reply.status_code, reply.json()["error"]) == (401, "unauthorized")
    assert httpx.get(served.url + "/v1/status", timeout=10).status_code == 401
    path = served.node.inference_token_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(served.token) == 64
    assert served.url.startswith("http://127.0.0.1:")


def test_a_tampered_adapter_is_refused_naming_the_file(served: Served) -> None:
    path = AdapterStore.directory_of(served.node.workspace()) / f"run-{RUN_ID}-final.sealed"
    original = path.read_bytes()
    try:
        flipped = bytearray(original)
        flipped[-20] ^= 0x01
        path.write_bytes(bytes(flipped))
        reply = served.post("/v1/classify", {"texts": ["row 1 good"]})
        assert (reply.status_code, reply.json()["error"]) == (409, "adapter-unusable")
        assert str(path) in reply.json()["message"]
        assert "predictions" not in reply.json()
        # The baseline renamed to the final: authentic bytes, wrong file.
        baseline = path.with_name(f"run-{RUN_ID}-baseline.sealed")
        path.write_bytes(baseline.read_bytes())
        reply = served.post("/v1/classify", {"texts": ["row 1 good"]})
        assert reply.status_code == 409
        assert "baseline adapter" in reply.json()["message"]
    finally:
        path.write_bytes(original)
        os.utime(path, None)
    assert served.post("/v1/classify", {"texts": ["row 1 good"]}).status_code == 200


def test_bad_requests_are_refused_without_echoing_a_text(served: Served) -> None:
    too_long = CANARY * (served.node.max_row_bytes // len(CANARY) + 1)
    cases: list[tuple[Any, int, str]] = [
        ({"texts": [CANARY] * 65}, 400, "bad-request"),
        ({"texts": [too_long]}, 400, "bad-request"),
        ({"texts": [CANARY], "adapter": "other"}, 400, "bad-request"),
        ({"texts": [CANARY], CANARY: 1}, 400, "bad-request"),
        ({"texts": CANARY}, 400, "bad-request"),
        ({"texts": [CANARY], "run_id": 99}, 404, "no-adapter"),
    ]
    for body, status, code in cases:
        reply = served.post("/v1/classify", body)
        assert (reply.status_code, reply.json()["error"]) == (status, code), body
        assert CANARY not in reply.text
    reply = served.post("/v1/complete", {"texts": [CANARY]})
    assert (reply.status_code, reply.json()["error"]) == (422, "wrong-task")


def test_the_journal_keeps_counts_and_digests_only(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        ok = served.post("/v1/classify", {"texts": [CANARY, CANARY + " again"]})
        refused = served.post("/v1/classify", {"texts": [CANARY], "adapter": "x"})
    assert ok.status_code == 200
    assert refused.status_code == 400
    entries = _journal(served.node)
    served_entry, refused_entry = entries[-2], entries[-1]
    assert served_entry["kind"] == "inference_served"
    assert (served_entry["run_id"], served_entry["adapter"], served_entry["count"]) == (
        RUN_ID,
        "final",
        2,
    )
    assert len(served_entry["request_sha256"]) == 64 == len(served_entry["response_sha256"])
    assert refused_entry["kind"] == "inference_refused"
    assert refused_entry["code"] == "bad-request"
    assert served.node.journal_path is not None
    journal_text = served.node.journal_path.read_text(encoding="utf-8")
    # Negative control: the canary is in the request, so a leak would show.
    assert CANARY in ok.request.content.decode()
    assert CANARY not in journal_text
    assert "4111-1111" not in journal_text  # a short digit run can occur in a digest
    assert CANARY not in caplog.text
    assert "4111-1111" not in caplog.text


def test_an_unprotected_sandbox_refuses_inference(trained: Trained, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    node = NodeConfig(
        name="plain",
        data_path=trained.alpine.data_path,
        journal_path=tmp_path / "journal.jsonl",
        unprotected=True,
        source=config,
    )
    with pytest.raises(InferenceUnavailable, match="unprotected"):
        NodeSandbox(node).infer(json.dumps({"texts": ["x"]}).encode(), "classify")
    assert read_journal(tmp_path / "journal.jsonl")[-1]["code"] == "not-attested"


def test_adapter_key_binds_its_context() -> None:
    key = AdapterKey(b"k" * 32, "ueid-1", "c" * 64, "tiny")
    salt = b"s" * 32
    assert key.derive(salt) == AdapterKey(b"k" * 32, "ueid-1", "c" * 64, "tiny").derive(salt)
    for changed in (
        dataclasses.replace(key, ueid="ueid-2"),
        dataclasses.replace(key, code="d" * 64),
        dataclasses.replace(key, model_id="other"),
        dataclasses.replace(key, content_key=b"j" * 32),
    ):
        assert changed.derive(salt) != key.derive(salt)
    assert key.derive(b"t" * 32) != key.derive(salt)


def test_ark_node_infer_prints_labels_and_names_a_missing_sandbox(
    served: Served, trained: Trained, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from sandbox.ops.cli import app

    texts = tmp_path / "tickets.jsonl"
    texts.write_text(
        '{"text": "row 1 good", "label": "b"}\n\n{"text": "row 2 bad", "label": "a"}\n',
        encoding="utf-8",
    )
    config = str(served.node.source)
    result = CliRunner().invoke(app, ["node", "infer", "--config", config, str(texts)])
    assert result.exit_code == 0, result.output
    assert f"run {RUN_ID}, final adapter" in result.output
    assert "row 2 bad" in result.output
    result = CliRunner().invoke(
        app, ["node", "infer", "--config", config, "--adapter", "other", str(texts)]
    )
    assert result.exit_code == 2
    assert "'adapter' must be one of" in result.output
    # No sandbox runs for coastal: the command says so.
    coastal = str(trained.coastal.source)
    result = CliRunner().invoke(app, ["node", "infer", "--config", coastal, str(texts)])
    assert result.exit_code == 2
    assert "is `ark node sandbox" in " ".join(result.output.split())


def test_an_address_left_by_a_killed_sandbox_is_not_used(tmp_path: Path) -> None:
    """After a crash the published address and token stay behind; whoever binds that port
    since must not get the operator's texts. Negative control: a live listener of this
    user at the published port is accepted."""
    config = tmp_path / "node.toml"
    config.write_text('[node]\nname = "n"\ndata-path = "d.jsonl"\n', encoding="utf-8")
    node = NodeConfig.load(config)
    node.inference_address_path().parent.mkdir(parents=True)
    node.inference_token_path().write_text("t" * 64, encoding="ascii")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        for pid in (2**22 + 7, os.getpid()):  # no such process; this one, not listening there
            address = {"url": "http://127.0.0.1:9/", "pid": pid}
            node.inference_address_path().write_text(json.dumps(address), encoding="utf-8")
            with pytest.raises(SandboxUnavailable, match="not serving it"):
                InferenceClient.for_node(node)
        address = {"url": f"http://127.0.0.1:{port}/", "pid": os.getpid()}
        node.inference_address_path().write_text(json.dumps(address), encoding="utf-8")
        InferenceClient.for_node(node).close()
    finally:
        listener.close()
