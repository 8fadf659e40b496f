"""Provider and node provisioning, the ``ark provider``/``ark node`` commands, and the
ClientApp's one way to a model: attest, receive the key, unseal in memory.

The key broker here is the real one, served over gRPC with TLS on loopback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from clients.aggregator import load_aggregator_policy, verify_aggregator
from clients.model import attest_for_key, load_base_model
from sandbox.attestation.backends import VerifierRegistry, load_attester
from sandbox.attestation.measure import AGGREGATOR_PACKAGES, CodeScope, code_measurement
from sandbox.attestation.result import (
    AFFIRMING,
    CONTRAINDICATED,
    NONE,
    WARNING,
    status_of,
)
from sandbox.attestation.verifier import AppraisalPolicy
from sandbox.config import NodeConfig
from sandbox.errors import (
    ConfigError,
    KeyReleaseDenied,
    MeasurementRejected,
    NodeNotAllowed,
    NonceMismatch,
    SealedModelError,
    TeeNotAccepted,
)
from sandbox.events import JsonlEventSink, KeyDenied, KeyReleased, SentDigest
from sandbox.keyfiles import load_ed25519_public, write_private
from sandbox.models import inspect_model_dir, load_pretrained
from sandbox.ops.cli import app
from sandbox.ops.federation import Federation, free_port
from sandbox.ops.provision import (
    LoopbackDeployment,
    ProviderWorkspace,
    init_aggregator,
    init_node,
    init_provider,
    provision_loopback,
    save_policy,
    write_policy,
)
from sandbox.seal.envelope import RecipientKey
from sandbox.seal.package import MANIFEST, SIGNATURE, read_manifest
from sandbox.translog.note import NoteVerifier, verify_checkpoint
from sandbox.translog.store import LogStore
from tests.conftest import make_spec, serve_key_broker, served_deployment
from tests.test_seal import forge_plain_file

runner = CliRunner()


def _flat(output: str) -> str:
    """Command output with rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture
def deployment(tmp_path: Path, tiny_bert_dir: Path) -> Iterator[LoopbackDeployment]:
    """A provisioned provider and two nodes, with the key broker serving on loopback."""
    data = {}
    for name in ("alpine", "coastal"):
        data[name] = tmp_path / f"{name}.jsonl"
        data[name].write_text('{"text": "t", "label": "a"}\n', encoding="utf-8")
    with served_deployment(tmp_path, tiny_bert_dir, data, model_id="tiny") as (deployed, _):
        yield deployed


def test_node_gets_the_exact_weights_only_through_attestation(
    deployment: LoopbackDeployment, tiny_bert_dir: Path
) -> None:
    node = NodeConfig.load(deployment.node_configs["alpine"])
    spec = make_spec(tiny_bert_dir, model_id="tiny")
    model, _, info, result = load_base_model(spec, node)
    assert result is not None
    assert result.status == AFFIRMING
    assert result.is_stub
    assert info.model_type == "bert"
    reference, _ = load_pretrained(inspect_model_dir(tiny_bert_dir, spec.task), num_labels=3)
    ours, theirs = model.state_dict(), reference.state_dict()
    shared = [k for k in theirs if "classifier" not in k]
    assert shared
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    kinds = [e["kind"] for e in JsonlEventSink(deployment.provider.events).read()]
    assert kinds == ["model_published", "attestation_appraised", "key_released"]


def test_node_without_a_sandbox_table_cannot_load_a_model(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "n"\ndata-path = "d.jsonl"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"node\.toml: key 'node\.sandbox'.*only through"):
        load_base_model(make_spec(tiny_bert_dir), NodeConfig.load(path))


def test_run_for_another_model_is_refused_before_attesting(
    deployment: LoopbackDeployment, tiny_bert_dir: Path
) -> None:
    node = NodeConfig.load(deployment.node_configs["alpine"])
    with pytest.raises(Exception, match="holds model 'tiny', the run wants 'other'"):
        load_base_model(make_spec(tiny_bert_dir, model_id="other"), node)
    assert [e["kind"] for e in JsonlEventSink(deployment.provider.events).read()] == [
        "model_published"
    ]


