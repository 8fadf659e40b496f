"""How updates travel between the ServerApp and the nodes: one interface, one class per protection.

The job's stages (``server/app.py``) never ask which protection a run has; they ask its
channel. A channel says which nodes must shake hands before they take part and admits
them from their hello, builds each node's instruction, and opens each node's reply into
update tensors and a weight. :class:`SealedChannel` (the default) speaks through the
attested aggregator sandbox: HPKE envelopes both ways, bound to the run, round, node and
base model. :class:`PlaintextChannel` (``protection = "off"``: the canary test's
negative control and the overhead bench) sends and takes raw arrays. A further
protection (secure aggregation) is one more implementation, listed in :data:`CHANNELS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log

from sandbox import events
from sandbox.channel import LOCAL_MODEL_DIGEST, model_dir_digest
from sandbox.config import LOCAL_MODEL, PROTECTION_OFF, PROTECTION_SEALED, RunSpec
from sandbox.digests import sha256_hex
from sandbox.errors import ConfigError, UpdateRejected
from sandbox.lora import Adapter
from sandbox.protocol import (
    CONFIG_KEY,
    GLOBAL_KEY,
    HELLO_KEY,
    UPDATE_KEY,
    from_record,
    round_config,
    to_record,
)
from server.sandbox import AggregatorSandbox, PeerTable, sealed_blob


@dataclass(frozen=True)
class Admission:
    """What the log records of a node admitted after its hello."""

    ear_sha256: str
    ueid: str
    tee_pubkey_sha256: str


@dataclass(frozen=True)
class OpenedUpdate:
    """A node's update as the aggregator may add it."""

    tensors: Adapter
    # The example count the update is weighted by (before any bound clips it).
    declared: float
    # Whom the held weight belongs to: an identity that outlives the Flower node id.
    identity: str


class UpdateChannel(ABC):
    """The server's end of a run's update channel (see the module docstring)."""

    run_id: int

    @abstractmethod
    def strangers(self, nodes: Sequence[int]) -> list[int]:
        """The nodes that must shake hands before they take part."""

    @abstractmethod
    def hello(self, rnd: int) -> RecordDict:
        """The handshake instruction a stranger answers."""

    @abstractmethod
    def admit(self, node_id: int, reply: Message) -> Admission:
        """Admit a node from its hello reply; AttestationError or KeyError says why not."""

    @abstractmethod
    def participants(self, nodes: Sequence[int]) -> list[int]:
        """The nodes among ``nodes`` that may take part now."""

    @abstractmethod
    def forget(self, node_id: int) -> None:
        """Drop a node's handshake: it shakes hands again before it next takes part."""

    @abstractmethod
    def instructions(self, rnd: int, adapter: Adapter, stage: str) -> Callable[[int], RecordDict]:
        """Each node's instruction for ``stage`` of round ``rnd``, carrying ``adapter``;
        the function raises EnvelopeError for a node that cannot be sealed to, or
        AttestationError for one the aggregator's evidence cannot be made for."""

    @abstractmethod
    def ueid(self, node_id: int) -> str | None:
        """The attested TEE (ueid) admitted as ``node_id`` in this run, if any."""

    @abstractmethod
    def envelope(self, reply: Message) -> tuple[str, int]:
        """What names a reply's update in events: its digest (or kind) and size."""

    @abstractmethod
    def open(self, node_id: int, reply: Message, rnd: int, reported: float) -> OpenedUpdate:
        """The reply's update; UpdateRejected (or KeyError, TypeError, ValueError for a
        malformed reply) if it may not count. ``reported`` is the example count in the
        reply's metrics."""

    @abstractmethod
    def admissions(self) -> Mapping[str, int]:
        """What a restarted ServerApp of this run must keep: ueid -> node id (the channel's
        own record, not a copy)."""

    @abstractmethod
    def restore(self, admissions: Mapping[str, int]) -> None:
        """Take back the admissions a checkpoint kept for this run."""

    def close(self) -> None:  # noqa: B027 - a channel that holds nothing has nothing to close
        """Release what the channel keeps of its nodes (its scratch store, if any)."""


