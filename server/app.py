"""The provider's ServerApp: federated LoRA rounds over the Flower Message API.

Each round sends the global adapter to every eligible node, folds replies into one
running weighted sum as they arrive, checkpoints the new global adapter, and moves on
once enough nodes answered before the round deadline. After the last round every node
evaluates the final adapter; results, a plot and a stock PEFT adapter are written.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from sandbox import events
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, model_dir_digest
from sandbox.config import DEFAULT_EGRESS_METRICS, PROTECTION_SEALED, RunSpec
from sandbox.digests import sha256_hex
from sandbox.errors import (
    AggregateInvalid,
    AttestationError,
    CheckpointError,
    ConfigError,
    EnvelopeError,
    FederationError,
    UpdateRejected,
)
from sandbox.events import EventSink, FanOutSink, JsonlEventSink, Key
from sandbox.lora import adapter_state, build_peft_model, export_peft_adapter, is_trained
from sandbox.models import inspect_model_dir, load_pretrained
from sandbox.protocol import (
    CONFIG_KEY,
    GLOBAL_KEY,
    HELLO_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    ROUND_KEY,
    UPDATE_KEY,
    from_record,
    sealed_digest,
    to_record,
)
from sandbox.reasons import NodeReason
from sandbox.translog.store import LogSink, LogStore
from server.aggregation import StreamingAggregator, Weight, spec_of
from server.checkpoint import CheckpointStore, JobState
from server.results import build_results, write_outputs
from server.rounds import RoundCall, wait_for_nodes
from server.sandbox import AggregatorSandbox, NodePeer, sealed_blob

EVENTS_FILE = "events.jsonl"

# Every metric name a node's reply may carry (what the egress guard lets out by default).
PROTOCOL_METRICS = frozenset(DEFAULT_EGRESS_METRICS)

app = ServerApp()


def _provider_model(spec: RunSpec) -> Any:
    """The provider's PEFT model, seeded so the initial adapter is reproducible."""
    import torch

    info = inspect_model_dir(spec.model_path, spec.task)
    torch.manual_seed(spec.seed)
    base, _ = load_pretrained(info, num_labels=len(spec.labels))
    return build_peft_model(
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.mode
    )


def _round_config(rnd: int) -> ConfigRecord:
    return ConfigRecord({ROUND_KEY: rnd})


def _split_metrics(reply: Message) -> tuple[float, dict[str, float], dict[str, float], float]:
    """The example count, held-out metrics before and after training, and training loss.

    Only the protocol's metric names are read; any other name is text the node chose (it
    could be a private row) and is dropped, never stored.
    """
    record = reply.content.metric_records[METRICS_KEY]
    raw = {k: float(v) for k, v in record.items() if k in PROTOCOL_METRICS}  # type: ignore[arg-type]
    before = {k.removeprefix("before-"): v for k, v in raw.items() if k.startswith("before-")}
    after = {k.removeprefix("after-"): v for k, v in raw.items() if k.startswith("after-")}
    return raw[NUM_EXAMPLES], before, after, raw.get("train-loss", float("nan"))


def _clipping(weight: Weight) -> dict[Key, Any]:
    """Event fields for an update whose weight a bound clipped: what it declared, and which
    bound (none when it counted as declared)."""
    if weight.bound is None:
        return {}
    return {Key.DECLARED_EXAMPLES: weight.declared, Key.WEIGHT_BOUND: weight.bound}


def _round_metrics(current: dict[str, Any]) -> dict[str, float]:
    """The round's headline numbers for the log: mean local accuracy and training loss."""
    local = [m.get("accuracy") for m in current["local"].values()]
    accuracies = [float(a) for a in local if isinstance(a, (int, float))]
    losses = [float(v) for v in current["train_loss"].values() if v == v]
    out: dict[str, float] = {"updates": float(len(current["examples"]))}
    if accuracies:
        out["local_accuracy"] = sum(accuracies) / len(accuracies)
    if losses:
        out["train_loss"] = sum(losses) / len(losses)
    return out


