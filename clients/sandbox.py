"""The node sandbox: the one long-lived process per node that a real TEE would hold.

It attests and has the model's content key released once, unseals the base model into
its memory once, and keeps there what must never leave the node or touch its disk: the
plaintext weights, each run's channel private key, and the open private data. It
re-attests when its attestation result expires or the sealed package changes, and
refuses to serve (a fixed code) when attestation fails.

Each request comes from the node's ClientApp, a ciphertext shuttle: the instruction's
envelope and the aggregator's evidence in, a sealed update and allowlisted scalar
metrics out. The sandbox checks the aggregator, opens the global adapter, trains and
evaluates, and decides what leaves: its reply passes the same egress checks the
ClientApp's guard applies again (``clients/egress.py``). The gRPC face of this class is
``clients/service.py``.

A sealed run's baseline and final global adapters are kept, encrypted at rest under a
key only this attested sandbox derives (``clients/adapters.py``), and :meth:`infer`
answers the node operator's own inference requests with them on the node (the local
HTTP API of ``clients/inference_api.py``); nothing of it leaves the node.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, MessageType, RecordDict

from clients import inference
from clients.adapters import (
    BASELINE,
    FINAL,
    AdapterKey,
    AdapterStore,
    stored_runs,
    stored_spec,
)
from clients.channel import Channels
from clients.channels import (
    Accepted,
    Hello,
    ModelSource,
    RunIds,
    UpdateChannel,
    UpdateRecords,
    journal,
    sealed_source,
    update_channel,
)
from clients.data import Split, load_examples, split_examples
from clients.egress import check_reply
from clients.model import NodeModel, Unsealed, certify_signing, load_node_model, model_package
from clients.scoring import (
    Scoring,
    own_model_digest,
    sign_commitment_bytes,
    sign_scorecard_bytes,
)
from clients.secagg import NodeRound
from sandbox import events
from sandbox.attestation.measure import CODE, code_measurement
from sandbox.canonical import canonical_entry
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, adapter_bytes, model_dir_digest
from sandbox.config import (
    DP_BUDGET,
    DP_CLIP,
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_TOTAL,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    LOCAL_MODEL,
    NodeConfig,
    RunSpec,
)
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import (
    ConfigError,
    InferenceTaskMismatch,
    InferenceUnavailable,
    KeyBrokerUnavailable,
    NoAdapterStored,
    ProtocolError,
    SecAggRefused,
    UpdateRejected,
)
from sandbox.events import node as node_events
from sandbox.journal import append_journal
from sandbox.keyfiles import load_ec_public
from sandbox.privacy import (
    Ledger,
    Settings,
    Spent,
    check_ask,
    client_noise_share,
    ledger_of,
    noise_share_std,
    resolve,
)
from sandbox.protocol import (
    BROKER_RETRY,
    COMMITMENT_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SCORECARD_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    SECAGG_KEY,
    SECAGG_MESSAGE_TYPE,
    SIGNED_KEY,
    metric_record,
    sealed_digest,
    secagg_record,
)
from sandbox.seal.package import MANIFEST
from sandbox.secagg import (
    MASKED_TENSOR,
    STAGE_CHECK,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    CheckRequest,
    MaskRequest,
    ShareRequest,
    UnmaskRequest,
    flatten,
)

if TYPE_CHECKING:
    from sandbox.lora import Adapter

log = logging.getLogger("ark.sandbox")
# Seconds between attempts to reach an unreachable key broker at start.
BROKER_RETRY_SECONDS = 3.0
# The most runs a sandbox holds a channel for at once (the oldest go first).
MAX_CHANNELS = 64
# The most secure-aggregation rounds a sandbox keeps state for at once (the oldest go).
MAX_SECURE_ROUNDS = 8
# The most revealed rounds a sandbox remembers, to refuse taking part in one again.
MAX_UNMASKED_ROUNDS = 4096
# The largest secure-aggregation request the sandbox parses: a share request carries
# every node's advertisement (about 2 KB each); the others are far smaller.
MAX_SHARE_REQUEST_BYTES = 32 * 1024 * 1024
MAX_SECAGG_REQUEST_BYTES = 4 * 1024 * 1024
# Renew the signing key's certification when it has less than this left to live.
CERTIFICATION_MARGIN = dt.timedelta(minutes=5)


# A round's DP settings on this node and what it would bring the run's and the node's
# epsilon to (None, None: no DP).
_Afforded = tuple[Settings | None, tuple[float, float] | None]


@dataclass(frozen=True)
class Request:
    """One instruction as the sandbox acts on it: whose, which round and stage, the run's
    validated spec, the instruction's records, and when its ClientApp process started."""

    ids: RunIds
    round: int
    stage: str
    spec: RunSpec
    content: RecordDict
    clientapp_started: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    """What leaves after training: the update's records, the scalar metrics and, in a
    comparison, the node's signed held-out commitment."""

    records: UpdateRecords
    metrics: dict[str, float]
    commitment: bytes = b""
    # With secure aggregation: the round's signed key advertisement (nothing else leaves).
    secagg: bytes = b""


@dataclass(frozen=True)
class EvaluateResult:
    """What leaves after the final evaluation: the scalar metrics and, in a comparison,
    the node's signed scorecard of the run."""

    metrics: dict[str, float]
    scorecard: bytes = b""


