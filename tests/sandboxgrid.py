"""An in-process federation for tests: the real ServerApp jobs against real, attested
node sandboxes, with the real key broker over TLS on loopback. Only Flower's transport
is replaced: :class:`SandboxGrid` hands each message to its node's sandbox and records
every reply the ServerApp receives, so a test can search all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, NoReturn, TypeVar

import grpc
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients.channels import RunIds
from clients.sandbox import NodeSandbox, Request, TrainResult
from clients.service import NodeSandboxService
from protos.ark.v1 import nodesandbox_pb2 as pb
from sandbox import events
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, manifest_digest
from sandbox.config import RunSpec
from sandbox.events import MemoryEventSink
from sandbox.events.members import inline
from sandbox.keyfiles import load_ed25519_public
from sandbox.ops.federation import free_port
from sandbox.ops.provision import LoopbackDeployment, provision_loopback
from sandbox.protocol import (
    COMMITMENT_KEY,
    HELLO_KEY,
    METRICS_KEY,
    SECAGG_KEY,
    SECAGG_PAYLOAD,
    SECAGG_STAGE,
    SIGNED_KEY,
    metric_record,
    round_of,
    secagg_record,
)
from sandbox.reasons import NodeReason
from sandbox.seal.package import read_manifest
from server.app import FederatedJob
from server.sandbox import AggregatorSandbox
from tests.sealed_run import key_broker

LABELS = ("a", "b")
Hook = Callable[[str, int, Message, Message | None], Message | None]
Job = TypeVar("Job", bound=FederatedJob)
S = TypeVar("S", bound=NodeSandbox)


def node_rows(name: str, n: int) -> str:
    """``n`` JSONL rows of a node's private data, labels a and b in turn."""
    words = {"a": "refund billing invoice", "b": "login password reset"}
    return "".join(
        json.dumps({"text": f"{name} {i} {words[LABELS[i % 2]]}", "label": LABELS[i % 2]}) + "\n"
        for i in range(n)
    )


class _Aborted(Exception):
    """What :class:`_Call` raises where gRPC's ``context.abort`` would end the call."""


class _Call:
    """The part of a gRPC call's context the sandbox service uses to fail a call."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(details)


def _train_content(result: TrainResult) -> RecordDict:
    """A train reply's records as the ClientApp sends them (``clients/shuttle.py``)."""
    if result.secagg:
        return RecordDict({SECAGG_KEY: secagg_record(result.secagg)})
    content = RecordDict({**result.records, METRICS_KEY: metric_record(result.metrics)})
    if result.commitment:
        content[COMMITMENT_KEY] = ConfigRecord({SIGNED_KEY: result.commitment})
    return content