class FederatedJob:
    """State machine of one job: init or resume, rounds, final evaluation, outputs."""

    def __init__(
        self,
        grid: Grid,
        spec: RunSpec,
        *,
        sandbox: AggregatorSandbox | None = None,
        events: EventSink | None = None,
        run_id: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if spec.output_dir is None:
            raise ConfigError(
                "is empty; the ServerApp needs a directory for results", key="output-dir"
            )
        self.grid = grid
        self.clock = clock
        self.sleep = sleep
        self.spec = spec
        self.out = spec.output_dir
        self.store = CheckpointStore(self.out / "checkpoints")
        self._model: Any = None
        if spec.protection == PROTECTION_SEALED and sandbox is None:
            raise ConfigError("protection is sealed but no aggregator sandbox was given")
        self.sandbox = sandbox
        # Every event goes to the job's own file, and to ``events`` (the log) when given.
        job_events = JsonlEventSink(self.out / EVENTS_FILE)
        self.events = job_events if events is None else FanOutSink([job_events, events])
        self.run_id = sandbox.run_id if sandbox is not None else run_id
        # Nodes that shook hands with this ServerApp process (sealed runs only).
        self.peers: dict[int, NodePeer] = {}

    def _event(self, kind: type[events.RunEvent], **fields: Any) -> None:
        """Record ``kind`` for this run (and job) in the job's events and the log."""
        now = dt.datetime.now(dt.UTC)
        self.events.emit(kind(time=now, run=self.run_id, job=self.spec.job_id, **fields))

    def _round_started(self, rnd: int, stage: str, messages: list[Message]) -> None:
        """Who takes part in this round, and the digest of what each was sent."""
        participants = [
            events.Participant(
                node=m.metadata.dst_node_id, instruction_sha256=sealed_digest(m.content)
            )
            for m in messages
        ]
        self._event(events.RoundStarted, round=rnd, stage=stage, participants=participants)

    def _admit(self, nodes: list[int], rnd: int) -> list[int]:
        """Shake hands with nodes new to this run; return the nodes that may take part."""
        if self.sandbox is None:
            return nodes
        new = [node_id for node_id in nodes if node_id not in self.peers]
        if new:
            hellos = [
                Message(RecordDict({CONFIG_KEY: _round_config(rnd)}), node_id, MessageType.QUERY)
                for node_id in new
            ]
            call = RoundCall(self.grid, self.spec.round_timeout, clock=self.clock, sleep=self.sleep)
            for node_id, reply in call.replies(hellos):
                try:
                    if reply.has_error():  # recorded as its code, never the node's text
                        raise AttestationError(NodeReason.of(reply.error).label)
                    hello = reply.content.config_records[HELLO_KEY]
                    peer = self.sandbox.admit(node_id, hello, self.peers.values())
                except (AttestationError, KeyError) as exc:
                    log(WARNING, "[ark] node %s not admitted: %s", node_id, exc)
                    self._event(events.NodeRefused, node=node_id, reason=str(exc))
                    continue
                self.peers[node_id] = peer
                self._event(
                    events.NodeAdmitted,
                    node=node_id,
                    ear_sha256=peer.result.digest,
                    ueid=peer.result.ueid,
                    tee_pubkey_sha256=sha256_hex(peer.result.tee_pubkey),
                )
        return [node_id for node_id in nodes if node_id in self.peers]

    def _messages(
        self, nodes: list[int], kind: str, adapter: dict[str, np.ndarray], rnd: int
    ) -> list[Message]:
        """One instruction per node: sealed to each node's key, or (protection off) one
        shared plaintext content that Flower dedups."""
        if self.sandbox is not None:
            stage = STAGE_TRAIN if kind == MessageType.TRAIN else STAGE_EVALUATE
            messages = []
            for node_id in nodes:
                try:
                    content = self.sandbox.instruction(self.peers[node_id], rnd, adapter, stage)
                except EnvelopeError as exc:
                    # One node's unusable key leaves that node out, not the whole round.
                    log(WARNING, "[ark] node %s left out: cannot seal to its key: %s", node_id, exc)
                    self.peers.pop(node_id, None)
                    self._event(
                        events.NodeRefused, node=node_id, reason=f"cannot seal to its key: {exc}"
                    )
                    continue
                messages.append(Message(content, node_id, kind, group_id=str(rnd)))
            return messages
        content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: _round_config(rnd)})
        return [Message(content, node_id, kind, group_id=str(rnd)) for node_id in nodes]

    def _update(
        self, node_id: int, reply: Message, rnd: int, reported: float
    ) -> tuple[dict[str, np.ndarray], float]:
        """The reply's update tensors and weight: opened from its envelope (whose sealed
        example count must match the reported one), or (protection off) raw."""
        if self.sandbox is None:
            return from_record(reply.content.array_records[UPDATE_KEY]), reported
        update, weight = self.sandbox.open_update(
            self.peers[node_id], sealed_blob(reply.content), rnd
        )
        if weight != reported:
            raise UpdateRejected(
                f"reported {reported:g} examples, the sealed update says {weight:g}"
            )
        return update, weight

    def _envelope(self, reply: Message) -> tuple[str, int]:
        """What names an update in events: its envelope's SHA-256 and size (sealed runs),
        or the raw arrays' data size (protection off)."""
        if self.sandbox is None:
            record = reply.content.array_records[UPDATE_KEY]
            return events.PLAINTEXT, sum(len(record[name].data) for name in record)
        blob = sealed_blob(reply.content)
        return sha256_hex(blob), len(blob)

    def _identity(self, node_id: int) -> str:
        """Whom an update's held weight belongs to: the node's attested TEE (its ueid), which
        a node keeps when its Flower node id changes; with protection off, the node id."""
        if self.sandbox is None:
            return f"node-{node_id}"
        return str(self.peers[node_id].result.ueid)

    def _save(self, state: JobState, adapter: dict[str, np.ndarray]) -> str:
        """Checkpoint ``adapter`` and ``state`` with this run's ueid admissions, so that a
        ServerApp restarted in the same run admits each ueid as the same node."""
        if self.sandbox is not None and self.sandbox.admitted:
            state.admissions[str(self.run_id)] = dict(self.sandbox.admitted)
        return self.store.save(state, adapter)

    def _declined(self, node_id: int, reply: Message, rnd: int) -> str:
        """A node's error reply: record its code (never the node's text), and make the node
        shake hands again next time. Returns the code's label."""
        reason = NodeReason.of(reply.error).label
        self.peers.pop(node_id, None)
        self._event(events.NodeDeclined, round=rnd, node=node_id, reason=reason)
        return reason

    def model(self) -> Any:
        if self._model is None:
            self._model = _provider_model(self.spec)
        return self._model

    def start(self) -> tuple[JobState, dict[str, np.ndarray]]:
        loaded = self.store.load(self.spec.fingerprint())
        if loaded is not None:
            state, adapter = loaded
            log(
                INFO, "[ark] resuming job %s after finished round %d", self.spec.job_id, state.round
            )
            if self.sandbox is not None:
                self.sandbox.admitted.update(state.admissions.get(str(self.run_id), {}))
            return state, adapter
        adapter = adapter_state(self.model())
        state = JobState(fingerprint=self.spec.fingerprint(), round=0, history={"rounds": {}})
        self._save(state, adapter)
        log(
            INFO,
            "[ark] job %s: initial adapter with %d tensors checkpointed as round 0",
            self.spec.job_id,
            len(adapter),
        )
        return state, adapter

    def _nodes(self, rnd: int) -> list[int]:
        nodes = wait_for_nodes(
            self.grid,
            minimum=self.spec.min_nodes,
            expected=self.spec.expected_nodes,
            timeout=self.spec.round_timeout,
            clock=self.clock,
            sleep=self.sleep,
        )
        if not nodes:
            raise FederationError(
                f"round {rnd}: fewer than min-nodes={self.spec.min_nodes} nodes connected "
                f"within {self.spec.round_timeout:.0f}s"
            )
        return nodes

    def train_round(self, state: JobState, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rnd = state.round + 1
        started = time.monotonic()
        nodes = self._admit(self._nodes(rnd), rnd)
        log(INFO, "[ark] round %d/%d: training on %d nodes", rnd, self.spec.num_rounds, len(nodes))
        trained = {k: v for k, v in adapter.items() if is_trained(k, self.spec.mode)}
        aggregator = StreamingAggregator(
            spec_of(trained),
            reference=trained,
            max_norm=self.spec.update_norm_bound,
            max_weight=self.spec.max_examples_per_update,
        )
        rounds = state.history.setdefault("rounds", {})
        previous = rounds.setdefault(str(rnd - 1), {})
        current: dict[str, Any] = {"local": {}, "train_loss": {}, "rejected": {}, "examples": {}}
        call = RoundCall(self.grid, self.spec.round_timeout, clock=self.clock, sleep=self.sleep)
        messages = self._messages(nodes, MessageType.TRAIN, adapter, rnd)
        self._round_started(rnd, STAGE_TRAIN, messages)
        accepted: list[str] = []
        for node_id, reply in call.replies(messages):
            key = str(node_id)
            if reply.has_error():
                reason = self._declined(node_id, reply, rnd)
                current["rejected"][key] = f"node error: {reason}"
                log(WARNING, "[ark] round %d: node %s failed: %s", rnd, node_id, reason)
                continue
            envelope = "none"
            try:
                envelope, size = self._envelope(reply)
                reported, before, after, loss = _split_metrics(reply)
                update, declared = self._update(node_id, reply, rnd, reported)
                identity = self._identity(node_id)
                weight = aggregator.add(update, declared, held=state.weights.get(identity))
            except (UpdateRejected, KeyError, TypeError, ValueError) as exc:
                current["rejected"][key] = f"update rejected: {exc}"
                log(WARNING, "[ark] round %d: update from node %s rejected: %s", rnd, node_id, exc)
                self._event(
                    events.UpdateRejected,
                    round=rnd,
                    node=node_id,
                    envelope_sha256=envelope,
                    reason=str(exc),
                )
                continue
            finally:
                del reply
            state.weights.setdefault(identity, weight.used)
            self._event(
                events.UpdateAccepted,
                round=rnd,
                node=node_id,
                envelope_sha256=envelope,
                envelope_bytes=size,
                examples=weight.used,
                **_clipping(weight),
            )
            accepted.append(envelope)
            previous.setdefault("global", {})[key] = before
            current["local"][key] = after
            current["train_loss"][key] = loss
            current["examples"][key] = weight.used
            if weight.bound is not None:
                log(
                    WARNING,
                    "[ark] round %d: node %s declared %g examples, weighted %g (%s)",
                    rnd,
                    node_id,
                    weight.declared,
                    weight.used,
                    weight.bound,
                )
            log(
                INFO,
                "[ark] round %d: update %d/%d from node %s (%g examples)",
                rnd,
                aggregator.count,
                len(nodes),
                node_id,
                weight.used,
            )
        if call.missing:
            log(
                WARNING,
                "[ark] round %d: no reply from nodes %s before the %.0fs deadline",
                rnd,
                sorted(call.missing),
                self.spec.round_timeout,
            )
        current["missing"] = sorted(call.missing)
        current["seconds"] = time.monotonic() - started
        if aggregator.count < self.spec.min_nodes:
            raise FederationError(
                f"round {rnd}: only {aggregator.count} accepted updates, "
                f"min-nodes is {self.spec.min_nodes}"
            )
        try:
            result = aggregator.result()
        except AggregateInvalid as exc:
            raise AggregateInvalid(
                f"round {rnd}: {exc}; nothing was committed, the job stops after round "
                f"{state.round}"
            ) from exc
        merged = {**adapter, **result}
        rounds[str(rnd)] = current
        state.round = rnd
        digest = self._save(state, merged)
        self._event(
            events.AggregateCommitted,
            round=rnd,
            adapter_sha256=digest,
            updates=accepted,
            examples=aggregator.total_weight,
            metrics=_round_metrics(current),
        )
        log(
            INFO,
            "[ark] round %d: aggregated %d updates (%g examples), checkpointed",
            rnd,
            aggregator.count,
            aggregator.total_weight,
        )
        return merged

    def final_evaluation(self, state: JobState, adapter: dict[str, np.ndarray]) -> None:
        rnd = state.round
        nodes = self._admit(self._nodes(rnd), rnd)
        log(INFO, "[ark] final evaluation of round-%d adapter on %d nodes", rnd, len(nodes))
        entry = state.history.setdefault("rounds", {}).setdefault(str(rnd), {})
        call = RoundCall(self.grid, self.spec.round_timeout, clock=self.clock, sleep=self.sleep)
        messages = self._messages(nodes, MessageType.EVALUATE, adapter, rnd)
        self._round_started(rnd, STAGE_EVALUATE, messages)
        for node_id, reply in call.replies(messages):
            if reply.has_error():
                reason = self._declined(node_id, reply, rnd)
                log(WARNING, "[ark] evaluation on node %s failed: %s", node_id, reason)
                continue
            try:
                _, before, _, _ = _split_metrics(reply)
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "[ark] evaluation reply from node %s is malformed: %r", node_id, exc)
                continue
            entry.setdefault("global", {})[str(node_id)] = before
        state.finished = True
        self._save(state, adapter)

    def run(self) -> None:
        state, adapter = self.start()
        self._event(
            events.RunStarted,
            rounds=self.spec.num_rounds,
            resumed_after_round=state.round,
            protection=self.spec.protection,
            model_id=self.spec.model_id,
            min_nodes=self.spec.min_nodes,
        )
        if state.round > self.spec.num_rounds:
            raise CheckpointError(
                f"checkpoint is at round {state.round}, beyond num-rounds={self.spec.num_rounds}"
            )
        if state.finished and state.round < self.spec.num_rounds:
            state.finished = False
        while state.round < self.spec.num_rounds:
            adapter = self.train_round(state, adapter)
        if not state.finished:
            self.final_evaluation(state, adapter)
        results = build_results(self.spec, state.history)
        export_peft_adapter(self.model(), adapter, self.out / "adapter")
        write_outputs(results, self.out)
        final = state.history.get("rounds", {}).get(str(state.round), {}).get("global", {})
        self._event(
            events.RunFinished,
            rounds=state.round,
            adapter_sha256=self.store.adapter_digest(state.round),
            metrics={Key.FINAL: final},
        )
        log(INFO, "[ark] job %s finished: results in %s", self.spec.job_id, self.out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated job described by the run config."""
    spec = RunSpec.from_run_config(context.run_config)
    sandbox = None
    if spec.protection == PROTECTION_SEALED:
        if spec.aggregator_dir is None:
            raise ConfigError(
                "is empty; a sealed run needs the aggregator's identity directory",
                key="aggregator-dir",
            )
        sandbox = AggregatorSandbox.load(
            spec.aggregator_dir,
            run_id=context.run_id,
            model_digest=model_dir_digest(spec.model_path),
        )
    else:
        log(WARNING, "[ark] protection is OFF: plaintext updates, no aggregator attestation")
    log_sink = None if spec.log_db is None else LogSink(LogStore(spec.log_db))
    FederatedJob(grid, spec, sandbox=sandbox, events=log_sink, run_id=context.run_id).run()
