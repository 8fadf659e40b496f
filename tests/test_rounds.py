"""Rounds over a simulated Flower Grid: aggregation, FFA, deadlines, rejections, resume.

``SimulatedGrid`` implements flwr's abstract ``Grid``; each simulated node answers as
its behaviour says, so failures are staged by changing the grid's state, and a fake
clock stands in for time so no test sleeps through a deadline.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from clients.channel import Channels, open_channel
from clients.channels import Accepted, PlaintextChannel, RunIds, SealedAccepted, SealedChannel
from clients.egress import failure_reason
from clients.model import certify_channel
from sandbox.attestation.result import PURPOSE_CHANNEL, ResultContext
from sandbox.attestation.verifier import Appraisal
from sandbox.channel import (
    EXAMPLES,
    STAGE_TRAIN,
    TICKET,
    UPLINK,
    ChannelContext,
    model_dir_digest,
    seal_tensors,
)
from sandbox.config import MODE_FEDAVG, MODE_FFA, PROTECTION_OFF, NodeConfig, RunSpec
from sandbox.errors import (
    AggregateInvalid,
    AggregatorRefused,
    AttestationError,
    CheckpointError,
    EnvelopeError,
    FederationError,
)
from sandbox.events import JOB_EVENTS_FILE as EVENTS_FILE
from sandbox.events import Event, JsonlEventSink, MemoryEventSink
from sandbox.keyfiles import load_ed25519_public
from sandbox.lora import is_trained
from sandbox.ops.demo_data import write_demo_data
from sandbox.ops.keybroker.broker import KeyBroker
from sandbox.ops.keybroker.inprocess import InProcessTransport
from sandbox.ops.provision import LoopbackDeployment, build_broker, provision_loopback
from sandbox.protocol import (
    CONFIG_KEY,
    GLOBAL_KEY,
    HELLO_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    NUM_EXAMPLES,
    ROUND_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    metric_record,
    round_of,
    stage_of,
    to_record,
)
from sandbox.reasons import NodeReason
from sandbox.seal.envelope import SUITE_X25519, RecipientKey
from sandbox.seal.package import read_manifest
from sandbox.translog.store import LogSink, LogStore
from server.aggregation import CAP_BOUND, HELD_BOUND, StreamingAggregator, Weight
from server.app import FederatedJob, _add_held_out
from server.checkpoint import CheckpointStore
from server.history import RoundRecord
from server.results import RESULTS_FILE
from server.rounds import PULL_BATCH, PUSH_BATCH, Outbox, RoundCall, wait_for_nodes
from server.sandbox import AggregatorSandbox
from server.scratch import ScratchMap
from tests.conftest import make_spec

Adapter = dict[str, np.ndarray]
TIMEOUT = 30.0
RUN_ID = 7
TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE
SHIFT = 0.05  # what a "shift" node adds to one tensor of its update
# A private training row that a hostile node tries to get into the provider's records.
PRIVATE_ROW = "ticket 4417: tree down on line 4 at Alpe Rossa, call Anna 079 555 01 23"
TRACES = [part.encode() for part in (PRIVATE_ROW, "Alpe Rossa", "079 555")]
# "Alpe" as a tensor shape: what a rejection reason that quoted shapes would show.
SHAPE_TEXT = tuple(b"Alpe")


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process identity Flower's ServerApp runtime sets before ``main`` runs."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@dataclass
class FakeClock:
    """Monotonic time that only moves when someone sleeps."""

    now: float = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def accuracy(node_id: int, global_round: int) -> float:
    """The held-out accuracy a node reports for the global adapter of ``global_round``."""
    return 0.5 + 0.1 * global_round + 0.01 * node_id


@dataclass
class SealedWorld:
    """A provisioned provider, its in-process key broker, and node workspaces.

    The broker is the real one (``build_broker``), only called without gRPC; simulated
    nodes get their channel keys certified by it through the ClientApp's own code
    (``certify_channel``) over the in-process transport.
    """

    deployment: LoopbackDeployment
    broker: KeyBroker
    configs: dict[int, NodeConfig]
    key_id: str
    model_digest: str

    def certify(self, node: NodeConfig) -> Callable[[RecipientKey], str]:
        """What a ClientApp certifies its channel key with, over the in-process broker."""
        transport = InProcessTransport(self.broker)
        return lambda key: certify_channel(node, self.key_id, key, transport=transport)

    def sandbox(self, **changes: Any) -> AggregatorSandbox:
        """The provider's aggregator sandbox for RUN_ID (``changes`` stage an attack)."""
        loaded = AggregatorSandbox.load(
            self.deployment.provider.aggregator, run_id=RUN_ID, model_digest=self.model_digest
        )
        return dataclasses.replace(loaded, **changes)


