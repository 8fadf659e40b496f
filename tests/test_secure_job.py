"""Secure aggregation end to end in one process: the real SecureJob (the ServerApp's
stages) and the real aggregator sandbox against three real, attested node sandboxes,
with the real key broker over TLS on loopback. Only Flower's transport is replaced: a
Grid that hands each message to its node's sandbox and records every reply the ServerApp
receives (``tests/sandboxgrid.py``), so a test can search all of it for any node's true
update.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from clients.sandbox import NodeSandbox, SecAggResult
from sandbox import events
from sandbox.attestation.result import (
    PURPOSE_SIGNING,
    SIGNING_SUITE,
    ResultContext,
    ResultSigner,
)
from sandbox.attestation.verifier import Appraisal
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import SecAggFailed
from sandbox.events import MemoryEventSink
from sandbox.events import node as node_events
from sandbox.journal import read_journal
from sandbox.lora import is_trained
from sandbox.protocol import (
    NUM_EXAMPLES,
    SEALED_KEY,
    SECAGG_KEY,
    SECAGG_PAYLOAD,
    SECAGG_STAGE,
    round_of,
    secagg_record,
)
from sandbox.secagg import (
    MASKED_TENSOR,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    Advertisement,
    Quantization,
    flatten,
)
from server.checkpoint import CheckpointStore
from server.sandbox import sealed_blob
from server.secure_job import SecureJob
from tests.conftest import make_spec
from tests.sandboxgrid import (
    LABELS,
    SandboxGrid,
    World,
    events_of,
    listed,
    provisioned,
    serverapp_identity,
    stage_of,
    start_job,
)

NODES = ("alpine", "coastal", "desert")
RUN_ID = 91
# Flower node ids are random unsigned 64-bit.
NODE_IDS = {"alpine": 2**63 + 11, "coastal": 7_000_000_000_000_003, "desert": 41}


class RecordingSandbox(NodeSandbox):
    """A real node sandbox that also keeps, for the test only, the true update of each
    round it masks (what must never reach the aggregator)."""

    def __init__(self, node: NodeConfig):
        super().__init__(node)
        self.true_updates: dict[int, dict[str, np.ndarray]] = {}
        self.true_weights: dict[int, float] = {}

    def _masked(self, secure: Any, request: Any) -> SecAggResult:
        trained = secure.training.result()
        names = sorted(trained.update)
        rnd, spec = secure.request.round, secure.request.spec
        self.true_updates[rnd] = {
            n: trained.update[n] - trained.exchange.accepted.adapter[n] for n in names
        }
        cap = float(spec.max_examples_per_update)
        self.true_weights[rnd] = min(trained.metrics[NUM_EXAMPLES], cap) / cap
        return super()._masked(secure, request)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> Iterator[World[RecordingSandbox]]:
    """A provisioned provider with its key broker on loopback and three attested nodes."""
    root = tmp_path_factory.mktemp("secure")
    with provisioned(root, tiny_bert_dir, NODES) as deployment:
        sandboxes = {}
        for name in NODES:
            sandbox = RecordingSandbox(NodeConfig.load(deployment.node_configs[name]))
            sandbox.start()
            sandboxes[NODE_IDS[name]] = sandbox
        yield World(deployment, tiny_bert_dir, root, sandboxes)


@pytest.fixture(autouse=True)
def identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is its own run (the sandboxes keep per-run channels and rounds)."""
    global RUN_ID
    RUN_ID += 1
    serverapp_identity(monkeypatch, RUN_ID)


def _job(
    world: World[RecordingSandbox], tmp_path: Path, **overrides: Any
) -> tuple[SecureJob, SandboxGrid, MemoryEventSink]:
    values: dict[str, Any] = {
        "job_id": f"secure-{RUN_ID}",  # each test its own job: a node sums one input once
        "labels": LABELS,
        "model_id": "tiny",
        "local_steps": 2,
        "num_rounds": 1,
        "mode": "ffa+secagg",
        "min_nodes": 2,
        "expected_nodes": 3,
        "round_timeout": 60.0,
        "output_dir": tmp_path / "job",
    }
    values.update(overrides)
    return start_job(world, make_spec(world.model_dir, **values), RUN_ID, SecureJob)