@dataclass(frozen=True)
class SecAggResult:
    """What leaves after a secure-aggregation stage: this node's message (shares or
    revealed shares), or in the mask stage the sealed masked input and the metrics."""

    payload: bytes = b""
    records: UpdateRecords = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Trained:
    """A secure round's local training, done: the exchange, the trained tensors and the
    metrics that leave with the masked input."""

    exchange: _Exchange
    update: Adapter
    metrics: dict[str, float]


@dataclass
class _Secure:
    """A secure-aggregation round in progress on this node: its protocol state and its
    local training (run in the background while the keys and shares are exchanged)."""

    request: Request
    state: NodeRound
    training: Future[_Trained]
    # What the round's update is computed from: the global adapter, the run's training
    # config (its fingerprint) and the round. A node adds its update to one sum per input.
    inputs: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Held:
    """The base model files in memory, and which source (and result) they came from."""

    key: tuple[Any, ...]
    unsealed: Unsealed
    models: dict[tuple[Any, ...], NodeModel] = field(default_factory=dict)
    # The stored adapters, sealed under a key derived from this model's content key.
    store: AdapterStore | None = None


@dataclass
class _Exchange:
    """An instruction being worked on: accepted, its model and data, and when the
    sandbox received it and how long it trained and evaluated."""

    request: Request
    accepted: Accepted
    loaded: NodeModel
    split: Split
    received: float
    work: float = 0.0

    @contextmanager
    def working(self) -> Iterator[None]:
        """Time the training and evaluation (what is not the per-message fixed cost)."""
        started = time.time()
        try:
            yield
        finally:
            self.work = time.time() - started

    def journal(
        self,
        node: NodeConfig,
        kind: type[events.Evaluate],
        metrics: dict[str, float],
        **fields: Any,
    ) -> None:
        """Journal the exchange: its round, attestation, envelopes, metrics and timings
        (when the forwarding ClientApp process started, when the sandbox received and
        answered it, and the seconds of training and evaluation in between)."""
        request = self.request
        journal(
            node,
            request.ids,
            kind,
            round=request.round,
            **self.accepted.attested(self.loaded),
            received_sha256=sealed_digest(request.content),
            metrics=metrics,
            timings={
                "process_start": request.clientapp_started,
                "handler_start": self.received,
                "work_seconds": self.work,
                "handler_end": time.time(),
            },
            **fields,
        )


def load_split(spec: RunSpec, node: NodeConfig) -> Split:
    """The node's private data, checked against the run's task and labels, split locally.

    A row whose label the run does not list fails as a :class:`~sandbox.errors.DataError`
    that names the file, row and label for the node's own log. The provider gets only
    the fixed ``clientapp-failed`` code for it, the same code as for any other failure (a
    missing or empty label included): a code of its own would tell the provider that the
    node holds a label outside the list it sent.
    """
    examples = load_examples(
        node.data_path, spec.task, labels=spec.labels or None, max_row_bytes=node.max_row_bytes
    )
    return split_examples(
        examples,
        heldout_fraction=node.heldout_fraction,
        seed=node.split_seed,
        source=node.data_path,
    )


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}-{name}": value for name, value in metrics.items()}


