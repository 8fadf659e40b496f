"""Abuse cases of the node sandbox's local API, against the real gRPC server.

Each test talks to ``serve()`` (``clients/service.py``) running in a thread of this
process on its real Unix socket, for a sealed node whose key broker serves on loopback
(``tests/conftest.py``'s ``served_deployment``). The provider's side of a run is the
real aggregator sandbox (``server/sandbox.py``), so an instruction is exactly what a
ServerApp would send: the sandbox's refusals below are of genuine, validly sealed
instructions sent to the wrong place, and each has its accepted negative control.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import save_file

import clients.sandbox as node_sandbox
from clients.adapters import stored_runs
from clients.sandbox import BROKER_RETRY_SECONDS, NodeSandbox
from clients.service import MAX_RUN_CONFIG_BYTES, serve
from clients.shuttle import (
    CHANNEL_OPTIONS,
    SandboxClient,
    hello_content,
    instruction,
    run_context,
    unix_target,
)
from protos.ark.v1 import nodesandbox_pb2 as pb
from protos.ark.v1 import nodesandbox_pb2_grpc as pb_grpc
from sandbox.attestation.result import SUBMOD, verify_result
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, model_dir_digest
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import (
    KeyBrokerUnavailable,
    KeyReleaseDenied,
    ResultInvalid,
    UpdateRejected,
)
from sandbox.events import JsonlEventSink
from sandbox.journal import read_journal
from sandbox.lora import Adapter, adapter_state
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.inference_client import InferenceClient
from sandbox.ops.provision import LoopbackDeployment, ProviderWorkspace, save_policy
from sandbox.protocol import BROKER_RETRY, CONFIG_KEY, HELLO_KEY, METRICS_KEY, round_config
from sandbox.reasons import NodeReason
from server import sandbox as server_sandbox
from server.app import _provider_model
from server.sandbox import AggregatorSandbox, NodePeer, sealed_blob
from tests.canary import byte_windows, files_holding, weight_windows
from tests.clientapp_audit import decode_records, encode_records
from tests.conftest import ServedBroker, make_spec, served_deployment

RUN, NODE = 41, 9
NOBODY = 65534
# A value only this test's run config holds: it must never come back in a status.
PRIVATE = "Alpe Rossa 4417"
READY_TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process identity Flower's ServerApp runtime sets (messages are made here)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@contextlib.contextmanager
def serving(node: NodeConfig, sandbox: NodeSandbox | None = None) -> Iterator[Path]:
    """``serve(node)`` (with ``sandbox``, if given) in a thread until the block ends; the
    socket path once it serves. A failure to start is raised here, as ``ark node sandbox``
    would exit with it."""
    stop, ready = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve(node, stop, sandbox=sandbox, on_ready=lambda path: ready.set())
        except BaseException as exc:  # handed to the test thread
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name=f"sandbox-{node.name}", daemon=True)
    thread.start()
    assert ready.wait(READY_TIMEOUT), "the sandbox did not serve in time"
    try:
        if failed:
            raise failed[0]
        yield node.socket_path()
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "the sandbox did not stop"


def key_releases(ws: ProviderWorkspace) -> int:
    """How many content keys the provider's key broker released."""
    return sum(e["kind"] == "key_released" for e in JsonlEventSink(ws.events).read())


def journal_of(node: NodeConfig) -> list[dict[str, Any]]:
    assert node.journal_path is not None
    return read_journal(node.journal_path) if node.journal_path.exists() else []


def kinds_after(node: NodeConfig, seen: int) -> list[tuple[str, str | None]]:
    """Kinds (and codes) of the journal entries appended after the first ``seen``."""
    return [(e["kind"], e.get("code")) for e in journal_of(node)[seen:]]


