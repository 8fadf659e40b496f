"""The auditor's checks of a transparency log, over any :class:`LogReader`.

:func:`verify_log` raises on anything that breaks the log's cryptography, in order:
the checkpoint's signature and origin, consistency with the last checkpoint the auditor
kept, and the inclusion of every entry. It then checks policy across the events and
returns an :class:`Audit` listing any violations: the log is then sound, but what it
records is not. :func:`crosscheck` holds node journals against the log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sandbox.errors import (
    AggregateUnaccepted,
    ConfigError,
    ConsistencyProofError,
    EntryMissing,
    EntryTampered,
    InclusionProofError,
    JournalMismatch,
    LogFork,
    LogRollback,
    NoteMalformed,
    OriginMismatch,
    PolicyViolation,
    ReleaseWithoutAppraisal,
    UpdateFromUnattested,
)
from sandbox.translog import merkle
from sandbox.translog.note import Checkpoint, NoteVerifier, log_origin, verify_checkpoint
from sandbox.translog.store import LogReader

AFFIRMING = "affirming"
PURPOSE_KEY_RELEASE = "key-release"
PURPOSE_CHANNEL = "channel"
# Entries fetched per request while auditing; the gRPC service pages at most this many.
PAGE = 1000


@dataclass
class Audit:
    """What :func:`verify_log` found: the verified checkpoint, the one before it (if the
    auditor had one), the decoded events and any policy violations. True when clean."""

    checkpoint: Checkpoint
    note: str
    previous: Checkpoint | None
    records: list[dict[str, Any]]
    violations: list[PolicyViolation] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.violations


class AuditorState:
    """The last checkpoint an auditor accepted, per log origin, under one directory."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, origin: str) -> Path:
        return self.directory / f"{hashlib.sha256(origin.encode()).hexdigest()[:16]}.checkpoint"

    def load(self, verifier: NoteVerifier, origin: str | None = None) -> Checkpoint | None:
        """The kept checkpoint, re-verified (the state folder is not trusted either)."""
        path = self._path(origin or verifier.name)
        if not path.exists():
            return None
        return verify_checkpoint(path.read_bytes(), verifier, origin=origin)

    def save(self, note: str, checkpoint: Checkpoint) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(checkpoint.origin)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(note, encoding="utf-8")
        tmp.replace(path)
        with (self.directory / "history.log").open("a", encoding="utf-8") as history:
            history.write(f"{checkpoint.origin} {checkpoint.size} {checkpoint.root.hex()}\n")
        return path


def check_consistency(reader: LogReader, previous: Checkpoint, current: Checkpoint) -> None:
    """Raise unless ``current`` extends ``previous`` (same log, no rollback, no fork)."""
    if previous.origin != current.origin:
        raise OriginMismatch(f"kept checkpoint is for {previous.origin!r}, not {current.origin!r}")
    if current.size < previous.size:
        raise LogRollback(
            f"the log now has {current.size} entries; it had {previous.size} at the last "
            "checkpoint: truncated or rolled back"
        )
    if current.size == previous.size:
        if current.root != previous.root:
            raise LogFork(
                f"two signed checkpoints of size {current.size} with different roots "
                f"({previous.root.hex()[:16]}… and {current.root.hex()[:16]}…): a forked log"
            )
        return
    proof = reader.consistency_proof(previous.size, current.size)
    try:
        merkle.verify_consistency(previous.size, current.size, proof, previous.root, current.root)
    except ConsistencyProofError as exc:
        raise ConsistencyProofError(
            f"the log of size {current.size} does not extend the one of size {previous.size} "
            f"seen before (history rewritten): {exc}"
        ) from exc


def fetch_entries(reader: LogReader, size: int) -> list[bytes]:
    """Entries ``[0, size)``; :class:`EntryMissing` if the log serves fewer."""
    entries: list[bytes] = []
    while len(entries) < size:
        page = reader.entries(len(entries), min(size, len(entries) + PAGE))
        if not page:
            break
        entries.extend(page)
    if len(entries) != size:
        raise EntryMissing(
            f"the checkpoint signs {size} entries but the log serves {len(entries)}: "
            "entries were deleted"
        )
    return entries


def check_entries(reader: LogReader, entries: Sequence[bytes], checkpoint: Checkpoint) -> None:
    """Every entry is in the signed tree at its position.

    Recomputing the root from all entries proves the inclusion of each one at once. If
    it differs, the entries' own inclusion proofs name the first that is not in the tree.
    """
    leaves = [merkle.leaf_hash(entry) for entry in entries]
    if merkle.root_of_leaf_hashes(leaves) == checkpoint.root:
        return
    for index, leaf in enumerate(leaves):
        try:
            proof = reader.inclusion_proof(index, checkpoint.size)
            merkle.verify_inclusion(leaf, index, checkpoint.size, proof, checkpoint.root)
        except InclusionProofError as exc:
            raise EntryTampered(
                f"entry {index} is not the one the signed tree holds (edited): {exc}"
            ) from exc
    raise EntryTampered("the entries do not hash to the signed root (edited or reordered)")


def decode(entries: Sequence[bytes]) -> list[dict[str, Any]]:
    """The events in the entries; a malformed one decodes to ``{"kind": None, ...}``."""
    records: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        try:
            record = json.loads(entry)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            record = {"kind": None, "malformed": f"entry {index} is not a JSON object"}
        records.append(record)
    return records