def _committed_delta(spec: RunSpec) -> dict[str, np.ndarray]:
    """What the committed round-1 adapter moved from the initial one (trained tensors)."""
    store = CheckpointStore(spec.output_dir / "checkpoints")  # type: ignore[operator]
    before, after = (load_file(store.adapter_path(r)) for r in (0, 1))
    return {n: after[n] - before[n] for n in after if is_trained(n, spec.lora_mode)}


def _plain_mean(
    world: World[RecordingSandbox], nodes: Iterable[int], rnd: int
) -> tuple[dict[str, np.ndarray], float]:
    """The plaintext weighted mean of ``nodes``' true updates, and their summed weight."""
    total: dict[str, np.ndarray] = {}
    weight = 0.0
    for node_id in nodes:
        sandbox = world.sandboxes[node_id]
        w = sandbox.true_weights[rnd]
        for n, v in sandbox.true_updates[rnd].items():
            total[n] = total.get(n, np.zeros(v.shape)) + w * v.astype(np.float64)
        weight += w
    return {n: v / weight for n, v in total.items()}, weight


def _journal(world: World[RecordingSandbox], node_id: int) -> list[dict[str, Any]]:
    return read_journal(world.sandboxes[node_id].node.journal_path)  # type: ignore[arg-type]


def _revealed(world: World[RecordingSandbox], node_id: int, run: int) -> list[dict[str, Any]]:
    return [
        e
        for e in _journal(world, node_id)
        if e.get("kind") == node_events.SecaggRevealed.kind and e.get("run_id") == run
    ]


def _masked_inputs(job: SecureJob, grid: SandboxGrid) -> dict[int, np.ndarray]:
    """Every masked input the ServerApp received, opened as the aggregator opens it."""
    opened: dict[int, np.ndarray] = {}
    peers = job.sealed.peers
    for reply in grid.received:
        if not reply.has_content() or SEALED_KEY not in reply.content.config_records:
            continue
        node_id = reply.metadata.src_node_id
        tensors, _ = job.sealed.sandbox.open_update(peers[node_id], sealed_blob(reply.content), 1)
        opened[node_id] = tensors[MASKED_TENSOR]
    return opened


