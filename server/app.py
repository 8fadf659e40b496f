"""The provider's ServerApp: federated LoRA rounds over the Flower Message API.

Each round is a list of explicit stages over a typed round state: *admit* (wait for
nodes, shake hands with new ones), *instruct* (send each the global adapter), *collect*
(fold replies into one running weighted sum as they arrive, until the round deadline)
and *commit* (checkpoint the new global adapter once enough updates were accepted).
After the last round, *admit*, *instruct* and *evaluate* have every node evaluate the
final adapter; results, a plot and a stock PEFT adapter are written. How instructions
and updates are protected is the run's update channel (``server/channels.py``).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from array import array
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from sandbox import events
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN
from sandbox.config import DEFAULT_EGRESS_METRICS, LOCAL_MODEL, RunSpec
from sandbox.errors import (
    AggregateInvalid,
    AttestationError,
    CheckpointError,
    ConfigError,
    EnvelopeError,
    FederationError,
    ScorecardError,
    UpdateRejected,
)
from sandbox.events import JOB_EVENTS_FILE, EventSink, FanOutSink, JsonlEventSink, Key
from sandbox.events.members import Streamed, per_member, streamed
from sandbox.lora import (
    Adapter,
    adapter_state,
    build_peft_model,
    export_peft_adapter,
    is_trained,
)
from sandbox.models import inspect_model_dir, load_pretrained
from sandbox.privacy import client_epsilon
from sandbox.protocol import (
    COMMITMENT_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SCORECARD_KEY,
    sealed_digest,
)
from sandbox.reasons import NodeReason
from sandbox.translog.store import LogSink, LogStore
from server.aggregation import Aggregate, StreamingAggregator, Weight, spec_of
from server.channels import update_channel
from server.checkpoint import CheckpointStore, JobState
from server.history import Metrics, RoundRecord, Training
from server.privacy import ClientNoise, reported_spending
from server.results import build_results, write_outputs
from server.rounds import Outbox, RoundCall, wait_for_nodes
from server.sandbox import AggregatorSandbox
from server.scoring import ComparisonRecords, signed_record
from server.scratch import JOB_FOLDER, ScratchMap, use_folder

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
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.lora_mode
    )


def _split_metrics(reply: Message) -> tuple[float, Metrics, Metrics, float]:
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


def _add_held_out(record: RoundRecord, held_out: MutableMapping[str, Metrics]) -> None:
    """Add a round's held-out metrics to ``record``: the round's own map (on disk), not a
    copy, unless the record has some already (a finished job given more rounds evaluates
    its last round again), which it keeps where no node reported anew."""
    if record.held_out:
        merged = ScratchMap(record.held_out)
        merged.update(held_out)
        held_out = merged
    record.held_out = held_out


def _training_on_disk() -> Training:
    return Training(
        local=ScratchMap(), train_loss=ScratchMap(), rejected=ScratchMap(), examples=ScratchMap()
    )


@dataclass
class RoundState:
    """One round in flight, filled in by its stages in turn (as Flower's SecAgg+
    ``WorkflowState`` is): a training round runs admit, instruct, collect, commit; the
    final evaluation runs admit, instruct, evaluate."""

    job: JobState
    round: int
    stage: str  # STAGE_TRAIN or STAGE_EVALUATE
    adapter: Adapter  # the global adapter this round sends
    started: float = field(default_factory=time.monotonic)
    # admit: the nodes that take part, as 8-byte ids (Flower's are unsigned 64-bit).
    nodes: Sequence[int] = field(default_factory=lambda: array("Q"))
    # What grows with the nodes below is kept on disk (``server/scratch.py``), not in memory.
    # instruct: one instruction per node that could be sent one, until it is pushed.
    messages: Outbox = field(default_factory=Outbox)
    # collect / evaluate: each node's held-out metrics of ``adapter`` (whose round is
    # ``round - 1`` when training, ``round`` when evaluating).
    held_out: MutableMapping[str, Metrics] = field(default_factory=ScratchMap)
    # collect: what the replies left, the running sum, the accepted updates' envelopes
    # (by node, in the order they were accepted).
    training: Training = field(default_factory=_training_on_disk)
    aggregator: Aggregate | None = None
    accepted: MutableMapping[str, str] = field(default_factory=ScratchMap)
    # commit: the new global adapter.
    merged: Adapter | None = None


Stage = Callable[[RoundState], None]


class FederatedJob:
    """One job: init or resume, training rounds, final evaluation, outputs.

    Each round is a list of stages over a :class:`RoundState`; what protection the run
    has is its :class:`~server.channels.UpdateChannel`'s business, chosen once here.
    """

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
        # What is kept of each node from here on goes to disk beside the job's outputs.
        use_folder(self.out / JOB_FOLDER)
        self.channel = update_channel(spec, run_id, sandbox)
        # Every event goes to the job's own file, and to ``events`` (the log) when given.
        job_events = JsonlEventSink(self.out / JOB_EVENTS_FILE)
        self.events = job_events if events is None else FanOutSink([job_events, events])
        self.run_id = self.channel.run_id
        # A comparison run logs each node's held-out commitment and scorecard.
        self.comparison = (
            ComparisonRecords(spec, self.run_id, self._event) if spec.comparison else None
        )

    # The stages of a training round and of the final evaluation.
    def training_stages(self) -> list[Stage]:
        return [self.admit, self.instruct, self.collect, self.commit]

    def evaluation_stages(self) -> list[Stage]:
        return [self.admit, self.instruct, self.evaluate]

    def _event(self, kind: type[events.RunEvent], **fields: Any) -> None:
        """Record ``kind`` for this run (and job) in the job's events and the log; a list
        that grows with the nodes is logged one entry per member (``per_member``)."""
        self.events.emit_many(per_member(kind(**self._stamp(), **fields)))

    def _event_streamed(
        self, kind: type[events.PerMember], lists: Mapping[str, Streamed], **fields: Any
    ) -> None:
        """Record ``kind`` with ``lists`` too long to hold, read as they are logged."""
        self.events.emit_many(streamed(kind, lists, **self._stamp(), **fields))

    def _stamp(self) -> dict[str, Any]:
        """The fields every event of this run has: when, and which run and job."""
        return {"time": dt.datetime.now(dt.UTC), "run": self.run_id, "job": self.spec.job_id}

    def _call(self, timeout: float | None = None) -> RoundCall:
        return RoundCall(
            self.grid, timeout or self.spec.round_timeout, clock=self.clock, sleep=self.sleep
        )

    def _save(self, state: JobState, adapter: Adapter) -> str:
        """Checkpoint ``adapter`` and ``state`` with this run's ueid admissions, so that a
        ServerApp restarted in the same run admits each ueid as the same node."""
        admissions = self.channel.admissions()
        if admissions:
            state.admissions[str(self.run_id)] = admissions
        return self.store.save(state, adapter)

    def _declined(self, node_id: int, reply: Message, rnd: int) -> str:
        """A node's error reply: record its code (never the node's text), and make the node
        shake hands again next time. Returns the code's label."""
        reason = NodeReason.of(reply.error).label
        self.channel.forget(node_id)
        self._event(events.NodeDeclined, round=rnd, node=node_id, reason=reason)
        return reason

    def _spent(self, rnd: int, node_id: int, spent: dict[Key, Any] | None) -> None:
        """Log what a node reported its accepted update cost its records (DP)."""
        if spent is not None:
            self._event(events.DpSpent, round=rnd, node=node_id, **spent)

    def _privacy_asked(self) -> dict[Key, Any]:
        """run_started's fields for the differential privacy the run asks (if any)."""
        asked: dict[Key, Any] = {}
        if self.spec.dp_epsilon > 0:
            asked[Key.DP_EPSILON] = self.spec.dp_epsilon
        if self.spec.client_dp:
            asked[Key.DP_CLIENT_NOISE] = self.spec.dp_client_noise
        return asked

    def model(self) -> Any:
        if self._model is None:
            self._model = _provider_model(self.spec)
        return self._model

    def start(self) -> tuple[JobState, Adapter]:
        loaded = self.store.load(self.spec.fingerprint())
        if loaded is not None:
            state, adapter = loaded
            log(
                INFO, "[ark] resuming job %s after finished round %d", self.spec.job_id, state.round
            )
            self.channel.restore(state.admissions.get(str(self.run_id), {}))
            return state, adapter
        adapter = adapter_state(self.model())
        state = JobState(fingerprint=self.spec.fingerprint(), round=0)
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

    def admit(self, state: RoundState) -> None:
        """Stage: wait for nodes, shake hands with those new to the channel, keep those
        that may take part."""
        rnd = state.round
        nodes = self._nodes(rnd)
        strangers = self.channel.strangers(nodes)
        if strangers:
            hellos, hello = Outbox(), self.channel.hello(rnd)  # one content for all
            for node_id in strangers:
                hellos.add(Message(hello, node_id, MessageType.QUERY))
            for node_id, reply in self._call().replies(hellos):
                try:
                    if reply.has_error():  # recorded as its code, never the node's text
                        raise AttestationError(NodeReason.of(reply.error).label)
                    admission = self.channel.admit(node_id, reply)
                except (AttestationError, KeyError) as exc:
                    log(WARNING, "[ark] node %s not admitted: %s", node_id, exc)
                    self._event(events.NodeRefused, node=node_id, reason=str(exc))
                    continue
                self._event(
                    events.NodeAdmitted,
                    node=node_id,
                    ear_sha256=admission.ear_sha256,
                    ueid=admission.ueid,
                    tee_pubkey_sha256=admission.tee_pubkey_sha256,
                )
        state.nodes = array("Q", self.channel.participants(nodes))
        if state.stage == STAGE_TRAIN:
            log(
                INFO,
                "[ark] round %d/%d: training on %d nodes",
                rnd,
                self.spec.num_rounds,
                len(state.nodes),
            )
        else:
            log(
                INFO,
                "[ark] final evaluation of round-%d adapter on %d nodes",
                rnd,
                len(state.nodes),
            )

    def instruct(self, state: RoundState) -> None:
        """Stage: one instruction per node (a node that cannot be sent one is left out,
        not the whole round); record who takes part and the digest of what each got."""
        rnd = state.round
        kind = MessageType.TRAIN if state.stage == STAGE_TRAIN else MessageType.EVALUATE
        instruction = self.channel.instructions(rnd, state.adapter, state.stage)
        # Node -> the digest of its instruction, on disk, logged as it is read back.
        participants = ScratchMap()
        for node_id in state.nodes:
            try:
                content = instruction(node_id)
            except (EnvelopeError, AttestationError) as exc:
                # A key the library refuses, or evidence the attester could not make for
                # this node's nonce: this node is left out, not the round.
                reason = (
                    f"cannot seal to its key: {exc}"
                    if isinstance(exc, EnvelopeError)
                    else f"cannot make the aggregator's evidence for it: {exc}"
                )
                log(WARNING, "[ark] node %s left out: %s", node_id, reason)
                self.channel.forget(node_id)
                self._event(events.NodeRefused, node=node_id, reason=reason)
                continue
            state.messages.add(Message(content, node_id, kind, group_id=str(rnd)))
            participants[str(node_id)] = sealed_digest(content)
        listed = Streamed(
            len(participants),
            lambda: (
                events.Participant(node=int(node), instruction_sha256=digest).to_json()
                for node, digest in participants.items()
            ),
        )
        self._event_streamed(
            events.RoundStarted, {"participants": listed}, round=rnd, stage=state.stage
        )

    def collect(self, state: RoundState) -> None:
        """Stage: fold each reply's update into the running sum as it arrives, until every
        node answered or the deadline passed; record each acceptance and rejection."""
        rnd, training = state.round, state.training
        trained = {k: v for k, v in state.adapter.items() if is_trained(k, self.spec.lora_mode)}
        aggregator: StreamingAggregator | ClientNoise
        if self.spec.client_dp:
            aggregator = ClientNoise(
                spec_of(trained),
                reference=trained,
                max_norm=self.spec.update_norm_bound,
                noise_multiplier=self.spec.dp_client_noise,
                clip=self.spec.dp_client_clip,
            )
        else:
            aggregator = StreamingAggregator(
                spec_of(trained),
                reference=trained,
                max_norm=self.spec.update_norm_bound,
                max_weight=self.spec.max_examples_per_update,
            )
        state.aggregator = aggregator
        call = self._call()
        for node_id, reply in call.replies(state.messages):
            key = str(node_id)
            if reply.has_error():
                reason = self._declined(node_id, reply, rnd)
                training.rejected[key] = f"node error: {reason}"
                log(WARNING, "[ark] round %d: node %s failed: %s", rnd, node_id, reason)
                continue
            envelope, commitment = events.NO_ENVELOPE, None
            try:
                envelope, size = self.channel.envelope(reply)
                reported, before, after, loss = _split_metrics(reply)
                spent = reported_spending(reply, self.spec)
                if self.comparison is not None:
                    commitment = signed_record(reply.content, COMMITMENT_KEY)
                update = self.channel.open(node_id, reply, rnd, reported)
                weight = aggregator.add(
                    update.tensors, update.declared, held=state.job.weights.get(update.identity)
                )
            except (UpdateRejected, ScorecardError, KeyError, TypeError, ValueError) as exc:
                if self.comparison is not None:  # the node's claim stands either way
                    self.comparison.commitment(node_id, self.channel.ueid(node_id), commitment)
                training.rejected[key] = f"update rejected: {exc}"
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
            # Recorded (on disk) before it is logged: a store that fails stops the round
            # before the log says anything of this update.
            state.job.weights.setdefault(update.identity, weight.used)
            state.accepted[key] = envelope
            state.held_out[key] = before
            training.local[key] = after
            training.train_loss[key] = loss
            training.examples[key] = weight.used
            self._event(
                events.UpdateAccepted,
                round=rnd,
                node=node_id,
                envelope_sha256=envelope,
                envelope_bytes=size,
                examples=weight.used,
                **_clipping(weight),
            )
            self._spent(rnd, node_id, spent)
            if self.comparison is not None:
                self.comparison.commitment(node_id, self.channel.ueid(node_id), commitment)
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
                len(state.nodes),
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
        training.missing = sorted(call.missing)
        training.seconds = time.monotonic() - state.started

    def commit(self, state: RoundState) -> None:
        """Stage: with enough accepted updates and a valid aggregate, checkpoint the new
        global adapter and the round's records; otherwise the job stops here."""
        rnd, job, aggregator = state.round, state.job, state.aggregator
        if aggregator is None:
            raise RuntimeError("commit before collect")
        if aggregator.count < self.spec.min_nodes:
            raise FederationError(
                f"round {rnd}: only {aggregator.count} accepted updates, "
                f"min-nodes is {self.spec.min_nodes}"
            )
        try:
            result = aggregator.result()
        except AggregateInvalid as exc:
            raise AggregateInvalid(
                f"round {rnd}: {exc}; nothing was committed, the job stops after round {job.round}"
            ) from exc
        merged = state.merged = {**state.adapter, **result}
        _add_held_out(job.history.round(rnd - 1), state.held_out)
        job.history.round(rnd).training = state.training
        job.round = rnd
        digest = self._save(job, merged)
        accepted = state.accepted
        self._event_streamed(
            events.AggregateCommitted,
            {"updates": Streamed(len(accepted), accepted.values)},
            round=rnd,
            adapter_sha256=digest,
            examples=aggregator.total_weight,
            metrics=state.training.summary(),
        )
        if self.spec.client_dp:
            epsilon = client_epsilon(self.spec.dp_client_noise, rnd, self.spec.dp_delta)
            self._event(
                events.DpAggregate,
                round=rnd,
                nodes=aggregator.count,
                noise_multiplier=self.spec.dp_client_noise,
                clip=self.spec.dp_client_clip,
                delta=self.spec.dp_delta,
                epsilon=epsilon,
            )
            log(
                INFO,
                "[ark] round %d: client-level DP, epsilon %.3g after %d noisy aggregates",
                rnd,
                epsilon,
                rnd,
            )
        log(
            INFO,
            "[ark] round %d: aggregated %d updates (%g examples), checkpointed",
            rnd,
            aggregator.count,
            aggregator.total_weight,
        )

    def evaluate(self, state: RoundState) -> None:
        """Stage: each node's held-out metrics of the final adapter; the job is finished."""
        rnd = state.round
        # A local-model run's one message trains for the run's whole budget on each node.
        local = self.spec.model_id == LOCAL_MODEL
        timeout = self.spec.round_timeout * ((self.spec.num_rounds + 1) if local else 1)
        for node_id, reply in self._call(timeout).replies(state.messages):
            if reply.has_error():
                reason = self._declined(node_id, reply, rnd)
                log(WARNING, "[ark] evaluation on node %s failed: %s", node_id, reason)
                continue
            try:
                _, before, _, _ = _split_metrics(reply)
                scorecard = signed_record(reply.content, SCORECARD_KEY)
            except (ScorecardError, KeyError, TypeError, ValueError) as exc:
                log(WARNING, "[ark] evaluation reply from node %s is malformed: %r", node_id, exc)
                continue
            state.held_out[str(node_id)] = before
            if self.comparison is not None:
                self.comparison.scorecard(node_id, self.channel.ueid(node_id), scorecard)
        _add_held_out(state.job.history.round(rnd), state.held_out)
        state.job.finished = True
        self._save(state.job, state.adapter)

    def train_round(self, job: JobState, adapter: Adapter) -> Adapter:
        """Run one training round's stages; the new global adapter."""
        state = RoundState(job, job.round + 1, STAGE_TRAIN, adapter)
        for stage in self.training_stages():
            stage(state)
        if state.merged is None:
            raise RuntimeError("a training round ended without a commit")
        return state.merged

    def final_evaluation(self, job: JobState, adapter: Adapter) -> None:
        """Run the final evaluation's stages on the last round's adapter."""
        state = RoundState(job, job.round, STAGE_EVALUATE, adapter)
        for stage in self.evaluation_stages():
            stage(state)

    def run_local(self) -> None:
        """A comparison's local-model run (``model-id = "local"``): each admitted node
        fine-tunes its operator's own model in its sandbox with the run's whole budget and
        answers one evaluation instruction (carrying no adapter) with its held-out metrics
        and signed scorecard. No adapter travels either way; nothing is aggregated."""
        if not self.spec.comparison:
            raise ConfigError("a local-model run exists only in a comparison", key="model-id")
        job = JobState(fingerprint=self.spec.fingerprint(), round=0)
        self._event(
            events.RunStarted,
            rounds=self.spec.num_rounds,
            resumed_after_round=0,
            protection=self.spec.protection,
            model_id=self.spec.model_id,
            min_nodes=self.spec.min_nodes,
        )
        log(INFO, "[ark] job %s: each node fine-tunes its own model", self.spec.job_id)
        self.final_evaluation(job, {})
        write_outputs(build_results(self.spec, self.store.history(job)), self.out)
        self._event(
            events.RunFinished,
            rounds=0,
            adapter_sha256=self.store.adapter_digest(0),
            metrics={Key.FINAL: job.history.held_out(0)},
        )

    def run(self) -> None:
        if self.spec.model_id == LOCAL_MODEL:
            self.run_local()
            return
        state, adapter = self.start()
        self._event(
            events.RunStarted,
            rounds=self.spec.num_rounds,
            resumed_after_round=state.round,
            protection=self.spec.protection,
            model_id=self.spec.model_id,
            min_nodes=self.spec.min_nodes,
            **self._privacy_asked(),
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
        # The trained adapter first: a damaged metrics file must not hold it back.
        export_peft_adapter(self.model(), adapter, self.out / "adapter")
        write_outputs(build_results(self.spec, self.store.history(state)), self.out)
        self._event(
            events.RunFinished,
            rounds=state.round,
            adapter_sha256=self.store.adapter_digest(state.round),
            metrics={Key.FINAL: state.history.held_out(state.round)},
        )
        log(INFO, "[ark] job %s finished: results in %s", self.spec.job_id, self.out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated job described by the run config."""
    spec = RunSpec.from_run_config(context.run_config)
    log_sink = None if spec.log_db is None else LogSink(LogStore(spec.log_db))
    job = FederatedJob
    if spec.secure_aggregation:
        from server.secure_job import SecureJob  # it builds on this module

        job = SecureJob
    running = job(grid, spec, events=log_sink, run_id=context.run_id)
    try:
        running.run()
    except sqlite3.Error as exc:  # a full or unwritable disk under a store, typically
        raise FederationError(
            f"a SQLite store of the ServerApp failed ({type(exc).__name__}: {exc}); its "
            f"per-node records are under {running.out / JOB_FOLDER}"
        ) from exc
    finally:
        running.channel.close()