@dataclass
class Provider:
    """The ServerApp's side of run ``run_id``: the real aggregator sandbox and the
    global adapter it starts from."""

    aggregator: AggregatorSandbox
    spec: RunSpec
    adapter: Adapter
    peers: dict[int, NodePeer] = field(default_factory=dict)

    def context(self, node_id: int) -> Context:
        """The ClientApp's context on node ``node_id`` in this run."""
        config = dict(self.spec.to_run_config())
        return Context(self.aggregator.run_id, node_id, {}, RecordDict(), config)

    def aggregator_hello(self, rnd: int) -> RecordDict:
        return RecordDict({CONFIG_KEY: round_config(rnd)})

    def admit(self, sandbox: SandboxClient, node_id: int, rnd: int = 1) -> NodePeer:
        """Shake hands with the node's sandbox, as the ServerApp's hello does."""
        reply = sandbox.hello(run_context(self.context(node_id)), rnd)
        peer = self.aggregator.admit(node_id, hello_content(reply)[HELLO_KEY])
        self.peers[node_id] = peer
        return peer

    def instruction(
        self, peer: int, rnd: int, stage: str = STAGE_TRAIN, **changes: Any
    ) -> pb.Instruction:
        """Node ``peer``'s sealed instruction for ``stage`` of round ``rnd``, as the
        ClientApp forwards it; ``changes`` then replay it elsewhere (another run_id,
        node_id, round)."""
        content = self.aggregator.instruction(self.peers[peer], rnd, self.adapter, stage)
        kind = MessageType.TRAIN if stage == STAGE_TRAIN else MessageType.EVALUATE
        msg = Message(content, dst_node_id=peer, message_type=kind)
        request = instruction(msg, self.context(peer), 0.0)
        for name, value in changes.items():
            target = request.run if name in ("run_id", "node_id") else request
            setattr(target, name, value)
        return request


@dataclass
class World:
    deployment: LoopbackDeployment
    broker: ServedBroker
    node: NodeConfig
    spec: RunSpec
    model_digest: str
    adapter: Adapter

    def provider(self, run_id: int = RUN) -> Provider:
        aggregator = AggregatorSandbox.load(
            self.deployment.provider.aggregator, run_id=run_id, model_digest=self.model_digest
        )
        return Provider(aggregator, self.spec, self.adapter)

    def deny_all_nodes(self) -> None:
        """The operator removes every node from the provider's allowlist; the key broker
        is restarted with that policy."""
        ws = self.deployment.provider
        raw = tomllib.loads(ws.policy.read_text(encoding="utf-8"))
        raw["policy"]["allowed-nodes"] = ["someone-else"]
        save_policy(ws.policy, raw)
        self.broker.restart()


@contextlib.contextmanager
def sealed_world(root: Path, model_dir: Path) -> Iterator[World]:
    """One sealed node (under ``root``: keep it short, a Unix socket path holds at most
    107 bytes) and its key broker, and the run it is asked to train in."""
    data = write_demo_data(root / "data", 1, rows_per_node=12, seed=2)
    with served_deployment(root, model_dir, data, model_id="tiny", threads=1) as (deployed, broker):
        node = NodeConfig.load(next(iter(deployed.node_configs.values())))
        spec = make_spec(
            model_dir, labels=tuple(sorted(DEMO_LABELS)), model_id="tiny", local_steps=1
        )
        adapter = adapter_state(_provider_model(spec))
        yield World(deployed, broker, node, spec, model_dir_digest(model_dir), adapter)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Iterator[World]:
    with sealed_world(tmp_path_factory.mktemp("nsb"), tiny_bert_dir) as made:
        yield made


