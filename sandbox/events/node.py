"""A node's journal entries: what its ClientApp, egress guard and launcher record.

:func:`sandbox.journal.append_journal` stamps each :class:`NodeEvent` with the time
(seconds since the epoch) and the node's name; the stamped form is a
:class:`JournalEntry`. The journal's first line is :class:`JournalOpened`, unstamped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

from sandbox.errors import EventInvalid
from sandbox.events.schema import JsonObject, Key, Record, decode_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeEvent(Record):
    """What a node records; its run and node ids (Flower's, unsigned 64-bit) where known."""

    registry: ClassVar[dict[str, type[Record]]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class JournalOpened(NodeEvent):
    """Line 0 of a journal: its format and the public key that signs every line."""

    kind: ClassVar[str] = "journal_opened"
    format: str
    node: str
    public_key: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppApproved(NodeEvent):
    """The node launcher found the run's app among the node's approved digests."""

    kind: ClassVar[str] = "app_approved"
    app_sha256: str
    run_id: int | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppRefused(NodeEvent):
    kind: ClassVar[str] = "app_refused"
    app_sha256: str
    run_id: int | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class InRun(NodeEvent):
    """A ClientApp entry: of Flower run ``run_id``, as node ``node_id``."""

    run_id: int
    node_id: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregatorRefused(InRun):
    """The node could not verify the aggregator, so it did not train."""

    kind: ClassVar[str] = "aggregator_refused"
    round: int
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(InRun):
    """The node opened the run's channel (its key certified by the key broker)."""

    kind: ClassVar[str] = "hello"
    round: int
    suite: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyAttestation(JsonObject):
    """The attestation result the node's model key was released against."""

    ear_sha256: str
    status: str
    session: str
    stub: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregatorSeen(JsonObject):
    """The aggregator the node verified: its attested ueid."""

    ueid: str | None
    stub: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluate(InRun):
    """The node evaluated the adapter it received (sealed envelope ``received_sha256``,
    null when unprotected); both attestation records are null when unprotected."""

    kind: ClassVar[str] = "evaluate"
    round: int
    attestation: KeyAttestation | None
    aggregator: AggregatorSeen | None
    received_sha256: str | None
    metrics: dict[str, float]
    timings: dict[str, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train(Evaluate):
    """The node trained and sent an update (sealed envelope ``sent_sha256``) of these
    tensors."""

    kind: ClassVar[str] = "train"
    sent_sha256: str | None
    tensors: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutCommitment(InRun):
    """In a comparison, the node sent its signed commitment to its held-out set with
    this round's update: the comparison, the Merkle root, how many examples it covers
    and the SHA-256 of the signed record as it left."""

    kind: ClassVar[str] = "heldout_commitment"
    round: int
    comparison: str
    root: str
    count: int
    record_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecaggRevealed(InRun):
    """Secure aggregation: the node revealed, once for the round, its shares of the
    survivors' seeds (``seeds_of``) and of the dropped nodes' masking keys (``keys_of``)."""

    kind: ClassVar[str] = "secagg_revealed"
    round: int
    seeds_of: list[int]
    keys_of: list[int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpRound(InRun):
    """The node's privacy ledger: one round of record-level DP-SGD trained here (steps,
    Poisson sampling rate, per-example clip, noise multiplier), and what its accountant
    says it cost: ``epsilon`` for the run so far, ``epsilon_total`` for everything this
    node has trained (the ledger), against the node's ``budget`` (all at ``delta``).
    ``client_noise_std``: with client-level DP under secure aggregation, the standard
    deviation of the noise share this node added to its update before masking."""

    kind: ClassVar[str] = "dp_round"
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float
    delta: float
    epsilon: float
    epsilon_total: float
    budget: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientNoiseAdded(InRun):
    """Client-level DP under secure aggregation: before masking its update, the node
    clipped it to ``clip`` (L2) and added its share of the aggregate's noise, Gaussian of
    standard deviation ``client_noise_std`` per element (the run's ``noise_multiplier`` x
    clip over the square root of the round's threshold)."""

    kind: ClassVar[str] = "client_noise_added"
    round: int
    noise_multiplier: float
    clip: float
    client_noise_std: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScorecardSigned(InRun):
    """In a comparison, the node signed and sent its scorecard of the run's model: which
    model, the root it names, and the SHA-256 of the signed record as it left."""

    kind: ClassVar[str] = "scorecard_signed"
    comparison: str
    model_id: str
    heldout_root: str
    record_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Withheld(InRun):
    """The egress guard kept a reply (or an error's text) on the node: ``code`` left,
    ``reason`` stayed."""

    code: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class EgressBlocked(Withheld):
    kind: ClassVar[str] = "egress_blocked"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientappFailed(Withheld):
    kind: ClassVar[str] = "clientapp_failed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorWithheld(Withheld):
    kind: ClassVar[str] = "error_withheld"


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceServed(NodeEvent):
    """The sandbox answered a local inference request with run ``run_id``'s stored
    ``adapter`` (final or baseline) for ``count`` texts. Counts and digests only: the
    SHA-256 of the request body as received and of the canonical (JCS) response, never a
    text, a label or a score."""

    kind: ClassVar[str] = "inference_served"
    run_id: int
    adapter: str
    count: int
    request_sha256: str
    response_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferenceRefused(NodeEvent):
    """The sandbox refused a local inference request: the fixed ``code`` it answered,
    the ``reason`` (an error message, which never quotes a text) and the request body's
    SHA-256."""

    kind: ClassVar[str] = "inference_refused"
    request_sha256: str
    code: str
    reason: str


@dataclasses.dataclass(frozen=True)
class JournalEntry:
    """A journal line's entry: ``event`` stamped with the time it was appended (seconds
    since the epoch) and the node's name."""

    time: float
    node: str
    event: NodeEvent

    def to_json(self) -> dict[str, Any]:
        return {Key.TIME.value: self.time, Key.NODE.value: self.node, **self.event.to_json()}

    @classmethod
    def from_json(cls, record: Any) -> Self:
        """Parse a stamped entry strictly (:class:`EventInvalid` names kind and key)."""
        if not isinstance(record, dict):
            raise EventInvalid("must be a JSON object", kind=None)
        body = {k: v for k, v in record.items() if k not in (Key.TIME, Key.NODE)}
        event = NodeEvent.from_json(body)
        if isinstance(event, JournalOpened):
            raise EventInvalid("opens a journal and is never stamped", kind=event.kind)
        stamp = {}
        for key, hint in ((Key.TIME, float), (Key.NODE, str)):
            if key not in record:
                raise EventInvalid("is missing", kind=event.kind, key=key)
            stamp[key.value] = decode_value(record[key], hint, event.kind, key)
        return cls(stamp[Key.TIME], stamp[Key.NODE], event)


def parse_journal_entry(record: Any) -> JournalOpened | JournalEntry:
    """A journal line's entry: its opening line, or a stamped :class:`NodeEvent`."""
    if isinstance(record, dict) and record.get(Key.KIND) == JournalOpened.kind:
        return JournalOpened.from_json(record)
    return JournalEntry.from_json(record)
