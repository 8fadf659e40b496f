"""A node's side of secure aggregation: one round's state machine, no I/O.

The node sandbox keeps one :class:`NodeRound` per run and round, and drives it with the
aggregator's requests (``sandbox/secagg.py`` has the protocol and wire formats). Every
request is hostile: the node checks each advertisement against the key broker's result
key, derives the round's mask graph itself from the advertisements it verified (the
aggregator sends none), shares to and masks only with its neighbours that advertised
and shared, signs one split of the round into survivors and dropped, and reveals at most
once per round, for that split only and once the threshold of its holders signed it,
only its neighbours' shares and never both kinds of share of one node (Bonawitz et al.'s
consistency check, per neighbourhood in a sparse graph as in Bell et al.). Those rules
keep every honest node's update hidden from an aggregator that asks for more than the
protocol gives it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sandbox.errors import SecAggRefused
from sandbox.secagg import (
    SEED_BYTES,
    Advertisement,
    CheckRequest,
    Consistency,
    GraphParameters,
    MaskGraph,
    MaskRequest,
    Quantization,
    Reveal,
    ShareBundle,
    ShareRequest,
    UnmaskRequest,
    agree,
    apply_pair_mask,
    consistency_bytes,
    graph_parameters,
    open_share,
    seal_share,
    seed_commitment,
    self_mask,
    share_index,
    split_secret,
    threshold,
)


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


@dataclass
class NodeRound:
    """One node's secure-aggregation state for one round of one run."""

    run: int
    round: int
    node: int
    # The run's threshold fraction and clip range (``secagg-threshold``, ``secagg-clip``).
    fraction: float
    clip: float
    signer: Ed25519PrivateKey
    certificate: str
    result_key: Any
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    rng: Callable[[int], bytes] = os.urandom
    # What the mask graph's degree and threshold come from (the same for every party).
    parameters: GraphParameters = graph_parameters
    # advertise
    advert: Advertisement | None = None
    _c: X25519PrivateKey | None = None
    _s: X25519PrivateKey | None = None
    _seed: bytes = b""
    # share: the advertised nodes (sorted), their advertisements, the ueid each
    # certification names, the mask graph this node derived from them, the share
    # threshold among a node's holders (the graph's t) and the fewest survivors of the
    # round (a strict majority, the run's ``secagg-threshold``; both the same number in
    # the full graph).
    roster: tuple[int, ...] = ()
    peers: dict[int, Advertisement] = field(default_factory=dict)
    ueids: dict[int, str] = field(default_factory=dict)
    graph: MaskGraph | None = None
    threshold: int = 0
    minimum: int = 0
    # mask: the nodes that shared as the mask request named them, whom of them this node
    # masked with (its holders among them), and the shares it holds of each (seed, key).
    shared: tuple[int, ...] = ()
    masked_with: tuple[int, ...] = ()
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    # check: the one split of this round this node signed.
    confirmed: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # unmask: whose seed shares and whose key shares this node revealed.
    revealed_seeds: tuple[int, ...] | None = None
    revealed_keys: tuple[int, ...] = ()

    def _refuse(self, reason: str) -> SecAggRefused:
        return SecAggRefused(f"run {self.run} round {self.round}: {reason}")

    def _check_ids(self, run: int, rnd: int) -> None:
        if (run, rnd) != (self.run, self.round):
            raise self._refuse(f"a request for run {run} round {rnd}")

    def advertise(self) -> Advertisement:
        """Stage 1: fresh keys and seed for this round, advertised (once)."""
        if self.advert is not None:
            raise self._refuse("keys were already advertised for this round")
        self._c = X25519PrivateKey.from_private_bytes(self.rng(32))
        self._s = X25519PrivateKey.from_private_bytes(self.rng(32))
        self._seed = self.rng(SEED_BYTES)
        self.advert = Advertisement.sign(
            self.signer,
            self.certificate,
            run=self.run,
            rnd=self.round,
            node=self.node,
            c_pk=_raw_public(self._c),
            s_pk=_raw_public(self._s),
            seed_commitment=seed_commitment(self._seed, self.run, self.round, self.node),
        )
        return self.advert

    def share(self, request: ShareRequest) -> ShareBundle:
        """Stage 2: check every advertisement, then seal each peer's shares of this
        node's seed and ``s`` key to that peer's ``c`` key."""
        self._check_ids(request.run, request.round)
        if self.advert is None or self._c is None or self._s is None:
            raise self._refuse("a share request before this node advertised")
        if self.roster:
            raise self._refuse("a second share request for this round")
        adverts = {a.node: a for a in request.adverts}
        if adverts.get(self.node) != self.advert:
            raise self._refuse("the share request does not carry this node's own keys")
        now = self.clock()
        ueids: dict[int, str] = {}
        for node, advert in adverts.items():
            result = advert.verify(self.result_key, now=now, run=self.run, rnd=self.round)
            ueids[node] = str(result.ueid)
        if len(set(ueids.values())) != len(ueids) or len(
            {a.signer for a in adverts.values()}
        ) != len(adverts):
            raise self._refuse("two advertised nodes share one attested identity")
        keys = [k for a in adverts.values() for k in (a.s_pk, a.c_pk)]
        if len(set(keys)) != len(keys):
            raise self._refuse("two advertised keys are the same")
        roster = tuple(sorted(adverts))
        if len(roster) < 2:
            raise self._refuse("fewer than 2 nodes advertised: a sum of one is no secret")
        # This node's own graph, from what it verified: nothing the aggregator says.
        graph = MaskGraph.derive(
            self.run,
            self.round,
            [adverts[n] for n in roster],
            fraction=self.fraction,
            parameters=self.parameters,
        )
        holders = graph.holders(self.node)
        seed_shares = split_secret(self._seed, graph.t, len(holders))
        key_shares = split_secret(self._s.private_bytes_raw(), graph.t, len(holders))
        sealed: dict[int, bytes] = {}
        for position, node in enumerate(holders):
            if node == self.node:
                self.held[node] = (seed_shares[position], key_shares[position])
                continue
            sealed[node] = seal_share(
                self._c,
                adverts[node].c_pk,
                run=self.run,
                rnd=self.round,
                sender=self.node,
                recipient=node,
                index=position + 1,
                seed_share=seed_shares[position],
                key_share=key_shares[position],
                rng=self.rng,
            )
        self.roster, self.peers, self.ueids, self.graph = roster, adverts, ueids, graph
        self.threshold, self.minimum = graph.t, threshold(len(roster), self.fraction)
        return ShareBundle(self.run, self.round, self.node, sealed)

    @property
    def quantization(self) -> Quantization:
        """The fixed point every node of this round uses (clip and advertised count)."""
        return Quantization(self.clip, len(self.roster))

    def mask(self, request: MaskRequest, values: np.ndarray, weight: float) -> np.ndarray:
        """Stage 3: keep the shares this node's neighbours sent it, then quantize ``weight
        * values`` and ``weight`` and mask them with this node's seed and with every
        neighbour that shared. Refused before anything is masked if the roster or a share
        is wrong (a share from a node that is not its neighbour in the graph it derived,
        or one missing), if fewer than the threshold shared, overall or among its holders
        (its secrets could not be rebuilt), or (QuantizationOverflow) if the input could
        overflow the sum."""
        self._check_ids(request.run, request.round)
        graph = self.graph
        if not self.roster or self._s is None or graph is None:
            raise self._refuse("a mask request before shares were exchanged")
        if self.masked_with:
            raise self._refuse("a second mask request for this round")
        roster = request.roster
        if self.node not in roster or not set(roster) <= set(self.roster):
            raise self._refuse(
                "the mask roster names nodes that did not advertise, or not this node"
            )
        if len(roster) < self.minimum:
            raise self._refuse(
                f"{len(roster)} nodes shared, fewer than the threshold {self.minimum}"
            )
        mine = tuple(sorted(set(roster) & set(graph.holders(self.node))))
        if len(mine) < self.threshold:
            raise self._refuse(
                f"{len(mine)} of this node's holders shared, fewer than the threshold "
                f"{self.threshold}: its secrets could not be rebuilt"
            )
        if set(request.shares) != set(mine) - {self.node}:
            raise self._refuse(
                "the shares do not come from exactly the roster's other nodes among this "
                "node's neighbours in the round's mask graph"
            )
        held = {self.node: self.held[self.node]}
        for sender, blob in request.shares.items():
            index, seed_share, key_share = open_share(
                self._c_key(),
                self.peers[sender].c_pk,
                blob,
                run=self.run,
                rnd=self.round,
                sender=sender,
                recipient=self.node,
            )
            if index != share_index(graph.holders(sender), self.node):
                raise self._refuse(f"the share from node {sender} is for another index")
            held[sender] = (seed_share, key_share)
        quantized = self.quantization.encode(values, weight)
        total = quantized + self_mask(self._seed, self.run, self.round, self.node, quantized.size)
        for peer in mine:
            if peer != self.node:
                shared = agree(self._s, self.peers[peer].s_pk)
                apply_pair_mask(total, shared, self.run, self.round, self.node, peer, sign=1)
        self.held, self.shared, self.masked_with = held, roster, mine
        masked: np.ndarray = total
        return masked

    def _c_key(self) -> X25519PrivateKey:
        if self._c is None:
            raise RuntimeError("no keys advertised")
        return self._c

    def _holders(self) -> tuple[int, ...]:
        """Whose shares this node holds: its neighbours and itself (everyone, full graph)."""
        if self.graph is None:
            raise RuntimeError("no mask graph before the share stage")
        return self.graph.holders(self.node)

    def _check_split(self, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> None:
        """SecAggRefused unless ``survivors`` and ``dropped`` split exactly the nodes of
        this node's mask roster, this node among the survivors, the survivors at the
        round's threshold and, among this node's holders, at the graph's."""
        if not self.masked_with:
            raise self._refuse("a split of the round before this node sent its masked input")
        if set(survivors) & set(dropped):
            raise self._refuse(
                "the request names a node both surviving and dropped: both its shares would "
                "unmask it"
            )
        if set(survivors) | set(dropped) != set(self.shared):
            raise self._refuse(
                "survivors and dropped are not exactly the nodes this node's mask roster "
                "named (those it masked with among them): a node that did not drop could "
                "be unmasked"
            )
        if self.node not in survivors:
            raise self._refuse("this node is named as dropped")
        if len(survivors) < self.minimum:
            raise self._refuse(
                f"{len(survivors)} survivors, fewer than the threshold {self.minimum}"
            )
        near = set(survivors) & set(self.masked_with)
        if len(near) < self.threshold:
            raise self._refuse(
                f"{len(near)} survivors among this node's holders, fewer than the threshold "
                f"{self.threshold}: too many of its neighbours are named dropped"
            )

    def _consistency(self, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> bytes:
        return consistency_bytes(self.run, self.round, self.roster, survivors, dropped, self.graph)

    def _check_signatures(self, request: UnmaskRequest) -> None:
        """SecAggRefused unless at least the threshold of survivors among this node's
        holders (every survivor, in the full graph) signed the split, and nobody else."""
        signed = self._consistency(request.survivors, request.dropped)
        signers = set(request.signatures)
        if not signers <= set(request.survivors):
            raise self._refuse("a split signature from a node that is not a survivor")
        if not signers <= set(self._holders()):
            raise self._refuse("a split signature from a node that is not this node's neighbour")
        for node, signature in request.signatures.items():
            try:
                Ed25519PublicKey.from_public_bytes(self.peers[node].signer).verify(
                    signature, signed
                )
            except (InvalidSignature, ValueError):
                raise self._refuse(
                    f"node {node}'s signature of the split does not verify"
                ) from None
        if len(signers) < self.threshold:
            raise self._refuse(
                f"{len(signers)} survivors signed the split, fewer than the threshold "
                f"{self.threshold}"
            )

    def check(self, request: CheckRequest) -> Consistency:
        """Stage 4: sign the aggregator's split of this round, if it splits exactly this
        node's mask roster and leaves the threshold of its holders surviving; one split
        per round (the same one may be asked again)."""
        self._check_ids(request.run, request.round)
        split = (request.survivors, request.dropped)
        if self.confirmed is not None and self.confirmed != split:
            raise self._refuse("a second, different split of this round: one is signed")
        self._check_split(*split)
        self.confirmed = split
        signature = self.signer.sign(self._consistency(*split))
        return Consistency(self.run, self.round, self.node, signature)

    def unmask(self, request: UnmaskRequest) -> Reveal:
        """Stage 5: once per round, this node's shares of each survivor's seed and of each
        dropped node's ``s`` key, of its holders only; refused (nothing revealed) unless
        the split is the one this node signed and at least the threshold of survivors
        among its holders signed it too.

        In the full graph, when nobody dropped and this node signed no split, the split
        needs no signatures: it reveals only seed shares, of exactly the nodes it masked
        with. Masking-key shares come only from the one split the threshold of survivors
        signed, and a node reveals for one split only; so, with a strict-majority
        threshold, no node's seed and key both reach the threshold, and every sum the
        aggregator can unmask covers at least a whole mask roster. In a sparse graph the
        split is always signed: a revealer's own key then cannot be rebuilt, as that would
        take the threshold of its holders signing another split (``sandbox/secagg.py``
        has the argument)."""
        self._check_ids(request.run, request.round)
        if self.revealed_seeds is not None:
            raise self._refuse("a second unmask request for this round: shares are revealed once")
        split = (request.survivors, request.dropped)
        self._check_split(*split)
        unsigned = not request.dropped and self.confirmed is None and not request.signatures
        if unsigned and self.graph is not None and self.graph.full:
            self.confirmed = split  # nobody dropped: seed shares only, no signature needed
        elif unsigned:
            raise self._refuse("a sparse round reveals only for a split its holders signed")
        elif self.confirmed != split:
            raise self._refuse("the unmask split is not the one this node signed")
        else:
            self._check_signatures(request)
        near = set(self.masked_with)
        if self.graph is not None and not self.graph.full:
            # A survivor's seed share goes only to a split that survivor signed: its
            # signature says it masked with exactly the split's nodes, so with this node.
            # Else the aggregator could leave some of its holders out of its mask roster,
            # show them another with it, and have them reveal its seed while their pair
            # masks with it were never added: fewer honest inputs would stay in the sum.
            silent = (near & set(request.survivors)) - set(request.signatures) - {self.node}
            if silent:
                raise self._refuse(
                    f"{len(silent)} survivors among this node's holders did not sign the "
                    "split: their seed shares are revealed only for a split they signed"
                )
        self.revealed_seeds = tuple(sorted(near & set(request.survivors)))
        self.revealed_keys = tuple(sorted(near & set(request.dropped)))
        return Reveal(
            self.run,
            self.round,
            self.node,
            share_index(self.roster, self.node),
            {u: self.held[u][0] for u in self.revealed_seeds},
            {d: self.held[d][1] for d in self.revealed_keys},
        )