@pytest.fixture
def own_world(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Iterator[World]:
    """A world of the test's own, for a test that changes the provider's policy."""
    with sealed_world(tmp_path_factory.mktemp("nsb"), tiny_bert_dir) as made:
        yield made


@pytest.fixture(scope="module")
def served(world: World) -> Iterator[Path]:
    """The world's node sandbox, serving for the whole module."""
    with serving(world.node) as path:
        yield path


@pytest.fixture
def client(served: Path) -> Iterator[SandboxClient]:
    sandbox = SandboxClient(served)
    yield sandbox
    sandbox.close()


@contextlib.contextmanager
def raw_channel(path: Path) -> Iterator[grpc.Channel]:
    """A plain gRPC channel to the socket, for calls no SandboxClient would make."""
    channel = grpc.secure_channel(
        unix_target(path),
        grpc.local_channel_credentials(grpc.LocalConnectionType.UDS),
        options=CHANNEL_OPTIONS,
    )
    try:
        yield channel
    finally:
        channel.close()


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def assert_fixed(error: grpc.RpcError, code: grpc.StatusCode, reason: NodeReason) -> None:
    """The status is ``code`` with ``reason``'s label as its only text."""
    assert error.code() == code, error
    assert error.details() == reason.label
    assert not error.trailing_metadata(), error.trailing_metadata()
    assert PRIVATE not in error.debug_error_string()  # type: ignore[attr-defined]


# -- 1. only the node's user reaches the socket ------------------------------------------

# Run as root in a fresh process: import everything first (the interpreter lives under
# /root, which another user may not enter), then drop to ``uid`` unless it is empty,
# then try the socket raw and through the ClientApp's SandboxClient.
PROBE = """
import json, os, socket, sys
from pathlib import Path
from clients.shuttle import SandboxClient
from sandbox.errors import SandboxUnavailable

path, uid = sys.argv[1], sys.argv[2]
if uid:
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
out = {"uid": os.getuid()}
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect(path)
    out["connect"] = "connected"
except OSError as exc:
    out["connect"] = type(exc).__name__
finally:
    probe.close()
client = SandboxClient(Path(path))
try:
    out["status"] = client.status(timeout=2.0).pid
except SandboxUnavailable as exc:
    out["status"] = type(exc).__name__
print(json.dumps(out))
"""


def probe_as(path: Path, uid: int | None) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), "" if uid is None else str(uid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_another_local_user_cannot_reach_the_socket(served: Path) -> None:
    assert served.stat().st_mode & 0o777 == 0o600
    assert served.parent.stat().st_mode & 0o777 == 0o700
    assert probe_as(served, NOBODY) == {
        "uid": NOBODY,
        "connect": "PermissionError",
        "status": "SandboxUnavailable",
    }
    # Negative control: the node's own user (the sandbox's) gets through both ways.
    assert probe_as(served, None) == {"uid": 0, "connect": "connected", "status": os.getpid()}
    # The socket's own mode holds even if its folder is opened up by mistake.
    served.parent.chmod(0o755)
    try:
        assert probe_as(served, NOBODY)["connect"] == "PermissionError"
    finally:
        served.parent.chmod(0o700)


# -- 2. a sealed instruction counts only where it was sealed for ------------------------


def test_an_instruction_replayed_elsewhere_is_refused_and_trains_nothing(
    world: World, client: SandboxClient, served: Path
) -> None:
    provider = world.provider()
    peer = provider.admit(client, NODE)
    releases = key_releases(world.deployment.provider)
    # A second run the sandbox also shook hands in: its channel key is not this one's.
    other_run = world.provider(RUN + 1)
    other_run.admit(client, NODE)
    replays = {
        "another run": provider.instruction(NODE, 1, run_id=RUN + 1),
        "a run it never joined": provider.instruction(NODE, 1, run_id=RUN + 7),
        "another node": provider.instruction(NODE, 1, node_id=NODE + 1),
        "another round": provider.instruction(NODE, 1, round=2),
    }
    seen = len(journal_of(world.node))
    with raw_channel(served) as channel:
        stub = pb_grpc.NodeSandboxStub(channel)
        for case, request in replays.items():
            error = rpc_error(lambda: stub.Train(request))  # noqa: B023 (called at once)
            assert_fixed(error, grpc.StatusCode.FAILED_PRECONDITION, NodeReason.AGGREGATOR_REFUSED)
            entries = kinds_after(world.node, seen)
            assert entries[-1] == ("clientapp_failed", "aggregator-refused"), case
            assert "train" not in {kind for kind, _ in entries}, case
            seen = len(journal_of(world.node))
        # A training instruction replayed as an evaluation (its stage is sealed in too).
        error = rpc_error(lambda: stub.Evaluate(provider.instruction(NODE, 1)))
        assert_fixed(error, grpc.StatusCode.FAILED_PRECONDITION, NodeReason.AGGREGATOR_REFUSED)
        assert kinds_after(world.node, seen) == [("clientapp_failed", "aggregator-refused")]
        seen = len(journal_of(world.node))

        # Negative control: the instruction where it was sealed for is accepted, and the
        # provider opens the update it comes back with.
        reply = stub.Train(provider.instruction(NODE, 1))
    tensors, weight = provider.aggregator.open_update(peer, reply.sealed_update, 1)
    assert set(tensors) <= set(world.adapter)
    assert tensors
    assert weight == reply.metrics["num-examples"] > 0
    assert kinds_after(world.node, seen) == [("train", None)]
    assert key_releases(world.deployment.provider) == releases, "the model was held, not re-read"


# -- 3. four calls, and nothing but fixed codes for anything malformed -------------------


def test_a_result_whose_ueid_is_not_text_is_refused_before_anything_is_kept(
    world: World, client: SandboxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ueid comes from the node's evidence, and is logged as canonical JSON: one with
    a lone surrogate (which no log entry can hold) is refused as the result's fault."""
    provider = world.provider()
    verified = verify_result

    def odd_ueid(*args: Any, **kwargs: Any) -> Any:
        result = verified(*args, **kwargs)
        claims = copy.deepcopy(result.claims)
        claims["submods"][SUBMOD]["ark.ueid"] = "ueid:\ud800"
        return dataclasses.replace(result, claims=claims)

    monkeypatch.setattr(server_sandbox, "verify_result", odd_ueid)
    with pytest.raises(ResultInvalid, match="ueid is not text"):
        provider.admit(client, NODE)
    assert len(provider.aggregator.admitted) == 0


def test_the_aggregator_keeps_a_node_key_not_its_evidence_and_honours_one_rounds_tickets(
    world: World, client: SandboxClient
) -> None:
    """At a thousand nodes, what the aggregator keeps per node is what memory grows by: a
    peer is its key, nonce and TEE. The evidence an instruction carries is signed for it
    (over the node's hello nonce, as before), and the node appraises it every time: the
    round-2 instruction trains on evidence made after round 1's. Tickets are MACs, not
    records: none is kept, and those of a round are refused once a later round is
    instructed, so an update of the earlier round then no longer opens."""
    provider = world.provider()
    peer = provider.admit(client, NODE)
    assert not hasattr(peer, "__dict__"), "a peer has a fixed set of slots"
    assert {"evidence", "result"}.isdisjoint(peer.__slots__)
    assert peer.ueid
    assert len(peer.ear_sha256) == 64
    aggregator = provider.aggregator

    first = client.train(provider.instruction(NODE, 1))
    aggregator.open_update(peer, first.sealed_update, 1)  # opens in its round
    # Another process of the same run (another ticket key) does not honour it.
    restarted = dataclasses.replace(aggregator, ticket_key=secrets.token_bytes(32))
    with pytest.raises(UpdateRejected, match="ticket"):
        restarted.open_update(peer, first.sealed_update, 1)

    later = client.train(provider.instruction(NODE, 2))
    assert aggregator.ticket_round == 2
    with pytest.raises(UpdateRejected, match="ticket"):
        aggregator.open_update(peer, first.sealed_update, 1)
    tensors, _ = aggregator.open_update(peer, later.sealed_update, 2)
    assert tensors


def test_the_api_has_exactly_five_calls() -> None:
    service = pb.DESCRIPTOR.services_by_name["NodeSandbox"]
    names = {method.name for method in service.methods}
    assert names == {"Hello", "Train", "Evaluate", "SecAgg", "Status"}


@pytest.mark.parametrize("name", ["GetChannelKey", "ExportModel", "Train2", ""])
def test_a_call_the_api_does_not_have_is_unimplemented(served: Path, name: str) -> None:
    with raw_channel(served) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/ark.v1.NodeSandbox/{name}"
        )
        error = rpc_error(lambda: call(b"\x0a\x02\x08\x01", timeout=10))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not error.trailing_metadata()


GARBAGE = {
    "not protobuf": b"\xff\xff\xff\xff\xff",
    "truncated": pb.Instruction(run=pb.RunContext(run_id=1)).SerializeToString()[:-1],
    "wrong wire type": b"\x0d\x00\x00\x00\x00",  # field 1 (run) as a fixed32
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@pytest.mark.parametrize("method", ["Hello", "Train", "Evaluate"])
def test_garbage_bytes_get_one_fixed_code(
    world: World, served: Path, method: str, case: str
) -> None:
    seen = len(journal_of(world.node))
    with raw_channel(served) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/ark.v1.NodeSandbox/{method}"
        )
        error = rpc_error(lambda: call(GARBAGE[case], timeout=30))
    assert_fixed(error, grpc.StatusCode.INVALID_ARGUMENT, NodeReason.CLIENTAPP_FAILED)
    assert kinds_after(world.node, seen) == [("clientapp_failed", "clientapp-failed")]


BAD_RUN_CONFIGS = {
    "not JSON": PRIVATE,
    "not an object": json.dumps([PRIVATE]),
    "a nested value": json.dumps({"task": {"name": PRIVATE}}),
    "oversized": json.dumps({"job-id": PRIVATE + "x" * MAX_RUN_CONFIG_BYTES}),
    "not a run spec": json.dumps({"task": PRIVATE}),
    "an unknown key": json.dumps({PRIVATE: 1}),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN_CONFIGS))