def test_the_aggregator_receives_no_update_and_commits_their_weighted_mean(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """FFA with secure aggregation: nothing the ServerApp receives holds any node's update
    (not its float bytes, not its quantized values), and the committed adapter moved by
    the plaintext weighted mean of the true updates, within the quantization's bound."""
    job, grid, sink = _job(world, tmp_path)
    job.run()
    deltas = _committed_delta(job.spec)
    expected, weight = _plain_mean(world, world.sandboxes, 1)
    protocol_bound = events_of(sink, events.SecaggUnmasked)[0]
    assert protocol_bound.dropped == []
    assert sorted(listed(protocol_bound.survivors)) == sorted(NODE_IDS.values())
    quantization = Quantization(job.spec.secagg_clip, 3)
    magnitude = max(float(np.abs(v).max()) for v in expected.values())
    bound = quantization.bound(3, weight, magnitude) + 1e-7  # the float32 checkpoint's rounding
    for name, value in expected.items():
        assert np.abs(deltas[name] - value).max() <= bound, name
    assert max(float(np.abs(v).max()) for v in expected.values()) > 100 * bound  # it trained
    # Every byte the ServerApp received: no float32 run of any node's update is in it.
    received = b"".join(
        bytes(v)
        for reply in grid.received
        for record in reply.content.config_records.values()
        for v in record.values()
        if isinstance(v, bytes)
    )
    assert not any(reply.content.array_records for reply in grid.received)
    for sandbox in world.sandboxes.values():
        for value in sandbox.true_updates[1].values():
            flat = value.astype(np.float32).ravel()
            nonzero = flat[flat != 0]
            if nonzero.size >= 4:  # a run of four values: 16 bytes no mask would repeat
                assert nonzero[:4].tobytes() not in received
    # Opened as the aggregator opens them, the masked inputs look nothing like the true
    # quantized updates: a random uint32 matches a value with chance 2^-32.
    masked = _masked_inputs(job, grid)
    assert set(masked) == set(world.sandboxes)
    for node_id, vector in masked.items():
        sandbox = world.sandboxes[node_id]
        names = sorted(sandbox.true_updates[1])
        true = quantization.encode(flatten(sandbox.true_updates[1], names), sandbox.true_weights[1])
        assert vector.shape == true.shape
        assert np.mean(vector == true) < 0.01
    # The log names each stage's nodes; every node revealed seeds only, no key shares.
    stages = {e.stage: listed(e.nodes) for e in events_of(sink, events.SecaggStage)}
    assert sorted(stages[STAGE_SHARE]) == sorted(stages[STAGE_MASK]) == sorted(NODE_IDS.values())
    assert not events_of(sink, events.UpdateAccepted)
    for node_id in world.sandboxes:
        (revealed,) = _revealed(world, node_id, job.run_id)
        assert revealed["keys_of"] == []


def test_a_node_lost_after_sharing_keys_leaves_the_survivors_aggregate(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """Dropout: one node stops answering after the share stage; the round completes with
    the other two, the committed adapter equals their plaintext weighted mean, and the
    survivors revealed the lost node's masking key share only."""
    job, grid, sink = _job(world, tmp_path)
    lost = NODE_IDS["coastal"]

    def stop_after_sharing(
        stage: str, node: int, msg: Message, reply: Message | None
    ) -> Message | None:
        return None if node == lost and stage in (STAGE_MASK, STAGE_UNMASK) else reply

    grid.hook = stop_after_sharing
    job.run()
    survivors = [n for n in world.sandboxes if n != lost]
    (unmasked,) = events_of(sink, events.SecaggUnmasked)
    assert unmasked.dropped == [lost]
    assert sorted(listed(unmasked.survivors)) == sorted(survivors)
    expected, weight = _plain_mean(world, survivors, 1)
    deltas = _committed_delta(job.spec)
    magnitude = max(float(np.abs(v).max()) for v in expected.values())
    bound = Quantization(job.spec.secagg_clip, 3).bound(2, weight, magnitude) + 1e-7
    for name, value in expected.items():
        assert np.abs(deltas[name] - value).max() <= bound, name
    for node_id in survivors:
        (revealed,) = _revealed(world, node_id, job.run_id)
        assert revealed["keys_of"] == [lost]
        assert lost not in revealed["seeds_of"]


def test_a_masked_input_replayed_into_the_next_round_is_refused(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """A node's round-1 masked input, replayed as its round-2 answer, does not open for
    round 2 (the envelope binds the round): it is refused and logged, the node counts as
    dropped, and round 2 completes with the other two."""
    job, grid, sink = _job(world, tmp_path, num_rounds=2)
    victim = NODE_IDS["desert"]
    first: dict[str, Message] = {}

    def replay(stage: str, node: int, msg: Message, reply: Message | None) -> Message | None:
        if stage != STAGE_MASK or node != victim or reply is None:
            return reply
        rnd = round_of(msg.content)
        if rnd == 1:
            first["reply"] = reply
            return reply
        return Message(first["reply"].content, reply_to=msg)

    grid.hook = replay
    job.run()
    rejected = [e for e in events_of(sink, events.UpdateRejected) if e.round == 2]
    assert [e.node for e in rejected] == [victim]
    unmasked = {e.round: e for e in events_of(sink, events.SecaggUnmasked)}
    assert unmasked[1].dropped == []
    assert unmasked[2].dropped == [victim]
    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1, 2]


def _forged_advert(world: World[RecordingSandbox], node_id: int, rnd: int, run: int) -> bytes:
    """Keys for ``node_id`` signed by a key the verifier never certified: its
    certification is signed by another result key (a verifier the nodes do not trust)."""
    key = Ed25519PrivateKey.generate()
    other = ResultSigner(ec.generate_private_key(ec.SECP256R1()), {"developer": "forger"})
    now = dt.datetime.now(dt.UTC)
    sandbox = world.sandboxes[node_id]
    claims = {"ueid": sandbox.node.require_sandbox().ueid, "measurements": {}}
    result = other.affirm(
        Appraisal(claims, "stub", "p", now),
        ResultContext(
            "s", "stub", key.public_key().public_bytes_raw(), SIGNING_SUITE, "e", "p", "d",
            PURPOSE_SIGNING,
        ),
        now=now,
    )  # fmt: skip
    advert = Advertisement.sign(
        key,
        result.token,
        run=run,
        rnd=rnd,
        node=node_id,
        c_pk=bytes(range(32)),
        s_pk=bytes(range(1, 33)),
        seed_commitment=bytes(32),
    )
    return advert.to_bytes()


def test_keys_not_signed_by_an_attested_identity_are_left_out(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """An advertisement whose signing key the key broker never certified (the aggregator
    or a man in the middle substituting keys) is refused and logged; the round goes on
    with the two attested nodes, and they never mask with the forged keys."""
    job, grid, sink = _job(world, tmp_path)
    victim = NODE_IDS["alpine"]

    def forge(stage: str, node: int, msg: Message, reply: Message | None) -> Message | None:
        if stage == MessageType.TRAIN and node == victim:
            payload = _forged_advert(world, node, 1, job.run_id)
            return Message(RecordDict({SECAGG_KEY: secagg_record(payload)}), reply_to=msg)
        return reply

    grid.hook = forge
    job.run()
    refused = [e for e in events_of(sink, events.NodeRefused) if e.node == victim]
    assert refused
    assert "not signed by an attested identity" in refused[0].reason
    (advertised,) = events_of(sink, events.SecaggAdvertised)
    assert victim not in [n.node for n in listed(advertised.nodes)]
    (unmasked,) = events_of(sink, events.SecaggUnmasked)
    assert victim not in listed(unmasked.survivors)
    assert len(listed(unmasked.survivors)) == 2


def test_a_node_refuses_a_share_request_carrying_forged_keys(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """A hostile aggregator that puts forged keys into the share request: every honest
    node refuses to seal shares (nothing of its seed or key leaves)."""
    job, _, _ = _job(world, tmp_path)
    victim = NODE_IDS["coastal"]

    class Substituting(SandboxGrid):
        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            out = []
            for msg in messages:
                record = msg.content.config_records.get(SECAGG_KEY)
                if record is not None and record[SECAGG_STAGE] == STAGE_SHARE:
                    request = json.loads(bytes(record[SECAGG_PAYLOAD]))  # type: ignore[arg-type]
                    forged = json.loads(_forged_advert(world, victim, 1, job.run_id))
                    request["adverts"] = [
                        forged if a["node"] == victim else a for a in request["adverts"]
                    ]
                    record[SECAGG_PAYLOAD] = json.dumps(request, separators=(",", ":")).encode()
                out.append(msg)
            return super().push_messages(out)

    hostile = Substituting(dict(world.sandboxes), job.spec, job.run_id)
    job.grid = hostile
    with pytest.raises(SecAggFailed):
        job.run()
    payloads = [
        r.content.config_records[SECAGG_KEY][SECAGG_PAYLOAD]
        for r in hostile.received
        if r.has_content() and SECAGG_KEY in r.content.config_records
    ]
    assert not [p for p in payloads if isinstance(p, bytes) and b'"stage":"share"' in p]
    errors = [r for r in hostile.received if r.has_error()]
    assert len(errors) >= 2


def test_fewer_survivors_than_the_threshold_fail_closed(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """Two of three nodes lost after sharing: the round fails closed. No unmask request
    is sent, no node reveals anything, nothing is committed."""
    job, grid, sink = _job(world, tmp_path)
    lost = {NODE_IDS["coastal"], NODE_IDS["desert"]}

    def stop(stage: str, node: int, msg: Message, reply: Message | None) -> Message | None:
        return None if node in lost and stage == STAGE_MASK else reply

    grid.hook = stop
    with pytest.raises(SecAggFailed, match="fewer than the threshold"):
        job.run()
    assert not [m for m in grid.sent if stage_of(m) == STAGE_UNMASK]
    assert not events_of(sink, events.SecaggUnmasked)
    assert not events_of(sink, events.AggregateCommitted)
    for node_id in world.sandboxes:
        assert not _revealed(world, node_id, job.run_id)


class AskingTwice(SecureJob):
    """A hostile aggregator: after the honest unmask stage it asks one survivor again, now
    naming another survivor as dropped (its masking key's share would unmask it)."""

    target: int = 0
    victim: int = 0
    answers: ClassVar[list[Message]] = []

    def unmask(self, state: Any) -> None:
        protocol = self._secure[state.round].protocol
        super().unmask(state)
        request = protocol.unmask_request()
        survivors = tuple(n for n in request.survivors if n != self.victim)
        forged = dataclasses.replace(request, survivors=survivors, dropped=(self.victim,))
        both = dataclasses.replace(request, dropped=(self.victim,))
        for payload in (forged.to_bytes(), both.to_bytes()):
            message = self._query(state.round, self.target, STAGE_UNMASK, payload)
            for _, reply in self._call().replies([message]):
                self.answers.append(reply)


def test_a_survivor_refuses_to_reveal_the_key_share_of_a_node_that_did_not_drop(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """The aggregator, holding every masked input, asks a survivor for the masking-key
    share of another survivor (once as a second unmask request, once naming it both
    surviving and dropped): refused both times, and the node's journal shows it revealed
    once, seed shares only."""
    job, grid, sink = _job(world, tmp_path)
    hostile = AskingTwice(
        grid, job.spec, sandbox=job.sealed.sandbox, events=sink, run_id=job.run_id,
        sleep=lambda _: None,
    )  # fmt: skip
    hostile.target, hostile.victim = NODE_IDS["alpine"], NODE_IDS["desert"]
    hostile.answers.clear()
    hostile.run()
    assert len(hostile.answers) == 2
    assert all(answer.has_error() for answer in hostile.answers)
    (revealed,) = _revealed(world, hostile.target, job.run_id)
    assert revealed["keys_of"] == []
    assert NODE_IDS["desert"] in revealed["seeds_of"]


def test_an_update_that_could_overflow_the_sum_is_refused_in_the_sandbox(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """A clip range too small for the updates: every node's sandbox refuses to quantize
    (the sum could overflow), nothing masked leaves, and the round fails closed."""
    job, grid, sink = _job(world, tmp_path, secagg_clip=1e-6)
    with pytest.raises(SecAggFailed):
        job.run()
    mask_replies = [
        r for r in grid.received if r.has_content() and SEALED_KEY in r.content.config_records
    ]
    assert mask_replies == []
    assert not events_of(sink, events.AggregateCommitted)


def test_a_node_adds_its_update_on_one_input_to_one_sum_only(
    world: World[RecordingSandbox], tmp_path: Path
) -> None:
    """The same job run again in a new run (the same config, round and global adapter):
    every node trained again, with randomness of its own (another update than the first
    run's), and refuses to mask it, so two sums of one input, whose difference could be
    one node's update, never exist. Nothing is committed."""
    job, _, sink = _job(world, tmp_path / "first")
    job.run()
    first = {n: s.true_updates[1] for n, s in world.sandboxes.items()}
    global RUN_ID
    RUN_ID += 1
    TaskIdentity._run_id = RUN_ID  # the second run's
    again, grid, sink = _job(world, tmp_path / "again", job_id=job.spec.job_id)
    with pytest.raises(SecAggFailed):
        again.run()
    assert not events_of(sink, events.AggregateCommitted)
    refused = [r for r in grid.received if r.has_error()]
    assert len(refused) == len(world.sandboxes)
    assert not [m for m in grid.sent if stage_of(m) == STAGE_UNMASK]
    for node_id, sandbox in world.sandboxes.items():
        name = sorted(first[node_id])[-1]
        assert not np.array_equal(sandbox.true_updates[1][name], first[node_id][name])
        assert len(_revealed(world, node_id, again.run_id)) == 0
