"""Event histories for the transparency-log tests and bench: what an honest provider's key
broker and ServerApp append over whole runs, with the same fields the real services emit,
and helpers that build a signed log from them."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandbox.attestation.result import (
    AFFIRMING,
    PURPOSE_CHANNEL,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
)
from sandbox.attestation.stub import STUB_TEE
from sandbox.canonical import canonical_entry
from sandbox.channel import STAGE_TRAIN
from sandbox.config import PROTECTION_SEALED, NodeConfig
from sandbox.events import (
    AggregateCommitted,
    AggregatorSeen,
    AttestationAppraised,
    ChannelCertified,
    ComparedModel,
    ComparisonFinished,
    ComparisonStarted,
    DenialsRateLimited,
    DpAggregate,
    DpRound,
    DpSpent,
    Event,
    FileDigest,
    HeldoutCommitted,
    Key,
    KeyAttestation,
    KeyDenied,
    KeyReleased,
    ModelPublished,
    NodeAdmitted,
    NodeDeclined,
    Participant,
    RoundStarted,
    RunFinished,
    RunStarted,
    ScorecardLogged,
    SecaggAdvertised,
    SecaggNode,
    SecaggStage,
    SecaggUnmasked,
    SentDigest,
    Train,
    UpdateAccepted,
    UpdateRejected,
)
from sandbox.events.members import per_member
from sandbox.events.node import SecaggRevealed
from sandbox.journal import append_journal
from sandbox.ops.translog.audit import LEDGER_NUMBERS
from sandbox.privacy import Mechanism, epsilon_of
from sandbox.scorecard import (
    Commitment,
    Cost,
    Scorecard,
    heldout_leaf,
    heldout_root,
    sign_commitment,
    sign_scorecard,
    signer_sha256,
)
from sandbox.secagg import STAGE_CHECK, STAGE_MASK, STAGE_SHARE
from sandbox.translog.note import NoteSigner, log_origin
from sandbox.translog.store import LogStore

TIME = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
JOB = "demo"
KEY_ID = "minilm-0001"
MODEL_ID = "minilm"


def digest(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _ueid(node: str) -> str:
    return digest("ueid", node)[:32]


def attestation(
    session: str, purpose: str, node: str, *, status: str = AFFIRMING
) -> dict[str, Any]:
    return AttestationAppraised(
        time=TIME,
        session=session,
        key_id=KEY_ID,
        tee=STUB_TEE,
        purpose=purpose,
        status=status,
        ear_sha256=digest("ear", session),
        stub=True,
        policy_id="ark-provider-policy/test",
        ueid=_ueid(node),
        measurements={"code": digest("code")},
        trustworthiness={"executables": 2},
        failure=None,
        tee_pubkey_sha256=digest("tee", session),
    ).to_json()


def release(session: str, node: str) -> dict[str, Any]:
    return KeyReleased(
        time=TIME,
        session=session,
        key_id=KEY_ID,
        tee=STUB_TEE,
        purpose=PURPOSE_KEY_RELEASE,
        model_id=MODEL_ID,
        ueid=_ueid(node),
        ear_sha256=digest("ear", session),
        tee_pubkey_sha256=digest("tee", session),
    ).to_json()


def denial(session: str, code: str, cause: str, *, client: str = "flooder") -> dict[str, Any]:
    """The key broker denying an attestation on ``session``: values it holds as they are,
    what the client sent as sizes and digests only."""
    sent = {"session": 22, "key_id": 11, "tee": 4, "purpose": 11, "evidence": 900}
    return KeyDenied(
        time=TIME,
        session=session,
        key_id=KEY_ID,
        tee=STUB_TEE,
        purpose=PURPOSE_KEY_RELEASE,
        request={
            name: SentDigest(bytes=size, sha256=digest(name, session))
            for name, size in sent.items()
        },
        client=digest("client", client)[:32],
        code=code,
        cause=cause,
        ear_sha256=None,
    ).to_json()


def denials_rate_limited(
    suppressed: int = 1000, *, logged: int = 16, client: str | None = "flooder"
) -> dict[str, Any]:
    """The key broker's summary of one window of denials it counted instead of logging
    (``client`` None: the window shared by all clients)."""
    return DenialsRateLimited(
        time=TIME,
        scope="all" if client is None else "client",
        client=None if client is None else digest("client", client)[:32],
        window_start=TIME,
        window_end=TIME + dt.timedelta(minutes=1),
        logged=logged,
        suppressed=suppressed,
        codes={"SESSION_UNKNOWN": suppressed},
    ).to_json()


def denial_flood(budget: int = 16) -> list[dict[str, Any]]:
    """What a flood of bogus attestations from one client leaves in the log: its budget
    of denials and one summary of the rest."""
    denials = [denial(f"flood-{n}", "SESSION_UNKNOWN", "SessionUnknown") for n in range(budget)]
    return [*denials, denials_rate_limited(logged=budget)]


def admission(run: int, node: int, session: str, tee: str) -> dict[str, Any]:
    """The ServerApp admitting ``node`` to ``run`` under the channel attestation of
    ``session``, made by the TEE of node name ``tee`` (its ueid)."""
    return NodeAdmitted(
        time=TIME,
        run=run,
        job=JOB,
        node=node,
        ear_sha256=digest("ear", session),
        ueid=_ueid(tee),
        tee_pubkey_sha256=digest("tee", session),
    ).to_json()


def node_declined(run: int, rnd: int, node: int) -> dict[str, Any]:
    """The ServerApp recording that ``node`` answered round ``rnd`` with an error."""
    return NodeDeclined(
        time=TIME, run=run, job=JOB, round=rnd, node=node, reason="clientapp-failed"
    ).to_json()


def rejected(accepted: dict[str, Any], reason: str = "update rejected") -> dict[str, Any]:
    """The ServerApp rejecting the update an ``update_accepted`` record names."""
    event = UpdateAccepted.from_json(accepted)
    return UpdateRejected(
        time=event.time,
        run=event.run,
        job=event.job,
        round=event.round,
        node=event.node,
        envelope_sha256=event.envelope_sha256,
        reason=reason,
    ).to_json()


def channel_admission(run: int, node: int, name: str) -> list[dict[str, Any]]:
    """Node name ``name``'s channel attestation, appraised and certified by the key broker,
    and the ServerApp admitting it to ``run`` as Flower node ``node``."""
    session = f"r{run}-n{node}-channel"
    return [
        attestation(session, PURPOSE_CHANNEL, name),
        ChannelCertified(
            time=TIME,
            session=session,
            key_id=KEY_ID,
            tee=STUB_TEE,
            purpose=PURPOSE_CHANNEL,
            ueid=_ueid(name),
            ear_sha256=digest("ear", session),
            tee_pubkey_sha256=digest("tee", session),
        ).to_json(),
        admission(run, node, session, name),
    ]


def run_events(run: int, *, rounds: int = 2, nodes: int = 3) -> list[dict[str, Any]]:
    """One honest sealed run: channel attestations, admissions, rounds, aggregates."""
    job: dict[Key, Any] = {Key.TIME: TIME, Key.RUN: run, Key.JOB: JOB}
    events: list[dict[str, Any]] = [
        RunStarted(
            **job,
            rounds=rounds,
            protection=PROTECTION_SEALED,
            resumed_after_round=0,
            model_id=MODEL_ID,
            min_nodes=2,
        ).to_json(),
    ]
    for node in range(1, nodes + 1):
        events += channel_admission(run, node, f"node-{node}")
    for rnd in range(1, rounds + 1):
        participants = [
            Participant(node=node, instruction_sha256=digest("in", run, rnd, node))
            for node in range(1, nodes + 1)
        ]
        events.append(
            RoundStarted(**job, round=rnd, stage=STAGE_TRAIN, participants=participants).to_json()
        )
        updates = []
        for node in range(1, nodes + 1):
            envelope = digest("up", run, rnd, node)
            updates.append(envelope)
            events.append(
                UpdateAccepted(
                    **job,
                    round=rnd,
                    node=node,
                    envelope_sha256=envelope,
                    envelope_bytes=306244,
                    examples=40.0,
                ).to_json()
            )
        events.append(
            AggregateCommitted(
                **job,
                round=rnd,
                adapter_sha256=digest("adapter", run, rnd),
                updates=updates,
                examples=40.0 * nodes,
                metrics={
                    "updates": float(nodes),
                    "local_accuracy": 0.5 + rnd / 10,
                    "train_loss": 1.0 / rnd,
                },
            ).to_json()
        )
    events.append(
        RunFinished(
            **job,
            rounds=rounds,
            adapter_sha256=digest("adapter", run, rounds),
            metrics={Key.FINAL: {str(n): {"accuracy": 0.8} for n in range(1, nodes + 1)}},
        ).to_json()
    )
    return events


def honest_history(runs: int = 1, *, rounds: int = 2, nodes: int = 3) -> list[dict[str, Any]]:
    """Model publication, per-node key releases, then ``runs`` runs."""
    events: list[dict[str, Any]] = [
        ModelPublished(
            time=TIME,
            model_id=MODEL_ID,
            key_id=KEY_ID,
            files=[FileDigest(name="model.safetensors", sha256=digest("weights"))],
        ).to_json()
    ]
    for node in range(1, nodes + 1):
        session = f"release-{node}"
        events += [
            attestation(session, PURPOSE_KEY_RELEASE, f"node-{node}"),
            release(session, f"node-{node}"),
        ]
    for run in range(1, runs + 1):
        events += run_events(run, rounds=rounds, nodes=nodes)
    return events


def history_of_size(size: int) -> Iterable[dict[str, Any]]:
    """At least ``size`` honest events (whole runs), cut to exactly ``size``."""
    produced, run = 0, 0
    for event in honest_history(1):
        if produced == size:
            return
        yield event
        produced += 1
    while produced < size:
        run += 1
        for event in run_events(run + 1):
            if produced == size:
                return
            yield event
            produced += 1


def train_entry(run: int, node: int, rnd: int, **changes: Any) -> dict[str, Any]:
    """Node ``node``'s journal entry for training round ``rnd`` of an honest ``run`` of
    ``run_events`` (the entry :func:`~sandbox.journal.append_journal` is given)."""
    entry = Train(
        run_id=run,
        node_id=node,
        round=rnd,
        attestation=KeyAttestation(
            ear_sha256=digest("ear", f"release-{node}"),
            status=AFFIRMING,
            session=f"release-{node}",
            stub=True,
        ),
        aggregator=AggregatorSeen(ueid=_ueid("aggregator"), stub=True),
        received_sha256=digest("in", run, rnd, node),
        sent_sha256=digest("up", run, rnd, node),
        metrics={"num-examples": 40.0},
        tensors=["lora_A", "lora_B"],
        timings={"handler_start": 1.0, "handler_end": 2.0},
    )
    return {**entry.to_json(), **changes}


def node_journal(run: int, node: int, rounds: int = 2) -> list[dict[str, Any]]:
    """What node ``node``'s journal holds for an honest ``run`` of ``run_events``."""
    return [train_entry(run, node, rnd) for rnd in range(1, rounds + 1)]