@pytest.fixture(scope="module")
def world(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SealedWorld:
    root = tmp_path_factory.mktemp("sealed-world")
    data = write_demo_data(root / "data", 5, rows_per_node=10, seed=1)
    deployment = provision_loopback(
        root, model_dir=tiny_bert_dir, node_data=data, key_broker_port=1
    )
    broker = build_broker(deployment.provider, MemoryEventSink())
    configs = {
        i: NodeConfig.load(path) for i, path in enumerate(deployment.node_configs.values(), 1)
    }
    signing = load_ed25519_public(deployment.provider.public / "signing.pub")
    manifest = read_manifest(deployment.package, signing)
    return SealedWorld(
        deployment, broker, configs, manifest["key_id"], model_dir_digest(tiny_bert_dir)
    )


# Node behaviours that attack the channel (sealed runs) or the update itself.
# Those that forge the update's envelope seal it themselves; every other node replies
# through the real client channel (clients/channels.py).
FORGED_SEALS = frozenset(
    {"forged-ticket", "replay", "wrong-key", "other-run", "other-model", "extra-tensor"}
)


@dataclass
class SimNode:
    """A ClientApp stand-in that records what it received and what it sent.

    Given a node config (sealed runs) it speaks the real protocol through
    ``clients/channel.py``: hello, aggregator check, downlink, sealed uplink.
    """

    node_id: int
    behaviour: str = "ok"
    examples: float = 10.0
    delay: int = 0  # pulls before the reply becomes visible
    online_at: float = 0.0
    plan: dict[int, str] = field(default_factory=dict)  # round -> behaviour override
    received: list[tuple[str, int, Adapter]] = field(default_factory=list)
    sent: list[Adapter] = field(default_factory=list)
    world: SealedWorld | None = None
    envelopes: list[bytes] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    hellos: dict[int, ConfigRecord] = field(default_factory=dict)  # shared by the grid
    counts: dict[int, float] = field(default_factory=dict)  # round -> examples it declares
    tee_of: int | None = None  # a Sybil: runs in this node's TEE (its key, so its ueid)
    workspace: Path | None = None  # the Sybil's own workspace
    channels: Channels = field(default_factory=dict)  # its sandbox's in-memory channel keys

    @property
    def config(self) -> NodeConfig:
        assert self.world is not None
        if self.tee_of is None:
            return self.world.configs[self.node_id]
        assert self.workspace is not None
        own = self.world.configs[self.tee_of]
        return dataclasses.replace(own, source=self.workspace / "node.toml")

    def count(self, rnd: int) -> float:
        """The example count this node declares in round ``rnd``."""
        return self.counts.get(rnd, self.examples)

    def hello(self, msg: Message) -> Message:
        assert self.world is not None
        if self.behaviour == "impostor":  # presents node 1's certified key and nonce as its own
            record = self.hellos[1]
        else:
            _, record = open_channel(
                self.config, RUN_ID, self.world.certify(self.config), self.channels
            )
            self.hellos[self.node_id] = record
        return Message(RecordDict({HELLO_KEY: record}), reply_to=msg)

    def _context(self, rnd: int, direction: str, stage: str, **changes: Any) -> ChannelContext:
        assert self.world is not None
        values = {
            "run_id": str(RUN_ID),
            "round": rnd,
            "node_id": str(self.node_id),
            "model_digest": self.world.model_digest,
            "direction": direction,
            "stage": stage,
            **changes,
        }
        return ChannelContext(**values)

    def _open(self, msg: Message, rnd: int, behaviour: str) -> Accepted:
        """The instruction as a ClientApp accepts it, over the node's real update channel."""
        ids, stage = RunIds(RUN_ID, self.node_id), stage_of(msg.metadata.message_type)
        if GLOBAL_KEY in msg.content:
            return PlaintextChannel().accept(msg.content, ids, stage, rnd)
        if behaviour == "rekey":  # the node started a fresh channel; the aggregator did not
            open_channel(self.config, RUN_ID, self.world.certify(self.config), self.channels)  # type: ignore[union-attr]
        return SealedChannel(self.config, self.channels).accept(msg.content, ids, stage, rnd)

    def _seal(
        self, update: Adapter, accepted: Accepted, rnd: int, behaviour: str
    ) -> dict[str, Any]:
        """The update as it leaves: through the channel, unless ``behaviour`` forges it."""
        if behaviour not in FORGED_SEALS or not isinstance(accepted, SealedAccepted):
            records = accepted.reply(update, self.count(rnd))
            if SEALED_KEY in records:
                self.envelopes.append(records[SEALED_KEY][SEALED_UPDATE_KEY])  # type: ignore[arg-type]
            return records
        aggregator, ticket = accepted.aggregator, accepted.ticket
        key, context = aggregator.public_key, self._context(rnd, UPLINK, STAGE_TRAIN)
        if behaviour == "forged-ticket":  # sealed without having opened the downlink
            ticket = "0" * 32
        if behaviour == "replay" and self.envelopes:
            return {SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: self.envelopes[0]})}
        if behaviour == "wrong-key":
            key = RecipientKey.generate(aggregator.suite).public_key()
        elif behaviour == "other-run":
            context = self._context(rnd, UPLINK, STAGE_TRAIN, run_id=str(RUN_ID + 1))
        elif behaviour == "other-model":
            context = self._context(rnd, UPLINK, STAGE_TRAIN, model_digest="0" * 64)
        metadata = {TICKET: ticket, EXAMPLES: repr(float(self.count(rnd)))}
        blob = seal_tensors(update, key, context, suite=aggregator.suite, metadata=metadata)
        self.envelopes.append(blob)
        return {SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: blob})}

    def answer(self, msg: Message, mode: str) -> Message | None:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return self.hello(msg)
        rnd = round_of(msg.content)
        behaviour = self.plan.get(rnd, self.behaviour)
        try:
            accepted = self._open(msg, rnd, behaviour)
        except AggregatorRefused as exc:  # what the node's egress guard sends for it
            self.refusals.append(str(exc))
            return Message(failure_reason(exc).error(), reply_to=msg)
        adapter = accepted.adapter
        self.received.append((kind, rnd, adapter))
        if behaviour == "silent":
            return None
        if behaviour == "error":  # the app's error reply, as the egress guard lets it out
            return Message(NodeReason.CLIENTAPP_ERROR.error(), reply_to=msg)
        if kind == MessageType.EVALUATE:
            metrics = {NUM_EXAMPLES: self.examples, "before-accuracy": accuracy(self.node_id, rnd)}
            return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)
        rng = np.random.default_rng([self.node_id, rnd])
        update = {
            name: (value + rng.normal(scale=0.01, size=value.shape)).astype(value.dtype)
            for name, value in adapter.items()
            if is_trained(name, mode)
        }
        first = sorted(update)[0]
        if behaviour == "nan":
            update[first] = np.full_like(update[first], np.nan)
        elif behaviour == "inf":
            update[first] = np.full_like(update[first], np.inf)
        elif behaviour == "shift":  # pulls the aggregate its way, within the norm bound
            update[first] = update[first] + np.float32(SHIFT)
        elif behaviour == "norm":
            update[first] = update[first] + 1e4
        elif behaviour == "wrong-shape":
            update[first] = np.zeros((update[first].size + 1,), dtype=update[first].dtype)
        elif behaviour == "extra-tensor":
            update["base_model.model.smuggled.lora_B.weight"] = np.zeros((2, 2), np.float32)
        elif behaviour == "shape-text":  # an empty tensor whose shape spells out bytes
            update[first] = np.zeros((0, *SHAPE_TEXT), dtype=update[first].dtype)
        self.sent.append(update)
        metrics = {
            # "inflate": a relay (or the node) claims more examples than the sealed count
            NUM_EXAMPLES: self.count(rnd) * (1000 if behaviour == "inflate" else 1),
            "before-accuracy": accuracy(self.node_id, rnd - 1),
            "before-macro_f1": 0.4,
            "after-accuracy": accuracy(self.node_id, rnd) + 0.05,
            "after-macro_f1": 0.45,
            "train-loss": 1.0 / rnd,
        }
        if behaviour == "metric-text":  # metric names the provider never asked for
            metrics.update({f"before-{PRIVATE_ROW}": 1.0, f"after-{PRIVATE_ROW}": 1.0})
            metrics[PRIVATE_ROW] = 1.0
        content = RecordDict(
            {
                **self._seal(update, accepted, rnd, behaviour),
                METRICS_KEY: metric_record(metrics),
            }
        )
        return Message(content, reply_to=msg)