def _edit_policy(ws: ProviderWorkspace, change: Callable[[dict[str, Any]], object]) -> None:
    """Change the ``[policy]`` table of the workspace's policy file, as an operator would."""
    raw = tomllib.loads(ws.policy.read_text(encoding="utf-8"))
    change(raw["policy"])
    save_policy(ws.policy, raw)


def test_node_removed_from_the_allowlist_is_denied(
    deployment: LoopbackDeployment, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    ws = deployment.provider
    _edit_policy(
        ws,
        lambda p: p.update(
            {
                "allowed-nodes": [
                    n if not n.startswith("alpine") else "someone-else" for n in p["allowed-nodes"]
                ]
            }
        ),
    )
    port = free_port()
    server = serve_key_broker(ws, port)
    try:
        config = deployment.node_configs["alpine"]
        config.write_text(
            config.read_text(encoding="utf-8").replace(deployment.key_broker, f"localhost:{port}"),
            encoding="utf-8",
        )
        with pytest.raises(KeyReleaseDenied, match="NODE_NOT_ALLOWED"):
            load_base_model(make_spec(tiny_bert_dir), NodeConfig.load(config))
    finally:
        server.stop(grace=None)
    assert JsonlEventSink(ws.events).read()[-1]["kind"] == "key_denied"


def test_ark_node_attest_prints_the_result_without_loading_the_model(
    deployment: LoopbackDeployment,
) -> None:
    config = deployment.node_configs["coastal"]
    result = runner.invoke(app, ["node", "attest", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "status: affirming (STUB TEE" in _flat(result.output)
    assert "discarded without loading the model" in _flat(result.output)


def test_ark_provider_commands(tmp_path: Path, tiny_bert_dir: Path) -> None:
    provider = tmp_path / "provider"
    assert runner.invoke(app, ["provider", "init", "--workdir", str(provider)]).exit_code == 0
    again = runner.invoke(app, ["provider", "init", "--workdir", str(provider)])
    assert again.exit_code == 2
    assert "refusing to replace its keys" in _flat(again.output)
    ws = ProviderWorkspace(provider)
    assert ws.signing_key.stat().st_mode & 0o777 == 0o600
    policy = AppraisalPolicy.load(ws.policy)
    assert policy.reference_values["code"] == {code_measurement()}
    assert policy.allowed_nodes == frozenset()

    sealed = tmp_path / "sealed"
    result = runner.invoke(
        app,
        ["provider", "seal", str(tiny_bert_dir), "--out", str(sealed), "--workdir", str(provider)],
    )
    assert result.exit_code == 0, result.output
    assert not (sealed / "model.safetensors").exists()
    result = runner.invoke(
        app, ["provider", "check-package", str(sealed), "--workdir", str(provider)]
    )
    assert result.exit_code == 0, result.output
    assert "signature and every digest verified" in _flat(result.output)

    data = bytearray((sealed / "model.safetensors.sealed").read_bytes())
    data[-1] ^= 1
    (sealed / "model.safetensors.sealed").write_bytes(bytes(data))
    result = runner.invoke(
        app, ["provider", "check-package", str(sealed), "--workdir", str(provider)]
    )
    assert result.exit_code == 2
    assert "model.safetensors.sealed: ciphertext digest or size does not match" in _flat(
        result.output
    )

    result = runner.invoke(app, ["provider", "allow-node", "node-1", "--workdir", str(provider)])
    assert result.exit_code == 0, result.output
    assert AppraisalPolicy.load(ws.policy).allowed_nodes == frozenset({"node-1"})


def test_check_package_refuses_a_validly_signed_plain_weight_file(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    provider = tmp_path / "provider"
    assert runner.invoke(app, ["provider", "init", "--workdir", str(provider)]).exit_code == 0
    sealed = tmp_path / "sealed"
    seal = ["provider", "seal", str(tiny_bert_dir), "--out", str(sealed), "--workdir"]
    assert runner.invoke(app, [*seal, str(provider)]).exit_code == 0
    signer = ProviderWorkspace(provider).signer()
    forge_plain_file(sealed, signer, "pytorch_model.bin", b"plaintext weights")
    signer.public_key().verify((sealed / SIGNATURE).read_bytes(), (sealed / MANIFEST).read_bytes())
    result = runner.invoke(
        app, ["provider", "check-package", str(sealed), "--workdir", str(provider)]
    )
    assert result.exit_code == 2
    assert "manifest.json: lists 'pytorch_model.bin' in plain" in _flat(result.output)


def test_node_refuses_a_validly_signed_plain_weight_file_before_attesting(
    deployment: LoopbackDeployment, tiny_bert_dir: Path
) -> None:
    forge_plain_file(
        deployment.package, deployment.provider.signer(), "pytorch_model.bin", b"weights"
    )
    node = NodeConfig.load(deployment.node_configs["alpine"])
    with pytest.raises(SealedModelError, match=r"lists 'pytorch_model\.bin' in plain"):
        load_base_model(make_spec(tiny_bert_dir, model_id="tiny"), node)
    # No attestation, so no content key: the package was never opened, nothing was written.
    assert [e["kind"] for e in JsonlEventSink(deployment.provider.events).read()] == [
        "model_published"
    ]


def test_commands_outside_a_provider_workspace_name_the_folder(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["provider", "check-package", str(tmp_path), "--workdir", str(tmp_path / "nope")]
    )
    assert result.exit_code == 2
    assert "nope: not a provider workspace" in _flat(result.output)


def test_code_measurement_follows_the_code(tmp_path: Path) -> None:
    package = tmp_path / "measured_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.invalidate_caches()
        scope = CodeScope(include=("measured_pkg/**/*.py",), exclude=())
        before = code_measurement(["measured_pkg"], scope)
        assert code_measurement(["measured_pkg"], scope) == before
        (package / "__init__.py").write_text("VALUE = 2\n", encoding="utf-8")
        assert code_measurement(["measured_pkg"], scope) != before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("measured_pkg", None)


@pytest.mark.parametrize(
    ("vector", "status"),
    [
        ({"a": 2, "b": 2}, AFFIRMING),
        ({"a": 2, "b": 32}, WARNING),
        ({"a": 32, "b": 96}, CONTRAINDICATED),
        ({"a": 0, "b": 0}, NONE),
        ({}, NONE),
    ],
)
def test_status_is_the_worst_tier(vector: dict[str, int], status: str) -> None:
    assert status_of(vector) == status


def test_unregistered_tee_kinds_are_refused() -> None:
    with pytest.raises(TeeNotAccepted, match="no verifier backend for TEE kind 'tdx'"):
        VerifierRegistry({}).appraise(
            "tdx",
            "token",
            nonce=bytes(32),
            tee_pubkey=b"k",
            policy=AppraisalPolicy("p", frozenset(), False, {}),
            now=dt.datetime.now(dt.UTC),
        )
    with pytest.raises(ConfigError, match="no attester backend for TEE kind 'sev-snp'"):
        load_attester("sev-snp", Path("k"), Path("c"), "u")


def test_policy_allowlist_and_advisory_values_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    base = '[policy]\nid = "p/1"\naccepted-tees = ["stub"]\n'
    path.write_text(base + 'allowed-nodes = "node-1"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'policy\.allowed-nodes'.*'node-1'"):
        AppraisalPolicy.load(path)
    path.write_text(base + '[policy.advisory-values]\nconfig = ["xyz"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'policy\.advisory-values\.config'"):
        AppraisalPolicy.load(path)


def test_event_sink_appends_and_reads_back(tmp_path: Path) -> None:
    sink = JsonlEventSink(tmp_path / "events.jsonl")
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    request: dict[str, SentDigest] = {}
    sink.emit(
        KeyDenied(
            time=now, request=request, client="c", code="NONCE_MISMATCH", cause="x", ear_sha256=None
        )
    )
    sink.emit(
        KeyReleased(
            time=now,
            session="s",
            key_id="k",
            model_id="m",
            ueid=None,
            ear_sha256="e",
            tee_pubkey_sha256="t",
        )
    )
    assert [e["kind"] for e in sink.read()] == ["key_denied", "key_released"]
    assert sink.read()[0]["time"] == now.isoformat()


def test_ark_provider_serve_applies_allow_node_without_a_restart(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    """The real `ark provider serve` process: deny, allow the node, release, stop cleanly."""
    data = tmp_path / "n.jsonl"
    data.write_text('{"text": "t", "label": "a"}\n', encoding="utf-8")
    port = free_port()
    deployed = provision_loopback(
        tmp_path, model_dir=tiny_bert_dir, node_data={"alpine": data}, key_broker_port=port
    )
    ws = deployed.provider
    node = NodeConfig.load(deployed.node_configs["alpine"])
    ueid = node.require_sandbox().ueid
    _edit_policy(ws, lambda p: p["allowed-nodes"].remove(ueid))
    federation = Federation(tmp_path)
    try:
        federation.start_key_broker(port)
        with pytest.raises(KeyReleaseDenied, match="NODE_NOT_ALLOWED"):
            attest_for_key(node, _key_id(node))
        assert (
            runner.invoke(
                app, ["provider", "allow-node", ueid, "--workdir", str(ws.root)]
            ).exit_code
            == 0
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                released = attest_for_key(node, _key_id(node))
                break
            except KeyReleaseDenied:
                assert time.monotonic() < deadline, "the policy was never reloaded"
                time.sleep(0.5)
        assert released.result.status == AFFIRMING
    finally:
        assert federation.stop() == []
    log = (tmp_path / "logs" / "key-broker.log").read_text(encoding="utf-8")
    assert "policy reloaded" in log
    assert "key broker and log stopped" in log
    kinds = [e["kind"] for e in JsonlEventSink(ws.events).read()]
    assert kinds[:3] == ["model_published", "attestation_appraised", "key_denied"]
    assert kinds[-1] == "key_released"
    # The same events, in the same order, are in the transparency log, and the broker
    # signed a checkpoint of all of them on its way out.
    store = LogStore(ws.log_db, readonly=True)
    logged = [json.loads(entry)["kind"] for entry in store.entries(0, store.size())]
    assert logged == kinds
    checkpoint = verify_checkpoint(
        store.checkpoint(), NoteVerifier.from_vkey(ws.log_vkey.read_text())
    )
    assert checkpoint.size == len(kinds)
    assert checkpoint.root == store.root()


def _key_id(node: NodeConfig) -> str:
    sandbox = node.require_sandbox()
    return str(read_manifest(sandbox.package, load_ed25519_public(sandbox.manifest_key))["key_id"])


def test_allow_node_keeps_every_other_policy_key(tmp_path: Path) -> None:
    from sandbox.ops.provision import allow_node, init_provider

    ws = init_provider(tmp_path / "provider")

    def widen(policy: dict[str, Any]) -> None:
        policy["accepted-tees"].append("tdx")
        policy["reference-values"]["config"] = ["cd" * 32]
        policy["advisory-values"] = {"code": ["ef" * 32]}

    _edit_policy(ws, widen)
    before = AppraisalPolicy.load(ws.policy)
    after = allow_node(ws, "node-9")
    assert after.allowed_nodes == frozenset({"node-9"})
    assert after.accepted_tees == before.accepted_tees == frozenset({"stub", "tdx"})
    assert after.reference_values == before.reference_values
    assert set(after.reference_values) == {"code", "config"}
    assert after.advisory_values == before.advisory_values != {}
    assert after.policy_id == before.policy_id
    assert after.digest != before.digest
    assert not list(ws.policy.parent.glob(".policy.toml.*")), "staging file left behind"


@dataclasses.dataclass
class _Aggregator:
    attester: Any
    key: RecipientKey


def _aggregator(deployment: LoopbackDeployment) -> _Aggregator:
    identity = deployment.provider.aggregator
    attester = load_attester(
        "stub",
        identity / "key.pem",
        identity / "chain.pem",
        (identity / "ueid").read_text(encoding="utf-8").strip(),
    )
    return _Aggregator(attester, RecipientKey.generate())


def test_node_verifies_the_provisioned_aggregator_with_its_own_policy(
    deployment: LoopbackDeployment,
) -> None:
    node = NodeConfig.load(deployment.node_configs["alpine"])
    aggregator = _aggregator(deployment)
    nonce = bytes(range(32))
    now = dt.datetime.now(dt.UTC)
    approved = code_measurement(AGGREGATOR_PACKAGES)

    def evidence(attester: Any, code: str) -> str:
        return str(
            attester.evidence(
                nonce=nonce,
                tee_pubkey=aggregator.key.public_bytes,
                measurements={"code": code},
                now=now,
            )
        )

    def verify(token: str, node_nonce: bytes = nonce) -> Any:
        return verify_aggregator(
            node,
            tee="stub",
            evidence=token,
            aggregator_key=aggregator.key.public_bytes,
            nonce=node_nonce,
            now=now,
        )

    assert verify(evidence(aggregator.attester, approved)).is_stub
    # A ServerApp that is not the reviewed code, and evidence over a stale nonce, fail.
    with pytest.raises(MeasurementRejected):
        verify(evidence(aggregator.attester, "00" * 32))
    with pytest.raises(NonceMismatch):
        verify(evidence(aggregator.attester, approved), node_nonce=bytes(32))
    # Another attested instance (say, a node's key) is not the pinned aggregator.
    sandbox = node.require_sandbox()
    impostor = load_attester(
        "stub", sandbox.attestation_key, sandbox.attestation_chain, sandbox.ueid
    )
    with pytest.raises(NodeNotAllowed):
        verify(evidence(impostor, approved))


def _init_node(tmp_path: Path, ws: ProviderWorkspace) -> Path:
    return init_node(
        tmp_path / "node",
        name="alpine",
        data_path=tmp_path / "d.jsonl",
        manufacturer=tmp_path / "manufacturer",
        provider_public=ws.public,
        key_broker="localhost:1",
        package=tmp_path / "package",
    )


def test_node_init_always_pins_the_aggregator_and_the_node_refuses_a_policy_without_it(
    tmp_path: Path,
) -> None:
    ws = init_provider(tmp_path / "provider")
    # A bundle with no aggregator identity left the node's policy open to any TEE.
    with pytest.raises(ConfigError, match="aggregator-ueid: cannot read the aggregator's ueid"):
        _init_node(tmp_path, ws)
    assert not (tmp_path / "node").exists(), "nothing is written before the check"
    ueid = init_aggregator(ws, tmp_path / "manufacturer")
    node = NodeConfig.load(_init_node(tmp_path, ws))
    policy_path = node.require_sandbox().aggregator_policy
    assert policy_path is not None
    assert load_aggregator_policy(policy_path).allowed_nodes == frozenset({ueid})
    unpinned_policies: tuple[list[str] | None, ...] = (None, [])
    for unpinned in unpinned_policies:
        write_policy(
            policy_path,
            policy_id="p",
            code_digests=["00" * 32],
            allow_stub=True,
            allowed_nodes=unpinned,
        )
        with pytest.raises(ConfigError, match=r"key 'policy\.allowed-nodes': must pin") as raised:
            verify_aggregator(
                node,
                tee="stub",
                evidence="",
                aggregator_key=b"",
                nonce=b"",
                now=dt.datetime.now(dt.UTC),
            )
        assert raised.value.path == policy_path


def test_write_private_replaces_a_symlink_and_never_writes_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    target = tmp_path / "keys" / "server.key"
    target.parent.mkdir()
    target.symlink_to(victim)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_private(target, b"key")
    write_private(target, b"key", overwrite=True)
    assert not target.is_symlink()
    assert target.read_bytes() == b"key"
    assert victim.read_bytes() == b"not yours", "the symlink was followed"
    target.chmod(0o644)  # an older, looser file is replaced, not reused
    write_private(target, b"new key", overwrite=True)
    assert (target.read_bytes(), target.stat().st_mode & 0o777) == (b"new key", 0o600)
    assert sorted(p.name for p in target.parent.iterdir()) == ["server.key"]
