"""The auditor's checks of a transparency log, over any :class:`LogReader`.

:func:`verify_log` raises on anything that breaks the log's cryptography, in order:
the checkpoint's signature and origin, consistency with the last checkpoint the auditor
kept, and the inclusion of every entry. It then checks policy across the events and
returns an :class:`Audit` listing any violations: the log is then sound, but what it
records is not. :func:`crosscheck` holds node journals against the log.

Events are read by the schema's names (:mod:`sandbox.events`: ``KeyReleased.kind``,
``Key.SESSION``), but as plain records, not parsed strictly: a log is untrusted input,
so a record missing a field, or holding one of the wrong type, must neither crash the
audit nor match another such record (a rule compares present, non-empty values only).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sandbox import strictjson
from sandbox.attestation.result import (
    AFFIRMING,
    PURPOSE_CHANNEL,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
)
from sandbox.canonical import canonical_entry
from sandbox.channel import STAGE_TRAIN
from sandbox.errors import (
    AggregateUnaccepted,
    AuditTooLarge,
    ConfigError,
    ConsistencyProofError,
    EntryMissing,
    EntryTampered,
    JournalMismatch,
    ListCommitmentMismatch,
    LogFork,
    LogRollback,
    LogVerificationError,
    NodeAdmittedTwice,
    NoteMalformed,
    OriginMismatch,
    PolicyViolation,
    PrivacyLedgerMismatch,
    ReleaseWithoutAppraisal,
    ScorecardInvalid,
    ScorecardMissing,
    ScorecardRootMismatch,
    ScorecardUnattested,
    SecAggInconsistent,
    UpdateFromUnattested,
)
from sandbox.events import (
    PLAINTEXT,
    AggregateCommitted,
    AttestationAppraised,
    ChannelCertified,
    ComparisonFinished,
    ComparisonStarted,
    DpAggregate,
    DpRound,
    DpSpent,
    HeldoutCommitted,
    Key,
    KeyReleased,
    NodeAdmitted,
    NodeDeclined,
    NodeRefused,
    RoundStarted,
    RunStarted,
    ScorecardLogged,
    SecaggAdvertised,
    SecaggStage,
    SecaggUnmasked,
    UpdateAccepted,
    UpdateRejected,
)
from sandbox.events.members import Expanded, expand
from sandbox.events.node import HeldoutCommitment, ScorecardSigned, SecaggRevealed
from sandbox.files import write_atomic
from sandbox.ops.translog import MAX_AUDIT_ENTRIES
from sandbox.privacy import RDP_ORDERS
from sandbox.scorecard import Commitment, Scorecard, open_commitment, open_scorecard
from sandbox.secagg import STAGE_CHECK, STAGE_MASK, STAGE_SHARE
from sandbox.strictjson import StrictJSONError
from sandbox.translog import merkle
from sandbox.translog.note import Checkpoint, NoteVerifier, log_origin, verify_checkpoint
from sandbox.translog.store import LogReader

Signed = TypeVar("Signed", Commitment, Scorecard)

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
        write_atomic(path, note.encode("utf-8"))
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
    try:
        proof = reader.consistency_proof(previous.size, current.size)
        merkle.verify_consistency(previous.size, current.size, proof, previous.root, current.root)
    except LogVerificationError as exc:
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
    it differs, a bisection over consistency proofs (O(log n) requests) finds the first
    entry that is not the one the signed tree holds.
    """
    leaves = [merkle.leaf_hash(entry) for entry in entries]
    if merkle.root_of_leaf_hashes(leaves) == checkpoint.root:
        return

    def prefix_holds(size: int) -> bool:
        """Do our first ``size`` entries form the prefix of the signed tree?"""
        try:
            proof = reader.consistency_proof(size, checkpoint.size)
            root = merkle.root_of_leaf_hashes(leaves[:size])
            merkle.verify_consistency(size, checkpoint.size, proof, root, checkpoint.root)
        except LogVerificationError:
            return False
        return True

    good, bad = 0, checkpoint.size  # the empty prefix always holds; the whole log does not
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if prefix_holds(middle) else (good, middle)
    raise EntryTampered(
        f"entry {bad - 1} is not the one the signed tree holds (edited): the first "
        f"{bad - 1} entries match the signed tree and the first {bad} do not"
    )


def decode(entries: Sequence[bytes]) -> list[dict[str, Any]]:
    """The events in the entries. One that is not a canonical JSON object (RFC 8785, as
    the log writes them; parsed by :mod:`sandbox.strictjson`, so no duplicate keys, no
    ambiguity between parsers, no nesting or number that breaks the parser) decodes to
    ``{"kind": None, "malformed": ...}``, which the policy reports."""
    records: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        why = ""
        try:
            record = strictjson.loads(entry)
            canonical = isinstance(record, dict) and canonical_entry(record) == entry
        except StrictJSONError as exc:
            record, canonical, why = None, False, f": {exc}"
        if not isinstance(record, dict) or not canonical:
            malformed = f"entry {index} is not canonical JSON (RFC 8785) of an object{why}"
            record = {Key.KIND: None, "malformed": malformed}
        records.append(record)
    return records


def verify_log(
    reader: LogReader,
    verifier: NoteVerifier,
    *,
    origin: str | None = None,
    previous: Checkpoint | None = None,
    max_entries: int = MAX_AUDIT_ENTRIES,
) -> Audit:
    """Verify the log end to end; raise on a broken log, return policy violations.

    A log larger than ``max_entries`` is refused before any entry is fetched (the audit
    holds every event in memory).
    """
    note = reader.checkpoint()
    checkpoint = verify_checkpoint(note, verifier, origin=origin)
    if previous is not None:
        check_consistency(reader, previous, checkpoint)
    if checkpoint.size > max_entries:
        raise AuditTooLarge(
            f"the log signs {checkpoint.size} entries, more than --max-entries {max_entries}"
        )
    entries = fetch_entries(reader, checkpoint.size)
    check_entries(reader, entries, checkpoint)
    expanded = expand(decode(entries))
    return Audit(checkpoint, note, previous, expanded.records, _check_expanded(expanded))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _fields(record: Mapping[str, Any], *names: str) -> tuple[str, ...] | None:
    """The named fields as text, or None if any is missing or empty (missing fields
    must never match each other)."""
    values = tuple(_text(record.get(name)) for name in names)
    return None if any(not value for value in values) else values


def _ids(value: Any) -> list[str] | None:
    """A logged list of node ids as text (a Flower id beyond 2**53 is logged as its
    decimal text, a smaller one as a number: both read the same), or None if it is not a
    list."""
    return [_text(item) for item in value] if isinstance(value, list) else None


def _named(nodes: Iterable[str]) -> str:
    """Nodes as a message names them: "node 7" or "nodes 3, 7"."""
    listed = sorted(nodes, key=lambda node: (len(node), node))
    return f"node{'s' if len(listed) != 1 else ''} {', '.join(listed)}"