def verify_log(
    reader: LogReader,
    verifier: NoteVerifier,
    *,
    origin: str | None = None,
    previous: Checkpoint | None = None,
) -> Audit:
    """Verify the log end to end; raise on a broken log, return policy violations."""
    note = reader.checkpoint()
    checkpoint = verify_checkpoint(note, verifier, origin=origin)
    if previous is not None:
        check_consistency(reader, previous, checkpoint)
    entries = fetch_entries(reader, checkpoint.size)
    check_entries(reader, entries, checkpoint)
    records = decode(entries)
    return Audit(checkpoint, note, previous, records, check_policy(records))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def check_policy(records: Sequence[Mapping[str, Any]]) -> list[PolicyViolation]:
    """The rules that must hold across events, in log order:

    - every key release follows an affirming key-release appraisal of the same session,
      the same attestation result and the same TEE key;
    - every accepted update comes from a node admitted in that run under a channel
      attestation the key broker appraised as affirming;
    - every committed aggregate lists only updates accepted in that run and round.
    """
    violations: list[PolicyViolation] = []
    appraised: dict[tuple[str, str], Mapping[str, Any]] = {}  # (session, ear) -> appraisal
    affirmed_ears: dict[str, str] = {}  # ear digest -> purpose
    admitted: dict[tuple[str, str], str] = {}  # (run, node) -> ear digest
    accepted: dict[tuple[str, str], set[str]] = {}  # (run, round) -> envelope digests
    for index, record in enumerate(records):
        kind = record.get("kind")
        run = _text(record.get("run"))
        if kind is None:
            violations.append(PolicyViolation(f"entry {index}: {record.get('malformed')}"))
        elif kind == "attestation_appraised" and record.get("status") == AFFIRMING:
            ear = _text(record.get("ear_sha256"))
            appraised[(_text(record.get("session")), ear)] = record
            affirmed_ears[ear] = _text(record.get("purpose"))
        elif kind == "key_released":
            session, ear = _text(record.get("session")), _text(record.get("ear_sha256"))
            before = appraised.get((session, ear))
            if (
                before is None
                or before.get("purpose", PURPOSE_KEY_RELEASE) != PURPOSE_KEY_RELEASE
                or before.get("tee_pubkey_sha256") != record.get("tee_pubkey_sha256")
            ):
                violations.append(
                    ReleaseWithoutAppraisal(
                        f"entry {index}: key {_text(record.get('key_id'))!r} released to "
                        f"session {session!r} with no affirming appraisal of that session "
                        "and key before it"
                    )
                )
        elif kind == "node_admitted":
            ear = _text(record.get("ear_sha256"))
            if affirmed_ears.get(ear) == PURPOSE_CHANNEL:
                admitted[(run, _text(record.get("node")))] = ear
        elif kind == "update_accepted":
            node = _text(record.get("node"))
            if (run, node) not in admitted:
                violations.append(
                    UpdateFromUnattested(
                        f"entry {index}: run {run} round {_text(record.get('round'))} accepted "
                        f"an update from node {node}, which was never attested and admitted "
                        "in that run"
                    )
                )
            key = (run, _text(record.get("round")))
            accepted.setdefault(key, set()).add(_text(record.get("envelope_sha256")))
        elif kind == "aggregate_committed":
            key = (run, _text(record.get("round")))
            updates = record.get("updates")
            listed = [_text(u) for u in updates] if isinstance(updates, list) else []
            if not isinstance(updates, list):
                violations.append(
                    AggregateUnaccepted(f"entry {index}: the aggregate lists no updates")
                )
            for update in listed:
                if update not in accepted.get(key, set()):
                    violations.append(
                        AggregateUnaccepted(
                            f"entry {index}: run {run} round {key[1]} aggregate includes "
                            f"update {update[:16]}…, which was not accepted in that round"
                        )
                    )
    return violations


def crosscheck(
    records: Sequence[Mapping[str, Any]], journal: Sequence[Mapping[str, Any]], name: str
) -> list[JournalMismatch]:
    """What a node's journal says it received and sent that the provider's log lacks.

    A sent update must appear as accepted or rejected in the same run; a received
    instruction must appear among that run's round participants.
    """
    sent: set[tuple[str, str]] = set()
    instructed: set[tuple[str, str]] = set()
    for record in records:
        run = _text(record.get("run"))
        if record.get("kind") in ("update_accepted", "update_rejected"):
            sent.add((run, _text(record.get("envelope_sha256"))))
        elif record.get("kind") == "round_started":
            participants = record.get("participants")
            for participant in participants if isinstance(participants, list) else []:
                if isinstance(participant, Mapping):
                    instructed.add((run, _text(participant.get("instruction_sha256"))))
    mismatches: list[JournalMismatch] = []
    for number, entry in enumerate(journal, 1):
        run = _text(entry.get("run_id"))
        where = f"{name} entry {number} ({_text(entry.get('kind'))}, run {run})"
        received, update = entry.get("received_sha256"), entry.get("sent_sha256")
        if received and (run, _text(received)) not in instructed:
            mismatches.append(
                JournalMismatch(
                    f"{where}: received instruction {_text(received)[:16]}… is not in the "
                    "provider's log"
                )
            )
        if update and (run, _text(update)) not in sent:
            mismatches.append(
                JournalMismatch(
                    f"{where}: sent update {_text(update)[:16]}… is not in the provider's log"
                )
            )
    return mismatches


def load_verifier(path: Path) -> NoteVerifier:
    """The log's checkpoint key from a file: a C2SP vkey line, or an Ed25519 public PEM
    (named by :func:`~sandbox.translog.note.log_origin`)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the log key: {exc.strerror or exc}", path=path) from exc
    if raw.lstrip().startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(raw)
        except ValueError as exc:
            raise ConfigError("not a PEM public key", path=path) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("the log key must be Ed25519", path=path)
        return NoteVerifier(log_origin(key), key)
    try:
        return NoteVerifier.from_vkey(raw.decode("utf-8"))
    except (UnicodeDecodeError, NoteMalformed) as exc:
        raise ConfigError(f"not a C2SP verifier key or PEM: {exc}", path=path) from exc
