"""The provider's events: the key broker's, provisioning's and the ServerApp's.

Each goes to ``events.jsonl`` and, as one canonical entry, to the transparency log. They
hold digests, ids and statuses, never key material or private data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, ClassVar

from sandbox.errors import EventInvalid
from sandbox.events.schema import JsonObject, Record, omitted

# The ``envelope_sha256`` of an update sent with protection off (raw arrays, there is no
# envelope), and of a reply whose update could not even be found.
PLAINTEXT = "plaintext"
NO_ENVELOPE = "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event(Record):
    """A provider event: its kind and when it happened (``time``, ISO 8601)."""

    registry: ClassVar[dict[str, type[Record]]] = {}
    time: dt.datetime


# -- the key broker ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttestationAppraised(Event):
    """The broker appraised evidence and signed a result (affirming or not)."""

    kind: ClassVar[str] = "attestation_appraised"
    session: str
    key_id: str
    tee: str
    purpose: str
    status: str
    ear_sha256: str
    tee_pubkey_sha256: str
    stub: bool
    policy_id: str
    ueid: str | None
    measurements: dict[str, str]
    trustworthiness: dict[str, int]
    failure: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelCertified(Event):
    """A channel attestation: the broker certified a TEE's channel key (no key leaves)."""

    kind: ClassVar[str] = "channel_certified"
    session: str
    key_id: str
    tee: str
    purpose: str
    ueid: str | None
    ear_sha256: str
    tee_pubkey_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyReleased(Event):
    """A content key left, wrapped to the TEE key of an affirming result: right after the
    appraisal (``tee`` and ``purpose`` named) or against a presented result
    (``result_sha256`` named)."""

    kind: ClassVar[str] = "key_released"
    session: str
    key_id: str
    tee: str | None = omitted()
    purpose: str | None = omitted()
    result_sha256: str | None = omitted()
    model_id: str
    ueid: str | None
    ear_sha256: str
    tee_pubkey_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class SentDigest(JsonObject):
    """What a client sent, as its size and SHA-256, never its bytes."""

    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDenied(Event):
    """A refused request: the values the broker itself issued or holds, as they are
    (omitted otherwise), and what the client sent as sizes and digests."""

    kind: ClassVar[str] = "key_denied"
    session: str | None = omitted()
    key_id: str | None = omitted()
    tee: str | None = omitted()
    purpose: str | None = omitted()
    request: dict[str, SentDigest]
    client: str
    code: str
    cause: str
    ear_sha256: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenialsRateLimited(Event):
    """One per client and window in which the broker counted denials instead of logging
    each (its flood limit); ``scope`` "all" (``client`` null) counts those over the
    budget of all clients."""

    kind: ClassVar[str] = "denials_rate_limited"
    scope: str
    client: str | None
    window_start: dt.datetime
    window_end: dt.datetime
    logged: int
    suppressed: int
    codes: dict[str, int]


# -- provisioning --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileDigest(JsonObject):
    name: str
    sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelPublished(Event):
    """The provider sealed a model under a new content key (``ark provider seal``), or
    listed a sealed model in a signed catalog (``ark provider catalog``, one event per
    entry, ``catalog`` the SHA-256 of that ``catalog.json``). ``manifest_sha256`` is the
    SHA-256 of the package's ``manifest.json``; both are absent in older logs."""

    kind: ClassVar[str] = "model_published"
    model_id: str
    key_id: str
    files: list[FileDigest]
    manifest_sha256: str | None = omitted()
    catalog: str | None = omitted()


