"""Event histories for the transparency-log tests and bench: what an honest provider's key
broker and ServerApp append over whole runs, with the same fields the real services emit,
and helpers that build a signed log from them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandbox.canonical import canonical_entry
from sandbox.translog.note import NoteSigner, log_origin
from sandbox.translog.store import LogStore

TIME = "2026-11-23T03:00:00+00:00"


def digest(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def attestation(
    session: str, purpose: str, node: str, *, status: str = "affirming"
) -> dict[str, Any]:
    return {
        "kind": "attestation_appraised",
        "time": TIME,
        "session": session,
        "key_id": "minilm-0001",
        "tee": "stub",
        "purpose": purpose,
        "status": status,
        "ear_sha256": digest("ear", session),
        "stub": True,
        "policy_id": "ark-provider-policy/test",
        "ueid": digest("ueid", node)[:32],
        "measurements": {"code": digest("code")},
        "trustworthiness": {"executables": 2},
        "failure": None,
        "tee_pubkey_sha256": digest("tee", session),
    }


def release(session: str, node: str) -> dict[str, Any]:
    return {
        "kind": "key_released",
        "time": TIME,
        "session": session,
        "key_id": "minilm-0001",
        "tee": "stub",
        "purpose": "key-release",
        "model_id": "minilm",
        "ueid": digest("ueid", node)[:32],
        "ear_sha256": digest("ear", session),
        "tee_pubkey_sha256": digest("tee", session),
    }


def denial(session: str, code: str, cause: str, *, client: str = "flooder") -> dict[str, Any]:
    """The key broker denying an attestation on ``session``: values it holds as they are,
    what the client sent as sizes and digests only."""
    sent = {"session": 22, "key_id": 11, "tee": 4, "purpose": 11, "evidence": 900}
    return {
        "kind": "key_denied",
        "time": TIME,
        "session": session,
        "key_id": "minilm-0001",
        "tee": "stub",
        "purpose": "key-release",
        "request": {
            name: {"bytes": size, "sha256": digest(name, session)} for name, size in sent.items()
        },
        "client": digest("client", client)[:32],
        "code": code,
        "cause": cause,
        "ear_sha256": None,
    }


def denials_rate_limited(
    suppressed: int = 1000, *, logged: int = 16, client: str | None = "flooder"
) -> dict[str, Any]:
    """The key broker's summary of one window of denials it counted instead of logging
    (``client`` None: the window shared by all clients)."""
    return {
        "kind": "denials_rate_limited",
        "time": TIME,
        "scope": "all" if client is None else "client",
        "client": None if client is None else digest("client", client)[:32],
        "window_start": TIME,
        "window_end": "2026-11-23T03:01:00+00:00",
        "logged": logged,
        "suppressed": suppressed,
        "codes": {"SESSION_UNKNOWN": suppressed},
    }


def denial_flood(budget: int = 16) -> list[dict[str, Any]]:
    """What a flood of bogus attestations from one client leaves in the log: its budget
    of denials and one summary of the rest."""
    denials = [denial(f"flood-{n}", "SESSION_UNKNOWN", "SessionUnknown") for n in range(budget)]
    return [*denials, denials_rate_limited(logged=budget)]


def admission(run: int, node: int, session: str, tee: str) -> dict[str, Any]:
    """The ServerApp admitting ``node`` to ``run`` under the channel attestation of
    ``session``, made by the TEE of node name ``tee`` (its ueid)."""
    return {
        "run": run,
        "job": "demo",
        "time": TIME,
        "kind": "node_admitted",
        "node": node,
        "ear_sha256": digest("ear", session),
        "ueid": digest("ueid", tee)[:32],
        "tee_pubkey_sha256": digest("tee", session),
    }


def run_events(run: int, *, rounds: int = 2, nodes: int = 3) -> list[dict[str, Any]]:
    """One honest sealed run: channel attestations, admissions, rounds, aggregates."""
    job = {"run": run, "job": "demo", "time": TIME}
    events: list[dict[str, Any]] = [
        {
            **job,
            "kind": "run_started",
            "rounds": rounds,
            "protection": "sealed",
            "resumed_after_round": 0,
            "model_id": "minilm",
            "min_nodes": 2,
        },
    ]
    for node in range(1, nodes + 1):
        session = f"r{run}-n{node}-channel"
        events.append(attestation(session, "channel", f"node-{node}"))
        events.append(
            {
                "kind": "channel_certified",
                "time": TIME,
                "session": session,
                "ear_sha256": digest("ear", session),
            }
        )
        events.append(admission(run, node, session, f"node-{node}"))
    for rnd in range(1, rounds + 1):
        participants = [
            {"node": node, "instruction_sha256": digest("in", run, rnd, node)}
            for node in range(1, nodes + 1)
        ]
        events.append(
            {
                **job,
                "kind": "round_started",
                "round": rnd,
                "stage": "train",
                "participants": participants,
            }
        )
        updates = []
        for node in range(1, nodes + 1):
            envelope = digest("up", run, rnd, node)
            updates.append(envelope)
            events.append(
                {
                    **job,
                    "kind": "update_accepted",
                    "round": rnd,
                    "node": node,
                    "envelope_sha256": envelope,
                    "envelope_bytes": 306244,
                    "examples": 40.0,
                }
            )
        events.append(
            {
                **job,
                "kind": "aggregate_committed",
                "round": rnd,
                "adapter_sha256": digest("adapter", run, rnd),
                "updates": updates,
                "examples": 40.0 * nodes,
                "metrics": {
                    "updates": float(nodes),
                    "local_accuracy": 0.5 + rnd / 10,
                    "train_loss": 1.0 / rnd,
                },
            }
        )
    events.append(
        {
            **job,
            "kind": "run_finished",
            "rounds": rounds,
            "adapter_sha256": digest("adapter", run, rounds),
            "metrics": {"final": {str(n): {"accuracy": 0.8} for n in range(1, nodes + 1)}},
        }
    )
    return events


def honest_history(runs: int = 1, *, rounds: int = 2, nodes: int = 3) -> list[dict[str, Any]]:
    """Model publication, per-node key releases, then ``runs`` runs."""
    events: list[dict[str, Any]] = [
        {
            "kind": "model_published",
            "time": TIME,
            "model_id": "minilm",
            "key_id": "minilm-0001",
            "files": [{"name": "model.safetensors", "sha256": digest("weights")}],
        }
    ]
    for node in range(1, nodes + 1):
        session = f"release-{node}"
        events += [
            attestation(session, "key-release", f"node-{node}"),
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


def node_journal(run: int, node: int, rounds: int = 2) -> list[dict[str, Any]]:
    """What node ``node``'s journal holds for an honest ``run`` of ``run_events``."""
    return [
        {
            "kind": "train",
            "run_id": run,
            "node_id": node,
            "round": rnd,
            "received_sha256": digest("in", run, rnd, node),
            "sent_sha256": digest("up", run, rnd, node),
        }
        for rnd in range(1, rounds + 1)
    ]


def new_signer() -> NoteSigner:
    key = Ed25519PrivateKey.generate()
    return NoteSigner(log_origin(key.public_key()), key)


def build_log(path: Path, events: Iterable[dict[str, Any]], signer: NoteSigner) -> LogStore:
    """A log at ``path`` holding ``events``, with a signed checkpoint of all of them."""
    store = LogStore(path, durable=False)
    store.append_many(canonical_entry(event) for event in events)
    store.sign_checkpoint(signer)
    return store