class _Policy:
    """The state :func:`check_policy` keeps while it walks the log in order."""

    def __init__(self) -> None:
        self.violations: list[PolicyViolation] = []
        # (session, ear, tee key) of affirming key-release appraisals.
        self.release_appraisals: set[tuple[str, ...]] = set()
        # ear -> (ueid, tee key) of affirming channel appraisals.
        self.channel_appraisals: dict[str, tuple[str, str]] = {}
        self.ear_owner: dict[str, tuple[str, str]] = {}  # ear -> the (run, node) it admitted
        self.admitted: set[tuple[str, str]] = set()  # (run, node) admitted now
        self.ueid_node: dict[tuple[str, str], str] = {}  # (run, ueid) -> the node it admitted
        self.participants: dict[tuple[str, str], set[str]] = {}  # (run, round) -> nodes
        self.accepted: dict[tuple[str, str], set[str]] = {}  # (run, round) -> envelopes
        self.decided: set[tuple[str, str]] = set()  # (run, envelope) accepted or rejected

    def appraised(self, record: Mapping[str, Any]) -> None:
        if record.get(Key.STATUS) != AFFIRMING:
            return
        purpose = record.get(Key.PURPOSE)
        if purpose == PURPOSE_KEY_RELEASE:
            key = _fields(record, Key.SESSION, Key.EAR_SHA256, Key.TEE_PUBKEY_SHA256)
            if key is not None:
                self.release_appraisals.add(key)
        elif purpose == PURPOSE_CHANNEL:
            key = _fields(record, Key.EAR_SHA256, Key.UEID, Key.TEE_PUBKEY_SHA256)
            if key is not None:
                self.channel_appraisals[key[0]] = (key[1], key[2])

    def released(self, index: int, record: Mapping[str, Any]) -> None:
        key = _fields(record, Key.SESSION, Key.EAR_SHA256, Key.TEE_PUBKEY_SHA256)
        if key is None or key not in self.release_appraisals:
            self.violations.append(
                ReleaseWithoutAppraisal(
                    f"entry {index}: key {_text(record.get(Key.KEY_ID))!r} released to session "
                    f"{_text(record.get(Key.SESSION))!r} with no affirming appraisal of that "
                    "session and key before it"
                )
            )

    def admitted_node(self, index: int, record: Mapping[str, Any]) -> None:
        key = _fields(record, Key.RUN, Key.NODE, Key.EAR_SHA256, Key.UEID, Key.TEE_PUBKEY_SHA256)
        if key is None:
            return
        run, node, ear, ueid, tee_key = key
        first = self.ueid_node.setdefault((run, ueid), node)
        if first != node:
            self.violations.append(
                NodeAdmittedTwice(
                    f"entry {index}: run {run} admitted node {node} with ueid {ueid}, "
                    f"already admitted in that run as node {first}"
                )
            )
        appraisal = self.channel_appraisals.get(ear)
        owner = self.ear_owner.setdefault(ear, (run, node))
        if appraisal == (ueid, tee_key) and owner == (run, node):
            self.admitted.add((run, node))

    def left(self, record: Mapping[str, Any]) -> None:
        """A node refused or declined: it must be admitted again before it counts."""
        self.admitted.discard((_text(record.get(Key.RUN)), _text(record.get(Key.NODE))))

    def round_started(self, record: Mapping[str, Any]) -> None:
        if record.get(Key.STAGE) not in (None, STAGE_TRAIN):
            return
        participants = record.get(Key.PARTICIPANTS)
        nodes = {
            _text(p.get(Key.NODE))
            for p in (participants if isinstance(participants, list) else [])
            if isinstance(p, Mapping)
        }
        key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
        self.participants[key] = nodes

    def decided_update(self, index: int, record: Mapping[str, Any]) -> None:
        run, rnd = _text(record.get(Key.RUN)), _text(record.get(Key.ROUND))
        node, envelope = _text(record.get(Key.NODE)), _text(record.get(Key.ENVELOPE_SHA256))
        if (run, envelope) in self.decided and envelope != PLAINTEXT:
            self.violations.append(
                PolicyViolation(
                    f"entry {index}: update {envelope[:16]}… of run {run} was already "
                    "accepted or rejected once"
                )
            )
        self.decided.add((run, envelope))
        if record.get(Key.KIND) != UpdateAccepted.kind:
            return
        self._contributor(index, run, rnd, node, "accepted an update")
        self.accepted.setdefault((run, rnd), set()).add(envelope)

    def masked(self, index: int, record: Mapping[str, Any]) -> None:
        """A secure round's mask stage: every node whose masked input the aggregate sums
        must be one an update would be accepted from."""
        if record.get(Key.STAGE) != STAGE_MASK:
            return
        run, rnd = _text(record.get(Key.RUN)), _text(record.get(Key.ROUND))
        for node in dict.fromkeys(_ids(record.get(Key.NODES)) or []):
            self._contributor(index, run, rnd, node, "took a masked input")

    def _contributor(self, index: int, run: str, rnd: str, node: str, what: str) -> None:
        """``node`` contributed to round ``rnd``: it must be admitted to the run and have
        been sent the round's instruction."""
        if (run, node) not in self.admitted:
            self.violations.append(
                UpdateFromUnattested(
                    f"entry {index}: run {run} round {rnd} {what} from node {node}, which "
                    "was not attested and admitted in that run"
                )
            )
        elif node not in self.participants.get((run, rnd), set()):
            self.violations.append(
                UpdateFromUnattested(
                    f"entry {index}: run {run} round {rnd} {what} from node {node}, which "
                    "was not sent that round's instruction"
                )
            )

    def committed(self, index: int, record: Mapping[str, Any]) -> None:
        run, rnd = _text(record.get(Key.RUN)), _text(record.get(Key.ROUND))
        updates = record.get(Key.UPDATES)
        if not isinstance(updates, list):
            self.violations.append(
                AggregateUnaccepted(f"entry {index}: the aggregate lists no updates")
            )
            return
        listed = [_text(u) for u in updates]
        for update in sorted({u for u in listed if listed.count(u) > 1}):
            self.violations.append(
                AggregateUnaccepted(
                    f"entry {index}: run {run} round {rnd} aggregate counts update "
                    f"{update[:16]}… more than once"
                )
            )
        for update in dict.fromkeys(listed):
            if update not in self.accepted.get((run, rnd), set()):
                self.violations.append(
                    AggregateUnaccepted(
                        f"entry {index}: run {run} round {rnd} aggregate includes update "
                        f"{update[:16]}…, which was not accepted in that round"
                    )
                )


# The steps of a secure-aggregation round, in the order the ServerApp logs them, each once.
_SECURE_STEPS = (
    SecaggAdvertised.kind,
    f"{SecaggStage.kind} {STAGE_SHARE}",
    f"{SecaggStage.kind} {STAGE_MASK}",
    f"{SecaggStage.kind} {STAGE_CHECK}",
    SecaggUnmasked.kind,
    AggregateCommitted.kind,
)
_ADVERTISED, _SHARED, _MASKED, _CHECKED, _UNMASKED, _COMMITTED = range(len(_SECURE_STEPS))


@dataclass
class _SecureRound:
    """What the log said so far about one secure-aggregation round of one run."""

    reached: int = -1  # the last step logged (an index into _SECURE_STEPS)
    nodes: dict[int, set[str]] = field(default_factory=dict)  # step -> the nodes it names
    survivors: set[str] | None = None
    # The SHA-256 of each masked input the mask stage took (when it lists them).
    envelopes: set[str] | None = None


