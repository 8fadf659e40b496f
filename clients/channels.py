"""How this node takes instructions and sends updates: one interface, one class per protection.

The node sandbox (``clients/sandbox.py``) never asks which protection a run has; it
asks the run's channel, chosen once by :func:`update_channel`. A channel answers
the handshake and accepts an instruction (checks whoever sent it and opens the global
adapter, before any private data is read); the :class:`Accepted` instruction then says
how the update is replied and what the journal keeps of the exchange.
:class:`SealedChannel` (the default) speaks the attested channel of
``clients/channel.py``; :class:`PlaintextChannel` (an ``unprotected`` node in a run
with ``protection = "off"``: tests and bench only) takes and sends raw arrays. A further
protection (secure aggregation) is one more implementation, listed in :data:`CHANNELS`.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.channel import (
    Channels,
    VerifiedAggregator,
    channel_of,
    check_aggregator,
    open_channel,
    open_global,
    seal_update,
)
from clients.model import (
    NodeModel,
    Unsealed,
    certify_channel,
    model_package,
    plaintext_dir,
    plaintext_files,
    unseal,
)
from sandbox import events
from sandbox.channel import (
    DOWNLINK,
    LOCAL_MODEL_DIGEST,
    UPLINK,
    ChannelContext,
    manifest_digest,
)
from sandbox.config import LOCAL_MODEL, PROTECTION_OFF, PROTECTION_SEALED, NodeConfig, RunSpec
from sandbox.errors import AggregatorRefused, ConfigError
from sandbox.events import Key
from sandbox.journal import append_journal
from sandbox.protocol import GLOBAL_KEY, SEALED_KEY, UPDATE_KEY, from_record, to_record
from sandbox.seal.envelope import RecipientKey
from sandbox.secagg import MASKED_TENSOR

if TYPE_CHECKING:  # sandbox.lora imports torch, which the hello's process does not need
    from sandbox.lora import Adapter

# The records an update leaves a node in (next to its metrics).
UpdateRecords = dict[str, ArrayRecord | ConfigRecord]
# What the journal keeps of an exchange with no attestation on either side.
NOT_ATTESTED: dict[Key, Any] = {Key.ATTESTATION: None, Key.AGGREGATOR: None}


@dataclass(frozen=True)
class RunIds:
    """Which Flower run an exchange belongs to, and this node's id in it."""

    run_id: int
    node_id: int


def journal(node: NodeConfig, ids: RunIds, kind: type[events.InRun], **fields: Any) -> None:
    """Append what this node sent to its own journal (the auditor cross-checks it later)."""
    append_journal(node, kind(run_id=ids.run_id, node_id=ids.node_id, **fields))


@dataclass
class Accepted(ABC):
    """An instruction this node accepted: its round, its stage and the global adapter."""

    round: int
    stage: str
    adapter: Adapter

    @abstractmethod
    def reply(self, update: Adapter, examples: float) -> UpdateRecords:
        """The records the update leaves in, weighted by ``examples``."""

    @abstractmethod
    def attested(self, loaded: NodeModel) -> dict[Key, Any]:
        """What the journal keeps of this message's key release and aggregator check."""

    def reply_masked(self, masked: np.ndarray, examples: float) -> UpdateRecords:
        """The records a secure-aggregation masked input leaves in (sealed runs only)."""
        raise ConfigError("secure aggregation needs the sealed channel", key="protection")


@dataclass(frozen=True)
class ModelSource:
    """Where a run's base model comes from on this node: ``load`` reads it into memory
    (attesting first when sealed); ``key`` changes whenever what ``load`` would read
    does, so the sandbox knows when what it holds is stale."""

    key: tuple[Any, ...]
    load: Callable[[], Unsealed]


@dataclass(frozen=True)
class Hello:
    """The handshake reply's record, and the channel suite it offers (for the journal)."""

    record: ConfigRecord
    suite: str