def test_a_bad_run_config_gets_one_fixed_code(world: World, served: Path, case: str) -> None:
    seen = len(journal_of(world.node))
    run = pb.RunContext(run_id=RUN, node_id=NODE, run_config_json=BAD_RUN_CONFIGS[case])
    with raw_channel(served) as channel:
        stub = pb_grpc.NodeSandboxStub(channel)
        for call in (
            lambda: stub.Hello(pb.HelloRequest(run=run, round=1)),
            lambda: stub.Train(pb.Instruction(run=run, round=1)),
        ):
            error = rpc_error(call)
            assert_fixed(error, grpc.StatusCode.INVALID_ARGUMENT, NodeReason.CLIENTAPP_FAILED)
    journal = journal_of(world.node)[seen:]
    assert [(e["kind"], e["code"]) for e in journal] == [
        ("clientapp_failed", "clientapp-failed")
    ] * 2
    # The detail stays on the node.
    assert all(e["reason"] for e in journal)


def test_a_good_run_config_is_accepted(world: World, client: SandboxClient) -> None:
    """Negative control of the two tests above: the same calls, well formed."""
    reply = client.hello(run_context(world.provider().context(NODE)), 1)
    assert reply.nonce
    assert reply.node_key
    assert reply.result


# -- 4. attestation: no serving without it, and again when it expires --------------------