class SandboxGrid(Grid):
    """Flower's Grid over in-process node sandboxes: each pushed message is answered by
    its node's sandbox at once, and every reply is kept (``received``). A sandbox's
    failure leaves as the node sandbox service fails a call: journaled on the node, its
    fixed code in the reply. ``hook`` may drop or replace a reply (a node that stops, a
    hostile one)."""

    def __init__(self, sandboxes: dict[int, NodeSandbox], spec: RunSpec, run_id: int):
        self.sandboxes = sandboxes
        self.spec = spec
        self.run_id = run_id
        self.received: list[Message] = []
        self.sent: list[Message] = []
        self.hook: Hook | None = None
        self._outbox: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=run_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sandboxes)

    def _answer(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        sandbox = self.sandboxes[node_id]
        ids = RunIds(self.run_id, node_id)
        kind = msg.metadata.message_type
        rnd = round_of(msg.content)
        try:
            if kind == MessageType.QUERY:
                content = RecordDict({HELLO_KEY: sandbox.hello(ids, rnd, self.spec).record})
            elif kind == MessageType.TRAIN:
                result = sandbox.train(Request(ids, rnd, STAGE_TRAIN, self.spec, msg.content))
                content = _train_content(result)
            elif kind == MessageType.EVALUATE:
                evaluated = sandbox.evaluate(
                    Request(ids, rnd, STAGE_EVALUATE, self.spec, msg.content)
                )
                content = RecordDict({METRICS_KEY: metric_record(evaluated.metrics)})
            else:
                record = msg.content.config_records[SECAGG_KEY]
                stage, payload = str(record[SECAGG_STAGE]), bytes(record[SECAGG_PAYLOAD])  # type: ignore[arg-type]
                answer = sandbox.secagg(ids, rnd, stage, payload)
                content = RecordDict({**answer.records})
                if answer.payload:
                    content[SECAGG_KEY] = secagg_record(answer.payload)
                if answer.metrics:
                    content[METRICS_KEY] = metric_record(answer.metrics)
        except Exception as exc:
            run = pb.RunContext(run_id=ids.run_id, node_id=ids.node_id)
            try:
                NodeSandboxService(sandbox).refuse(_Call(), run, exc)  # type: ignore[arg-type]
            except _Aborted as aborted:
                # The ClientApp forwards the code the service's status carried.
                return Message(NodeReason.from_label(str(aborted)).error(), reply_to=msg)
        return Message(content, reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(msg)
            reply: Message | None = self._answer(msg)
            if self.hook is not None:
                stage = stage_of(msg)
                reply = self.hook(stage, msg.metadata.dst_node_id, msg, reply)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                self._outbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = [self._outbox.pop(m) for m in list(message_ids) if m in self._outbox]
        self.received.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:  # fmt: skip
        return self.pull_messages(self.push_messages(messages))


def stage_of(msg: Message) -> str:
    """The secure-aggregation stage of ``msg``, else its message type."""
    record = msg.content.config_records.get(SECAGG_KEY)
    if record is not None:
        return str(record[SECAGG_STAGE])
    return str(msg.metadata.message_type)


@dataclasses.dataclass
class World(Generic[S]):
    """A provisioned deployment and the started node sandboxes, by Flower node id."""

    deployment: LoopbackDeployment
    model_dir: Path
    root: Path
    sandboxes: dict[int, S]


@contextlib.contextmanager
def provisioned(root: Path, model_dir: Path, names: Iterable[str]) -> Iterator[LoopbackDeployment]:
    """A provisioned provider (model ``tiny``) with its key broker served on loopback,
    and a node of 24 rows for each of ``names``, for the block's duration."""
    data = {}
    for name in names:
        data[name] = root / f"{name}.jsonl"
        data[name].write_text(node_rows(name, 24), encoding="utf-8")
    deployment = provision_loopback(
        root, model_dir=model_dir, node_data=data, key_broker_port=free_port(), model_id="tiny"
    )
    with key_broker(deployment):
        yield deployment


def serverapp_identity(monkeypatch: pytest.MonkeyPatch, run_id: int) -> None:
    """The process identity Flower's ServerApp runtime sets before ``main`` runs."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", run_id)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def start_job(
    world: World[S], spec: RunSpec, run_id: int, kind: type[Job]
) -> tuple[Job, SandboxGrid, MemoryEventSink]:
    """A ``kind`` job of run ``run_id`` over ``world``'s sandboxes, its aggregator the
    deployment's, its events kept in memory."""
    sandbox_cfg = next(iter(world.sandboxes.values())).node.require_sandbox()
    manifest = read_manifest(sandbox_cfg.package, load_ed25519_public(sandbox_cfg.manifest_key))
    aggregator = AggregatorSandbox.load(
        world.deployment.provider.aggregator, run_id=run_id, model_digest=manifest_digest(manifest)
    )
    grid = SandboxGrid(dict(world.sandboxes), spec, run_id)
    sink = MemoryEventSink()
    job = kind(grid, spec, sandbox=aggregator, events=sink, run_id=run_id, sleep=lambda _: None)
    return job, grid, sink


E = TypeVar("E", bound=events.Event)


T = TypeVar("T")


def listed(value: list[T] | None) -> list[T]:
    """An event's list that the job logged (inline again: :func:`events_of`)."""
    assert value is not None, "the event has no such list"
    return value


def events_of(sink: MemoryEventSink, kind: type[E]) -> list[E]:
    """The events of ``kind`` in ``sink``, in order, lists inline (as the job built them)."""
    return [e for e in inline(sink.events) if isinstance(e, kind)]
