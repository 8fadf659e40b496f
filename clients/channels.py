"""How this node takes instructions and sends updates: one interface, one class per protection.

The ClientApp's handlers (``clients/app.py``) never ask which protection a run has;
they ask the run's channel, chosen once by :func:`update_channel`. A channel answers
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

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from clients.channel import (
    NodeChannel,
    VerifiedAggregator,
    channel_path,
    check_aggregator,
    open_channel,
    open_global,
    seal_update,
)
from clients.model import (
    BaseModel,
    NodeModel,
    certify_channel,
    load_base_model,
    load_plaintext,
)
from sandbox import events
from sandbox.channel import DOWNLINK, UPLINK, ChannelContext, manifest_digest
from sandbox.config import PROTECTION_OFF, PROTECTION_SEALED, NodeConfig, RunSpec
from sandbox.errors import AggregatorRefused, ConfigError
from sandbox.events import Key
from sandbox.journal import append_journal
from sandbox.keyfiles import load_ed25519_public
from sandbox.protocol import GLOBAL_KEY, SEALED_KEY, UPDATE_KEY, from_record, stage_of, to_record
from sandbox.seal.envelope import RecipientKey
from sandbox.seal.package import read_manifest

if TYPE_CHECKING:  # sandbox.lora imports torch, which the hello's process does not need
    from sandbox.lora import Adapter

# The records an update leaves a node in (next to its metrics).
UpdateRecords = dict[str, ArrayRecord | ConfigRecord]
# What the journal keeps of an exchange with no attestation on either side.
NOT_ATTESTED: dict[Key, Any] = {Key.ATTESTATION: None, Key.AGGREGATOR: None}


def journal(node: NodeConfig, context: Context, kind: type[events.InRun], **fields: Any) -> None:
    """Append what this node sent to its own journal (the auditor cross-checks it later)."""
    append_journal(node, kind(run_id=context.run_id, node_id=context.node_id, **fields))


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


@dataclass(frozen=True)
class Hello:
    """The handshake reply's record, and the channel suite it offers (for the journal)."""

    record: ConfigRecord
    suite: str


class UpdateChannel(ABC):
    """The node's end of a run's update channel (see the module docstring)."""

    @abstractmethod
    def hello(self, context: Context) -> Hello:
        """Answer the aggregator's handshake."""

    @abstractmethod
    def base_model(self, spec: RunSpec) -> BaseModel:
        """The run's base model as this channel's protection lets the node have it."""

    @abstractmethod
    def accept(self, msg: Message, context: Context, rnd: int) -> Accepted:
        """Accept the instruction of round ``rnd`` and open its global adapter; raises
        (AggregatorRefused, ProtocolError, ...) when this node must not act on it."""


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
    """The attested channel: a certified key per run, an appraised aggregator, envelopes."""

    node: NodeConfig

    def _manifest(self) -> dict[str, Any]:
        sandbox = self.node.require_sandbox()
        return read_manifest(sandbox.package, load_ed25519_public(sandbox.manifest_key))

    def hello(self, context: Context) -> Hello:
        """Start this run's channel: a nonce and a channel key the key broker certifies."""
        key_id = self._manifest()["key_id"]

        def certify(key: RecipientKey) -> str:
            return certify_channel(self.node, key_id, key)

        channel, record = open_channel(self.node, context.run_id, certify)
        return Hello(record, channel.key.suite)

    def base_model(self, spec: RunSpec) -> BaseModel:
        """Attest, have the content key released, unseal in memory, build the model."""
        return load_base_model(spec, self.node)

    def accept(self, msg: Message, context: Context, rnd: int) -> Accepted:
        """Verify the aggregator and open the global adapter."""
        stage = stage_of(msg.metadata.message_type)
        self.node.require_sandbox()
        channel = NodeChannel.load(channel_path(self.node, context.run_id), context.run_id)
        try:
            aggregator = check_aggregator(
                self.node, channel, msg.content, now=dt.datetime.now(dt.UTC)
            )
        except AggregatorRefused as exc:
            journal(self.node, context, events.AggregatorRefused, round=rnd, reason=str(exc))
            raise
        accepted = SealedAccepted(
            rnd,
            stage,
            {},
            aggregator,
            context.run_id,
            context.node_id,
            manifest_digest(self._manifest()),
        )
        accepted.adapter, accepted.ticket = open_global(
            channel, msg.content, accepted.context(DOWNLINK)
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

    def hello(self, context: Context) -> Hello:
        raise ConfigError("a run with protection off has no handshake", key="protection")

    def base_model(self, spec: RunSpec) -> BaseModel:
        """The run's plaintext model directory (the canary's negative control, the bench)."""
        return load_plaintext(spec)

    def accept(self, msg: Message, context: Context, rnd: int) -> Accepted:
        adapter = from_record(msg.content.array_records[GLOBAL_KEY])
        return PlaintextAccepted(rnd, stage_of(msg.metadata.message_type), adapter)


# Protection (the run config's ``protection``) -> this node's end of its channel.
CHANNELS: dict[str, Callable[[NodeConfig], UpdateChannel]] = {
    PROTECTION_SEALED: SealedChannel,
    PROTECTION_OFF: lambda node: PlaintextChannel(),
}


def update_channel(spec: RunSpec, node: NodeConfig) -> UpdateChannel:
    """The run's channel on this node. A node runs unprotected only when both its
    operator and the run say so; any other mismatch is a ConfigError."""
    if node.unprotected != (spec.protection == PROTECTION_OFF):
        raise ConfigError(
            f"the run asks for protection={spec.protection!r} but this node is "
            + ("unprotected" if node.unprotected else "sealed-only"),
            path=node.source,
            key="node.unprotected",
        )
    return CHANNELS[spec.protection](node)