def test_a_sandbox_the_key_broker_denies_never_serves(own_world: World) -> None:
    world = own_world
    path, ws = world.node.socket_path(), world.deployment.provider
    with serving(world.node):  # negative control: allowed, it serves
        assert path.is_socket()
    assert not path.exists()
    world.deny_all_nodes()
    with pytest.raises(KeyReleaseDenied, match="NODE_NOT_ALLOWED"), serving(world.node):
        pass
    assert not path.exists(), "a sandbox that was denied its key created its socket"
    kinds = [e["kind"] for e in JsonlEventSink(ws.events).read()]
    assert kinds[-1] == "key_denied"
    assert kinds.count("key_released") == 1  # the negative control's


def test_an_expired_attestation_is_renewed_and_a_failed_renewal_drops_the_model(
    own_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = own_world
    ws = world.deployment.provider
    real_now = node_sandbox._now
    with serving(world.node) as path:
        sandbox = SandboxClient(path)
        provider = world.provider()
        provider.admit(sandbox, NODE)
        sandbox.train(provider.instruction(NODE, 1))
        first = sandbox.status()
        assert first.attested
        assert key_releases(ws) == 1

        # The result the model was released on has expired: the next request attests again.
        later = dt.datetime.fromtimestamp(first.expires_at, dt.UTC) + dt.timedelta(seconds=1)
        monkeypatch.setattr(node_sandbox, "_now", lambda: max(later, real_now()))
        sandbox.train(provider.instruction(NODE, 2))
        second = sandbox.status()
        assert key_releases(ws) == 2
        assert second.attested
        assert second.result_sha256 != first.result_sha256

        # It expires again, and now the key broker denies the node: refused, model dropped.
        world.deny_all_nodes()
        later = dt.datetime.fromtimestamp(second.expires_at, dt.UTC) + dt.timedelta(seconds=1)
        seen = len(journal_of(world.node))
        with raw_channel(path) as channel:
            error = rpc_error(
                lambda: pb_grpc.NodeSandboxStub(channel).Train(provider.instruction(NODE, 3))
            )
        assert_fixed(error, grpc.StatusCode.FAILED_PRECONDITION, NodeReason.KEY_RELEASE_DENIED)
        assert kinds_after(world.node, seen) == [("clientapp_failed", "key-release-denied")]
        dropped = sandbox.status()
        assert not dropped.attested
        assert not dropped.result_sha256
        assert key_releases(ws) == 2
        sandbox.close()


# -- 5. the ClientApp is a ciphertext shuttle --------------------------------------------


class AuditedClientApp:
    """The node's real ClientApp in a fresh process (tests/clientapp_audit.py) that
    records every path each call opens."""

    def __init__(self, config: Path):
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.clientapp_audit", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        self.imported: list[str] = self._read()["imported"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the ClientApp process exited ({self.proc.wait(10)})"
        return dict(json.loads(line))

    def call(self, kind: str, content: RecordDict, provider: Provider, rnd: int) -> dict[str, Any]:
        """The ClientApp's answer to one instruction, its ``content`` decoded."""
        assert self.proc.stdin is not None
        request = {
            "type": kind,
            "round": rnd,
            "run_id": provider.aggregator.run_id,
            "run_config": provider.spec.to_run_config(),
            "content": encode_records(content),
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "content" in answer:
            answer["content"] = decode_records(answer["content"])
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


def test_the_clientapp_imports_no_model_code_and_opens_only_its_node_config(
    world: World, served: Path
) -> None:
    config = world.node.source
    assert config is not None
    provider = world.provider(RUN + 2)
    clientapp = AuditedClientApp(config)
    try:
        assert clientapp.imported == []
        hello = clientapp.call(MessageType.QUERY, provider.aggregator_hello(1), provider, 1)
        peer = provider.aggregator.admit(NODE, hello["content"][HELLO_KEY])
        provider.peers[NODE] = peer
        train = clientapp.call(
            MessageType.TRAIN,
            provider.aggregator.instruction(peer, 1, world.adapter, STAGE_TRAIN),
            provider,
            1,
        )
        tensors, _ = provider.aggregator.open_update(peer, sealed_blob(train["content"]), 1)
        assert tensors
        evaluate = clientapp.call(
            MessageType.EVALUATE,
            provider.aggregator.instruction(peer, 1, world.adapter, STAGE_EVALUATE),
            provider,
            1,
        )
        assert evaluate["content"][METRICS_KEY]["num-examples"] > 0
    finally:
        clientapp.close()
    sandbox = world.node.require_sandbox()
    for answer in (hello, train, evaluate):
        assert answer["imported"] == []  # nor did any call load them
        opened = set(answer["opened"])
        # The hook sees what the handlers open: each call reads the node config.
        assert str(config) in opened
        private = {world.node.data_path, sandbox.package, world.node.journal_path, config.parent}
        assert not {path for path in opened if Path(path) in private}
        assert not [path for path in opened if not shuttle_may_open(path, config)], answer
    # The egress guard checks a hello against the provider's public result key.
    assert str(sandbox.result_key) in hello["opened"]


def shuttle_may_open(path: str, config: Path) -> bool:
    """The node config; the provider's public result key the node config names (the
    egress guard checks a hello's result with it); the process's own start time in
    /proc (the journal's fixed-cost timing); and Python modules imported on first use."""
    node = NodeConfig.load(config)
    if path in (str(config), str(node.require_sandbox().result_key)):
        return True
    if path.startswith("/proc/") and path.endswith("stat"):
        return True
    code = (Path(sys.prefix), Path(sys.base_prefix))
    return any(Path(path).is_relative_to(root) for root in code)


# -- 7. nothing of the model, the adapter or the channel key is left on disk -------------


def _adapter_windows(*adapters: Adapter) -> list[bytes]:
    """Windows of every adapter tensor's raw bytes (LoRA B starts as zeros: skipped)."""
    return [
        window
        for adapter in adapters
        for name, tensor in sorted(adapter.items())
        if tensor.nbytes >= 2 * 64
        for window in byte_windows(np.ascontiguousarray(tensor).tobytes(), count=4, seed=len(name))
    ]


def test_after_a_run_and_inference_no_node_file_holds_weights_adapter_or_channel_key(
    own_world: World, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handshake, a training round, the final evaluation (the adapters are stored) and an
    inference session on the real sandbox; then every file of the node's workspace, its
    temporary files included, is searched for 64-byte windows of the plaintext base
    weights, of every adapter tensor that went in or out, and for the run's channel
    private key."""
    node = own_world.node
    assert node.source is not None
    workspace = node.source.parent
    scratch = workspace / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    sandbox = NodeSandbox(node)
    with serving(node, sandbox) as path:
        client = SandboxClient(path)
        provider = own_world.provider()
        peer = provider.admit(client, NODE)
        reply = client.train(provider.instruction(NODE, 1))
        update, _ = provider.aggregator.open_update(peer, reply.sealed_update, 1)
        client.evaluate(provider.instruction(NODE, 1, STAGE_EVALUATE))
        client.close()
        with InferenceClient.for_node(node) as api:
            predictions = api.classify(["pole down near the river", "billing question"])
        assert len(predictions["predictions"]) == 2
        channel_key = sandbox.channels[RUN].key.private_bytes()
    assert stored_runs(node.socket_path().parent / "adapters") == [RUN]
    adapter = _adapter_windows(own_world.adapter, update)
    weights = weight_windows(tiny_bert_dir)
    # The detector finds each kind where it is in the clear.
    clear = tmp_path / "clear"
    clear.mkdir()
    save_file(dict(update), str(clear / "update.safetensors"))
    (clear / "channel.key").write_bytes(channel_key)
    assert files_holding(adapter, [clear]) == [str(clear / "update.safetensors")]
    assert files_holding([channel_key], [clear]) == [str(clear / "channel.key")]
    assert files_holding(weights, [tiny_bert_dir]) == [str(tiny_bert_dir / "model.safetensors")]
    assert len(adapter) >= 8
    assert len(weights) >= 100
    leftovers = files_holding([*weights, *adapter, channel_key], [workspace])
    assert leftovers == [], leftovers


class _WaitClock:
    """Frozen time for a sandbox waiting on its key broker: each pause advances it, and
    ``on_pause`` runs after the pause it is given (e.g. the broker comes back)."""

    def __init__(self, on_pause: Callable[[int], None] = lambda count: None):
        self.now = 0.0
        self.pauses: list[float] = []
        self.on_pause = on_pause

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        self.on_pause(len(self.pauses))


def test_a_sandbox_waits_for_a_key_broker_that_is_down_then_serves(
    own_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world = own_world
    world.broker.stop()
    time = _WaitClock(lambda count: world.broker.start() if count == 2 else None)
    sandbox = NodeSandbox(world.node)
    with caplog.at_level(logging.WARNING, logger="ark.sandbox"):
        sandbox.start(broker_wait=60, sleep=time.sleep, clock=time.clock)
    assert sandbox.attestation is not None
    assert time.pauses == [BROKER_RETRY_SECONDS, BROKER_RETRY_SECONDS]
    said = [r.getMessage() for r in caplog.records if BROKER_RETRY in r.getMessage()]
    assert len(said) == 2
    assert "attempt 1" in said[0]
    assert str(world.node.require_sandbox().key_broker) in said[0]


def test_a_sandbox_gives_up_on_the_key_broker_after_its_wait(own_world: World) -> None:
    world = own_world
    world.broker.stop()
    time = _WaitClock()
    with pytest.raises(KeyBrokerUnavailable):
        NodeSandbox(world.node).start(broker_wait=7, sleep=time.sleep, clock=time.clock)
    assert time.pauses == [3.0, 3.0, 1.0]
    with pytest.raises(KeyBrokerUnavailable):  # no wait asked: one attempt only
        NodeSandbox(world.node).start(sleep=time.sleep, clock=time.clock)
    assert len(time.pauses) == 3


def test_a_key_release_denial_is_not_waited_out(own_world: World) -> None:
    world = own_world
    world.deny_all_nodes()
    time = _WaitClock()
    with pytest.raises(KeyReleaseDenied):
        NodeSandbox(world.node).start(broker_wait=60, sleep=time.sleep, clock=time.clock)
    assert time.pauses == []