class SimulatedGrid(Grid):
    """The Grid interface over in-process nodes; replies queue up until pulled."""

    def __init__(
        self,
        nodes: Iterable[SimNode],
        clock: FakeClock,
        mode: str = MODE_FEDAVG,
        world: SealedWorld | None = None,
    ):
        self.nodes = {node.node_id: node for node in nodes}
        self.world = world
        hellos: dict[int, ConfigRecord] = {}
        for node in self.nodes.values():
            node.world = world
            node.hellos = hellos
        self.time = clock
        self.mode = mode
        self.pulls = 0
        self._run = Run.create_empty(run_id=RUN_ID)
        self._outbox: dict[str, tuple[int, Message]] = {}  # message id -> (pulls left, reply)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def _online(self, node: SimNode) -> bool:
        return node.behaviour != "offline" and node.online_at <= self.time.now

    def get_node_ids(self) -> Iterable[int]:
        return [n.node_id for n in self.nodes.values() if self._online(n)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            if msg.metadata.reply_to_message_id or msg.metadata.message_id:
                raise ValueError(f"not a fresh instruction message: {msg.metadata}")
            node = self.nodes.get(msg.metadata.dst_node_id)
            if node is None or not self._online(node):
                ids.append("")  # what HttpGrid reports (None) for a message it cannot store
                continue
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            reply = node.answer(msg, self.mode)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                self._outbox[msg.metadata.message_id] = (node.delay, reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        ready = []
        for message_id in message_ids:
            if message_id not in self._outbox:
                continue
            left, reply = self._outbox[message_id]
            if left <= 0:
                ready.append(self._outbox.pop(message_id)[1])
            else:
                self._outbox[message_id] = (left - 1, reply)
        return ready

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = {i for i in self.push_messages(messages) if i}
        deadline = self.time.now + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending and (timeout is None or self.time.now < deadline):
            batch = list(self.pull_messages(sorted(pending)))
            replies.extend(batch)
            pending -= {r.metadata.reply_to_message_id for r in batch}
            self.time.sleep(0.1)
        return replies


def _job(
    grid: SimulatedGrid, spec: RunSpec, sandbox: AggregatorSandbox | None = None
) -> FederatedJob:
    """A sealed job when the grid's nodes live in a SealedWorld, else protection off."""
    if grid.world is not None and sandbox is None:
        sandbox = grid.world.sandbox()
    if sandbox is None:
        spec = dataclasses.replace(spec, protection=PROTECTION_OFF)
    return FederatedJob(grid, spec, sandbox=sandbox, clock=grid.time.clock, sleep=grid.time.sleep)


def _spec(model_dir: Path, out: Path, **overrides: Any) -> RunSpec:
    values: dict[str, Any] = {"num_rounds": 1, "round_timeout": TIMEOUT, "output_dir": out}
    return make_spec(model_dir, **{**values, **overrides})


def _weighted_mean(
    nodes: list[SimNode], index: int = 0, weights: list[float] | None = None
) -> Adapter:
    """sum(w_i * x_i) / sum(w_i) over each node's ``index``-th update, in float64; the
    weights are the nodes' example counts unless given."""
    weighted = np.array([n.examples for n in nodes] if weights is None else weights)
    stacked = {
        name: np.stack([n.sent[index][name] for n in nodes]) for name in nodes[0].sent[index]
    }
    return {name: np.tensordot(weighted, x, 1) / weighted.sum() for name, x in stacked.items()}


def _store(out: Path) -> CheckpointStore:
    return CheckpointStore(out / "checkpoints")


def _checkpoint(out: Path, rnd: int) -> Adapter:
    return load_file(str(_store(out).adapter_path(rnd)))


def _events(out: Path) -> list[dict[str, Any]]:
    """The job's events.jsonl, each line checked to parse as the schema's event."""
    records = JsonlEventSink(out / EVENTS_FILE).read()
    for record in records:
        Event.from_json(record)
    return records


def _results(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / RESULTS_FILE).read_text(encoding="utf-8")))


def test_fedavg_rounds_aggregate_checkpoint_and_report(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    nodes = [SimNode(1, examples=10), SimNode(2, examples=30), SimNode(3, examples=60)]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path, num_rounds=2)).run()

    round0, round1 = _checkpoint(tmp_path, 0), _checkpoint(tmp_path, 1)
    expected = _weighted_mean(nodes)
    assert set(expected) == set(round0)  # fedavg trains (and so averages) every tensor
    for name, value in expected.items():
        np.testing.assert_allclose(round1[name], value, rtol=1e-6, atol=1e-7)
        assert not np.allclose(round1[name], np.mean([n.sent[0][name] for n in nodes], 0))
    for node in nodes:
        assert [(k, r) for k, r, _ in node.received] == [(TRAIN, 1), (TRAIN, 2), (EVALUATE, 2)]
        for name, value in node.received[1][2].items():  # round 2 starts from round 1's global
            np.testing.assert_array_equal(value, round1[name])
    for rnd in range(3):
        assert _store(tmp_path).adapter_path(rnd).is_file()
    results = _results(tmp_path)
    assert [e["round"] for e in results["rounds"]] == [0, 1, 2]
    for entry in results["rounds"]:
        assert entry["nodes"].keys() == {"1", "2", "3"}
        for node in nodes:
            got = entry["nodes"][str(node.node_id)]["accuracy"]
            assert got == pytest.approx(accuracy(node.node_id, entry["round"]))
    assert results["rounds"][1]["examples"] == {"1": 10.0, "2": 30.0, "3": 60.0}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_ffa_keeps_lora_a_frozen_and_nodes_never_send_it(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    nodes = [SimNode(1, examples=5), SimNode(2, examples=15)]
    grid = SimulatedGrid(nodes, FakeClock(), mode=MODE_FFA, world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path, num_rounds=2, mode=MODE_FFA)).run()

    round0 = _checkpoint(tmp_path, 0)
    frozen = [name for name in round0 if ".lora_A." in name]
    assert frozen
    for rnd in (1, 2):
        adapter = _checkpoint(tmp_path, rnd)
        for name in frozen:
            np.testing.assert_array_equal(adapter[name], round0[name])
        assert any(not np.array_equal(adapter[n], round0[n]) for n in adapter if ".lora_B." in n)
    for node in nodes:
        assert len(node.sent) == 2
        assert all(frozen[0] in adapter for _, _, adapter in node.received)
        for update in node.sent:
            assert not [name for name in update if ".lora_A." in name]
            assert any(".lora_B." in name for name in update)