@dataclass
class SealedChannel(UpdateChannel):
    """Attested handshake, sealed instructions and sealed updates (``protection = "sealed"``)."""

    sandbox: AggregatorSandbox
    # Nodes that shook hands with this ServerApp process (on disk: one row a node).
    peers: PeerTable = field(default_factory=PeerTable)
    run_id: int = field(init=False)

    def __post_init__(self) -> None:
        self.run_id = self.sandbox.run_id

    def strangers(self, nodes: Sequence[int]) -> list[int]:
        return [node_id for node_id in nodes if node_id not in self.peers]

    def hello(self, rnd: int) -> RecordDict:
        return RecordDict({CONFIG_KEY: round_config(rnd)})

    def admit(self, node_id: int, reply: Message) -> Admission:
        hello = reply.content.config_records[HELLO_KEY]
        peer = self.sandbox.admit(node_id, hello, self.peers.holder)
        self.peers.add(peer)
        return Admission(
            ear_sha256=peer.ear_sha256,
            ueid=peer.ueid,
            tee_pubkey_sha256=sha256_hex(peer.key_bytes),
        )

    def participants(self, nodes: Sequence[int]) -> list[int]:
        return [node_id for node_id in nodes if node_id in self.peers]

    def forget(self, node_id: int) -> None:
        self.peers.discard(node_id)

    def instructions(self, rnd: int, adapter: Adapter, stage: str) -> Callable[[int], RecordDict]:
        def sealed_to(node_id: int) -> RecordDict:
            return self.sandbox.instruction(self.peers[node_id], rnd, adapter, stage)

        return sealed_to

    def envelope(self, reply: Message) -> tuple[str, int]:
        blob = sealed_blob(reply.content)
        return sha256_hex(blob), len(blob)

    def open(self, node_id: int, reply: Message, rnd: int, reported: float) -> OpenedUpdate:
        """Opened from its envelope, whose sealed example count must match the reported one;
        the update's identity is the node's attested TEE (its ueid), which a node keeps
        when its Flower node id changes."""
        peer = self.peers[node_id]
        update, weight = self.sandbox.open_update(peer, sealed_blob(reply.content), rnd)
        if weight != reported:
            raise UpdateRejected(
                f"reported {reported:g} examples, the sealed update says {weight:g}"
            )
        return OpenedUpdate(update, weight, peer.ueid)

    def admissions(self) -> Mapping[str, int]:
        return self.sandbox.admitted

    def ueid(self, node_id: int) -> str | None:
        peer = self.peers.get(node_id)
        return None if peer is None else peer.ueid

    def restore(self, admissions: Mapping[str, int]) -> None:
        self.sandbox.admitted.update(admissions)

    def close(self) -> None:
        self.peers.close()


@dataclass
class PlaintextChannel(UpdateChannel):
    """Raw arrays both ways, no handshake (``protection = "off"``; tests and bench only)."""

    run_id: int = 0

    def strangers(self, nodes: Sequence[int]) -> list[int]:
        return []

    def hello(self, rnd: int) -> RecordDict:
        raise RuntimeError("a plaintext channel has no handshake")

    def admit(self, node_id: int, reply: Message) -> Admission:
        raise RuntimeError("a plaintext channel has no handshake")

    def participants(self, nodes: Sequence[int]) -> list[int]:
        return list(nodes)

    def forget(self, node_id: int) -> None:
        pass

    def instructions(self, rnd: int, adapter: Adapter, stage: str) -> Callable[[int], RecordDict]:
        """One shared plaintext content for every node, which Flower dedups."""
        content = RecordDict({GLOBAL_KEY: to_record(adapter), CONFIG_KEY: round_config(rnd)})
        return lambda node_id: content

    def envelope(self, reply: Message) -> tuple[str, int]:
        record = reply.content.array_records[UPDATE_KEY]
        return events.PLAINTEXT, sum(len(record[name].data) for name in record)

    def open(self, node_id: int, reply: Message, rnd: int, reported: float) -> OpenedUpdate:
        """The raw arrays, weighted as reported, held under the node id."""
        update = from_record(reply.content.array_records[UPDATE_KEY])
        return OpenedUpdate(update, reported, f"node-{node_id}")

    def admissions(self) -> Mapping[str, int]:
        return {}

    def ueid(self, node_id: int) -> str | None:
        return None

    def restore(self, admissions: Mapping[str, int]) -> None:
        pass


def _sealed(spec: RunSpec, run_id: int, sandbox: AggregatorSandbox | None) -> UpdateChannel:
    if sandbox is None:
        if spec.aggregator_dir is None:
            raise ConfigError(
                "is empty; a sealed run needs the aggregator's identity directory",
                key="aggregator-dir",
            )
        digest = (
            LOCAL_MODEL_DIGEST
            if spec.model_id == LOCAL_MODEL
            else model_dir_digest(spec.model_path)
        )
        sandbox = AggregatorSandbox.load(spec.aggregator_dir, run_id=run_id, model_digest=digest)
    return SealedChannel(sandbox)


def _plaintext(spec: RunSpec, run_id: int, sandbox: AggregatorSandbox | None) -> UpdateChannel:
    if sandbox is not None:
        raise ConfigError("protection is off but an aggregator sandbox was given")
    log(WARNING, "[ark] protection is OFF: plaintext updates, no aggregator attestation")
    return PlaintextChannel(run_id)


# Protection (the run config's ``protection``) -> how its channel is opened.
CHANNELS: dict[str, Callable[[RunSpec, int, AggregatorSandbox | None], UpdateChannel]] = {
    PROTECTION_SEALED: _sealed,
    PROTECTION_OFF: _plaintext,
}


def update_channel(
    spec: RunSpec, run_id: int, sandbox: AggregatorSandbox | None = None
) -> UpdateChannel:
    """The run's update channel, chosen once by its protection. A sealed run uses
    ``sandbox`` when given, else loads the aggregator identity the run config names."""
    try:
        opener = CHANNELS[spec.protection]
    except KeyError:
        raise ConfigError(f"unknown protection {spec.protection!r}", key="protection") from None
    return opener(spec, run_id, sandbox)