# -- the ServerApp -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunEvent(Event):
    """A ServerApp event: of Flower run ``run`` (unsigned 64-bit) and job ``job``."""

    run: int
    job: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListCommitment(JsonObject):
    """A list an event logs one entry per member: how many members it has, and the RFC
    9162 Merkle tree hash (hex) over each member's canonical JSON, in order."""

    count: int
    root: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListMember(RunEvent):
    """One member (``item``, at ``index``) of a list that grows with the number of nodes,
    logged on its own so that no entry grows with them. ``list`` names the event kind and
    its field (``round_started.participants``; a map's members are ``[key, value]``
    pairs); ``round`` and ``stage`` are that event's. The event itself follows its
    members and commits to them (``committed``): see :mod:`sandbox.events.members`."""

    kind: ClassVar[str] = "list_member"
    list: str
    index: int
    item: Any
    round: int | None = omitted()
    stage: str | None = omitted()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerMember(RunEvent):
    """An event with lists that grow with the number of nodes (``PER_MEMBER``: their
    field paths). Emitters build it with the lists inline; it is logged with each list as
    ``list_member`` entries and ``committed`` in their place
    (:func:`sandbox.events.members.per_member`); logs written before that hold the lists
    inline, and the auditor reads both."""

    PER_MEMBER: ClassVar[tuple[str, ...]]
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # lists written only when they apply
    committed: dict[str, ListCommitment] | None = omitted()  # noqa: RUF009

    @classmethod
    def required_lists(cls, stage: object) -> frozenset[str]:
        """The lists an event of this kind (at ``stage``, for kinds that have one) must
        hold, inline or committed."""
        return frozenset(cls.PER_MEMBER) - cls.OPTIONAL

    def __post_init__(self) -> None:
        """Each list once: inline or committed (a required one in one of the two)."""
        super().__post_init__()
        required = self.required_lists(getattr(self, "stage", None))
        committed = self.committed or {}
        for path in committed:
            if path not in self.PER_MEMBER:
                raise EventInvalid("is not a list of this event", kind=self.kind, key=path)
        for path in self.PER_MEMBER:
            head, _, rest = path.partition(".")
            value = getattr(self, head)
            inline = value is not None if not rest else isinstance(value, dict) and rest in value
            if inline and path in committed:
                raise EventInvalid("is both inline and committed", kind=self.kind, key=path)
            if not inline and path not in committed and path in required:
                raise EventInvalid("is missing", kind=self.kind, key=path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunStarted(RunEvent):
    kind: ClassVar[str] = "run_started"
    rounds: int
    resumed_after_round: int
    protection: str
    model_id: str
    min_nodes: int
    # What differential privacy the run asks (written only when it asks any): record-level
    # epsilon per node, and the client-level noise multiplier at the aggregate.
    dp_epsilon: float | None = omitted()
    dp_client_noise: float | None = omitted()


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeAdmitted(RunEvent):
    """A node's channel attestation admitted it to the run."""

    kind: ClassVar[str] = "node_admitted"
    node: int
    ear_sha256: str
    ueid: str | None
    tee_pubkey_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeRefused(RunEvent):
    kind: ClassVar[str] = "node_refused"
    node: int
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeDeclined(RunEvent):
    """A node answered a round with an error (its code's label, never its text)."""

    kind: ClassVar[str] = "node_declined"
    round: int
    node: int
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Participant(JsonObject):
    """A node sent a round's instruction, and the SHA-256 of its sealed envelope (null
    with protection off)."""

    node: int
    instruction_sha256: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundStarted(PerMember):
    kind: ClassVar[str] = "round_started"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("participants",)
    round: int
    stage: str
    participants: list[Participant] | None = omitted()  # noqa: RUF009


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateAccepted(RunEvent):
    """An update in the round's aggregate; ``declared_examples`` and ``weight_bound`` are
    written only when a bound clipped its weight."""

    kind: ClassVar[str] = "update_accepted"
    round: int
    node: int
    envelope_sha256: str
    envelope_bytes: int
    examples: float
    declared_examples: float | None = omitted()
    weight_bound: str | None = omitted()


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateRejected(RunEvent):
    kind: ClassVar[str] = "update_rejected"
    round: int
    node: int
    envelope_sha256: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class AggregateCommitted(PerMember):
    """A round's aggregate checkpointed: the envelopes it counts and headline metrics."""

    kind: ClassVar[str] = "aggregate_committed"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("updates",)
    round: int
    adapter_sha256: str
    updates: list[str] | None = omitted()  # noqa: RUF009
    examples: float
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecaggNode(JsonObject):
    """A node whose key advertisement the aggregator accepted: the ueid its signing key is
    certified for, and the SHA-256 of that key."""

    node: int
    ueid: str
    signer_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecaggAdvertised(PerMember):
    """Secure aggregation, stage 1: the nodes whose signed keys the round uses."""

    kind: ClassVar[str] = "secagg_advertised"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("nodes",)
    round: int
    nodes: list[SecaggNode] | None = omitted()  # noqa: RUF009


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecaggStage(PerMember):
    """Secure aggregation: the nodes that completed stage ``stage`` (share: sent their
    sealed shares; mask: sent a masked input the aggregator folded into the sum, whose
    envelopes are listed)."""

    kind: ClassVar[str] = "secagg_stage"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("nodes", "envelopes")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"envelopes"})
    # The stage whose envelopes are logged (sandbox.secagg.STAGE_MASK; the events do not
    # import the protocol).
    ENVELOPES_STAGE: ClassVar[str] = "mask"

    @classmethod
    def required_lists(cls, stage: object) -> frozenset[str]:
        return (
            frozenset(cls.PER_MEMBER)
            if stage == cls.ENVELOPES_STAGE
            else super().required_lists(stage)
        )

    round: int
    stage: str
    nodes: list[int] | None = omitted()  # noqa: RUF009
    # The mask stage: the SHA-256 of each node's sealed masked input, in ``nodes``' order
    # (what the round's aggregate_committed lists as its updates).
    envelopes: list[str] | None = omitted()  # noqa: RUF009 (a field(), not a shared default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecaggUnmasked(PerMember):
    """Secure aggregation, stage 4: whose seeds were rebuilt (the survivors), whose
    masking keys were rebuilt (the dropped: shared but sent no masked input), and the
    nodes whose revealed shares did it."""

    kind: ClassVar[str] = "secagg_unmasked"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("survivors", "dropped", "revealed_by")
    round: int
    survivors: list[int] | None = omitted()  # noqa: RUF009
    dropped: list[int] | None = omitted()  # noqa: RUF009
    revealed_by: list[int] | None = omitted()  # noqa: RUF009


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSpent(RunEvent):
    """Record-level differential privacy: what one node's update of this round cost its
    records, as the node reported it with the update (its accountant's, Opacus RDP).

    The round's mechanism: ``steps`` steps of DP-SGD with Poisson sampling at
    ``sample_rate``, per-example clip ``clip`` and Gaussian noise ``noise_multiplier`` x
    clip. ``epsilon`` is what the run has spent of the node's records so far (at
    ``delta``), ``epsilon_total`` what everything the node trained has, this run
    included, and ``budget`` the node's declared budget (null: it declares none, and only
    the run's ask bounds the run). The auditor recomputes
    ``epsilon`` from the run's logged rounds with an accountant of its own."""

    kind: ClassVar[str] = "dp_spent"
    round: int
    node: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float
    delta: float
    epsilon: float
    epsilon_total: float
    budget: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpAggregate(RunEvent):
    """Client-level differential privacy: the round's aggregate had each of ``nodes``
    updates clipped to ``clip`` (L2) and Gaussian noise of ``noise_multiplier`` x clip
    added to their sum; ``epsilon`` (at ``delta``) is what the run's aggregates have
    spent so far of any one node's participation, by the provider's accountant."""

    kind: ClassVar[str] = "dp_aggregate"
    round: int
    nodes: int
    noise_multiplier: float
    clip: float
    delta: float
    epsilon: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFinished(PerMember):
    """The run's last adapter, and each node's final held-out metrics
    (``metrics["final"][node][metric]``)."""

    kind: ClassVar[str] = "run_finished"
    PER_MEMBER: ClassVar[tuple[str, ...]] = ("metrics.final",)
    rounds: int
    adapter_sha256: str
    metrics: dict[str, dict[str, dict[str, float]]]