class _SecureRounds:
    """The secure-aggregation rules :func:`check_policy` keeps while it walks the log.

    A round with any ``secagg_*`` event is secure. Its steps come in order, once each:
    advertised ⊇ share ⊇ mask ⊇ check (the survivors that signed the round's one split;
    skipped only when nobody dropped, as then no masking key is rebuilt); only those
    signers revealed shares; at the unmasking the survivors are exactly the mask stage's
    nodes and the dropped exactly the share stage's others, so no node whose masked input
    the sum holds ever has its masking key rebuilt (which would unmask that input alone);
    the aggregate comes after it and counts one input per survivor; and no individual update
    is accepted in the round. A ServerApp restarted in the same run (``run_started``) may
    run a round again from its advertisement only if that round was not unmasked yet: two
    unmaskings of one round would give two sums of (possibly) the same inputs, whose
    difference is one node's update.
    """

    def __init__(self, violations: list[PolicyViolation]) -> None:
        self.violations = violations
        self.rounds: dict[tuple[str, str], _SecureRound] = {}
        self.secure: set[tuple[str, str]] = set()  # (run, round) with any secagg event
        self.committed: set[tuple[str, str]] = set()  # (run, round) with an aggregate
        self.accepted: list[tuple[int, str, str, str]] = []  # (index, run, round, node)

    def _fail(self, index: int, key: tuple[str, str], what: str) -> None:
        self.violations.append(
            SecAggInconsistent(f"entry {index}: run {key[0]} round {key[1]}: {what}")
        )

    def restarted(self, record: Mapping[str, Any]) -> None:
        run = _text(record.get(Key.RUN))
        for key in [k for k, state in self.rounds.items() if k[0] == run]:
            if self.rounds[key].reached < _UNMASKED:
                del self.rounds[key]

    def _step(self, index: int, record: Mapping[str, Any], step: int) -> tuple[str, str]:
        """Record ``step`` of the record's round; a violation unless it is the next one."""
        key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
        self.secure.add(key)
        state = self.rounds.setdefault(key, _SecureRound())
        if key in self.committed and state.reached < _COMMITTED:
            state.reached = _COMMITTED  # a secure round's steps all come before its aggregate
        if step != state.reached + 1:
            after = _SECURE_STEPS[state.reached] if state.reached >= 0 else "no earlier step"
            order = " → ".join(_SECURE_STEPS)
            self._fail(
                index,
                key,
                f"{_SECURE_STEPS[step]} after {after}: a secure round's steps are "
                f"{order}, in that order, once each",
            )
        state.reached = max(state.reached, step)
        return key

    def _listed(
        self, index: int, key: tuple[str, str], record: Mapping[str, Any], name: Key
    ) -> set[str] | None:
        """The record's node list ``name``, each node once (else a violation)."""
        kind = _text(record.get(Key.KIND))
        value = record.get(name)
        if name == Key.NODES and kind == SecaggAdvertised.kind and isinstance(value, list):
            value = [node.get(Key.NODE) if isinstance(node, Mapping) else node for node in value]
        nodes = _ids(value)
        if nodes is None:
            self._fail(index, key, f"{kind} has no list of {name}")
            return None
        twice = {node for node in nodes if nodes.count(node) > 1}
        if twice:
            self._fail(index, key, f"{kind} lists {_named(twice)} more than once in {name}")
        return set(nodes)

    def advertised(self, index: int, record: Mapping[str, Any]) -> None:
        key = self._step(index, record, _ADVERTISED)
        nodes = self._listed(index, key, record, Key.NODES)
        if nodes is not None:
            self.rounds[key].nodes[_ADVERTISED] = nodes

    def staged(self, index: int, record: Mapping[str, Any]) -> None:
        stage = _text(record.get(Key.STAGE))
        step = {STAGE_SHARE: _SHARED, STAGE_MASK: _MASKED, STAGE_CHECK: _CHECKED}.get(stage)
        if step is None:
            key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
            self.secure.add(key)
            self._fail(index, key, f"{SecaggStage.kind} of unknown stage {stage!r}")
            return
        key = self._step(index, record, step)
        nodes = self._listed(index, key, record, Key.NODES)
        if nodes is None:
            return
        state = self.rounds[key]
        state.nodes[step] = nodes
        envelopes = record.get(Key.ENVELOPES)
        if step == _MASKED and isinstance(envelopes, list):
            state.envelopes = {_text(e) for e in envelopes}
        before = state.nodes.get(step - 1)
        if before is not None and nodes - before:
            self._fail(
                index,
                key,
                f"the {stage} stage names {_named(nodes - before)}, not in the "
                f"{_SECURE_STEPS[step - 1]} before it",
            )

    def unmasked(self, index: int, record: Mapping[str, Any]) -> None:
        key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
        state = self.rounds.get(key)
        if state is not None and state.reached == _MASKED and record.get(Key.DROPPED) == []:
            state.reached = _CHECKED  # nobody dropped: the survivors reveal seeds unsigned
        key = self._step(index, record, _UNMASKED)
        state = self.rounds[key]
        survivors, dropped, revealed_by = (
            self._listed(index, key, record, name)
            for name in (Key.SURVIVORS, Key.DROPPED, Key.REVEALED_BY)
        )
        state.survivors = survivors
        masked, shared = state.nodes.get(_MASKED), state.nodes.get(_SHARED)
        if dropped is not None and masked is not None and dropped & masked:
            self._fail(
                index,
                key,
                f"the masking keys of {_named(dropped & masked)} were rebuilt (listed as "
                "dropped), yet the mask stage took a masked input from them: each such "
                "input could be unmasked alone",
            )
        if survivors is not None and masked is not None and survivors != masked:
            if masked - survivors:
                self._fail(
                    index,
                    key,
                    f"the survivors leave out {_named(masked - survivors)}, which sent a "
                    "masked input",
                )
            if survivors - masked:
                self._fail(
                    index,
                    key,
                    f"the survivors include {_named(survivors - masked)}, which sent no "
                    "masked input",
                )
        if dropped is not None and shared is not None and masked is not None:
            gone = shared - masked
            if dropped - gone - masked:
                self._fail(
                    index,
                    key,
                    f"the dropped include {_named(dropped - gone - masked)}, which never "
                    "shared keys in the share stage",
                )
            if gone - dropped:
                self._fail(
                    index,
                    key,
                    f"the dropped leave out {_named(gone - dropped)}, which shared keys but "
                    "sent no masked input",
                )
        if revealed_by is not None and survivors is not None and revealed_by - survivors:
            self._fail(
                index,
                key,
                f"revealed_by includes {_named(revealed_by - survivors)}, which did not survive",
            )
        advertised = state.nodes.get(_ADVERTISED)
        if advertised:
            # Every threshold is a strict majority of the advertised nodes (at least 2):
            # a sum of fewer could be one node's update.
            least = max(2, len(advertised) // 2 + 1)
            for name, nodes in (
                ("survivors", survivors),
                ("revealed_by", revealed_by),
                ("check stage's signers", state.nodes.get(_CHECKED)),
            ):
                if nodes is not None and len(nodes) < least:
                    self._fail(
                        index,
                        key,
                        f"{len(nodes)} {name} of {len(advertised)} advertised nodes, fewer "
                        f"than a strict majority ({least}): the sum could be one node's",
                    )
        signers = state.nodes.get(_CHECKED)
        if revealed_by is not None and signers is not None and revealed_by - signers:
            self._fail(
                index,
                key,
                f"revealed_by includes {_named(revealed_by - signers)}, which did not sign the "
                "round's split in the check stage",
            )

    def aggregated(self, index: int, record: Mapping[str, Any]) -> bool:
        """Check a secure round's aggregate (after its unmasking, one masked input per
        survivor) and say True; for any other round's, only note it and say False."""
        key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
        if key not in self.secure:
            self.committed.add(key)
            return False
        self._step(index, record, _COMMITTED)
        self.committed.add(key)
        survivors = self.rounds[key].survivors
        updates = record.get(Key.UPDATES)
        listed = [_text(u) for u in updates] if isinstance(updates, list) else None
        if listed is None or len(set(listed)) != len(listed):
            self._fail(index, key, "the aggregate does not list its masked inputs, each once")
        elif survivors is not None and len(listed) != len(survivors):
            self._fail(
                index,
                key,
                f"the aggregate counts {len(listed)} masked inputs, but "
                f"{len(survivors)} nodes survived",
            )
        envelopes = self.rounds[key].envelopes
        if listed is not None and envelopes is not None and set(listed) != envelopes:
            self._fail(
                index,
                key,
                "the aggregate's updates are not the masked inputs its mask stage took",
            )
        return True

    def update_accepted(self, index: int, record: Mapping[str, Any]) -> None:
        self.accepted.append(
            (
                index,
                _text(record.get(Key.RUN)),
                _text(record.get(Key.ROUND)),
                _text(record.get(Key.NODE)),
            )
        )

    def end(self) -> None:
        """At the end of the log (a round's secagg events may follow an update): no update
        was accepted on its own in a secure round."""
        for index, run, rnd, node in self.accepted:
            if (run, rnd) in self.secure:
                self._fail(
                    index,
                    (run, rnd),
                    f"an individual update from node {node} accepted in a secure-aggregation "
                    "round: the aggregator may only see the sum of masked inputs",
                )


# -- differential privacy -------------------------------------------------------------------

# The RDP orders the nodes' accountant minimises over (integers only, where Opacus and
# dp-accounting are exact and agree): the audit recomputes with another implementation and
# imports no Opacus.
# The orders the audit's accountant evaluates: the nodes' (``sandbox.privacy.RDP_ORDERS``,
# integers only), where Opacus and dp-accounting both compute the subsampled Gaussian's
# RDP exactly.
_ORDERS = np.array(RDP_ORDERS, dtype=np.float64)

# How far a logged epsilon may sit below the audit's: 1% of it, plus 1e-3 (float rounding
# between the two implementations; at integer orders they agree to about 1e-9, which
# ``tests/test_audit_privacy.py`` measures over a grid of mechanisms).
EPSILON_RTOL = 0.01
# What the audit accounts: a noise multiplier in this range, at most this many steps a
# round (beyond, the numbers are no mechanism a node ran; dp-accounting would overflow).
_NOISE_RANGE = (1e-3, 1e6)
_MAX_STEPS = 10**9
EPSILON_ATOL = 1e-3


def _slack(bound: float) -> float:
    return bound * EPSILON_RTOL + EPSILON_ATOL


@functools.lru_cache(maxsize=256)
def _step_rdp(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP at each of ``_ORDERS`` of one DP-SGD step (a Poisson-subsampled Gaussian; the
    Gaussian itself at ``sample_rate`` 1), by Google's dp-accounting. Read-only: the cache
    hands the same array to every caller."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = RdpAccountant(list(_ORDERS))
    accountant.compose(event)
    rdp = np.asarray(accountant.rdp, dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def _epsilon(rdp: npt.NDArray[np.float64], delta: float) -> float:
    """The least epsilon at ``delta`` over the orders, by dp-accounting's conversion."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    epsilon, _ = compute_epsilon(list(_ORDERS), list(rdp), delta)
    return float(epsilon)


class Composition:
    """DP-SGD rounds composed by the audit's accountant (dp-accounting RDP, each round
    ``steps`` Poisson-subsampled Gaussian steps; the caller checks each is a mechanism:
    noise multiplier above 0, sampling rate in (0, 1]), and the epsilon they spend."""

    def __init__(self, mechanisms: Iterable[tuple[float, float, int]] = ()) -> None:
        self.rdp: npt.NDArray[np.float64] = np.zeros(len(_ORDERS))
        for mechanism in mechanisms:
            self.add(*mechanism)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps:
            self.rdp = self.rdp + steps * _step_rdp(noise_multiplier, sample_rate)

    def epsilon(self, delta: float) -> tuple[float, float]:
        """These rounds' epsilon at ``delta``, as (lower, upper) bounds for the report and
        the checks: at integer orders both are dp-accounting's one figure."""
        epsilon = _epsilon(self.rdp, delta)
        return epsilon, epsilon


def finite_number(value: Any) -> float | None:
    """A logged number (not a bool), finite, as a float; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _whole(value: Any) -> int | None:
    """A logged count or round number (an int, not a bool, at least 0); None otherwise."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _count(items: Sized, what: str) -> str:
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}"


def _shown(bounds: tuple[float, float]) -> str:
    lower, upper = bounds
    if upper - lower <= _slack(upper) / 10:
        return f"{upper:.4g}"
    return f"between {lower:.4g} and {upper:.4g}"


@dataclass
class _Spent:
    """One node's record-level DP in one run, as logged so far."""

    ueid: str | None
    rounds: dict[int, tuple[float, float, int]] = field(default_factory=dict)
    composition: Composition = field(default_factory=Composition)
    last: dict[Key, float] = field(default_factory=dict)  # the last dp_spent's numbers
    budget: float | None = None  # the last dp_spent's budget (None: the node declares none)
    recomputed: tuple[float, float] = (0.0, 0.0)
    disagreed: int = 0  # entries whose epsilon the audit does not reproduce
    # (epsilon_total, delta, entry index, round) of the largest total logged
    most: tuple[float, float, int, int] | None = None

    def forget_after(self, rnd: int) -> None:
        """A ServerApp restarted after round ``rnd`` runs the later rounds again. Their
        first trainings stay in the composition (their updates left the node, and the
        node's ledger counts them); only the rounds' order starts again after ``rnd``."""
        self.rounds = {r: m for r, m in self.rounds.items() if r <= rnd}


@dataclass
class _Aggregated:
    """A run's client-level DP (noisy aggregates), as logged so far."""

    rounds: dict[int, float] = field(default_factory=dict)  # round -> noise multiplier
    composition: Composition = field(default_factory=Composition)
    last: dict[Key, float] = field(default_factory=dict)
    recomputed: tuple[float, float] = (0.0, 0.0)
    disagreed: int = 0

    def forget_after(self, rnd: int) -> None:
        self.rounds = {r: m for r, m in self.rounds.items() if r <= rnd}
        self.composition = Composition((m, 1.0, 1) for m in self.rounds.values())


@dataclass(frozen=True)
class Spending:
    """What the log says a run spent of privacy, and what the audit recomputes: one node's
    records (record-level DP, ``node`` set) or any node's participation in the run's
    aggregates (client-level, ``node`` None). Mechanism values are the distinct ones logged;
    the epsilons are the last logged and the audit's for the same rounds; ``disagreed``
    counts the entries whose epsilon the audit does not reproduce."""

    run: str
    node: str | None
    ueid: str | None
    rounds: int
    noise_multiplier: tuple[float, ...]
    sample_rate: tuple[float, ...]
    steps: tuple[int, ...]
    clip: tuple[float, ...]
    delta: float
    epsilon: float
    recomputed: tuple[float, float]
    epsilon_total: float | None
    budget: float | None
    disagreed: int


_SPENT_NUMBERS = (
    Key.NOISE_MULTIPLIER,
    Key.SAMPLE_RATE,
    Key.CLIP,
    Key.DELTA,
    Key.EPSILON,
    Key.EPSILON_TOTAL,
)
_AGGREGATE_NUMBERS = (Key.NOISE_MULTIPLIER, Key.CLIP, Key.DELTA, Key.EPSILON)


class _PrivacyLedger:
    """The differential-privacy rules :func:`check_policy` keeps while it walks the log.

    Record-level (``dp_spent``, per run and node): rounds strictly increase; after each
    entry the audit composes the node's logged rounds of the run with its own accountant
    (:class:`Composition`) and the logged epsilon must agree (:data:`EPSILON_RTOL`); the
    epsilon stays within the node's budget and the run's ``dp_epsilon``, and the node's
    total covers the run's epsilon and stays within its budget. Across runs, per node
    identity (its ueid, as ``node_admitted`` names it; a Flower node id is per run), every
    round the log records composes to at most the largest total the node logged. In a run
    that asks record-level DP, and for any node that logged one in a run, every update
    accepted and every masked input taken has its round's ``dp_spent`` (checked at the
    end: a ``dp_spent`` may come before or after its update). Client-level
    (``dp_aggregate``, per run): rounds strictly increase and the logged epsilon agrees
    with the noisy aggregates composed so far; a run that asks ``dp_client_noise`` has one
    for every committed aggregate. A ServerApp restarted in a run logs again the rounds
    after the one it resumes from: for a node both trainings count, as in its ledger (both
    updates left it); a re-run aggregate replaces the first (never published).
    """

    def __init__(self, violations: list[PolicyViolation]) -> None:
        self.violations = violations
        self.asked: dict[str, float | None] = {}  # run -> dp_epsilon (latest run_started)
        self.record_level: set[str] = set()  # runs that ask record-level DP
        self.client_level: set[str] = set()  # runs that ask client-level DP
        self.ueids: dict[tuple[str, str], str] = {}  # (run, node) -> ueid
        self.spent: dict[tuple[str, str], _Spent] = {}  # (run, node) -> its ledger
        self.aggregated: dict[str, _Aggregated] = {}
        self.logged: set[tuple[str, str, str]] = set()  # (run, round, node) with dp_spent
        self.noised: set[tuple[str, str]] = set()  # (run, round) with dp_aggregate
        # (index, run, round, node, what) of every update accepted or masked input taken
        self.contributed: list[tuple[int, str, str, str, str]] = []
        self.committed: list[tuple[int, str, str]] = []  # (index, run, round) aggregates

    def _fail(self, index: int, what: str) -> None:
        self.violations.append(PrivacyLedgerMismatch(f"entry {index}: {what}"))

    def see(self, index: int, record: Mapping[str, Any]) -> None:
        """Take one log entry (of any kind) in order."""
        kind = record.get(Key.KIND)
        run = _text(record.get(Key.RUN))
        if kind == RunStarted.kind:
            self.started(run, record)
        elif kind == NodeAdmitted.kind:
            key = _fields(record, Key.RUN, Key.NODE, Key.UEID)
            if key is not None:
                self.ueids.setdefault((key[0], key[1]), key[2])
        elif kind == UpdateAccepted.kind:
            where = (_text(record.get(Key.ROUND)), _text(record.get(Key.NODE)))
            self.contributed.append((index, run, *where, "an update accepted"))
        elif kind == SecaggStage.kind and record.get(Key.STAGE) == STAGE_MASK:
            rnd = _text(record.get(Key.ROUND))
            for node in dict.fromkeys(_ids(record.get(Key.NODES)) or []):
                self.contributed.append((index, run, rnd, node, "a masked input taken"))
        elif kind == AggregateCommitted.kind:
            self.committed.append((index, run, _text(record.get(Key.ROUND))))
        elif kind == DpSpent.kind:
            self.spent_round(index, run, record)
        elif kind == DpAggregate.kind:
            self.aggregate(index, run, record)

    def started(self, run: str, record: Mapping[str, Any]) -> None:
        asked = finite_number(record.get(Key.DP_EPSILON))
        self.asked[run] = asked
        if asked is not None and asked > 0:
            self.record_level.add(run)
        noise = finite_number(record.get(Key.DP_CLIENT_NOISE))
        if noise is not None and noise > 0:
            self.client_level.add(run)
        resumed = _whole(record.get(Key.RESUMED_AFTER_ROUND)) or 0
        for (logged_run, _), spent in self.spent.items():
            if logged_run == run:
                spent.forget_after(resumed)
        if run in self.aggregated:
            self.aggregated[run].forget_after(resumed)

    def _numbers(
        self, index: int, record: Mapping[str, Any], names: Sequence[Key], what: str
    ) -> tuple[int, dict[Key, float]] | None:
        """The record's round and ``names`` as numbers, or None (and a violation)."""
        rnd = _whole(record.get(Key.ROUND))
        numbers = {name: finite_number(record.get(name)) for name in names}
        bad = [*([Key.ROUND] if rnd is None else []), *(k for k, v in numbers.items() if v is None)]
        if rnd is None or bad:
            self._fail(
                index,
                f"{what} with no valid {', '.join(bad)}: its privacy cost cannot be checked",
            )
            return None
        return rnd, {name: value for name, value in numbers.items() if value is not None}

    def _ordered(self, index: int, rounds: Iterable[int], rnd: int, what: str) -> bool:
        """Whether ``rnd`` comes after every round in ``rounds`` (else a violation)."""
        last = max(rounds, default=None)
        if last is None or rnd > last:
            return True
        again = "twice" if rnd in set(rounds) else f"after round {last}"
        self._fail(index, f"{what} logged {again}: a ledger's rounds strictly increase")
        return False

    def spent_round(self, index: int, run: str, record: Mapping[str, Any]) -> None:
        node = _text(record.get(Key.NODE))
        where = f"run {run} node {node}'s dp_spent"
        parsed = self._numbers(index, record, _SPENT_NUMBERS, where)
        steps = _whole(record.get(Key.STEPS))
        if parsed is None:
            return
        rnd, n = parsed
        where = f"run {run} round {rnd} node {node}'s dp_spent"
        self.logged.add((run, str(rnd), node))
        sigma, rate, delta = n[Key.NOISE_MULTIPLIER], n[Key.SAMPLE_RATE], n[Key.DELTA]
        if steps is None or not (
            _NOISE_RANGE[0] <= sigma <= _NOISE_RANGE[1]
            and 0 < rate <= 1
            and 1 <= steps <= _MAX_STEPS
            and n[Key.CLIP] > 0
            and 0 < delta < 1
        ):
            self._fail(
                index,
                f"{where} is no DP-SGD mechanism (noise multiplier {sigma:g}, sampling rate "
                f"{rate:g}, steps {record.get(Key.STEPS)!r}, clip {n[Key.CLIP]:g}, delta "
                f"{delta:g})",
            )
            return
        spent = self.spent.setdefault((run, node), _Spent(self.ueids.get((run, node))))
        if not self._ordered(index, spent.rounds, rnd, where):
            return
        spent.rounds[rnd] = (sigma, rate, steps)
        spent.composition.add(sigma, rate, steps)
        spent.last = n
        spent.budget = finite_number(record.get(Key.BUDGET))
        spent.recomputed = spent.composition.epsilon(delta)
        lower, upper = spent.recomputed
        epsilon, total = n[Key.EPSILON], n[Key.EPSILON_TOTAL]
        # null: the node declares no budget of its own (only the run's ask bounds it)
        budget = (
            math.inf if record.get(Key.BUDGET) is None else finite_number(record.get(Key.BUDGET))
        )
        if budget is None or budget <= 0:
            self._fail(index, f"{where} logs no valid budget: {record.get(Key.BUDGET)!r}")
            budget = math.inf
        if epsilon > upper + _slack(upper):
            # More than the log's rounds compose to: the node trained a round the log does
            # not show (a rejected or lost reply, a replayed instruction). Not an
            # understatement; the report marks it and crosscheck names the round.
            spent.disagreed += 1
        if epsilon < lower - _slack(lower):
            spent.disagreed += 1
            self._fail(
                index,
                f"{where} logs epsilon {epsilon:.4g}; its {_count(spent.rounds, 'logged round')} "
                f"(this one {steps} steps at noise multiplier {sigma:g}, sampling rate "
                f"{rate:g}) compose to epsilon {_shown(spent.recomputed)} at delta {delta:g} "
                "by the audit's own accountant (dp-accounting)",
            )
        if epsilon > budget + _slack(budget):
            self._fail(
                index, f"{where} logs epsilon {epsilon:.4g}, over the node's budget {budget:g}"
            )
        if total < epsilon - _slack(epsilon):
            self._fail(
                index,
                f"{where} logs a total epsilon {total:.4g} below the run's {epsilon:.4g}",
            )
        if total > budget + _slack(budget):
            self._fail(
                index,
                f"{where} logs a total epsilon {total:.4g}, over the node's budget {budget:g}",
            )
        asked = self.asked.get(run)
        if asked is not None and asked > 0 and epsilon > asked + _slack(asked):
            self._fail(
                index,
                f"{where} logs epsilon {epsilon:.4g}, over the {asked:g} the run asks (dp_epsilon)",
            )
        if spent.most is None or total >= spent.most[0]:
            spent.most = (total, delta, index, rnd)

    def aggregate(self, index: int, run: str, record: Mapping[str, Any]) -> None:
        where = f"run {run}'s dp_aggregate"
        parsed = self._numbers(index, record, _AGGREGATE_NUMBERS, where)
        if parsed is None:
            return
        rnd, n = parsed
        where = f"run {run} round {rnd}'s dp_aggregate"
        self.noised.add((run, str(rnd)))
        sigma, delta = n[Key.NOISE_MULTIPLIER], n[Key.DELTA]
        if not (_NOISE_RANGE[0] <= sigma <= _NOISE_RANGE[1] and n[Key.CLIP] > 0 and 0 < delta < 1):
            self._fail(
                index,
                f"{where} is no Gaussian mechanism (noise multiplier {sigma:g}, clip "
                f"{n[Key.CLIP]:g}, delta {delta:g})",
            )
            return
        aggregated = self.aggregated.setdefault(run, _Aggregated())
        if not self._ordered(index, aggregated.rounds, rnd, where):
            return
        aggregated.rounds[rnd] = sigma
        aggregated.composition.add(sigma, 1.0, 1)  # every node in every aggregate
        aggregated.last = n
        aggregated.recomputed = aggregated.composition.epsilon(delta)
        lower, _ = aggregated.recomputed
        epsilon = n[Key.EPSILON]
        if epsilon < lower - _slack(lower):
            aggregated.disagreed += 1
            self._fail(
                index,
                f"{where} logs client-level epsilon {epsilon:.4g}; its "
                f"{_count(aggregated.rounds, 'noisy aggregate')} (this one at noise multiplier "
                f"{sigma:g}) compose to epsilon {_shown(aggregated.recomputed)} at delta "
                f"{delta:g} by the audit's own accountant (dp-accounting)",
            )

    def end(self) -> None:
        """At the end of the log: every contribution in the ledger, every noisy aggregate
        logged, and each node's largest total covering all the log records of it."""
        dp_nodes = {key for key in self.spent} | {(run, node) for run, _, node in self.logged}
        missing: set[tuple[str, str, str]] = set()
        for index, run, rnd, node, what in self.contributed:
            asked = run in self.record_level or (run, node) in dp_nodes
            if asked and (run, rnd, node) not in self.logged | missing:
                missing.add((run, rnd, node))
                self._fail(
                    index,
                    f"run {run} round {rnd}: {what} from node {node}, with no dp_spent for "
                    "that round and node: its privacy cost is missing from the ledger",
                )
        for index, run, rnd in self.committed:
            if run in self.client_level and (run, rnd) not in self.noised:
                self._fail(
                    index,
                    f"run {run} round {rnd}: the run asks client-level DP (dp_client_noise), "
                    "and the aggregate has no dp_aggregate",
                )
        self._identities()

    def _identities(self) -> None:
        """Per node identity, all its logged rounds (every run) against its largest total."""
        identities: dict[tuple[str, ...], list[tuple[str, str, _Spent]]] = {}
        for (run, node), spent in self.spent.items():
            ueid = spent.ueid or self.ueids.get((run, node))
            key = ("ueid", ueid) if ueid else ("node", run, node)
            identities.setdefault(key, []).append((run, node, spent))
        for ledgers in identities.values():
            everything = Composition()
            everything.rdp = sum((s.composition.rdp for _, _, s in ledgers), everything.rdp)
            most = max(
                ((s.most, run, node) for run, node, s in ledgers if s.most is not None),
                key=lambda item: (item[0][0], item[0][2]),
                default=None,
            )
            if most is None:
                continue
            (total, delta, index, rnd), run, node = most
            lower, _ = everything.epsilon(delta)
            if lower > total + _slack(total):
                rounds = sum(len(s.rounds) for _, _, s in ledgers)
                self._fail(
                    index,
                    f"run {run} round {rnd} node {node} logs a total epsilon {total:.4g}, the "
                    f"largest it logs, yet the {rounds} rounds the log records of that node "
                    f"(ueid {ledgers[0][2].ueid or 'unknown'}, {len(ledgers)} run(s)) compose "
                    f"to at least {lower:.4g} at delta {delta:g}: its total leaves out "
                    "spending the log itself shows",
                )

    def spending(self) -> list[Spending]:
        """Every run's and node's spending, in the order the log first shows it."""
        rows = []
        for (run, node), spent in self.spent.items():
            if not spent.last:
                continue
            mechanisms = list(spent.rounds.values())
            rows.append(
                Spending(
                    run=run,
                    node=node,
                    ueid=spent.ueid or self.ueids.get((run, node)),
                    rounds=len(mechanisms),
                    noise_multiplier=tuple(dict.fromkeys(m[0] for m in mechanisms)),
                    sample_rate=tuple(dict.fromkeys(m[1] for m in mechanisms)),
                    steps=tuple(dict.fromkeys(m[2] for m in mechanisms)),
                    clip=(spent.last[Key.CLIP],),
                    delta=spent.last[Key.DELTA],
                    epsilon=spent.last[Key.EPSILON],
                    recomputed=spent.recomputed,
                    epsilon_total=spent.last[Key.EPSILON_TOTAL],
                    budget=spent.budget,
                    disagreed=spent.disagreed,
                )
            )
        for run, aggregated in self.aggregated.items():
            if not aggregated.last:
                continue
            rows.append(
                Spending(
                    run=run,
                    node=None,
                    ueid=None,
                    rounds=len(aggregated.rounds),
                    noise_multiplier=tuple(dict.fromkeys(aggregated.rounds.values())),
                    sample_rate=(1.0,),
                    steps=(1,),
                    clip=(aggregated.last[Key.CLIP],),
                    delta=aggregated.last[Key.DELTA],
                    epsilon=aggregated.last[Key.EPSILON],
                    recomputed=aggregated.recomputed,
                    epsilon_total=None,
                    budget=None,
                    disagreed=aggregated.disagreed,
                )
            )
        return rows


def privacy_spending(records: Sequence[Mapping[str, Any]]) -> list[Spending]:
    """What the log says each run spent of differential privacy, per node (record-level)
    and per run (client-level), beside the audit's own recomputation: for the report."""
    ledger = _PrivacyLedger([])
    for index, record in enumerate(records):
        ledger.see(index, record)
    return ledger.spending()


class _Comparisons:
    """The state the comparison rules keep while :func:`check_policy` walks the log: the
    keys certified for signing, each node's committed held-out set, and the valid
    scorecards. Each signed record is opened once, so the rules stay linear in the log."""

    def __init__(self, violations: list[PolicyViolation]) -> None:
        self.violations = violations
        # (EAR digest, ueid, key digest) of affirming appraisals for signing
        self.appraisals: set[tuple[str, ...]] = set()
        self.signers: set[tuple[str, ...]] = set()  # (ueid, key digest) certified for signing
        self.models: dict[str, dict[str, str]] = {}  # comparison -> model id -> manifest
        self.done: set[str] = set()  # comparisons finished
        # comparison -> ueid -> (root, count) of its first commitment
        self.roots: dict[str, dict[str, tuple[str, int]]] = {}
        # (comparison, model id, ueid) -> the runs it has a valid scorecard from
        self.scored: dict[tuple[str, str, str], set[str]] = {}
        self.admitted: dict[str, dict[str, str]] = {}  # run -> node -> ueid
        self.declined: set[tuple[str, str]] = set()  # (run, node) that declined or left

    def appraised(self, record: Mapping[str, Any]) -> None:
        if record.get(Key.PURPOSE) == PURPOSE_SIGNING and record.get(Key.STATUS) == AFFIRMING:
            key = _fields(record, Key.EAR_SHA256, Key.UEID, Key.TEE_PUBKEY_SHA256)
            if key is not None:
                self.appraisals.add(key)

    def certified(self, record: Mapping[str, Any]) -> None:
        """A key certified for signing counts only after an affirming appraisal of the
        same result, ueid and key."""
        if record.get(Key.PURPOSE) == PURPOSE_SIGNING:
            key = _fields(record, Key.EAR_SHA256, Key.UEID, Key.TEE_PUBKEY_SHA256)
            if key is not None and key in self.appraisals:
                self.signers.add(key[1:])

    def admitted_node(self, record: Mapping[str, Any]) -> None:
        key = _fields(record, Key.RUN, Key.NODE, Key.UEID)
        if key is not None:
            self.admitted.setdefault(key[0], {})[key[1]] = key[2]

    def left(self, record: Mapping[str, Any]) -> None:
        self.declined.add((_text(record.get(Key.RUN)), _text(record.get(Key.NODE))))

    def _in_progress(self, index: int, comparison: str, what: str) -> bool:
        """Whether ``comparison`` has started and not finished (else a violation): a record
        outside one is one the comparison's completeness check would never weigh."""
        if comparison in self.models and comparison not in self.done:
            return True
        state = "finished" if comparison in self.done else "never started"
        self.violations.append(
            PolicyViolation(f"entry {index}: a {what} in comparison {comparison!r}, {state}")
        )
        return False

    def started(self, index: int, record: Mapping[str, Any]) -> None:
        comparison = _text(record.get(Key.COMPARISON))
        if not comparison or comparison in self.models:
            self.violations.append(
                PolicyViolation(
                    f"entry {index}: comparison {comparison!r} is unnamed or started twice"
                )
            )
            return
        models = record.get(Key.MODELS)
        self.models[comparison] = {
            _text(m.get(Key.MODEL_ID)): _text(m.get(Key.MANIFEST_SHA256))
            for m in (models if isinstance(models, list) else [])
            if isinstance(m, Mapping)
        }

    def _opened(
        self,
        index: int,
        record: Mapping[str, Any],
        field: Key,
        what: str,
        opener: Callable[[Any], tuple[Signed, str]],
    ) -> Signed | None:
        """The record's signed ``field``, verified and by a certified signer, or None (and
        a violation)."""
        node = _text(record.get(Key.NODE))
        try:
            opened, signer = opener(record.get(field))
        except ScorecardInvalid as exc:
            self.violations.append(
                ScorecardUnattested(f"entry {index}: node {node}'s {what} does not verify: {exc}")
            )
            return None
        if (opened.ueid, signer) not in self.signers:
            self.violations.append(
                ScorecardUnattested(
                    f"entry {index}: node {node}'s {what} is signed by key {signer[:16]}…, which "
                    f"the key broker did not certify for signing by ueid {opened.ueid!r} before it"
                )
            )
            return None
        if _text(record.get(Key.COMPARISON)) != opened.comparison:
            self.violations.append(
                PolicyViolation(
                    f"entry {index}: node {node}'s {what} is for comparison "
                    f"{opened.comparison!r}, logged as one of {record.get(Key.COMPARISON)!r}"
                )
            )
            return None
        return opened

    def committed(self, index: int, record: Mapping[str, Any]) -> None:
        commitment = self._opened(
            index, record, Key.COMMITMENT, "held-out commitment", open_commitment
        )
        if commitment is None or not self._in_progress(
            index, commitment.comparison, "held-out commitment"
        ):
            return
        committed = (commitment.root, commitment.count)
        roots = self.roots.setdefault(commitment.comparison, {})
        first = roots.setdefault(commitment.ueid, committed)
        if first != committed:
            self.violations.append(
                ScorecardRootMismatch(
                    f"entry {index}: ueid {commitment.ueid!r} committed held-out set "
                    f"{_set(committed)} in comparison {commitment.comparison!r}, having "
                    f"committed {_set(first)} before"
                )
            )

    def scored_model(self, index: int, record: Mapping[str, Any]) -> None:
        scorecard = self._opened(index, record, Key.SCORECARD, "scorecard", open_scorecard)
        if scorecard is None or not self._in_progress(index, scorecard.comparison, "scorecard"):
            return
        where = (
            f"entry {index}: the scorecard of model {scorecard.model_id!r} by ueid "
            f"{scorecard.ueid!r} in comparison {scorecard.comparison!r}"
        )
        if _text(record.get(Key.RUN)) != str(scorecard.run):
            self.violations.append(
                PolicyViolation(f"{where} is of run {scorecard.run}, logged in another")
            )
            return
        committed = self.roots.get(scorecard.comparison, {}).get(scorecard.ueid)
        scored = (scorecard.heldout_root, scorecard.heldout_count)
        if committed is None:
            self.violations.append(
                ScorecardRootMismatch(f"{where} comes before that ueid committed a held-out set")
            )
            return
        if scored != committed:
            self.violations.append(
                ScorecardRootMismatch(
                    f"{where} is on held-out set {_set(scored)}, not the committed "
                    f"{_set(committed)}"
                )
            )
            return
        manifest = self.models.get(scorecard.comparison, {}).get(scorecard.model_id)
        if manifest is not None and manifest != scorecard.manifest_sha256:
            self.violations.append(
                PolicyViolation(
                    f"{where} scores manifest {scorecard.manifest_sha256[:16]}…, not the "
                    f"{manifest[:16]}… the comparison started with"
                )
            )
            return
        self.scored.setdefault(
            (scorecard.comparison, scorecard.model_id, scorecard.ueid), set()
        ).add(str(scorecard.run))

    def finished(self, index: int, record: Mapping[str, Any]) -> None:
        comparison = _text(record.get(Key.COMPARISON))
        models = self.models.get(comparison)
        if models is None:
            self.violations.append(
                PolicyViolation(f"entry {index}: comparison {comparison!r} finished, never started")
            )
            return
        if comparison in self.done:
            self.violations.append(
                PolicyViolation(f"entry {index}: comparison {comparison!r} finished twice")
            )
            return
        self.done.add(comparison)
        logged = record.get(Key.RUNS)
        runs = {
            _text(model): _text(run)
            for model, run in (logged.items() if isinstance(logged, Mapping) else [])
        }
        expected: set[tuple[str, str]] = set()  # (model, ueid) that must have a scorecard
        for ueid in self.roots.get(comparison, {}):
            expected.update((model, ueid) for model in models)
        for model, run in runs.items():
            # Every TEE admitted to a model's run and still in it at the end scored it.
            expected.update(
                (model, ueid)
                for node, ueid in self.admitted.get(run, {}).items()
                if (run, node) not in self.declined
            )
        for model in models:
            if model not in runs:
                self.violations.append(
                    ScorecardMissing(
                        f"entry {index}: comparison {comparison!r} finished naming no run of "
                        f"model {model!r}"
                    )
                )
        for model, ueid in sorted(expected):
            found = self.scored.get((comparison, model, ueid), set())
            if not found:
                self.violations.append(
                    ScorecardMissing(
                        f"entry {index}: comparison {comparison!r} finished with no valid "
                        f"scorecard of model {model!r} from ueid {ueid!r}, which committed a "
                        "held-out set or took part in that model's run"
                    )
                )
            elif model in runs and found != {runs[model]}:
                others = sorted(found - {runs[model]})
                self.violations.append(
                    PolicyViolation(
                        f"entry {index}: comparison {comparison!r} scored model {model!r} "
                        f"from ueid {ueid!r} in runs {others} besides run {runs[model]}, the "
                        "one it names: a best-of-several pick"
                    )
                )

    def end(self, size: int) -> None:
        """At the end of the log: a comparison started and never finished cannot be
        checked complete (a scorecard left out would go unnoticed)."""
        for comparison in sorted(set(self.models) - self.done):
            self.violations.append(
                ScorecardMissing(
                    f"comparison {comparison!r} started and is not finished in the log's "
                    f"{size} entries: its scorecards cannot be checked complete"
                )
            )


def certified_signers(records: Sequence[Mapping[str, Any]]) -> set[tuple[str, ...]]:
    """The (ueid, key SHA-256) pairs the log shows the key broker certified for signing
    after an affirming appraisal: the keys a comparison's records may be signed with."""
    comparisons = _Comparisons([])
    for record in records:
        if record.get(Key.KIND) == AttestationAppraised.kind:
            comparisons.appraised(record)
        elif record.get(Key.KIND) == ChannelCertified.kind:
            comparisons.certified(record)
    return comparisons.signers


def _set(committed: tuple[str, int]) -> str:
    """A held-out set as messages name it: its root, cut short, and its size."""
    return f"{committed[0][:16]}… ({committed[1]} examples)"


def check_policy(records: Sequence[Mapping[str, Any]]) -> list[PolicyViolation]:
    """The rules that must hold across events, in log order:

    - every key release follows an affirming key-release appraisal of the same session,
      the same attestation result and the same TEE key;
    - every accepted update comes from a node that, in that run, was admitted under a
      channel attestation the key broker appraised as affirming (same result, ueid and
      channel key; one result admits one node of one run; a refusal or a declined round
      ends the admission), and that was sent that round's instruction;
    - one ueid (one attested TEE) is admitted as one node per run, declines included;
    - every update is accepted or rejected once; every committed aggregate lists only
      updates accepted in that run and round, each once;
    - in a secure-aggregation round (one with ``secagg_*`` events) no update is accepted
      on its own, the protocol's steps come in order and agree with each other, and the
      aggregate counts one masked input per survivor (:class:`_SecureRounds`, else
      SecAggInconsistent); every node whose masked input it sums is admitted and was sent
      the round's instruction, as for an accepted update (else UpdateFromUnattested);
    - every held-out commitment and scorecard verifies (:mod:`sandbox.scorecard`) and is
      signed by a key the key broker certified for signing for the ueid it names, earlier
      in the log (else ScorecardUnattested); one ueid commits one held-out set per
      comparison, and every scorecard comes after its ueid's commitment and names that set
      (else ScorecardRootMismatch); once a comparison finishes, every model it started
      with has a valid scorecard from every ueid that committed (else ScorecardMissing);
    - every differential-privacy epsilon a node or the provider logs is the one the audit's
      own accountant computes from the logged rounds, within the node's budget and the
      run's ask, and no round that trained with DP is missing from the ledger
      (:class:`_PrivacyLedger`, else PrivacyLedgerMismatch);
    - every list logged one entry per member adds up to the count and Merkle root its
      event commits to (:func:`sandbox.events.members.expand`, else
      ListCommitmentMismatch); the rules above read such lists as if inline.

    Fields a rule compares must be present: missing values never match each other.
    """
    return _check_expanded(expand(records))


def _check_expanded(expanded: Expanded) -> list[PolicyViolation]:
    """:func:`check_policy` over a log whose lists :func:`expand` has read already."""
    records = expanded.records
    policy = _Policy()
    policy.violations.extend(
        ListCommitmentMismatch(f"entry {index}: {what}") for index, what in expanded.problems
    )
    comparisons = _Comparisons(policy.violations)
    secure = _SecureRounds(policy.violations)
    privacy = _PrivacyLedger(policy.violations)
    for index, record in enumerate(records):
        kind = record.get(Key.KIND)
        privacy.see(index, record)
        if kind is None:
            policy.violations.append(PolicyViolation(f"entry {index}: {record.get('malformed')}"))
        elif kind == AttestationAppraised.kind:
            policy.appraised(record)
            comparisons.appraised(record)
        elif kind == KeyReleased.kind:
            policy.released(index, record)
        elif kind == NodeAdmitted.kind:
            policy.admitted_node(index, record)
            comparisons.admitted_node(record)
        elif kind in (NodeRefused.kind, NodeDeclined.kind):
            policy.left(record)
            comparisons.left(record)
        elif kind == RoundStarted.kind:
            policy.round_started(record)
        elif kind in (UpdateAccepted.kind, UpdateRejected.kind):
            policy.decided_update(index, record)
            if kind == UpdateAccepted.kind:
                secure.update_accepted(index, record)
        elif kind == AggregateCommitted.kind:
            if not secure.aggregated(index, record):
                policy.committed(index, record)
        elif kind == RunStarted.kind:
            secure.restarted(record)
        elif kind == SecaggAdvertised.kind:
            secure.advertised(index, record)
        elif kind == SecaggStage.kind:
            secure.staged(index, record)
            policy.masked(index, record)
        elif kind == SecaggUnmasked.kind:
            secure.unmasked(index, record)
        elif kind == ChannelCertified.kind:
            comparisons.certified(record)
        elif kind == ComparisonStarted.kind:
            comparisons.started(index, record)
        elif kind == HeldoutCommitted.kind:
            comparisons.committed(index, record)
        elif kind == ScorecardLogged.kind:
            comparisons.scored_model(index, record)
        elif kind == ComparisonFinished.kind:
            comparisons.finished(index, record)
    comparisons.end(len(records))
    secure.end()
    privacy.end()
    return policy.violations


def crosscheck(
    records: Sequence[Mapping[str, Any]], journal: Sequence[Mapping[str, Any]], name: str
) -> list[JournalMismatch]:
    """Hold a node's journal and the provider's log against each other.

    - every instruction the journal says it received is among the participants of that
      run, round and node in the log, with the same digest;
    - every update it says it sent is accepted or rejected in that run, round and node;
    - every update the log accepts or rejects from this node, in a run the journal
      covers, is one the journal says it sent;
    - in a secure-aggregation round, the same for masked inputs, and for the key shares
      the node revealed (:func:`_crosscheck_secure`);
    - every round the node's privacy ledger records is logged with the same numbers, and
      the other way round (:func:`_crosscheck_privacy`).

    Lists the log holds one entry per member are read inline (:func:`expand`).
    """
    records = expand(records).records
    secure = _SecureLog(records)
    sent: set[tuple[str, ...]] = set()
    instructed: set[tuple[str, ...]] = set()
    for record in records:
        where = (
            _text(record.get(Key.RUN)),
            _text(record.get(Key.ROUND)),
            _text(record.get(Key.NODE)),
        )
        if record.get(Key.KIND) in (UpdateAccepted.kind, UpdateRejected.kind):
            sent.add((*where, _text(record.get(Key.ENVELOPE_SHA256))))
        elif record.get(Key.KIND) == RoundStarted.kind:
            participants = record.get(Key.PARTICIPANTS)
            for participant in participants if isinstance(participants, list) else []:
                if isinstance(participant, Mapping):
                    instructed.add(
                        (
                            where[0],
                            where[1],
                            _text(participant.get(Key.NODE)),
                            _text(participant.get(Key.INSTRUCTION_SHA256)),
                        )
                    )
    mismatches: list[JournalMismatch] = []
    journal_sent: set[tuple[str, ...]] = set()
    for number, entry in enumerate(journal, 1):
        where = (
            _text(entry.get(Key.RUN_ID)),
            _text(entry.get(Key.ROUND)),
            _text(entry.get(Key.NODE_ID)),
        )
        kind = _text(entry.get(Key.KIND))
        label = f"{name} entry {number} ({kind}, run {where[0]}, round {where[1]})"
        received, update = entry.get(Key.RECEIVED_SHA256), entry.get(Key.SENT_SHA256)
        if received and (*where, _text(received)) not in instructed:
            mismatches.append(
                JournalMismatch(
                    f"{label}: received instruction {_text(received)[:16]}… is not in the "
                    "provider's log for this node and round"
                )
            )
        if update:
            journal_sent.add((*where, _text(update)))
            if (where[0], where[1]) in secure.rounds:
                logged = (*where, _text(update)) in sent
                problem = secure.sent(where, _text(update), decided=logged)
                if problem:
                    mismatches.append(JournalMismatch(f"{label}: {problem}"))
            elif (*where, _text(update)) not in sent:
                mismatches.append(
                    JournalMismatch(
                        f"{label}: sent update {_text(update)[:16]}… is not in the provider's "
                        "log for this node and round"
                    )
                )
    covered = {(w[0], w[2]) for w in journal_sent} | {
        (_text(e.get(Key.RUN_ID)), _text(e.get(Key.NODE_ID)))
        for e in journal
        if e.get(Key.RECEIVED_SHA256)
    }
    for update in sorted(sent):
        if (update[0], update[2]) in covered and update not in journal_sent:
            mismatches.append(
                JournalMismatch(
                    f"{name}: the provider's log has an update {update[3][:16]}… from node "
                    f"{update[2]} in run {update[0]} round {update[1]} that the node's "
                    "journal never sent"
                )
            )
    return (
        mismatches
        + _crosscheck_secure(secure, journal, journal_sent, name, covered)
        + _crosscheck_signed(records, journal, name, covered)
        + _crosscheck_privacy(records, journal, name, covered)
    )


class _SecureLog:
    """What the log says of each secure-aggregation round, for the cross-check: the nodes
    of its mask stage, its (first) unmasking and the masked inputs its aggregate counts."""

    def __init__(self, records: Sequence[Mapping[str, Any]]) -> None:
        self.rounds: set[tuple[str, str]] = set()
        self.masked: dict[tuple[str, str], set[str]] = {}
        self.unmasked: dict[tuple[str, str], dict[Key, set[str]]] = {}
        self.aggregated: dict[tuple[str, str], set[str]] = {}
        for record in records:
            kind = record.get(Key.KIND)
            key = (_text(record.get(Key.RUN)), _text(record.get(Key.ROUND)))
            if kind in (SecaggAdvertised.kind, SecaggStage.kind, SecaggUnmasked.kind):
                self.rounds.add(key)
            if kind == SecaggStage.kind and record.get(Key.STAGE) == STAGE_MASK:
                self.masked.setdefault(key, set()).update(_ids(record.get(Key.NODES)) or [])
            elif kind == SecaggUnmasked.kind and key not in self.unmasked:
                self.unmasked[key] = {
                    name: set(_ids(record.get(name)) or [])
                    for name in (Key.SURVIVORS, Key.DROPPED, Key.REVEALED_BY)
                }
            elif kind == AggregateCommitted.kind and key in self.rounds:
                self.aggregated[key] = set(_ids(record.get(Key.UPDATES)) or [])

    def sent(self, where: tuple[str, ...], update: str, *, decided: bool) -> str | None:
        """Why the log does not count the masked input ``update`` a node's journal says
        it sent in a secure round (``where``: run, round, node), or None if it does, or
        (``decided``) logs it as rejected (or accepted, which :func:`check_policy`
        refuses) while the node's masking key stayed secret."""
        run, rnd, node = where
        unmasked = self.unmasked.get((run, rnd), {})
        if node in unmasked.get(Key.DROPPED, set()):
            return (
                f"sent masked input {update[:16]}…, yet the provider's log lists node {node} "
                "as dropped: its masking key was rebuilt, so that input could be unmasked alone"
            )
        if decided:
            return None
        if node not in self.masked.get((run, rnd), set()):
            return (
                f"sent masked input {update[:16]}…, which the provider's log does not take "
                f"from node {node} in that round's mask stage"
            )
        aggregated = self.aggregated.get((run, rnd))
        if aggregated is not None and update not in aggregated:
            return f"sent masked input {update[:16]}…, which the round's aggregate does not count"
        return None


def _entries_of(
    journal: Sequence[Mapping[str, Any]], kind: str, name: str
) -> Iterator[tuple[str, Mapping[str, Any], tuple[str, str, str]]]:
    """The journal's entries of ``kind``: a label naming each (file, entry number, run,
    round), the entry, and its (run, round, node)."""
    for number, entry in enumerate(journal, 1):
        if entry.get(Key.KIND) != kind:
            continue
        run, rnd = _text(entry.get(Key.RUN_ID)), _text(entry.get(Key.ROUND))
        label = f"{name} entry {number} ({kind}, run {run}, round {rnd})"
        yield label, entry, (run, rnd, _text(entry.get(Key.NODE_ID)))


def _crosscheck_secure(
    secure: _SecureLog,
    journal: Sequence[Mapping[str, Any]],
    journal_sent: set[tuple[str, ...]],
    name: str,
    covered: set[tuple[str, str]],
) -> list[JournalMismatch]:
    """A secure round's key shares and masked inputs, both ways. A node reveals its shares
    of the masking keys of the nodes the aggregator says dropped, and of the seeds of the
    ones it says survived: each node its journal names must be one the log lists so (a
    survivor the aggregator told a node had dropped could have its input unmasked alone,
    so the log must say what the aggregator told the nodes). Each node the log says
    revealed did, and each masked input the log takes from the node, in a run its journal
    covers, is one the journal sent."""
    mismatches: list[JournalMismatch] = []
    revealed: set[tuple[str, str, str]] = set()
    for label, entry, (run, rnd, node) in _entries_of(journal, SecaggRevealed.kind, name):
        revealed.add((run, rnd, node))
        unmasked = secure.unmasked.get((run, rnd))
        if unmasked is None:
            mismatches.append(
                JournalMismatch(
                    f"{label}: node {node} revealed its key shares for a round whose "
                    "unmasking the provider's log does not record"
                )
            )
            continue
        for shares_of, listed, what in (
            (Key.KEYS_OF, Key.DROPPED, "masking keys"),
            (Key.SEEDS_OF, Key.SURVIVORS, "seeds"),
        ):
            extra = set(_ids(entry.get(shares_of)) or []) - unmasked[listed]
            if extra:
                mismatches.append(
                    JournalMismatch(
                        f"{label}: node {node} revealed its shares of the {what} of "
                        f"{_named(extra)}, which the provider's log does not list as {listed}"
                    )
                )
    covered = covered | {(run, node) for run, _, node in revealed}
    for (run, rnd), unmasked in sorted(secure.unmasked.items()):
        for node in sorted(unmasked[Key.REVEALED_BY]):
            if (run, node) in covered and (run, rnd, node) not in revealed:
                mismatches.append(
                    JournalMismatch(
                        f"{name}: the provider's log says node {node} revealed its key shares "
                        f"in run {run} round {rnd}; the node's journal never did"
                    )
                )
    sent = {update[:3] for update in journal_sent}
    for (run, rnd), nodes in sorted(secure.masked.items()):
        for node in sorted(nodes):
            if (run, node) in covered and (run, rnd, node) not in sent:
                mismatches.append(
                    JournalMismatch(
                        f"{name}: the provider's log takes a masked input from node {node} in "
                        f"run {run} round {rnd} that the node's journal never sent"
                    )
                )
    return mismatches


# A comparison's signed records: the log's event kind and field, the journal's kind.
_SIGNED_RECORDS = (
    (HeldoutCommitted.kind, Key.COMMITMENT, HeldoutCommitment.kind, "held-out commitment"),
    (ScorecardLogged.kind, Key.SCORECARD, ScorecardSigned.kind, "scorecard"),
)


def _crosscheck_signed(
    records: Sequence[Mapping[str, Any]],
    journal: Sequence[Mapping[str, Any]],
    name: str,
    covered: set[tuple[str, str]],
) -> list[JournalMismatch]:
    """A comparison's commitments and scorecards, both ways: each one the node's journal
    says it sent is in the log for that run and node (a provider that withholds the
    scorecard of the model that lost is caught here), and each one the log attributes to
    the node, in a run the journal covers, is one the node sent (a record the provider
    made up is caught here, whoever certified its key)."""
    mismatches: list[JournalMismatch] = []
    for log_kind, signed, journal_kind, what in _SIGNED_RECORDS:
        logged: set[tuple[str, str, str]] = set()
        for record in records:
            if record.get(Key.KIND) == log_kind and isinstance(record.get(signed), Mapping):
                try:
                    body = canonical_entry(record[signed])
                except (TypeError, ValueError):
                    continue  # check_policy reports a record that does not verify
                where = (_text(record.get(Key.RUN)), _text(record.get(Key.NODE)))
                logged.add((*where, hashlib.sha256(body).hexdigest()))
        sent = {
            (
                _text(entry.get(Key.RUN_ID)),
                _text(entry.get(Key.NODE_ID)),
                _text(entry.get(Key.RECORD_SHA256)),
            )
            for entry in journal
            if entry.get(Key.KIND) == journal_kind
        }
        for run, node, digest in sorted(sent - logged):
            mismatches.append(
                JournalMismatch(
                    f"{name}: the {what} {digest[:16]}… it sent as node {node} in run {run} "
                    "is not in the provider's log"
                )
            )
        for run, node, digest in sorted(logged - sent):
            if (run, node) in covered:
                mismatches.append(
                    JournalMismatch(
                        f"{name}: the provider's log has a {what} {digest[:16]}… from node "
                        f"{node} in run {run} that the node's journal never sent"
                    )
                )
    return mismatches


# What a node's journal (dp_round) and the log (dp_spent) both say of a DP round.
LEDGER_NUMBERS = (
    Key.NOISE_MULTIPLIER,
    Key.SAMPLE_RATE,
    Key.STEPS,
    Key.CLIP,
    Key.DELTA,
    Key.EPSILON,
    Key.EPSILON_TOTAL,
    Key.BUDGET,
)


def _crosscheck_privacy(
    records: Sequence[Mapping[str, Any]],
    journal: Sequence[Mapping[str, Any]],
    name: str,
    covered: set[tuple[str, str]],
) -> list[JournalMismatch]:
    """The node's privacy ledger, both ways: each DP round its journal records
    (``dp_round``) is logged as ``dp_spent`` for that run, round and node with the same
    numbers (a provider that logs less than the node reported is caught here, whatever
    the accountants say), and each ``dp_spent`` the log has from the node, in a run its
    journal covers, is one the journal records. The numbers travel as float64 from the
    node's reply into the log, so they are compared exactly."""
    logged: dict[tuple[str, str, str], list[tuple[float | None, ...]]] = {}
    for record in records:
        if record.get(Key.KIND) == DpSpent.kind:
            where = (
                _text(record.get(Key.RUN)),
                _text(record.get(Key.ROUND)),
                _text(record.get(Key.NODE)),
            )
            numbers = tuple(finite_number(record.get(key)) for key in LEDGER_NUMBERS)
            logged.setdefault(where, []).append(numbers)
    mismatches: list[JournalMismatch] = []
    kept: set[tuple[str, str, str]] = set()
    for label, entry, (run, rnd, node) in _entries_of(journal, DpRound.kind, name):
        kept.add((run, rnd, node))
        numbers = tuple(finite_number(entry.get(key)) for key in LEDGER_NUMBERS)
        found = logged.get((run, rnd, node))
        if not found:
            mismatches.append(
                JournalMismatch(
                    f"{label}: node {node} trained this round with DP (epsilon "
                    f"{_text(entry.get(Key.EPSILON))}), and the provider's log has no "
                    "dp_spent for it"
                )
            )
        elif None in numbers or numbers not in found:
            differ = [
                f"{key} {_text(ours)} in the journal, {_text(theirs)} in the log"
                for key, ours, theirs in zip(LEDGER_NUMBERS, numbers, found[-1], strict=True)
                if ours is None or ours != theirs
            ]
            mismatches.append(
                JournalMismatch(
                    f"{label}: the provider's log records node {node}'s DP round with other "
                    f"numbers: {'; '.join(differ)}"
                )
            )
    covered = covered | {(run, node) for run, _, node in kept}
    for run, rnd, node in sorted(logged):
        if (run, node) in covered and (run, rnd, node) not in kept:
            mismatches.append(
                JournalMismatch(
                    f"{name}: the provider's log has a dp_spent from node {node} in run {run} "
                    f"round {rnd} that the node's journal never recorded"
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