def write_journal(folder: Path, entries: Iterable[dict[str, Any]]) -> Path:
    """A signed node journal (``alpine.jsonl`` in ``folder``) holding ``entries``."""
    node = NodeConfig(
        name="alpine", data_path=folder / "d.jsonl", journal_path=folder / "alpine.jsonl"
    )
    for entry in entries:
        append_journal(node, entry)
    assert node.journal_path is not None
    return node.journal_path


def per_member_form(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` as the ServerApp logs them: each growing list one ``list_member``
    entry per member, then its event with the list committed (``per_member``)."""
    return [logged.to_json() for event in events for logged in per_member(Event.from_json(event))]


def new_signer() -> NoteSigner:
    key = Ed25519PrivateKey.generate()
    return NoteSigner(log_origin(key.public_key()), key)


def build_log(path: Path, events: Iterable[dict[str, Any]], signer: NoteSigner) -> LogStore:
    """A log at ``path`` holding ``events``, with a signed checkpoint of all of them."""
    store = LogStore(path, durable=False)
    store.append_many(canonical_entry(event) for event in events)
    store.sign_checkpoint(signer)
    return store


# -- secure aggregation ----------------------------------------------------------------------

# A secure run's Flower ids: random unsigned 64-bit, beyond 2**53 (the log spells them as text).
SECURE_RUN = 16401725734191279431


def secure_node(number: int) -> int:
    """The Flower node id of node name ``node-<number>`` in a secure run."""
    return 2**63 + number


def masked_input(run: int, rnd: int, node: int) -> str:
    """The SHA-256 of the envelope of ``node``'s masked input in round ``rnd``."""
    return digest("masked", run, rnd, node)


def secure_run_events(
    run: int = SECURE_RUN, *, rounds: int = 2, nodes: int = 4, dropped: dict[int, int] | None = None
) -> list[dict[str, Any]]:
    """One honest run with secure aggregation, as the ServerApp logs it: its nodes
    (``node-1`` … as :func:`secure_node` ids) admitted; each round started, then the
    protocol's stages (every node advertises and shares; ``dropped[round]``, a node number,
    sends no masked input; the survivors reveal), then the aggregate of the masked inputs.
    No ``update_accepted``: the aggregator never sees an update on its own."""
    job: dict[Key, Any] = {Key.TIME: TIME, Key.RUN: run, Key.JOB: JOB}
    ids = [secure_node(n) for n in range(1, nodes + 1)]
    events: list[dict[str, Any]] = [
        RunStarted(
            **job,
            rounds=rounds,
            protection=PROTECTION_SEALED,
            resumed_after_round=0,
            model_id=MODEL_ID,
            min_nodes=2,
        ).to_json(),
    ]
    for number, node in enumerate(ids, 1):
        events += channel_admission(run, node, f"node-{number}")
    for rnd in range(1, rounds + 1):
        gone = [secure_node(n) for n in [(dropped or {}).get(rnd)] if n is not None]
        survivors = [node for node in ids if node not in gone]
        participants = [
            Participant(node=node, instruction_sha256=digest("in", run, rnd, node)) for node in ids
        ]
        updates = [masked_input(run, rnd, node) for node in survivors]
        events += [
            RoundStarted(**job, round=rnd, stage=STAGE_TRAIN, participants=participants).to_json(),
            SecaggAdvertised(
                **job,
                round=rnd,
                nodes=[
                    SecaggNode(node=node, ueid=_ueid(f"node-{n}"), signer_sha256=digest("sig", n))
                    for n, node in enumerate(ids, 1)
                ],
            ).to_json(),
            SecaggStage(**job, round=rnd, stage=STAGE_SHARE, nodes=ids).to_json(),
            SecaggStage(
                **job, round=rnd, stage=STAGE_MASK, nodes=survivors, envelopes=updates
            ).to_json(),
            *(
                [SecaggStage(**job, round=rnd, stage=STAGE_CHECK, nodes=survivors).to_json()]
                if gone
                else []  # nobody dropped: the survivors reveal seeds without signing
            ),
            SecaggUnmasked(
                **job, round=rnd, survivors=survivors, dropped=gone, revealed_by=survivors
            ).to_json(),
            AggregateCommitted(
                **job,
                round=rnd,
                adapter_sha256=digest("adapter", run, rnd),
                updates=updates,
                examples=40.0 * len(survivors),
                metrics={"updates": float(len(survivors)), "local_accuracy": 0.5},
            ).to_json(),
        ]
    events.append(
        RunFinished(
            **job,
            rounds=rounds,
            adapter_sha256=digest("adapter", run, rounds),
            metrics={Key.FINAL: {str(node): {"accuracy": 0.8} for node in ids}},
        ).to_json()
    )
    return events


def secure_node_journal(
    number: int,
    run: int = SECURE_RUN,
    *,
    rounds: int = 2,
    nodes: int = 4,
    dropped: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """What node ``node-<number>``'s journal holds for :func:`secure_run_events`: in each
    round it did not drop out of, its training with the masked input it sent, then its key
    shares revealed (the survivors' seeds, the dropped node's masking key)."""
    node = secure_node(number)
    entries = []
    for rnd in range(1, rounds + 1):
        gone = [secure_node(n) for n in [(dropped or {}).get(rnd)] if n is not None]
        if node in gone:
            continue
        survivors = [secure_node(n) for n in range(1, nodes + 1) if secure_node(n) not in gone]
        entries.append(train_entry(run, node, rnd, sent_sha256=masked_input(run, rnd, node)))
        revealed = SecaggRevealed(
            run_id=run, node_id=node, round=rnd, seeds_of=survivors, keys_of=gone
        )
        entries.append(revealed.to_json())
    return entries


# -- comparisons (1+N): held-out commitments and signed scorecards ---------------------------

COMPARISON = "cmp-1"
TASK = "sequence-classification"
# Flower run ids are random unsigned 64-bit: beyond 2**53, the log spells them as text.
COMPARISON_RUN = 16401725734191279427
HELDOUT = 40


def ueid_of(node: str) -> str:
    """The ueid of node name ``node``'s TEE, as the other histories here name it."""
    return _ueid(node)


def signing_key(node: str) -> Ed25519PrivateKey:
    """Node ``node``'s sandbox signing key: fixed per name, so logs are reproducible."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"sign/{node}".encode()).digest())


def signing_certification(
    node: str, key: Ed25519PrivateKey, *, ueid: str | None = None, purpose: str = PURPOSE_SIGNING
) -> list[dict[str, Any]]:
    """The key broker appraising node ``node``'s sandbox and certifying ``key`` as its
    signing key (``ueid``: the ueid the certification names, the node's own by default)."""
    session = f"sign-{node}-{signer_sha256(key.public_key())[:8]}"
    tee_key = signer_sha256(key.public_key())
    appraisal = {**attestation(session, purpose, node), Key.TEE_PUBKEY_SHA256: tee_key}
    certified = ChannelCertified(
        time=TIME,
        session=session,
        key_id=KEY_ID,
        tee=STUB_TEE,
        purpose=purpose,
        ueid=ueid or _ueid(node),
        ear_sha256=digest("ear", session),
        tee_pubkey_sha256=tee_key,
    ).to_json()
    if ueid is not None:
        appraisal[Key.UEID] = ueid
    return [appraisal, certified]


def heldout_set(node: str, count: int = HELDOUT) -> tuple[str, int]:
    """The root and size of node ``node``'s held-out set (``count`` salted examples)."""
    salt = hashlib.sha256(f"salt/{node}".encode()).digest()
    leaves = [heldout_leaf(salt, f"{node} example {n}", f"label-{n % 3}") for n in range(count)]
    return heldout_root(leaves), count


def committed(
    node: str,
    number: int,
    *,
    run: int = COMPARISON_RUN,
    comparison: str = COMPARISON,
    key: Ed25519PrivateKey | None = None,
    heldout: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The ServerApp logging node ``node``'s (Flower node ``number``) signed commitment to
    its held-out set (``heldout``: another set than its own)."""
    root, count = heldout or heldout_set(node)
    commitment = Commitment(comparison=comparison, ueid=_ueid(node), root=root, count=count)
    return HeldoutCommitted(
        time=TIME,
        run=run,
        job=JOB,
        node=number,
        comparison=comparison,
        commitment=sign_commitment(key or signing_key(node), commitment),
    ).to_json()


def scorecard(
    node: str,
    model_id: str,
    *,
    run: int = COMPARISON_RUN,
    comparison: str = COMPARISON,
    heldout: tuple[str, int] | None = None,
    accuracy: float = 0.8,
    ueid: str | None = None,
) -> Scorecard:
    """Node ``node``'s scorecard of ``model_id`` on its held-out set (or ``heldout``)."""
    root, count = heldout or heldout_set(node)
    return Scorecard(
        comparison=comparison,
        run=run,
        job=JOB,
        ueid=ueid or _ueid(node),
        model_id=model_id,
        manifest_sha256=digest("manifest", model_id),
        adapter_sha256=digest("adapter", model_id, node),
        heldout_root=root,
        heldout_count=count,
        before={"accuracy": 0.4, "macro_f1": 0.3},
        after={"accuracy": accuracy, "macro_f1": accuracy - 0.1},
        cost=Cost(
            train_seconds_per_step=0.25,
            inference_ms_per_example=3.5,
            update_bytes_per_round=306244,
            adapter_bytes=306244,
        ),
    )


def scored(
    number: int, card: Scorecard, key: Ed25519PrivateKey, *, comparison: str | None = None
) -> dict[str, Any]:
    """The ServerApp logging ``card``, signed by ``key``, as Flower node ``number`` sent it."""
    return ScorecardLogged(
        time=TIME,
        run=card.run,
        job=JOB,
        node=number,
        comparison=comparison or card.comparison,
        scorecard=sign_scorecard(key, card),
    ).to_json()


@dataclass
class ComparisonLog:
    """An honest comparison's events, and what attacks on it need: its models (the
    first scores lowest: the losing one) and nodes (name -> Flower node number)."""

    events: list[dict[str, Any]]
    models: list[str]
    nodes: dict[str, int] = field(default_factory=dict)

    def find(self, kind: str, **where: Any) -> int:
        """The index of the first event of ``kind`` whose fields (or, for a signed
        record, its body's) equal ``where``."""
        for index, event in enumerate(self.events):
            if event[Key.KIND] != kind:
                continue
            body: dict[str, Any] = {}
            for signed in (Key.COMMITMENT, Key.SCORECARD):
                if signed in event:
                    body = event[signed]["body"]
            if all(event.get(k, body.get(k)) == v for k, v in where.items()):
                return index
        raise LookupError(f"no {kind} event with {where}")


def comparison_history(
    models: int = 2, nodes: int = 3, *, local_model: bool = False
) -> ComparisonLog:
    """One honest 1+N comparison: each node's signing key certified, the comparison
    started, every node committing its held-out set in the first model's run and scoring
    every model (one Flower run per model), then finished. With ``local_model`` node-1
    also scores its own local model (in no catalog, so only by its node)."""
    names = {f"node-{n}": n for n in range(1, nodes + 1)}
    model_ids = [f"model-{m}" for m in range(models)]
    runs = {model: COMPARISON_RUN + m for m, model in enumerate(model_ids)}
    events: list[dict[str, Any]] = []
    for node in names:
        events += signing_certification(node, signing_key(node))
    events.append(
        ComparisonStarted(
            time=TIME,
            comparison=COMPARISON,
            task=TASK,
            models=[
                ComparedModel(model_id=model, manifest_sha256=digest("manifest", model))
                for model in model_ids
            ],
        ).to_json()
    )
    for m, model in enumerate(model_ids):
        for node, number in names.items():
            if m == 0:
                events.append(committed(node, number, run=runs[model]))
            card = scorecard(node, model, run=runs[model], accuracy=0.5 + 0.4 * m / models)
            events.append(scored(number, card, signing_key(node)))
    if local_model:
        local = "local-node-1"
        runs[local] = COMPARISON_RUN + models
        card = scorecard("node-1", local, run=runs[local])
        events.append(scored(1, card, signing_key("node-1")))
    events.append(ComparisonFinished(time=TIME, comparison=COMPARISON, runs=runs).to_json())
    return ComparisonLog(events, model_ids, names)


# -- differential privacy ----------------------------------------------------------------------

DP_DELTA = 1e-5
DP_CLIP = 1.0
DP_BUDGET = 8.0  # each node's [node.privacy] epsilon
DP_ASKED = 4.0  # the dp-epsilon a DP run asks
DP_CLIENT_NOISE = 1.5
# One round of DP-SGD on a node: 10 Poisson-sampled steps at rate 0.05, noise 1.1 x clip.
DP_ROUND = Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=10)


@functools.cache
def node_epsilon(mechanisms: tuple[Mechanism, ...], delta: float = DP_DELTA) -> float:
    """Epsilon of ``mechanisms`` composed by the node's own accountant (Opacus RDP,
    :func:`sandbox.privacy.epsilon_of`), cached: it takes a fraction of a second."""
    return epsilon_of(mechanisms, delta)


def dp_spent(
    run: int,
    rnd: int,
    node: int,
    spent: Sequence[Mechanism],
    *,
    before: Sequence[Mechanism] = (),
    budget: float = DP_BUDGET,
) -> dict[str, Any]:
    """The ServerApp logging what node ``node`` reported round ``rnd`` of ``run`` cost:
    ``spent`` its DP rounds of this run so far (this one last), ``before`` those it trained
    in earlier runs; both epsilons by the node's own accountant."""
    mechanism = spent[-1]
    return DpSpent(
        time=TIME,
        run=run,
        job=JOB,
        round=rnd,
        node=node,
        noise_multiplier=mechanism.noise_multiplier,
        sample_rate=mechanism.sample_rate,
        steps=mechanism.steps,
        clip=DP_CLIP,
        delta=DP_DELTA,
        epsilon=node_epsilon(tuple(spent)),
        epsilon_total=node_epsilon((*before, *spent)),
        budget=budget,
    ).to_json()


def dp_aggregate(run: int, rnd: int, nodes: int, noise: float = DP_CLIENT_NOISE) -> dict[str, Any]:
    """The ServerApp's client-level DP for round ``rnd`` (every round so far noised with
    ``noise``): epsilon by its accountant (:func:`sandbox.privacy.client_epsilon`)."""
    return DpAggregate(
        time=TIME,
        run=run,
        job=JOB,
        round=rnd,
        nodes=nodes,
        noise_multiplier=noise,
        clip=DP_CLIP,
        delta=DP_DELTA,
        epsilon=node_epsilon((Mechanism(noise, 1.0, rnd),)),
    ).to_json()


def with_dp(
    events: Iterable[dict[str, Any]],
    *,
    asked: float | None = DP_ASKED,
    client_noise: float | None = None,
    mechanism: Mechanism = DP_ROUND,
    before: Mapping[int, Sequence[Mechanism]] | None = None,
    budget: float = DP_BUDGET,
) -> list[dict[str, Any]]:
    """An honest history's runs with differential privacy: each run_started asks
    ``asked`` (record-level) and ``client_noise`` (client-level, when given); every
    accepted update and every masked input taken is followed by its node's ``dp_spent``
    (each round ``mechanism``; ``before[node]``: what the node trained in earlier runs),
    and, with client-level DP, every aggregate by its ``dp_aggregate``."""
    out: list[dict[str, Any]] = []
    spent: dict[tuple[int, int], list[Mechanism]] = {}

    def trained(run: int, rnd: int, node: int) -> dict[str, Any]:
        rounds = spent.setdefault((run, node), [])
        rounds.append(mechanism)
        earlier = (before or {}).get(node, ())
        return dp_spent(run, rnd, node, rounds, before=earlier, budget=budget)

    for event in events:
        kind, run, rnd = event[Key.KIND], event.get(Key.RUN, 0), event.get(Key.ROUND, 0)
        if kind == RunStarted.kind:
            asks = {Key.DP_EPSILON: asked, Key.DP_CLIENT_NOISE: client_noise}
            event = {**event, **{k: v for k, v in asks.items() if v is not None}}
        out.append(event)
        if kind == UpdateAccepted.kind:
            out.append(trained(run, rnd, event[Key.NODE]))
        elif kind == SecaggStage.kind and event[Key.STAGE] == STAGE_MASK:
            out += [trained(run, rnd, node) for node in event[Key.NODES]]
        elif kind == AggregateCommitted.kind and client_noise is not None:
            out.append(dp_aggregate(run, rnd, len(event[Key.UPDATES]), client_noise))
    return out


def dp_run_events(run: int, *, rounds: int = 3, nodes: int = 3, **dp: Any) -> list[dict[str, Any]]:
    """One honest sealed run (:func:`run_events`) with differential privacy (:func:`with_dp`)."""
    return with_dp(run_events(run, rounds=rounds, nodes=nodes), **dp)


def dp_journal(events: Iterable[Mapping[str, Any]], node: int) -> list[dict[str, Any]]:
    """What node ``node``'s journal holds for a history of :func:`with_dp`: its training
    entries and, for every ``dp_spent`` logged of it, the ``dp_round`` it recorded (what
    it reported)."""
    entries: list[dict[str, Any]] = []
    for event in events:
        if event[Key.KIND] != DpSpent.kind or event[Key.NODE] != node:
            continue
        run, rnd = event[Key.RUN], event[Key.ROUND]
        numbers = {key: event[key] for key in LEDGER_NUMBERS}
        entries.append(train_entry(run, node, rnd))
        entries.append(DpRound(run_id=run, node_id=node, round=rnd, **numbers).to_json())
    return entries


def log_violations(tmp_path: Path, events: Iterable[dict[str, Any]]) -> list[Any]:
    """What ``verify_log`` finds in a real signed log of ``events``."""
    from sandbox.ops.translog.audit import verify_log

    signer = new_signer()
    store = build_log(tmp_path / "log.db", events, signer)
    try:
        return list(verify_log(store, signer.verifier).violations)
    finally:
        store.close()


def audit_cli(
    tmp_path: Path, events: Iterable[dict[str, Any]], command: str, *extra: object
) -> Any:
    """``ark audit COMMAND`` over a signed SQLite log of ``events`` (its result)."""
    from typer.testing import CliRunner

    from sandbox.ops.cli import app

    signer = new_signer()
    db = tmp_path / "provider" / "translog.db"
    build_log(db, events, signer).close()
    vkey = tmp_path / "log.vkey"
    vkey.write_text(signer.verifier.vkey() + "\n", encoding="utf-8")
    args = [command, "--log", db, "--key", vkey, *extra]
    return CliRunner().invoke(app, ["audit", *map(str, args)])