# -- comparisons (1+N) ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComparedModel(JsonObject):
    """A model in a comparison: its id and the SHA-256 of its sealed package's manifest."""

    model_id: str
    manifest_sha256: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComparisonStarted(Event):
    """A 1+N comparison began: every model of it must be scored by every node that commits
    a held-out set (:mod:`sandbox.scorecard`)."""

    kind: ClassVar[str] = "comparison_started"
    comparison: str
    task: str
    models: list[ComparedModel]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutCommitted(RunEvent):
    """A node's sandbox committed to its held-out set: ``commitment`` is the signed record
    as the node sent it, which the auditor verifies (``open_commitment``)."""

    kind: ClassVar[str] = "heldout_committed"
    node: int
    comparison: str
    commitment: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScorecardLogged(RunEvent):
    """A node's sandbox scored the run's model: ``scorecard`` is the signed record as the
    node sent it, which the auditor verifies (``open_scorecard``)."""

    kind: ClassVar[str] = "scorecard_logged"
    node: int
    comparison: str
    scorecard: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComparisonFinished(Event):
    """A comparison ended: ``runs`` maps each model id to the Flower run that fine-tuned it.
    From here on every model must have a scorecard from every committed node."""

    kind: ClassVar[str] = "comparison_finished"
    comparison: str
    runs: dict[str, int]
