"""Event histories for the transparency-log tests and bench: what an honest provider's key
broker and ServerApp append over whole runs, with the same fields the real services emit,
and helpers that build a signed log from them."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandbox.attestation.result import AFFIRMING, PURPOSE_CHANNEL, PURPOSE_KEY_RELEASE
from sandbox.attestation.stub import STUB_TEE
from sandbox.canonical import canonical_entry
from sandbox.channel import STAGE_TRAIN
from sandbox.config import PROTECTION_SEALED
from sandbox.events import (
    AggregateCommitted,
    AggregatorSeen,
    AttestationAppraised,
    ChannelCertified,
    DenialsRateLimited,
    FileDigest,
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
    SentDigest,
    Train,
    UpdateAccepted,
    UpdateRejected,
)
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
        session = f"r{run}-n{node}-channel"
        events.append(attestation(session, PURPOSE_CHANNEL, f"node-{node}"))
        events.append(
            ChannelCertified(
                time=TIME,
                session=session,
                key_id=KEY_ID,
                tee=STUB_TEE,
                purpose=PURPOSE_CHANNEL,
                ueid=_ueid(f"node-{node}"),
                ear_sha256=digest("ear", session),
                tee_pubkey_sha256=digest("tee", session),
            ).to_json()
        )
        events.append(admission(run, node, session, f"node-{node}"))
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


def new_signer() -> NoteSigner:
    key = Ed25519PrivateKey.generate()
    return NoteSigner(log_origin(key.public_key()), key)


def build_log(path: Path, events: Iterable[dict[str, Any]], signer: NoteSigner) -> LogStore:
    """A log at ``path`` holding ``events``, with a signed checkpoint of all of them."""
    store = LogStore(path, durable=False)
    store.append_many(canonical_entry(event) for event in events)
    store.sign_checkpoint(signer)
    return store