def test_silent_node_is_missing_and_round_closes_at_deadline(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    nodes = [SimNode(1), SimNode(2, examples=20), SimNode(3, behaviour="silent")]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path)).run()

    assert grid.time.now >= TIMEOUT
    entry = _results(tmp_path)["rounds"][1]
    assert entry["missing"] == [3]
    assert entry["examples"] == {"1": 10.0, "2": 20.0}
    for name, value in _weighted_mean(nodes[:2]).items():
        np.testing.assert_allclose(_checkpoint(tmp_path, 1)[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("error", "clientapp-error"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("norm", "more than the bound"),
        ("wrong-shape", "shape"),
        ("extra-tensor", "1 not in the adapter"),
        ("wrong-key", "did not open"),
        ("other-run", "did not open"),
        ("other-model", "did not open"),
        ("forged-ticket", "ticket"),
        ("inflate", "the sealed update says 1000"),
    ],
)
def test_bad_update_is_rejected_recorded_and_left_out(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld, behaviour: str, reason: str
):
    """Each attack on the update or its envelope: left out of the aggregate, recorded."""
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    grid = SimulatedGrid(
        [*good, SimNode(3, behaviour=behaviour, examples=1000)], FakeClock(), world=world
    )
    _job(grid, _spec(tiny_bert_dir, tmp_path)).run()

    entry = _results(tmp_path)["rounds"][1]
    assert list(entry["rejected"]) == ["3"]
    assert reason in entry["rejected"]["3"]
    assert entry["missing"] == []
    assert entry["examples"] == {"1": 10.0, "2": 30.0}
    round1 = _checkpoint(tmp_path, 1)
    for name, value in _weighted_mean(good).items():
        np.testing.assert_allclose(round1[name], value, rtol=1e-6, atol=1e-7)
    recorded = [e for e in _events(tmp_path) if e.get("node") == 3 and e.get("round") == 1]
    expected_kind = "node_declined" if behaviour == "error" else "update_rejected"
    assert recorded
    assert recorded[0]["kind"] == expected_kind  # the training round's record
    assert reason in recorded[0]["reason"]
    accepted = {e["node"] for e in _events(tmp_path) if e["kind"] == "update_accepted"}
    assert accepted == {1, 2}
    # A name the node chose (it could hold a private row) is counted, never recorded.
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"smuggled" not in path.read_bytes(), path


def test_a_node_presenting_another_nodes_certified_key_is_not_admitted(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """A key belongs to the first node that presents it; node 3's copy comes later.

    (Had the copy come first, the impostor would be admitted in node 1's place, but it
    could still never open an instruction, so no update of its would be accepted.)
    """
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    impostor = SimNode(3, behaviour="impostor", delay=1)
    grid = SimulatedGrid([*good, impostor], FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path)).run()

    refused = [e for e in _events(tmp_path) if e["kind"] == "node_refused"]
    assert {e["node"] for e in refused} == {3}  # at the round and again at evaluation
    assert all("another node's certified channel key" in e["reason"] for e in refused)
    assert grid.nodes[3].received == []  # never sent an instruction
    for name, value in _weighted_mean(good).items():
        np.testing.assert_allclose(_checkpoint(tmp_path, 1)[name], value, rtol=1e-6, atol=1e-7)


def test_update_replayed_into_the_next_round_is_rejected(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    replayer = SimNode(3, examples=1000, plan={2: "replay"})
    grid = SimulatedGrid([*good, replayer], FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path, num_rounds=2)).run()

    rounds = _results(tmp_path)["rounds"]
    assert "3" in rounds[1]["examples"]  # its honest round-1 update counted
    assert "did not open" in rounds[2]["rejected"]["3"]
    round2 = _checkpoint(tmp_path, 2)
    for name, value in _weighted_mean(good, index=1).items():
        np.testing.assert_allclose(round2[name], value, rtol=1e-6, atol=1e-7)
    rejected = [e for e in _events(tmp_path) if e["kind"] == "update_rejected"]
    assert [(e["round"], e["node"]) for e in rejected] == [(2, 3)]
    # The replayed envelope is byte for byte the one accepted in round 1.
    first = [e for e in _events(tmp_path) if e["kind"] == "update_accepted" and e["node"] == 3]
    assert rejected[0]["envelope_sha256"] == first[0]["envelope_sha256"]


def test_nodes_refuse_an_aggregator_whose_code_is_not_approved(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    nodes = [SimNode(1), SimNode(2)]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    rogue = world.sandbox(measurements={"code": "ab" * 32})
    with pytest.raises(FederationError, match="only 0 accepted updates"):
        _job(grid, _spec(tiny_bert_dir, tmp_path), sandbox=rogue).run()

    assert not _store(tmp_path).adapter_path(1).exists()
    for node in nodes:
        assert node.received == []  # never opened the global adapter
        assert node.sent == []  # never trained
        assert len(node.refusals) == 1
        assert "MeasurementRejected" in node.refusals[0]
    declined = [e for e in _events(tmp_path) if e["kind"] == "node_declined"]
    assert sorted(e["node"] for e in declined) == [1, 2]
    assert all(e["reason"] == "aggregator-refused" for e in declined)


def test_node_refuses_aggregator_evidence_over_a_stale_nonce(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Node 3 starts a fresh channel (new nonce) after its hello; the aggregator still
    presents evidence over the old nonce, so node 3 refuses until it shakes hands again."""
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    node = SimNode(3, examples=1000, plan={1: "rekey"})
    grid = SimulatedGrid([*good, node], FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path, num_rounds=2)).run()

    assert len(node.refusals) == 1
    assert "NonceMismatch" in node.refusals[0]
    rounds = _results(tmp_path)["rounds"]
    assert rounds[1]["rejected"]["3"] == "node error: aggregator-refused"
    for name, value in _weighted_mean(good).items():
        np.testing.assert_allclose(_checkpoint(tmp_path, 1)[name], value, rtol=1e-6, atol=1e-7)
    # Declining dropped the node's channel; round 2 began with a fresh hello, and it took part.
    admitted = [e["node"] for e in _events(tmp_path) if e["kind"] == "node_admitted"]
    assert admitted.count(3) == 2
    assert "3" in rounds[2]["examples"]


def test_too_few_accepted_updates_fails_the_round(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    nodes = [SimNode(1), SimNode(2, behaviour="error"), SimNode(3, behaviour="nan")]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    with pytest.raises(FederationError, match="only 1 accepted updates, min-nodes is 2"):
        _job(grid, _spec(tiny_bert_dir, tmp_path)).run()
    assert not _store(tmp_path).adapter_path(1).exists()


def test_too_few_online_nodes_fails_after_timeout(tiny_bert_dir: Path, tmp_path: Path):
    grid = SimulatedGrid([SimNode(1), SimNode(2, behaviour="offline")], FakeClock())
    with pytest.raises(FederationError, match="fewer than min-nodes=2"):
        _job(grid, _spec(tiny_bert_dir, tmp_path)).run()
    assert grid.time.now >= TIMEOUT
    assert grid.nodes[1].received == []


def test_wait_for_nodes_expected_minimum_and_below_minimum():
    clock = FakeClock()
    grid = SimulatedGrid([SimNode(1), SimNode(2), SimNode(3, online_at=5.0)], clock)
    args: dict[str, Any] = {"timeout": TIMEOUT, "clock": clock.clock, "sleep": clock.sleep}
    assert wait_for_nodes(grid, minimum=2, expected=3, **args) == [1, 2, 3]
    assert clock.now == 5.0

    clock.now = 0.0
    grid.nodes[3].online_at = 1000.0
    assert wait_for_nodes(grid, minimum=2, expected=3, **args) == [1, 2]
    assert clock.now == pytest.approx(TIMEOUT)

    clock.now = 0.0
    grid.nodes[2].behaviour = "offline"
    assert wait_for_nodes(grid, minimum=2, expected=3, **args) == []
    assert clock.now == pytest.approx(TIMEOUT)


def test_resume_replays_nothing_before_the_failed_round(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    spec = _spec(tiny_bert_dir, tmp_path, num_rounds=2)
    failing = SimulatedGrid(
        [SimNode(1, plan={2: "silent"}), SimNode(2, plan={2: "silent"})], FakeClock(), world=world
    )
    with pytest.raises(FederationError, match="round 2: only 0 accepted"):
        _job(failing, spec).run()
    store = _store(tmp_path)
    saved = store.adapter_path(1).read_bytes()
    assert not store.adapter_path(2).exists()
    # Round 0's records are final since round 1 committed: in a file of their own, which
    # the resumed job checks before it sends anything.
    records = store.history_path(0)
    kept = records.read_bytes()
    records.write_bytes(kept.replace(b"0.", b"1."))
    untouched = SimulatedGrid([SimNode(1), SimNode(2)], FakeClock(), world=world)
    with pytest.raises(CheckpointError, match=f"{records.name}: digest does not match"):
        _job(untouched, spec).run()
    assert all(node.received == [] for node in untouched.nodes.values())
    records.write_bytes(kept)

    healthy = SimulatedGrid([SimNode(1), SimNode(2, examples=40)], FakeClock(), world=world)
    _job(healthy, spec).run()
    loaded = store.load(spec.fingerprint())
    assert loaded is not None
    assert (set(loaded[0].history.rounds), set(loaded[0].archived)) == ({2}, {0, 1})

    assert store.adapter_path(1).read_bytes() == saved
    round1 = _checkpoint(tmp_path, 1)
    for node in healthy.nodes.values():
        assert [(k, r) for k, r, _ in node.received] == [(TRAIN, 2), (EVALUATE, 2)]
        for name, value in node.received[0][2].items():
            np.testing.assert_array_equal(value, round1[name])
    results = _results(tmp_path)
    assert [set(e["nodes"]) for e in results["rounds"]] == [{"1", "2"}] * 3
    # Node 2 now declares 40 examples; it keeps the weight first accepted from it (10).
    assert results["rounds"][2]["examples"] == {"1": 10.0, "2": 10.0}


# -- one node cannot dominate or break the aggregate ---------------------------------------


def _accepted(out: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The last update_accepted event of each (round, node)."""
    events = _events(out)
    return {(e["round"], e["node"]): e for e in events if e["kind"] == "update_accepted"}


def test_a_node_declaring_a_billion_examples_weighs_no_more_than_the_cap(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Weighted as declared, node 4's 1e9 examples would make the global adapter its own
    update; clipped to max-examples-per-update it weighs as much as the largest honest
    node may. Node 3's count grows after its first accepted update: it keeps its first."""
    honest = [SimNode(1, examples=20), SimNode(2, examples=30), SimNode(3, counts={1: 40, 2: 60})]
    liar = SimNode(4, behaviour="shift", examples=1e9)
    nodes = [*honest, liar]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path, num_rounds=2, max_examples_per_update=60)).run()

    weights = [20.0, 30.0, 40.0, 60.0]
    for rnd in (1, 2):
        for name, value in _weighted_mean(nodes, rnd - 1, weights).items():
            np.testing.assert_allclose(
                _checkpoint(tmp_path, rnd)[name], value, rtol=1e-6, atol=1e-7
            )
    shifted = sorted(liar.sent[0])[0]
    honest_mean = _weighted_mean(honest, 0, weights[:3])[shifted]
    pull = float(np.mean(_checkpoint(tmp_path, 1)[shifted] - honest_mean)) / SHIFT
    assert pull == pytest.approx(60 / 150, abs=0.03)  # weighted as declared: 1.0
    accepted = _accepted(tmp_path)
    for rnd in (1, 2):
        clipped = accepted[(rnd, 4)]
        assert (clipped["examples"], clipped["declared_examples"]) == (60.0, 1e9)
        assert clipped["weight_bound"] == CAP_BOUND
        assert "declared_examples" not in accepted[(rnd, 1)]
    held = accepted[(2, 3)]
    assert (held["examples"], held["declared_examples"], held["weight_bound"]) == (
        40.0,
        60.0,
        HELD_BOUND,
    )
    assert _results(tmp_path)["rounds"][2]["examples"] == {
        "1": 20.0,
        "2": 30.0,
        "3": 40.0,
        "4": 60.0,
    }


def test_counts_at_the_float_limit_neither_poison_the_aggregate_nor_crash_the_job(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """1.7e308 declared examples made the aggregate inf: every later honest update was
    rejected as moving inf from it, and two such nodes crashed the ServerApp's logging."""
    honest = [SimNode(1, examples=10), SimNode(2, examples=30)]
    huge = [SimNode(3, examples=1.7e308), SimNode(4, examples=1.7e308)]
    nodes = [*honest, *huge]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    spec = _spec(tiny_bert_dir, tmp_path, num_rounds=2)
    _job(grid, spec).run()

    cap = float(spec.max_examples_per_update)
    for rnd in (1, 2):
        checkpoint = _checkpoint(tmp_path, rnd)
        for name, value in _weighted_mean(nodes, rnd - 1, [10.0, 30.0, cap, cap]).items():
            assert np.isfinite(checkpoint[name]).all()
            np.testing.assert_allclose(checkpoint[name], value, rtol=1e-6, atol=1e-7)
    rounds = _results(tmp_path)["rounds"]
    assert rounds[2]["rejected"] == {}
    assert rounds[2]["examples"] == {"1": 10.0, "2": 30.0, "3": cap, "4": cap}
    committed = [e["examples"] for e in _events(tmp_path) if e["kind"] == "aggregate_committed"]
    assert committed == [40.0 + 2 * cap] * 2
    assert {e["weight_bound"] for k, e in _accepted(tmp_path).items() if k[1] > 2} == {CAP_BOUND}


class FaultyAggregator(StreamingAggregator):
    """The real aggregator with a fault in its running total, as a flipped bit or an
    arithmetic bug would leave it: it keeps only ``keep`` of each update's weight. Every
    update still passes validation; their aggregate does not."""

    def __init__(self, *args: Any, keep: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep = keep

    def add(
        self, update: Mapping[str, np.ndarray], examples: float, *, held: float | None = None
    ) -> Weight:
        weight = super().add(update, examples, held=held)
        self.total_weight -= weight.used * (1 - self.keep)
        return weight


@pytest.mark.parametrize(("keep", "cause"), [(0.0, "not finite"), (1e-3, "more than the bound")])
def test_a_bad_aggregate_is_never_checkpointed_committed_or_sent(
    tiny_bert_dir: Path,
    tmp_path: Path,
    world: SealedWorld,
    monkeypatch: pytest.MonkeyPatch,
    keep: float,
    cause: str,
):
    faulty = functools.partial(FaultyAggregator, keep=keep)
    monkeypatch.setattr("server.app.StreamingAggregator", faulty)
    nodes = [SimNode(1), SimNode(2, examples=30)]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    spec = _spec(tiny_bert_dir, tmp_path, num_rounds=2)
    with pytest.raises(AggregateInvalid, match=f"round 1: the aggregate of 2 updates .*{cause}"):
        _job(grid, spec).run()

    assert not _store(tmp_path).adapter_path(1).exists()
    loaded = _store(tmp_path).load(spec.fingerprint())
    assert loaded is not None
    assert loaded[0].round == 0
    kinds = [e["kind"] for e in _events(tmp_path)]
    assert kinds.count("update_accepted") == 2  # each update passed
    assert "aggregate_committed" not in kinds
    for node in nodes:  # nothing went out after round 1's instruction
        assert [(k, r) for k, r, _ in node.received] == [(TRAIN, 1)]


def test_a_second_node_with_an_admitted_ueid_is_refused_for_the_whole_run(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Node 4 runs in node 1's TEE (same attestation key, so the same ueid) as another
    Flower node. It comes online once node 1 declined round 1 and holds no channel, and
    shakes hands before node 1 does: the ueid stays node 1's, which takes part again."""
    first = SimNode(1, delay=1, plan={1: "error"})
    sybil = SimNode(4, tee_of=1, workspace=tmp_path / "sybil", online_at=1.0)
    nodes = [first, SimNode(2, examples=30), SimNode(3, examples=20), sybil]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    out = tmp_path / "job"
    _job(grid, _spec(tiny_bert_dir, out, num_rounds=2)).run()

    events = _events(out)
    admitted = [e for e in events if e["kind"] == "node_admitted"]
    assert [e["node"] for e in admitted].count(1) == 2  # again after its decline
    assert 4 not in {e["node"] for e in admitted}
    refused = [e for e in events if e["kind"] == "node_refused"]
    assert [e["node"] for e in refused] == [4, 4]  # at round 2 and at evaluation
    ueid = next(e["ueid"] for e in admitted if e["node"] == 1)
    assert all(ueid in e["reason"] and "as node 1" in e["reason"] for e in refused)
    assert sybil.received == []
    assert [(k, r) for k, r, _ in first.received] == [(TRAIN, 1), (TRAIN, 2), (EVALUATE, 2)]
    assert set(_results(out)["rounds"][2]["examples"]) == {"1", "2", "3"}


def test_a_restarted_serverapp_keeps_each_ueids_node_and_held_weight(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Round 2 fails; a new ServerApp process of the same run (a fresh aggregator sandbox)
    resumes from the checkpoint. Node 4, in node 2's TEE, shakes hands before node 2:
    refused, as before the restart. Node 1 now declares 1e9 examples: it keeps round 1's 10."""
    out = tmp_path / "job"
    spec = _spec(tiny_bert_dir, out, num_rounds=2)
    silent = {2: "silent"}
    failing = SimulatedGrid(
        [SimNode(1), SimNode(2, examples=30, plan=silent), SimNode(3, plan=silent)],
        FakeClock(),
        world=world,
    )
    with pytest.raises(FederationError, match="round 2: only 1 accepted"):
        _job(failing, spec).run()

    liar, late = SimNode(1, examples=1e9), SimNode(2, examples=30, delay=1)
    sybil = SimNode(4, tee_of=2, workspace=tmp_path / "sybil")
    healthy = SimulatedGrid([liar, late, SimNode(3), sybil], FakeClock(), world=world)
    _job(healthy, spec).run()

    assert {e["node"] for e in _events(out) if e["kind"] == "node_refused"} == {4}
    assert sybil.received == []
    assert [(k, r) for k, r, _ in late.received] == [(TRAIN, 2), (EVALUATE, 2)]
    clipped = _accepted(out)[(2, 1)]
    assert (clipped["examples"], clipped["declared_examples"], clipped["weight_bound"]) == (
        10.0,
        1e9,
        HELD_BOUND,
    )
    assert _results(out)["rounds"][2]["examples"] == {"1": 10.0, "2": 30.0, "3": 10.0}


def test_round_call_streams_replies_across_pulls_and_reports_missing():
    clock = FakeClock()
    nodes = [
        SimNode(1, delay=3),
        SimNode(2, delay=0),
        SimNode(3, behaviour="silent"),
        SimNode(4, delay=1),
        SimNode(5, behaviour="offline"),
    ]
    grid = SimulatedGrid(nodes, clock)
    adapter = {"layer.lora_B.weight": np.ones((2, 2), np.float32)}
    content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    messages = [Message(content, n.node_id, MessageType.EVALUATE) for n in nodes]
    call = RoundCall(grid, timeout=10.0, clock=clock.clock, sleep=clock.sleep)

    arrivals = [(node_id, grid.pulls) for node_id, _ in call.replies(messages)]

    assert arrivals == [(2, 1), (4, 2), (1, 4)]
    assert call.missing == {3, 5}
    assert clock.now >= 10.0
    assert [len(n.received) for n in nodes] == [1, 1, 1, 1, 0]


class BatchRecordingGrid(SimulatedGrid):
    """A grid that records how many messages each push and ids each pull carry, and
    hands out, with every pull, a forged reply to an id it never issued and the same
    reply a second time (a replayed reply)."""

    def __init__(self, nodes: Iterable[SimNode], clock: FakeClock):
        super().__init__(nodes, clock)
        self.pushed: list[int] = []
        self.asked: list[int] = []
        self.replayed: Message | None = None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushed.append(len(messages))
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        self.asked.append(len(message_ids))
        ready = list(super().pull_messages(message_ids))
        forged = Message(RecordDict(), reply_to=Message(RecordDict(), 1, MessageType.QUERY))
        forged.metadata.__dict__["_reply_to_message_id"] = str(uuid4())
        replayed = [] if self.replayed is None else [self.replayed]
        impostors = []
        if ready:
            self.replayed = ready[0]
            # A reply to a pending message, from a node it was not sent to.
            impostor = Message(RecordDict(), reply_to=Message(RecordDict(), 999, MessageType.QUERY))
            impostor.metadata.__dict__["_reply_to_message_id"] = ready[
                0
            ].metadata.reply_to_message_id
            impostors.append(impostor)
        return [forged, *replayed, *impostors, *ready]


@pytest.mark.parametrize("spooled", [False, True], ids=["list", "outbox"])
def test_round_call_pushes_and_pulls_in_batches_and_keeps_its_ids_on_disk(
    scratch_root: Path, spooled: bool
) -> None:
    """A round of 251 nodes goes out and comes back in batches (of PUSH_BATCH messages and
    PULL_BATCH ids per call); every node's reply is yielded once, replies to ids the round
    never issued, replies from a node the message was not sent to and replayed replies are
    dropped, and the call's scratch stores (and the
    outbox the instructions were spooled to) are gone after."""
    clock = FakeClock()
    nodes = [SimNode(i, delay=i % 3) for i in range(1, 251)]
    nodes.append(SimNode(251, behaviour="silent"))
    grid = BatchRecordingGrid(nodes, clock)
    adapter = {"layer.lora_B.weight": np.full((2, 2), 0.25, np.float32)}
    content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    messages: Outbox | list[Message] = Outbox() if spooled else []
    for n in nodes:
        message = Message(content, n.node_id, MessageType.EVALUATE, group_id="1")
        messages.add(message) if isinstance(messages, Outbox) else messages.append(message)
    assert len(messages) == 251
    call = RoundCall(grid, timeout=10.0, clock=clock.clock, sleep=clock.sleep)

    answered = [node_id for node_id, _ in call.replies(messages)]

    assert sorted(answered) == list(range(1, 251)), "each node once: nothing forged or replayed"
    assert call.missing == {251}
    assert grid.pushed == [PUSH_BATCH] * (251 // PUSH_BATCH) + [251 % PUSH_BATCH]
    assert max(grid.asked) == PULL_BATCH
    assert len(grid.asked) > 3
    # Each node got its own instruction, as made: type, round, adapter.
    for node in nodes:
        ((kind, rnd, received),) = node.received
        assert (kind, rnd, set(received)) == (MessageType.EVALUATE, 1, set(adapter))
        assert np.array_equal(received["layer.lora_B.weight"], adapter["layer.lora_B.weight"])
    assert not any(scratch_root.iterdir()), "the call's scratch stores are removed"
    if not spooled:
        assert messages == [], "the instructions leave the caller's hands as they are pushed"


class RefusingGrid(SimulatedGrid):
    """A grid whose SuperLink refuses the whole push, as HttpGrid does on HTTP 413."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
        return []


def test_round_call_reports_every_node_missing_when_the_push_is_refused():
    clock = FakeClock()
    nodes = [SimNode(1), SimNode(2)]
    grid = RefusingGrid(nodes, clock)
    adapter = {"layer.lora_B.weight": np.ones((2, 2), np.float32)}
    content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    messages = [Message(content, n.node_id, MessageType.EVALUATE) for n in nodes]
    call = RoundCall(grid, timeout=10.0, clock=clock.clock, sleep=clock.sleep)

    assert list(call.replies(messages)) == []
    assert call.missing == {1, 2}
    assert grid.pulls == 0


@dataclass
class LeakyNode(SimNode):
    """A hostile node: it answers instructions of the types in ``leaks`` with an error
    whose reason is a private row, under the code given there (no egress guard)."""

    leaks: dict[str, int] = field(default_factory=dict)  # message type -> error code
    leaked: int = 0

    def answer(self, msg: Message, mode: str) -> Message | None:
        code = self.leaks.get(msg.metadata.message_type)
        if code is None:
            return super().answer(msg, mode)
        self.leaked += 1
        return Message(Error(code=code, reason=PRIVATE_ROW), reply_to=msg)


def _run_with_log(
    grid: SimulatedGrid, model_dir: Path, tmp_path: Path, world: SealedWorld
) -> tuple[Path, Path]:
    """Run the sealed job with the provider's transparency log as an extra event sink;
    return the job folder and the log database, for tests that search both."""
    out, log_db = tmp_path / "job", tmp_path / "provider" / "translog.db"
    store = LogStore(log_db, durable=False)
    try:
        FederatedJob(
            grid,
            _spec(model_dir, out),
            sandbox=world.sandbox(),
            events=LogSink(store),
            clock=grid.time.clock,
            sleep=grid.time.sleep,
        ).run()
    finally:
        store.close()
    return out, log_db


class LineCollector(logging.Handler):
    """Keeps every line the ServerApp logs through Flower's logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_nodes_error_text_never_reaches_the_providers_events_results_log_or_lines(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Free text in a node's error reply (hello, training, evaluation) is stored as the code
    it maps to: a Flower code's label, or ``unrecognized`` for an Ark code with another
    reason or a code outside the vocabulary."""
    leaky = [
        LeakyNode(3, leaks={MessageType.QUERY: NodeReason.FLOWER_CLIENTAPP_RAISED}),
        LeakyNode(4, leaks={TRAIN: NodeReason.EGRESS_BLOCKED}),
        LeakyNode(5, leaks={EVALUATE: 9}),
    ]
    grid = SimulatedGrid([SimNode(1), SimNode(2, examples=30), *leaky], FakeClock(), world=world)
    collector = LineCollector()
    FLOWER_LOGGER.addHandler(collector)
    try:
        out, log_db = _run_with_log(grid, tiny_bert_dir, tmp_path, world)
    finally:
        FLOWER_LOGGER.removeHandler(collector)

    assert [node.leaked for node in leaky] == [
        2,
        1,
        1,
    ]  # node 3: hello at round 1 and at evaluation
    events = _events(out)
    refused = [(e["node"], e["reason"]) for e in events if e["kind"] == "node_refused"]
    assert refused == [(3, "flower-clientapp-raised")] * 2
    declined = [
        (e["node"], e["round"], e["reason"]) for e in events if e["kind"] == "node_declined"
    ]
    assert declined == [(4, 1, "unrecognized"), (5, 1, "unrecognized")]
    assert _results(out)["rounds"][1]["rejected"] == {"4": "node error: unrecognized"}
    assert any("failed: unrecognized" in line for line in collector.lines)
    assert not [line for line in collector.lines if any(t.decode() in line for t in TRACES)]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert log_db in files
    assert b"node_declined" in log_db.read_bytes(), "negative control: the log is searchable"
    assert [str(path) for path in files if any(t in path.read_bytes() for t in TRACES)] == []


def test_a_nodes_metric_names_and_tensor_shapes_never_reach_the_providers_records(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Metric names outside the protocol's are dropped (the update still counts), and a
    shape chosen to spell bytes is rejected without being quoted: none of it is stored."""
    nodes = [SimNode(1), SimNode(2, behaviour="metric-text"), SimNode(3, behaviour="shape-text")]
    grid = SimulatedGrid(nodes, FakeClock(), world=world)
    out, log_db = _run_with_log(grid, tiny_bert_dir, tmp_path, world)

    events = _events(out)
    assert {e["node"] for e in events if e["kind"] == "update_accepted"} == {1, 2}
    rejected = [e for e in events if e["kind"] == "update_rejected"]
    assert [(e["node"], "shape differs" in e["reason"]) for e in rejected] == [(3, True)]
    quoted_shape = ", ".join(map(str, SHAPE_TEXT[:4])).encode()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert log_db in files
    leaks = [str(p) for p in files if any(t in p.read_bytes() for t in [*TRACES, quoted_shape])]
    assert leaks == []


class SmallOrderNode(SimNode):
    """Shakes hands with an X25519 channel key of small order (all zeros: every shared
    secret with it is zero) under an affirming channel EAR signed with the provider's
    result key, as a key broker that did not check the key would have signed it."""

    def hello(self, msg: Message) -> Message:
        assert self.world is not None
        key, policy, now = bytes(32), self.world.broker.policy, dt.datetime.now(dt.UTC)
        result = self.world.broker.signer.affirm(
            Appraisal(
                {"ueid": "small-order-tee", "measurements": {}}, "stub", policy.policy_id, now
            ),
            ResultContext(
                "small-order",
                "stub",
                key,
                SUITE_X25519,
                "",
                policy.policy_id,
                policy.digest,
                PURPOSE_CHANNEL,
            ),
            now=now,
        )
        hello = ConfigRecord(
            {HELLO_NONCE: bytes(32), HELLO_NODE_KEY: key, HELLO_RESULT: result.token.encode()}
        )
        return Message(RecordDict({HELLO_KEY: hello}), reply_to=msg)


def test_a_node_with_a_small_order_channel_key_is_refused_and_the_round_completes(
    tiny_bert_dir: Path, tmp_path: Path, world: SealedWorld
):
    """Sealing the round's instruction to that key failed with an untyped ValueError in
    the ServerApp, which ended the round for every node; now the aggregator refuses the
    key at admission and the honest nodes' round goes on."""
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    grid = SimulatedGrid([*good, SmallOrderNode(3)], FakeClock(), world=world)
    _job(grid, _spec(tiny_bert_dir, tmp_path)).run()

    events = _events(tmp_path)
    refused = [e for e in events if e["kind"] == "node_refused"]
    assert {e["node"] for e in refused} == {3}  # at the round and again at evaluation
    assert all("small order" in e["reason"] for e in refused)
    assert 3 not in {e["node"] for e in events if e["kind"] == "node_admitted"}
    assert grid.nodes[3].received == []
    for name, value in _weighted_mean(good).items():
        np.testing.assert_allclose(_checkpoint(tmp_path, 1)[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "error", "reason"),
    [
        ("instruction", EnvelopeError("the recipient key does not take an HPKE seal"),
         "cannot seal to its key"),
        ("evidence", AttestationError("the attester could not quote"),
         "cannot make the aggregator's evidence for it"),
    ],
)  # fmt: skip
def test_a_key_that_fails_to_seal_leaves_out_that_node_only(
    tiny_bert_dir: Path,
    tmp_path: Path,
    world: SealedWorld,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    error: Exception,
    reason: str,
):
    """Should sealing to one admitted node's key fail anyway (a suite or key the checks at
    admission did not foresee), or the attester fail to make the aggregator's evidence for
    that node's nonce (signed for every instruction), that node is left out and recorded;
    the round goes on."""
    good = [SimNode(1, examples=10), SimNode(2, examples=30)]
    grid = SimulatedGrid([*good, SimNode(3, examples=20)], FakeClock(), world=world)
    works = getattr(AggregatorSandbox, method)

    def fails_for_node_3(self: AggregatorSandbox, peer: Any, *args: Any) -> Any:
        if peer.node_id == 3:
            raise error
        return works(self, peer, *args)

    monkeypatch.setattr(AggregatorSandbox, method, fails_for_node_3)
    _job(grid, _spec(tiny_bert_dir, tmp_path)).run()

    events = _events(tmp_path)
    refused = [e for e in events if e["kind"] == "node_refused"]
    assert {e["node"] for e in refused} == {3}
    assert all(e["reason"].startswith(reason) for e in refused)
    assert grid.nodes[3].received == []
    for name, value in _weighted_mean(good).items():
        np.testing.assert_allclose(_checkpoint(tmp_path, 1)[name], value, rtol=1e-6, atol=1e-7)


def test_an_outbox_hands_back_a_shared_content_shared_and_drops_each_content_once_pushed(
    tmp_path: Path,
) -> None:
    """A plaintext round's one content goes in once and comes back as one object (not a
    copy per node); sealed contents leave the store with the last message that needs them."""
    shared = RecordDict({CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    own = [RecordDict({CONFIG_KEY: ConfigRecord({ROUND_KEY: 2, "n": i})}) for i in range(3)]
    outbox = Outbox()
    for node in range(1, 6):
        outbox.add(Message(shared, node, MessageType.TRAIN, group_id="1"))
    for node, content in enumerate(own, start=6):
        outbox.add(Message(content, node, MessageType.TRAIN, group_id="2"))
    stored = outbox._db.execute
    assert stored("SELECT count(*) FROM contents").fetchone()[0] == 4
    batches = outbox.batches(4)
    first = next(batches)
    assert [m.metadata.dst_node_id for m in first] == [1, 2, 3, 4]
    assert all(m.content is first[0].content for m in first)
    assert first[0].content.config_records[CONFIG_KEY][ROUND_KEY] == 1
    second = next(batches)
    assert [m.metadata.dst_node_id for m in second] == [5, 6, 7, 8]
    assert second[0].content is first[0].content, "one object for the shared content"
    assert [m.content.config_records[CONFIG_KEY]["n"] for m in second[1:]] == [0, 1, 2]
    assert [m.metadata.group_id for m in second] == ["1", "2", "2", "2"]
    assert stored("SELECT count(*) FROM contents").fetchone()[0] == 0
    assert list(batches) == []
    outbox.close()


def test_a_rounds_held_out_metrics_join_those_a_record_has() -> None:
    """A finished job given more rounds evaluates its last round again: nodes that report
    anew replace their metrics, the others keep theirs; otherwise the round's own map is
    the record's (no copy)."""
    record = RoundRecord(held_out={"1": {"accuracy": 0.5}, "2": {"accuracy": 0.6}})
    fresh = ScratchMap({"2": {"accuracy": 0.7}, "3": {"accuracy": 0.8}})
    _add_held_out(record, fresh)
    assert dict(record.held_out) == {
        "1": {"accuracy": 0.5},
        "2": {"accuracy": 0.7},
        "3": {"accuracy": 0.8},
    }
    empty = RoundRecord()
    _add_held_out(empty, fresh)
    assert empty.held_out is fresh


class UnavailableGrid(SimulatedGrid):
    """A grid whose SuperLink answers for node 2: its own error reply (node unavailable),
    sent from the SuperLink's node id, as Flower 1.41's linkstate makes one."""

    def __init__(self, nodes: Iterable[SimNode], clock: FakeClock):
        super().__init__(nodes, clock)
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        self.sent.update({m.metadata.message_id: m for m in messages})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        replies = list(super().pull_messages(message_ids))
        for message_id in message_ids:
            message = self.sent[message_id]
            if message.metadata.dst_node_id == 2:
                error = Message(Error(code=0, reason="node unavailable"), reply_to=message)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(error)
        return replies


def test_the_superlinks_own_error_for_a_node_counts_as_that_nodes_reply() -> None:
    """Flower's SuperLink answers for a node that went away with an error of its own
    (from the SuperLink's node id, not the node's): the round hears it at once as that
    node's failure, instead of waiting for the deadline."""
    clock = FakeClock()
    nodes = [SimNode(1), SimNode(2, behaviour="silent")]
    grid = UnavailableGrid(nodes, clock)
    adapter = {"layer.lora_B.weight": np.ones((2, 2), np.float32)}
    content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    messages = [Message(content, n.node_id, MessageType.EVALUATE) for n in nodes]
    call = RoundCall(grid, timeout=10.0, clock=clock.clock, sleep=clock.sleep)

    replies = dict(call.replies(messages))

    assert set(replies) == {1, 2}
    assert replies[2].has_error()
    assert not replies[1].has_error()
    assert call.missing == set()
    assert clock.now < 10.0, "no wait for the deadline"


class SameIdGrid(SimulatedGrid):
    """A grid that gives node 2's message the id it gave node 1's."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        messages[1].metadata.__dict__["_message_id"] = ids[1] = ids[0]
        return ids


def test_a_message_id_the_grid_gives_twice_makes_the_later_node_missing() -> None:
    """Two messages under one id cannot be told apart by their replies: the first node's
    reply counts, and the second node is reported missing, not silently dropped."""
    clock = FakeClock()
    nodes = [SimNode(1), SimNode(2), SimNode(3)]
    grid = SameIdGrid(nodes, clock)
    adapter = {"layer.lora_B.weight": np.ones((2, 2), np.float32)}
    content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: ConfigRecord({ROUND_KEY: 1})})
    messages = [Message(content, n.node_id, MessageType.EVALUATE) for n in nodes]
    call = RoundCall(grid, timeout=10.0, clock=clock.clock, sleep=clock.sleep)

    answered = sorted(node_id for node_id, _ in call.replies(messages))

    assert answered == [1, 3]
    assert call.missing == {2}