class NodeSandbox:
    """The sandbox's state and its three operations (see the module docstring).

    One instruction is worked on at a time (the model in memory is shared); a hello
    only talks to the key broker and runs beside them.
    """

    def __init__(self, node: NodeConfig):
        self.node = node
        self.channels: Channels = {}
        self._held: _Held | None = None
        self._splits: dict[tuple[Any, ...], Split] = {}
        self._work = threading.Lock()
        self._channels = threading.Lock()
        self._pending = False  # a preparation thread is waiting for the work lock
        self._scoring = Scoring(node)
        # The key this sandbox signs comparison records with: made in memory on first use
        # and certified by the key broker against this sandbox's attestation.
        self._signing_key: Ed25519PrivateKey | None = None
        self._signing_result: Any = None
        self._signing = threading.Lock()
        # Secure-aggregation rounds in progress, by (run, round), and the one worker that
        # trains them while their keys and shares are exchanged.
        self._secure: dict[tuple[int, int], _Secure] = {}
        # The inputs (global adapter, config, round) this sandbox revealed shares for,
        # newest last: it never adds an update on the same input to another sum.
        self._unmasked: dict[str, None] = {}
        self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ark-secure")
        # Differential privacy: the run's settings (one run at a time) and the ledger of
        # every DP round this node trained (its journal's), read on first use.
        self._settings: dict[tuple[Any, ...], Settings | None] = {}
        self._ledger: Ledger | None = None
        if node.threads:
            import torch

            torch.set_num_threads(node.threads)

    # -- the model in memory -----------------------------------------------------------
    def start(
        self,
        *,
        broker_wait: float = 0.0,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Attest and unseal now (a sealed node), so the first instruction finds the model
        in memory; an unprotected node reads its run's plaintext model on first use.

        While the key broker cannot be reached (it is down, or the link to the provider
        is), try again every few seconds for up to ``broker_wait`` seconds, saying so in
        the log each time; then raise KeyBrokerUnavailable. A denial is never retried."""
        if self.node.unprotected:
            return
        give_up = clock() + broker_wait
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._work:
                    self._unsealed(sealed_source(self.node))
                return
            except KeyBrokerUnavailable as exc:
                left = give_up - clock()
                if left <= 0:
                    raise
                pause = min(BROKER_RETRY_SECONDS, left)
                log.warning(
                    "%s (attempt %d: %s); trying again in %.0fs, for %.0fs more",
                    BROKER_RETRY,
                    attempt,
                    exc,
                    pause,
                    left,
                )
                if sleep(pause):  # the sandbox was told to stop meanwhile
                    raise

    @property
    def attestation(self) -> Any:
        """The result the held model's key was released on (None before or unprotected)."""
        return None if self._held is None else self._held.unsealed.attestation

    def _unsealed(self, source: ModelSource) -> _Held:
        """The held model files, read again (attesting again) when their source changed or
        the result they were released on expired. Nothing stale is kept on failure."""
        held = self._held
        if held is None or held.key != source.key or held.unsealed.expired(_now()):
            self._held = None  # a failed re-attestation leaves nothing to serve from
            self._held = held = _Held(source.key, source.load())
            log.info("model %s held in memory", held.unsealed.model_id)
        return held

    def _model(self, spec: RunSpec, source: ModelSource) -> NodeModel:
        """The run's base model with a LoRA adapter of its shape, built once per shape."""
        held = self._unsealed(source)
        shape = (spec.task, spec.labels, spec.lora, spec.lora_mode, spec.model_id)
        model = held.models.get(shape)
        if model is None:
            import torch

            held.models.clear()  # one built model at a time: memory stays one model's worth
            torch.manual_seed(spec.seed)  # the fresh adapter (and head) as the run seeds them
            model = held.models[shape] = load_node_model(spec, held.unsealed.build(spec))
        return model

    def _split(self, spec: RunSpec) -> Split:
        """The node's data for the run's task and labels, read once while the file is
        unchanged."""
        stat = self.node.data_path.stat()
        key = (spec.task, spec.labels, stat.st_mtime_ns, stat.st_size)
        split = self._splits.get(key)
        if split is None:
            self._splits.clear()
            split = self._splits[key] = load_split(spec, self.node)
        return split

    # -- the API -------------------------------------------------------------------------
    def hello(self, ids: RunIds, rnd: int, spec: RunSpec) -> Hello:
        """Open the run's channel: its key certified against this sandbox's attestation.
        Then, while the aggregator admits the other nodes, build the run's model and
        read its data in the background, so its first instruction finds both ready.
        A run asking a looser privacy budget than this node's is refused here."""
        check_ask(spec, self.node.privacy)
        channel = update_channel(spec, self.node, self.channels)
        with self._channels:
            answer = channel.hello(ids)
            # Keep the newest channels only: a flood of hellos cannot grow it without end.
            for run in list(self.channels)[:-MAX_CHANNELS]:
                del self.channels[run]
            prepare, self._pending = not self._pending, True
        journal(self.node, ids, events.Hello, round=rnd, suite=answer.suite)
        if prepare:  # one preparation waits at a time; otherwise the instruction builds
            threading.Thread(
                target=self._prepare, args=(spec, channel), name="ark-prepare", daemon=True
            ).start()
        return answer

    def _prepare(self, spec: RunSpec, channel: UpdateChannel) -> None:
        """Build the run's model and read its split ahead of its first instruction. A
        failure is only logged: the instruction meets it again and reports its code."""
        try:
            if spec.secure_aggregation:
                self._signer()  # certified now, not in the first round's key exchange
            with self._work:
                with self._channels:
                    self._pending = False
                self._model(spec, channel.model_source(spec))
                self._split(spec)
        except Exception as exc:
            log.warning("preparing the run's model and data failed: %s", type(exc).__name__)

    def _accept(self, request: Request) -> tuple[Accepted, NodeModel]:
        """Accept the instruction (before any private data is read), then have the model
        in memory carry its global adapter."""
        from sandbox.lora import load_adapter_state

        spec = request.spec
        channel = update_channel(spec, self.node, self.channels)
        accepted = channel.accept(request.content, request.ids, request.stage, request.round)
        loaded = self._model(spec, channel.model_source(spec))
        if spec.model_id == LOCAL_MODEL:
            # The operator's own model starts from its fresh adapter: nothing comes in.
            if accepted.adapter:
                raise ProtocolError("a local-model run's instruction carries an adapter")
        else:
            load_adapter_state(loaded.model, accepted.adapter)
        self._keep(request, accepted)
        return accepted, loaded

    def _keep(self, request: Request, accepted: Accepted) -> None:
        """Keep the run's baseline (round 1's train instruction) and final (the final
        evaluation's) global adapter, sealed at rest; only an attested sandbox does."""
        if request.stage == STAGE_EVALUATE:
            which = FINAL
        elif request.round == 1:
            which = BASELINE
        else:
            return
        held = self._held
        if held is None or held.unsealed.released is None:
            return  # unprotected: no content key, so nothing is kept
        path = self._store(held).store(
            request.ids.run_id, which, request.round, request.spec, accepted.adapter
        )
        log.info("kept run %d's %s adapter at %s", request.ids.run_id, which, path)

    def _store(self, held: _Held) -> AdapterStore:
        """The adapter store under the key the held model's release allows."""
        released = held.unsealed.released
        if released is None:
            raise InferenceUnavailable(
                f"node {self.node.name} is unprotected: it holds no content key, so it keeps "
                "no adapter and serves no inference"
            )
        if held.store is None:
            # The code measurement the key release was attested with (measured here if
            # the result does not carry it): another code derives another key.
            code = released.result.measurements.get(CODE) or code_measurement()
            key = AdapterKey(
                released.content_key, self.node.require_sandbox().ueid, code, released.model_id
            )
            held.store = AdapterStore(
                AdapterStore.directory_of(self.node.workspace()),
                key,
                model_path=held.unsealed.source,
            )
        return held.store

    def _signer(self) -> Ed25519PrivateKey:
        """The comparison signing key, certified by the key broker on first use for the
        node's own package's key id (a comparison needs an attested sandbox)."""
        if self.node.unprotected:
            raise ConfigError(
                f"node {self.node.name} is unprotected: it cannot sign a comparison's scorecards",
                path=self.node.source,
                key="node.unprotected",
            )
        with self._signing:
            result = self._signing_result
            if self._signing_key is None or result.expires_at - CERTIFICATION_MARGIN <= _now():
                key = self._signing_key or Ed25519PrivateKey.generate()
                key_id = model_package(self.node).manifest()["key_id"]
                self._signing_result = certify_signing(self.node, key_id, key.public_key())
                self._signing_key = key
                log.info("signing key certified (key id %s)", key_id)
            return self._signing_key

    def _held_now(self) -> _Held:
        if self._held is None:
            raise RuntimeError("no model is held: an instruction is worked on without one")
        return self._held

    def stored_runs(self) -> list[int]:
        """The runs whose final adapter is stored (file names only: nothing decrypted)."""
        if self.node.source is None:
            return []
        return stored_runs(AdapterStore.directory_of(self.node.workspace()), FINAL)

    @contextmanager
    def _exchange(self, request: Request, stage: str) -> Iterator[_Exchange]:
        """One instruction of ``stage`` worked on, with the work lock held: accepted, the
        model carrying its global adapter, the node's split read."""
        if request.stage != stage:
            raise ValueError(f"a {stage} request for stage {request.stage!r}")
        with self._work:
            received = time.time()
            accepted, loaded = self._accept(request)
            yield _Exchange(request, accepted, loaded, self._split(request.spec), received)

    def _local_training(
        self, exchange: _Exchange, afforded: _Afforded | None = None
    ) -> tuple[Adapter, dict[str, float], dict[str, float], float]:
        """Evaluate the incoming global adapter, train locally, evaluate again: the trained
        tensors, the metrics that leave, the held-out metrics before, the training time."""
        from clients.training import Private, evaluate, train_local
        from sandbox.lora import adapter_state, is_trained

        request = exchange.request
        spec = request.spec
        model, tokenizer, split = exchange.loaded.model, exchange.loaded.tokenizer, exchange.split
        privacy, spent = afforded or self._affordable(exchange)
        with exchange.working():
            before = evaluate(model, tokenizer, split.heldout, spec)
            seed = spec.seed * 1000 + request.round
            if spec.secure_aggregation:
                # The provider sets the seed: with it alone, training the same adapter on
                # the same rows again gives the same update, and two sums that differ by
                # one node would give that node's update. A secret part the provider does
                # not know makes each training this node's own.
                seed = int.from_bytes(secrets.token_bytes(8), "big")
            started = time.perf_counter()
            private = None
            if privacy is not None:
                private = Private(privacy.clip, privacy.noise_multiplier, privacy.sample_rate)
            loss = train_local(model, tokenizer, split.train, spec, seed=seed, private=private)
            train_seconds = time.perf_counter() - started
            after = evaluate(model, tokenizer, split.heldout, spec)
        update = {
            name: value
            for name, value in adapter_state(model).items()
            if is_trained(name, spec.lora_mode)
        }
        metrics: dict[str, float] = {
            NUM_EXAMPLES: float(len(split.train)),
            "heldout-examples": float(len(split.heldout)),
            **_prefixed("before", before),
            **_prefixed("after", after),
        }
        if privacy is None:  # under DP no training loss leaves: it is not noised
            metrics["train-loss"] = loss
        if privacy is not None and spent is not None:
            metrics.update(self._spend(request, privacy, *spent))
        return update, metrics, before, train_seconds

    def _affordable(self, exchange: _Exchange) -> _Afforded:
        """The run's DP settings on this node and what this round would bring its epsilon
        to (the run's, the node's total); PrivacyBudgetExhausted, before any training,
        when that passes a budget."""
        request = exchange.request
        privacy = self._privacy(request.spec, len(exchange.split.train))
        if privacy is None:
            return None, None
        spent = self._ledger_now().cost(
            request.ids.run_id, request.round, privacy, request.spec.local_steps
        )
        return privacy, spent

    # -- differential privacy ------------------------------------------------------------
    def _privacy(self, spec: RunSpec, examples: int) -> Settings | None:
        """The run's record-level DP settings on this node (its noise fitted once per run
        and training-set size); PrivacyBudgetRefused for an ask looser than the budget."""
        key = (spec.fingerprint(), spec.num_rounds, examples)
        if key not in self._settings:
            self._settings = {key: resolve(spec, self.node.privacy, examples)}
        return self._settings[key]

    def _ledger_now(self) -> Ledger:
        """Every DP round this node trained, read from its journal once."""
        if self._ledger is None:
            self._ledger = ledger_of(self.node)
        return self._ledger

    def _spend(
        self, request: Request, privacy: Settings, run_epsilon: float, total: float
    ) -> dict[str, float]:
        """Record a trained DP round in the ledger and the journal; its metrics."""
        ids, steps = request.ids, request.spec.local_steps
        mechanism = privacy.mechanism(steps)
        self._ledger_now().add(Spent(ids.run_id, request.round, mechanism, privacy.delta))
        journal(
            self.node,
            ids,
            node_events.DpRound,
            round=request.round,
            noise_multiplier=mechanism.noise_multiplier,
            sample_rate=mechanism.sample_rate,
            steps=steps,
            clip=privacy.clip,
            delta=privacy.delta,
            epsilon=run_epsilon,
            epsilon_total=total,
            budget=privacy.declared,
        )
        log.info(
            "run %d round %d: DP-SGD spent epsilon %.3g of the run's %g (node total %.3g of %s)",
            ids.run_id,
            request.round,
            run_epsilon,
            privacy.run_epsilon,
            total,
            privacy.declared or "no declared budget",
        )
        return {
            DP_NOISE_MULTIPLIER: mechanism.noise_multiplier,
            DP_SAMPLE_RATE: mechanism.sample_rate,
            DP_STEPS: float(steps),
            DP_CLIP: privacy.clip,
            DP_DELTA: privacy.delta,
            DP_EPSILON: run_epsilon,
            DP_EPSILON_TOTAL: total,
            DP_BUDGET: privacy.declared or 0.0,  # 0: the node declares no budget
        }

    def train(self, request: Request) -> TrainResult:
        """Evaluate the incoming global adapter, train locally, evaluate again, seal. With
        secure aggregation the reply is the round's key advertisement instead, and the
        training goes on in the background (see :meth:`secagg`)."""
        spec = request.spec
        if spec.model_id == LOCAL_MODEL:
            # The operator's own model never yields an update: only its scorecard leaves.
            raise ConfigError(
                "a local-model run sends no update; only its final evaluation is answered",
                key="model-id",
            )
        if spec.secure_aggregation:
            return self._train_secure(request)
        with self._exchange(request, STAGE_TRAIN) as exchange:
            update, metrics, before, train_seconds = self._local_training(exchange)
            records = exchange.accepted.reply(update, metrics[NUM_EXAMPLES])
            content = RecordDict({**records, METRICS_KEY: metric_record(metrics)})
            commitment = b""
            if spec.comparison:
                commitment = self._commit(exchange, before, train_seconds, content)
            self._egress(content, MessageType.TRAIN, spec)
            exchange.journal(
                self.node,
                events.Train,
                metrics,
                sent_sha256=sealed_digest(content, SEALED_UPDATE_KEY),
                tensors=sorted(update),
            )
            return TrainResult(records, metrics, commitment)

    # -- secure aggregation ------------------------------------------------------------
    def _train_secure(self, request: Request) -> TrainResult:
        """Stage 1 of a secure round: accept the instruction (the aggregator checked, the
        global adapter opened), start training in the background, and answer with this
        round's signed key advertisement."""
        ids = request.ids
        key = (ids.run_id, request.round)
        if key in self._secure:
            log.warning("run %d round %d instructed again: fresh keys", *key)
        spec = request.spec
        signer = self._signer()
        state = NodeRound(
            run=ids.run_id,
            round=request.round,
            node=ids.node_id,
            fraction=spec.secagg_threshold,
            clip=spec.secagg_clip,
            signer=signer,
            certificate=self._signing_result.token,
            result_key=load_ec_public(self.node.require_sandbox().result_key),
        )
        accepted = threading.Event()
        training = self._trainer.submit(self._secure_training, request, accepted)
        while not accepted.wait(0.05):
            if training.done():
                training.result()  # the instruction was refused: its error leaves
        advert = state.advertise()
        self._secure[key] = _Secure(request, state, training)
        for old in list(self._secure)[:-MAX_SECURE_ROUNDS]:
            del self._secure[old]
        content = RecordDict({SECAGG_KEY: secagg_record(advert.to_bytes())})
        self._egress(content, MessageType.TRAIN, spec)
        return TrainResult({}, {}, secagg=advert.to_bytes())

    def _secure_training(self, request: Request, accepted: threading.Event) -> _Trained:
        with self._exchange(request, STAGE_TRAIN) as exchange:
            afforded = self._affordable(exchange)  # past the budget: declined, not advertised
            accepted.set()
            update, metrics, _, _ = self._local_training(exchange, afforded)
            return _Trained(exchange, update, metrics)

    def secagg(self, ids: RunIds, rnd: int, stage: str, payload: bytes) -> SecAggResult:
        """Stages 2 to 5 of a secure round (``sandbox/secagg.py``): seal shares to the
        peers, mask and seal the update, sign the round's split, reveal shares. Each
        request is the aggregator's (hostile); the round's state refuses what the protocol
        does not allow."""
        secure = self._secure.get((ids.run_id, rnd))
        if secure is None:
            raise SecAggRefused(f"run {ids.run_id} round {rnd}: no secure round in progress")
        limit = MAX_SHARE_REQUEST_BYTES if stage == STAGE_SHARE else MAX_SECAGG_REQUEST_BYTES
        if len(payload) > limit:
            raise ProtocolError(f"a {stage!r} request of {len(payload)} bytes (at most {limit})")
        with secure.lock:  # one stage of a round at a time: "once" means once
            result = self._secagg_stage(secure, ids, rnd, stage, payload)
        content = RecordDict({**result.records})
        if result.payload:
            content[SECAGG_KEY] = secagg_record(result.payload)
        if result.metrics:
            content[METRICS_KEY] = metric_record(result.metrics)
        self._egress(content, SECAGG_MESSAGE_TYPE, secure.request.spec, stage)
        return result

    def _secagg_stage(
        self, secure: _Secure, ids: RunIds, rnd: int, stage: str, payload: bytes
    ) -> SecAggResult:
        if stage == STAGE_SHARE:
            bundle = secure.state.share(ShareRequest.from_bytes(payload))
            return SecAggResult(payload=bundle.to_bytes())
        if stage == STAGE_MASK:
            return self._masked(secure, MaskRequest.from_bytes(payload))
        if stage == STAGE_CHECK:
            signed = secure.state.check(CheckRequest.from_bytes(payload))
            return SecAggResult(payload=signed.to_bytes())
        if stage == STAGE_UNMASK:
            if secure.inputs in self._unmasked:
                # Masked twice on one input (two runs at once): only one sum is revealed.
                raise SecAggRefused(
                    f"run {ids.run_id} round {rnd}: this node already revealed a sum holding "
                    "its update on this global adapter and config"
                )
            reveal = secure.state.unmask(UnmaskRequest.from_bytes(payload))
            journal(
                self.node,
                ids,
                node_events.SecaggRevealed,
                round=rnd,
                seeds_of=sorted(reveal.seeds),
                keys_of=sorted(reveal.keys),
            )
            self._secure.pop((ids.run_id, rnd), None)
            self._unmasked[secure.inputs] = None
            for old in list(self._unmasked)[:-MAX_UNMASKED_ROUNDS]:
                del self._unmasked[old]
            return SecAggResult(payload=reveal.to_bytes())
        raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")

    def _masked(self, secure: _Secure, request: MaskRequest) -> SecAggResult:
        """Stage 3: wait for the round's training, validate the update here (what the
        aggregator can no longer do), quantize and mask it, seal it to the aggregator."""
        spec = secure.request.spec
        trained = secure.training.result(timeout=spec.round_timeout)
        secure.inputs = _inputs_digest(spec, secure.state.round, trained.exchange.accepted.adapter)
        if secure.inputs in self._unmasked:
            # A second sum with this node's update on the same input (a round run again,
            # in this run or another) would give the aggregator one node's update as the
            # difference of two sums.
            raise SecAggRefused(
                f"run {secure.state.run} round {secure.state.round}: this node's update on "
                "this global adapter and config is already in a sum; it is not masked again"
            )
        exchange = trained.exchange
        names = sorted(trained.update)
        delta = flatten(trained.update, names) - flatten(exchange.accepted.adapter, names)
        distance = float(np.linalg.norm(delta))
        if not distance <= spec.update_norm_bound:  # NaN included
            raise UpdateRejected(
                f"the update moves {distance:.4g} from the global adapter (L2), more than "
                f"update-norm-bound {spec.update_norm_bound:g}; it is not masked or sent"
            )
        examples = trained.metrics[NUM_EXAMPLES]
        cap = float(spec.max_examples_per_update)
        weight = min(examples, cap) / cap
        if spec.client_dp:
            delta, weight = self._noise_share(secure, delta), 1.0
        masked = secure.state.mask(request, delta, weight)
        records = exchange.accepted.reply_masked(masked, examples)
        content = RecordDict({**records, METRICS_KEY: metric_record(trained.metrics)})
        self._egress(content, SECAGG_MESSAGE_TYPE, spec, STAGE_MASK)
        exchange.journal(
            self.node,
            events.Train,
            trained.metrics,
            sent_sha256=sealed_digest(content, SEALED_UPDATE_KEY),
            tensors=[MASKED_TENSOR],
        )
        return SecAggResult(records=records, metrics=trained.metrics)

    def _noise_share(self, secure: _Secure, delta: np.ndarray) -> np.ndarray:
        """Client-level DP under secure aggregation: this node's update clipped to
        ``dp-client-clip`` and its share of the aggregate's noise added before masking,
        so that the sum of any ``t`` (the threshold) survivors' shares carries at least
        the whole noise; the aggregator never sees a noiseless sum."""
        spec, state = secure.request.spec, secure.state
        std = noise_share_std(spec.dp_client_noise, spec.dp_client_clip, state.threshold)
        shared = client_noise_share(delta, spec.dp_client_clip, std, spec.secagg_clip)
        journal(
            self.node,
            secure.request.ids,
            node_events.ClientNoiseAdded,
            round=state.round,
            noise_multiplier=spec.dp_client_noise,
            clip=spec.dp_client_clip,
            client_noise_std=std,
        )
        return shared

    def _commit(
        self,
        exchange: _Exchange,
        before: dict[str, float],
        train_seconds: float,
        content: RecordDict,
    ) -> bytes:
        """Count a comparison run's training round, and sign the node's commitment to
        its held-out set for the reply (every train reply of the run carries it, so a
        lost reply loses nothing). It goes into ``content`` for the egress check."""
        request = exchange.request
        sealed = content.config_records.get(SEALED_KEY)
        blob = sealed.get(SEALED_UPDATE_KEY) if sealed is not None else b""
        self._scoring.trained(
            request.ids.run_id,
            request.round,
            before=before,
            seconds=train_seconds,
            steps=request.spec.local_steps,
            update_bytes=len(blob) if isinstance(blob, bytes) else 0,
        )
        commitment = self._scoring.commitment(request.spec, exchange.split)
        return self._attach(
            content,
            COMMITMENT_KEY,
            sign_commitment_bytes(self._signer(), commitment),
            request.ids,
            node_events.HeldoutCommitment,
            round=request.round,
            comparison=commitment.comparison,
            root=commitment.root,
            count=commitment.count,
        )

    def _attach(
        self,
        content: RecordDict,
        key: str,
        signed: bytes,
        ids: RunIds,
        kind: type[events.InRun],
        **fields: Any,
    ) -> bytes:
        """Put a signed comparison record into the reply's ``content`` (for the egress
        check), and journal its digest; returns it."""
        content[key] = ConfigRecord({SIGNED_KEY: signed})
        journal(self.node, ids, kind, record_sha256=sha256_hex(signed), **fields)
        return signed

    def evaluate(self, request: Request) -> EvaluateResult:
        """Evaluate the instruction's global adapter on the local held-out split (and, in
        a comparison, sign the run's scorecard)."""
        from clients.training import evaluate

        spec = request.spec
        if spec.model_id == LOCAL_MODEL and not spec.comparison:
            raise ConfigError("a local-model run exists only in a comparison", key="model-id")
        with self._exchange(request, STAGE_EVALUATE) as exchange:
            if spec.model_id == LOCAL_MODEL:
                return self._score_local(exchange)
            loaded = exchange.loaded
            with exchange.working():
                started = time.perf_counter()
                result = evaluate(loaded.model, loaded.tokenizer, exchange.split.heldout, spec)
                eval_seconds = time.perf_counter() - started
            metrics = {
                NUM_EXAMPLES: float(len(exchange.split.heldout)),
                **_prefixed("before", result),
            }
            content = RecordDict({METRICS_KEY: metric_record(metrics)})
            scorecard = b""
            if spec.comparison:
                scorecard = self._score(exchange, result, eval_seconds, content)
            self._egress(content, MessageType.EVALUATE, spec)
            exchange.journal(self.node, events.Evaluate, metrics)
            return EvaluateResult(metrics, scorecard)

    def _score_local(self, exchange: _Exchange) -> EvaluateResult:
        """A comparison's local-model run: fine-tune the operator's own model here with
        the run's whole budget (rounds x local steps), score it before and after on the
        committed held-out set, and answer with the metrics and the signed scorecard
        only. Its adapter stays in memory until the next run and goes nowhere."""
        from clients.training import evaluate, train_local
        from sandbox.lora import adapter_state, is_trained

        request, loaded, split = exchange.request, exchange.loaded, exchange.split
        spec = request.spec
        budget = dataclasses.replace(spec, local_steps=spec.local_steps * spec.num_rounds)
        model, tokenizer = loaded.model, loaded.tokenizer
        try:
            with exchange.working():
                before = evaluate(model, tokenizer, split.heldout, spec)
                started = time.perf_counter()
                train_local(model, tokenizer, split.train, budget, seed=spec.seed * 1000 + 1)
                train_seconds = time.perf_counter() - started
                started = time.perf_counter()
                after = evaluate(model, tokenizer, split.heldout, spec)
                eval_seconds = time.perf_counter() - started
            adapter = {
                k: v for k, v in adapter_state(model).items() if is_trained(k, spec.lora_mode)
            }
        finally:
            # The next local-model run starts again from the untrained model.
            self._held_now().models.clear()
        self._scoring.trained(
            request.ids.run_id,
            1,
            before=before,
            seconds=train_seconds,
            steps=budget.local_steps,
            update_bytes=0,
        )
        metrics = {NUM_EXAMPLES: float(len(split.heldout)), **_prefixed("before", after)}
        content = RecordDict({METRICS_KEY: metric_record(metrics)})
        folder = self._held_now().unsealed.source
        scorecard = self._score(
            exchange,
            after,
            eval_seconds,
            content,
            manifest_sha256=own_model_digest(self._scoring.salt(), model_dir_digest(folder)),
            adapter=adapter,
        )
        self._egress(content, MessageType.EVALUATE, spec)
        exchange.journal(self.node, events.Evaluate, metrics)
        return EvaluateResult(metrics, scorecard)

    def _score(
        self,
        exchange: _Exchange,
        after: dict[str, float],
        eval_seconds: float,
        content: RecordDict,
        *,
        manifest_sha256: str | None = None,
        adapter: Adapter | None = None,
    ) -> bytes:
        """Sign the run's scorecard of the model held now, for the final evaluation's
        reply (it goes into ``content`` for the egress check). A catalog model is named
        by its package's manifest digest and the final global adapter; the local model
        by its folder's weights digest and the adapter trained here."""
        request = exchange.request
        held = self._held_now()
        scorecard = self._scoring.scorecard(
            request.spec,
            request.ids.run_id,
            model_id=held.unsealed.model_id,
            manifest_sha256=manifest_sha256 or sha256_file(held.unsealed.source / MANIFEST)[0],
            adapter=exchange.accepted.adapter if adapter is None else adapter,
            commitment=self._scoring.commitment(request.spec, exchange.split),
            after=after,
            eval_seconds=eval_seconds,
        )
        return self._attach(
            content,
            SCORECARD_KEY,
            sign_scorecard_bytes(self._signer(), scorecard),
            request.ids,
            node_events.ScorecardSigned,
            comparison=scorecard.comparison,
            model_id=scorecard.model_id,
            heldout_root=scorecard.heldout_root,
        )

    def infer(self, body: bytes, endpoint: str) -> dict[str, Any]:
        """Answer a local inference request (``body``, hostile JSON; ``endpoint``
        classify or complete) with a stored adapter, and journal counts and digests of
        it, never a text. Whatever fails is journaled with its fixed code and raised."""
        try:
            request = inference.parse_request(body, endpoint, max_row_bytes=self.node.max_row_bytes)
            run_id, response = self._infer(request, endpoint)
        except Exception as exc:
            reason = inference.failure_message(exc)
            log.error("inference refused (%s): %s", inference.failure_code(exc), reason)
            append_journal(
                self.node,
                events.InferenceRefused(
                    request_sha256=sha256_hex(body),
                    code=inference.failure_code(exc),
                    reason=reason,
                ),
            )
            raise
        append_journal(
            self.node,
            events.InferenceServed(
                run_id=run_id,
                adapter=request.which,
                count=len(request.texts),
                request_sha256=request.request_sha256,
                response_sha256=sha256_hex(canonical_entry(response)),
            ),
        )
        return response

    def _infer(
        self, request: inference.InferenceRequest, endpoint: str
    ) -> tuple[int, dict[str, Any]]:
        from sandbox.lora import load_adapter_state

        if self.node.unprotected:
            raise InferenceUnavailable(
                f"node {self.node.name} is unprotected: it keeps no adapter and serves no inference"
            )
        with self._work:  # the model in memory is the one training uses
            run_id = request.run_id
            if run_id is None:
                finished = self.stored_runs()
                if not finished:
                    raise NoAdapterStored(
                        f"node {self.node.name} has no stored final adapter yet: no sealed "
                        "run has reached its final evaluation here"
                    )
                run_id = finished[-1]
            path = AdapterStore.path_in(self.node.workspace(), run_id, request.which)
            if not path.exists():
                raise NoAdapterStored(
                    f"node {self.node.name} has no stored {request.which} adapter of run {run_id}"
                )
            # The model the adapter was trained on (a catalog model, or the node's own).
            source = sealed_source(self.node, stored_spec(path))
            held = self._unsealed(source)  # attests again if the result expired
            stored = self._store(held).load(run_id, request.which)
            spec = stored.spec
            wanted = endpoint == inference.CLASSIFY
            if inference.is_classification(spec) != wanted:
                raise InferenceTaskMismatch(
                    f"run {run_id} fine-tuned for {spec.task}; use the "
                    f"{inference.COMPLETE if wanted else inference.CLASSIFY} endpoint"
                )
            loaded = self._model(spec, source)
            load_adapter_state(loaded.model, stored.tensors)
            if wanted:
                answers = inference.classify(loaded.model, loaded.tokenizer, spec, request.texts)
                key = "predictions"
            else:
                answers = inference.complete(
                    loaded.model, loaded.tokenizer, spec, request.texts, request.max_new_tokens
                )
                key = "completions"
        return run_id, {"run_id": run_id, "adapter": request.which, key: answers}

    def _egress(
        self, content: RecordDict, kind: str, spec: RunSpec, stage: str | None = None
    ) -> None:
        """The sandbox's own egress decision: what it lets out is exactly what the
        ClientApp's guard allows (an unprotected node has neither)."""
        if not self.node.unprotected:
            check_reply(content, self.node.egress, kind, run=spec, node=self.node, stage=stage)


def _inputs_digest(spec: RunSpec, rnd: int, adapter: Adapter) -> str:
    """What a secure round's update is computed from: the run's training config (its
    fingerprint), the round and the global adapter it started from; the run id is left
    out, so a round run again, in this run or a resumed one, is the same input."""
    adapter_sha256 = hashlib.sha256(adapter_bytes(adapter)).hexdigest()
    identity = f"{spec.fingerprint()}|{rnd}|{adapter_sha256}"
    return hashlib.sha256(identity.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