def sealed_source(node: NodeConfig, spec: RunSpec | None = None) -> ModelSource:
    """The sealed package of the run's model (``spec.model_id``: a model of the node's
    catalog, else the node's own package; see :func:`~clients.model.model_package`):
    attest, have the content key released, unseal in memory. A catalog package is
    checked against its entry here, before anything is attested for, and its pinned
    manifest again as it is unsealed. A changed package (its folder's size or
    modification time, or the manifest the catalog pins) is read again."""
    package = model_package(node, spec.model_id if spec is not None else "")
    stat = package.path.stat()
    key = ("sealed", str(package.path), stat.st_mtime_ns, stat.st_size, package.manifest_sha256)
    return ModelSource(key, lambda: unseal(node, package))


def local_source(node: NodeConfig) -> ModelSource:
    """The operator's own model (``[node.sandbox] local-model``), for a comparison's
    local-model run: a plain folder read into the sandbox's memory, never sent anywhere.
    A changed folder (its modification time) is read again."""
    folder = node.require_sandbox().local_model
    if folder is None or not folder.is_dir():
        raise ConfigError(
            "a local-model run needs the operator's own model folder",
            path=node.source,
            key="node.sandbox.local-model",
        )
    key = ("local", str(folder), folder.stat().st_mtime_ns)
    return ModelSource(key, lambda: plaintext_dir(folder, LOCAL_MODEL))


class UpdateChannel(ABC):
    """The node's end of a run's update channel (see the module docstring)."""

    @abstractmethod
    def hello(self, ids: RunIds) -> Hello:
        """Answer the aggregator's handshake."""

    @abstractmethod
    def model_source(self, spec: RunSpec) -> ModelSource:
        """The run's base model as this channel's protection lets the node have it."""

    @abstractmethod
    def accept(self, content: RecordDict, ids: RunIds, stage: str, rnd: int) -> Accepted:
        """Accept the instruction (``content``) of round ``rnd`` and open its global
        adapter; raises (AggregatorRefused, ProtocolError, ...) when this node must not
        act on it."""


@dataclass
class SealedAccepted(Accepted):
    """An instruction from an aggregator this node appraised, opened from its envelope."""

    aggregator: VerifiedAggregator
    run_id: int
    node_id: int
    model_digest: str
    ticket: str = field(default="", repr=False)

    def context(self, direction: str) -> ChannelContext:
        return ChannelContext(
            str(self.run_id),
            self.round,
            str(self.node_id),
            self.model_digest,
            direction,
            self.stage,
        )

    def reply(self, update: Adapter, examples: float) -> UpdateRecords:
        """Only the instruction's adapter tensors, sealed to the verified aggregator."""
        record = seal_update(
            update,
            self.aggregator,
            self.context(UPLINK),
            allowed=frozenset(self.adapter),
            ticket=self.ticket,
            examples=examples,
        )
        return {SEALED_KEY: record}

    def reply_masked(self, masked: np.ndarray, examples: float) -> UpdateRecords:
        """The masked input (one uint32 tensor), sealed to the verified aggregator with
        this instruction's ticket like an update."""
        record = seal_update(
            {MASKED_TENSOR: masked},
            self.aggregator,
            self.context(UPLINK),
            allowed=frozenset({MASKED_TENSOR}),
            ticket=self.ticket,
            examples=examples,
        )
        return {SEALED_KEY: record}

    def attested(self, loaded: NodeModel) -> dict[Key, Any]:
        result = loaded.attestation
        if result is None:
            return dict(NOT_ATTESTED)
        appraisal = self.aggregator.appraisal
        return {
            Key.ATTESTATION: events.KeyAttestation(
                ear_sha256=result.digest,
                status=result.status,
                session=result.session_id,
                stub=result.is_stub,
            ),
            Key.AGGREGATOR: events.AggregatorSeen(
                ueid=appraisal.claims.get("ueid"), stub=appraisal.is_stub
            ),
        }


