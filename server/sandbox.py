"""The aggregator sandbox: its run key, its evidence for each node, and both envelopes.

At the start of a run the ServerApp makes one HPKE key pair per suite its nodes use.
A node that says hello sends a nonce, its channel key and the key broker's result
certifying that key; the aggregator checks the result and answers every instruction
with evidence over that node's nonce that binds the aggregator's key and measures the
ServerApp code. Updates open only under the aggregator's key and only for this run,
round, node and base model; the global adapter goes down sealed to each node's key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, RecordDict

from sandbox.attestation.backends import Attester, load_attester
from sandbox.attestation.measure import AGGREGATOR_PACKAGES, CODE, code_measurement
from sandbox.attestation.result import (
    AFFIRMING,
    PURPOSE_CHANNEL,
    verify_result,
)
from sandbox.channel import (
    DOWNLINK,
    EXAMPLES,
    STAGE_TRAIN,
    TICKET,
    UPLINK,
    ChannelContext,
    open_sealed,
    seal_tensors,
)
from sandbox.errors import (
    ConfigError,
    EnvelopeError,
    NodeAlreadyAdmitted,
    ResultInvalid,
    UpdateRejected,
)
from sandbox.files import read_regular
from sandbox.keyfiles import load_ec_public
from sandbox.protocol import (
    AGGREGATOR_EVIDENCE,
    AGGREGATOR_KEY,
    AGGREGATOR_PUBLIC_KEY,
    AGGREGATOR_SUITE,
    AGGREGATOR_TEE,
    CONFIG_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    ROUND_KEY,
    SEALED_GLOBAL_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
)
from sandbox.seal.envelope import RecipientKey, load_public_key
from server.scratch import Scratch, ScratchMap

# What a ticket's MAC is for, and its version (:meth:`AggregatorSandbox.ticket`).
TICKET_PURPOSE = "ark/v1/ticket"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_RESULT_BYTES = 16 * 1024
# A line of the aggregator's identity folder (a ueid URI, a TEE kind's name).
MAX_IDENTITY_LINE = 4096


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _identity_line(path: Path) -> str:
    """One line of the aggregator's identity folder (its ueid, its TEE kind)."""

    def missing(reason: str) -> ConfigError:
        return ConfigError(
            f"no aggregator identity: {reason}; `ark provider init --manufacturer DIR` writes it",
            path=path,
        )

    try:
        return read_regular(path, MAX_IDENTITY_LINE, missing).decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise missing(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class NodePeer:
    """A node admitted to this run: its attested channel key and its nonce.

    Only what later instructions and updates need is kept, a few hundred bytes a node:
    not the node's attestation result, nor the aggregator's evidence for it, which is
    signed again for every instruction (bound, as before, to the node's hello nonce, the
    run key and the code measurement, not to the instruction).
    """

    node_id: int
    nonce: bytes
    public_key: Any
    key_bytes: bytes
    suite: str
    # The node's attested TEE instance and the digest of the result that admitted it.
    ueid: str
    ear_sha256: str


class PeerTable:
    """The nodes this ServerApp process admitted, by Flower node id: each one's attested
    channel key, its hello nonce, its TEE (ueid) and the digest of the result that
    admitted it. A channel key is held by one node at most (an index, not a scan)."""

    # Flower's node ids are unsigned 64-bit, past SQLite's INTEGER: they are kept as text.
    # The ueid (the broker's result names it, from the node's evidence) and the suite are
    # kept as their JSON form: any text, a lone surrogate included, goes in and comes back.
    def __init__(self) -> None:
        self._store = Scratch(
            [
                "CREATE TABLE peers (node TEXT PRIMARY KEY, nonce BLOB NOT NULL, "
                "key BLOB NOT NULL UNIQUE, suite TEXT NOT NULL, ueid TEXT NOT NULL, "
                "ear_sha256 TEXT NOT NULL)"
            ]
        )
        self._db = self._store.db

    def add(self, peer: NodePeer) -> None:
        """Keep ``peer``, in place of any earlier peer of its node id. The caller has
        checked that no other node holds its key (:meth:`holder`); if one does, this
        raises sqlite3.IntegrityError and changes nothing (the node's earlier peer stays)."""
        row = (
            str(peer.node_id),
            peer.nonce,
            peer.key_bytes,
            json.dumps(peer.suite),
            json.dumps(peer.ueid),
            peer.ear_sha256,
        )
        self._db.execute("BEGIN")
        try:
            self._db.execute("DELETE FROM peers WHERE node = ?", (str(peer.node_id),))
            self._db.execute("INSERT INTO peers VALUES (?, ?, ?, ?, ?, ?)", row)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, node_id: int) -> NodePeer | None:
        """``node_id``'s peer, its key loaded again (the row holds the key's bytes)."""
        row = self._db.execute(
            "SELECT nonce, key, suite, ueid, ear_sha256 FROM peers WHERE node = ?", (str(node_id),)
        ).fetchone()
        if row is None:
            return None
        nonce, key, suite, ueid, ear_sha256 = row
        suite, ueid = json.loads(suite), json.loads(ueid)
        return NodePeer(node_id, nonce, load_public_key(suite, key), key, suite, ueid, ear_sha256)

    def __getitem__(self, node_id: int) -> NodePeer:
        peer = self.get(node_id)
        if peer is None:
            raise KeyError(node_id)
        return peer

    def __contains__(self, node_id: object) -> bool:
        row = self._db.execute("SELECT 1 FROM peers WHERE node = ?", (str(node_id),)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM peers").fetchone()[0])

    def holder(self, key_bytes: bytes) -> int | None:
        """The node whose channel key ``key_bytes`` is, if any."""
        row = self._db.execute("SELECT node FROM peers WHERE key = ?", (key_bytes,)).fetchone()
        return None if row is None else int(row[0])

    def discard(self, node_id: int) -> None:
        self._db.execute("DELETE FROM peers WHERE node = ?", (str(node_id),))

    def close(self) -> None:
        self._store.close()


@dataclass
class AggregatorSandbox:
    """One run's aggregator identity and channel keys (see the module docstring)."""

    attester: Attester
    result_key: ec.EllipticCurvePublicKey
    run_id: int
    model_digest: str
    measurements: Mapping[str, str] = field(
        default_factory=lambda: {CODE: code_measurement(AGGREGATOR_PACKAGES)}
    )
    clock: Callable[[], dt.datetime] = _now
    keys: dict[str, RecipientKey] = field(default_factory=dict)
    # A node proves it opened its instruction by returning the instruction's ticket inside
    # its sealed update. Tickets are MACs under this process's random key over the run,
    # node, round and stage (:meth:`ticket`), so none is stored whatever the number of nodes.
    ticket_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    # The latest round instructions were made for: only its tickets are honoured.
    ticket_round: int = 0
    # The node each attested TEE instance (ueid) was admitted as in this run: one node per
    # ueid for the whole run, declines and a restarted ServerApp (from the checkpoint) included.
    # Kept on disk (``server/scratch.py``): one row a node.
    admitted: MutableMapping[str, int] = field(default_factory=ScratchMap)

    @classmethod
    def load(cls, directory: Path, *, run_id: int, model_digest: str) -> AggregatorSandbox:
        """The identity ``ark provider init --manufacturer`` wrote under ``directory``: its
        attestation key and chain, its ueid, and its TEE kind (the file ``tee``), whose
        registered backend loads the attester; ConfigError naming the file otherwise."""
        tee_file = directory / "tee"
        attester = load_attester(
            _identity_line(tee_file),
            directory / "key.pem",
            directory / "chain.pem",
            _identity_line(directory / "ueid"),
            config_path=tee_file,
            config_key=None,
        )
        return cls(
            attester=attester,
            result_key=load_ec_public(directory / "result.pub"),
            run_id=run_id,
            model_digest=model_digest,
        )

    def key_for(self, suite: str) -> RecipientKey:
        """This run's aggregator key pair for ``suite`` (made on first use)."""
        if suite not in self.keys:
            self.keys[suite] = RecipientKey.generate(suite)
        return self.keys[suite]

    def admit(
        self,
        node_id: int,
        hello: Mapping[str, Any],
        key_holder: Callable[[bytes], int | None] = lambda key: None,
    ) -> NodePeer:
        """Check a node's hello; ResultInvalid unless its key is certified by the broker
        and can be sealed to (load_public_key refuses a malformed or small-order key, so
        one node's key can never make the instructions of a round fail to seal).

        ``key_holder`` names the node already admitted with a channel key, if any: a
        channel key belongs to one node only.
        A ueid is admitted as one node per run (NodeAlreadyAdmitted for any other node id
        presenting it); the same node shaking hands again, after a decline, is admitted.
        """
        nonce, node_key, token = (
            hello.get(HELLO_NONCE),
            hello.get(HELLO_NODE_KEY),
            hello.get(HELLO_RESULT),
        )
        if not (
            isinstance(nonce, bytes)
            and MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES
            and isinstance(node_key, bytes)
            and isinstance(token, bytes)
            and len(token) <= MAX_RESULT_BYTES
        ):
            raise ResultInvalid(f"node {node_id}: malformed hello")
        try:
            result = verify_result(token.decode("ascii"), self.result_key, now=self.clock())
        except UnicodeDecodeError:
            raise ResultInvalid(f"node {node_id}: attestation result is not ASCII") from None
        if result.status != AFFIRMING:
            raise ResultInvalid(f"node {node_id}: attestation result is {result.status}")
        if result.purpose != PURPOSE_CHANNEL:
            raise ResultInvalid(f"node {node_id}: attestation result does not certify a channel")
        if result.tee_pubkey != node_key:
            raise ResultInvalid(f"node {node_id}: attestation result does not bind its key")
        if key_holder(node_key) not in (None, node_id):
            raise ResultInvalid(f"node {node_id}: presents another node's certified channel key")
        ueid = result.ueid
        if not ueid:
            raise ResultInvalid(f"node {node_id}: attestation result names no TEE (ueid)")
        try:
            ueid.encode("utf-8")  # logged as canonical JSON: a lone surrogate cannot be
        except UnicodeEncodeError:
            raise ResultInvalid(f"node {node_id}: attestation result's ueid is not text") from None
        bound = self.admitted.get(ueid, node_id)
        if bound != node_id:
            raise NodeAlreadyAdmitted(
                f"node {node_id}: its TEE (ueid {ueid}) is already admitted to this run "
                f"as node {bound}"
            )
        try:
            public_key = load_public_key(result.hpke_suite, node_key)
        except EnvelopeError as exc:
            raise ResultInvalid(f"node {node_id}: {exc}") from exc
        self.admitted[ueid] = node_id
        return NodePeer(
            node_id, nonce, public_key, node_key, result.hpke_suite, ueid, result.digest
        )

    def evidence(self, peer: NodePeer) -> str:
        """This aggregator's evidence for ``peer``: over the node's hello nonce, binding
        the run key of the node's suite and the ServerApp code's measurement."""
        return self.attester.evidence(
            nonce=peer.nonce,
            tee_pubkey=self.key_for(peer.suite).public_bytes,
            measurements=dict(self.measurements),
            now=self.clock(),
        )

    def ticket(self, node_id: int, rnd: int, stage: str) -> str:
        """The ticket of ``node_id``'s instruction for ``stage`` of round ``rnd`` in this
        run: HMAC-SHA256 under this process's ticket key, so that only the node the
        instruction was sealed to learns it, and the process keeps nothing per node."""
        context = f"{TICKET_PURPOSE}/{self.run_id}/{node_id}/{rnd}/{stage}".encode()
        return hmac.new(self.ticket_key, context, hashlib.sha256).hexdigest()

    def context(self, peer: NodePeer, rnd: int, direction: str, stage: str) -> ChannelContext:
        return ChannelContext(
            str(self.run_id), rnd, str(peer.node_id), self.model_digest, direction, stage
        )

    def instruction(
        self, peer: NodePeer, rnd: int, adapter: Mapping[str, np.ndarray], stage: str
    ) -> RecordDict:
        """Round config, the aggregator's evidence for this node, the sealed global adapter."""
        # The evidence first: a node it cannot be made for is left out holding no ticket.
        evidence = self.evidence(peer)
        # No reply of an earlier round is opened once a later round is instructed.
        self.ticket_round = max(self.ticket_round, rnd)
        ticket = self.ticket(peer.node_id, rnd, stage)
        sealed = seal_tensors(
            adapter,
            peer.public_key,
            self.context(peer, rnd, DOWNLINK, stage),
            suite=peer.suite,
            metadata={TICKET: ticket},
        )
        return RecordDict(
            {
                CONFIG_KEY: ConfigRecord({ROUND_KEY: rnd}),
                AGGREGATOR_KEY: ConfigRecord(
                    {
                        AGGREGATOR_TEE: self.attester.tee,
                        AGGREGATOR_EVIDENCE: evidence,
                        AGGREGATOR_PUBLIC_KEY: self.key_for(peer.suite).public_bytes,
                        AGGREGATOR_SUITE: peer.suite,
                    }
                ),
                SEALED_KEY: ConfigRecord({SEALED_GLOBAL_KEY: sealed}),
            }
        )

    def open_update(
        self, peer: NodePeer, blob: bytes, rnd: int
    ) -> tuple[dict[str, np.ndarray], float]:
        """The node's update tensors and example count, from its envelope for this round.

        UpdateRejected unless the envelope opens under this run's key for exactly this
        round and node, and carries the ticket this round's instruction gave that node
        (honoured only until an instruction of a later round is made).
        """
        key = self.key_for(peer.suite)
        context = self.context(peer, rnd, UPLINK, STAGE_TRAIN)
        tensors, metadata = open_sealed(blob, key.private_key, context, suite=peer.suite)
        ticket = metadata.get(TICKET, "")
        issued = self.ticket(peer.node_id, rnd, STAGE_TRAIN)
        if rnd != self.ticket_round or not hmac.compare_digest(ticket.encode(), issued.encode()):
            raise UpdateRejected("sealed update does not carry this round's ticket")
        try:
            weight = float(metadata[EXAMPLES])
        except (KeyError, ValueError):
            raise UpdateRejected(f"sealed update has no numeric {EXAMPLES!r}") from None
        return tensors, weight


def sealed_blob(content: RecordDict) -> bytes:
    """The uplink envelope of a reply; UpdateRejected if there is none."""
    record = content.config_records.get(SEALED_KEY)
    blob = None if record is None else record.get(SEALED_UPDATE_KEY)
    if not isinstance(blob, bytes):
        raise UpdateRejected(f"reply has no sealed update ({SEALED_KEY}.{SEALED_UPDATE_KEY})")
    return blob