@dataclass
class SealedChannel(UpdateChannel):
    """The attested channel: a certified key per run, an appraised aggregator, envelopes.

    ``channels`` is the sandbox's in-memory table of open channels by run; a key of it is
    never written anywhere. ``spec`` is the run's config: its model (a catalog model, or
    the node's own package) is the one whose key id the channel key is certified for and
    whose manifest digest binds every envelope.
    """

    node: NodeConfig
    channels: Channels
    spec: RunSpec | None = None

    @property
    def _local(self) -> bool:
        """Whether this is a comparison's local-model run (the operator's own model)."""
        return self.spec is not None and self.spec.model_id == LOCAL_MODEL

    def _manifest(self) -> dict[str, Any]:
        """The verified manifest of the run's model's package (of the node's own package
        in a local-model run, whose model has none)."""
        model_id = self.spec.model_id if self.spec is not None and not self._local else ""
        return model_package(self.node, model_id).manifest()

    def hello(self, ids: RunIds) -> Hello:
        """Start this run's channel: a nonce and a channel key the key broker certifies."""
        key_id = self._manifest()["key_id"]

        def certify(key: RecipientKey) -> str:
            return certify_channel(self.node, key_id, key)

        channel, record = open_channel(self.node, ids.run_id, certify, self.channels)
        return Hello(record, channel.key.suite)

    def model_source(self, spec: RunSpec) -> ModelSource:
        if spec.model_id == LOCAL_MODEL:
            return local_source(self.node)
        return sealed_source(self.node, spec)

    def accept(self, content: RecordDict, ids: RunIds, stage: str, rnd: int) -> Accepted:
        """Verify the aggregator and open the global adapter."""
        self.node.require_sandbox()
        try:
            channel = channel_of(self.channels, ids.run_id)
            aggregator = check_aggregator(self.node, channel, content, now=dt.datetime.now(dt.UTC))
        except AggregatorRefused as exc:
            journal(self.node, ids, events.AggregatorRefused, round=rnd, reason=str(exc))
            raise
        accepted = SealedAccepted(
            rnd,
            stage,
            {},
            aggregator,
            ids.run_id,
            ids.node_id,
            LOCAL_MODEL_DIGEST if self._local else manifest_digest(self._manifest()),
        )
        accepted.adapter, accepted.ticket = open_global(
            channel, content, accepted.context(DOWNLINK)
        )
        return accepted


@dataclass
class PlaintextAccepted(Accepted):
    """An instruction taken as it came: raw arrays in, raw arrays out."""

    def reply(self, update: Adapter, examples: float) -> UpdateRecords:
        return {UPDATE_KEY: to_record(update)}

    def attested(self, loaded: NodeModel) -> dict[Key, Any]:
        return dict(NOT_ATTESTED)


class PlaintextChannel(UpdateChannel):
    """No handshake, no aggregator check, no envelopes (``protection = "off"``)."""

    def hello(self, ids: RunIds) -> Hello:
        raise ConfigError("a run with protection off has no handshake", key="protection")

    def model_source(self, spec: RunSpec) -> ModelSource:
        """The run's plaintext model directory (the canary's negative control, the bench)."""
        return ModelSource(("plain", str(spec.model_path)), lambda: plaintext_files(spec))

    def accept(self, content: RecordDict, ids: RunIds, stage: str, rnd: int) -> Accepted:
        adapter = from_record(content.array_records[GLOBAL_KEY])
        return PlaintextAccepted(rnd, stage, adapter)


# Protection (the run config's ``protection``) -> this node's end of its channel.
CHANNELS: dict[str, Callable[[NodeConfig, Channels, RunSpec], UpdateChannel]] = {
    PROTECTION_SEALED: SealedChannel,
    PROTECTION_OFF: lambda node, channels, spec: PlaintextChannel(),
}


def update_channel(spec: RunSpec, node: NodeConfig, channels: Channels) -> UpdateChannel:
    """The run's channel on this node. A node runs unprotected only when both its
    operator and the run say so; any other mismatch is a ConfigError."""
    if node.unprotected != (spec.protection == PROTECTION_OFF):
        raise ConfigError(
            f"the run asks for protection={spec.protection!r} but this node is "
            + ("unprotected" if node.unprotected else "sealed-only"),
            path=node.source,
            key="node.unprotected",
        )
    return CHANNELS[spec.protection](node, channels, spec)
