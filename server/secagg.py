"""The aggregator's side of secure aggregation: one round's state machine, no I/O.

The ServerApp's secure job (``server/secure_job.py``) feeds it the nodes' replies stage by
stage (``sandbox/secagg.py`` has the protocol). It derives the round's mask graph from
the advertisements as every node does, routes shares it cannot open between neighbours,
folds masked inputs into one running sum mod 2^32 as they arrive (no node's input is
kept), has the survivors sign the round's one split when a node dropped (always, in a
sparse graph), and at the end rebuilds the survivors' seeds and the dropped nodes' ``s``
keys from their holders' revealed shares to remove every mask. With fewer than the
threshold of nodes at any stage, overall or among one node's holders, it fails closed
(:class:`SecAggFailed`): it never asks for shares then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sandbox.errors import SecAggFailed, SecAggMessageInvalid
from sandbox.secagg import (
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
    combine_secret,
    consistency_bytes,
    graph_parameters,
    seed_commitment,
    self_mask,
    share_index,
    threshold,
)


@dataclass
class ServerRound:
    """One round's secure aggregation as the aggregator runs it."""

    run: int
    round: int
    fraction: float
    clip: float
    # Values per masked input, the weight not counted.
    length: int
    result_key: Any
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    # What the mask graph's degree and threshold come from (the nodes use the same).
    parameters: GraphParameters = graph_parameters
    adverts: dict[int, Advertisement] = field(default_factory=dict)
    ueids: dict[int, str] = field(default_factory=dict)
    roster: tuple[int, ...] = ()  # U1: advertised, fixed by the share request
    graph: MaskGraph | None = None  # derived from U1's advertisements with it
    bundles: dict[int, ShareBundle] = field(default_factory=dict)
    shared: tuple[int, ...] = ()  # U2: shared, fixed by the first mask request
    survivors: list[int] = field(default_factory=list)  # U3: sent a masked input
    signatures: dict[int, bytes] = field(default_factory=dict)  # the check stage's
    reveals: dict[int, Reveal] = field(default_factory=dict)
    _total: np.ndarray | None = None
    _check: CheckRequest | None = None
    _unmask: UnmaskRequest | None = None

    @property
    def minimum(self) -> int:
        """The fewest nodes every stage needs: a strict majority of the advertised nodes,
        at least the run's ``secagg-threshold`` of them."""
        return threshold(len(self.roster), self.fraction) if self.roster else 2

    @property
    def threshold(self) -> int:
        """The shares that rebuild a secret: the graph's ``t`` (the minimum, in the full
        graph)."""
        return self.graph.t if self.graph is not None else self.minimum

    def _need(self, count: int, stage: str) -> None:
        if not self.roster or count < self.minimum:
            raise SecAggFailed(
                f"round {self.round}: {count} nodes reached the {stage} stage, fewer than "
                f"the threshold {self.minimum}; it fails closed, nothing is unmasked"
            )

    def _mask_graph(self) -> MaskGraph:
        if self.graph is None:
            raise RuntimeError("no mask graph before the share request")
        return self.graph

    def _need_holders(self, having: set[int], owners: Iterable[int], stage: str) -> None:
        """SecAggFailed unless each of ``owners`` has the threshold of its holders in
        ``having``: else its secret could not be rebuilt. Nothing to count in the full
        graph, where the holders are everyone and ``_need`` counted them."""
        graph = self._mask_graph()
        if graph.full:
            return
        for node in owners:
            count = len(having.intersection(graph.holders(node)))
            if count < graph.t:
                raise SecAggFailed(
                    f"round {self.round}: {count} of node {node}'s holders reached the "
                    f"{stage} stage, fewer than the threshold {graph.t} of the mask graph; "
                    "it fails closed, nothing is unmasked"
                )

    # -- stage 1 -------------------------------------------------------------------------
    def add_advert(self, node: int, raw: bytes) -> str:
        """Accept a node's key advertisement; returns the ueid it is certified for.
        AdvertisementInvalid (or SecAggMessageInvalid) leaves the node out."""
        if self.roster:
            raise SecAggMessageInvalid(f"node {node}: advertisement after the share stage began")
        advert = Advertisement.from_json(raw)
        if advert.node != node:
            raise SecAggMessageInvalid(f"node {node} advertised keys for node {advert.node}")
        result = advert.verify(self.result_key, now=self.clock(), run=self.run, rnd=self.round)
        ueid = str(result.ueid)
        for other, known in self.adverts.items():
            if other != node and (
                self.ueids[other] == ueid
                or known.signer == advert.signer
                or {known.s_pk, known.c_pk} & {advert.s_pk, advert.c_pk}
            ):
                raise SecAggMessageInvalid(
                    f"node {node}: its attested identity or keys already advertised as node {other}"
                )
        self.adverts[node], self.ueids[node] = advert, ueid
        return ueid

    # -- stage 2 -------------------------------------------------------------------------
    def share_request(self) -> ShareRequest:
        """The advertised nodes (U1) are fixed here, and with them the mask graph; every
        node gets all advertisements (and derives the same graph from them)."""
        if not self.roster:
            roster = tuple(sorted(self.adverts))
            if len(roster) < 2:
                raise SecAggFailed(
                    f"round {self.round}: {len(roster)} nodes advertised keys; a sum of "
                    "fewer than 2 hides nothing"
                )
            self.graph = MaskGraph.derive(
                self.run,
                self.round,
                [self.adverts[n] for n in roster],
                fraction=self.fraction,
                parameters=self.parameters,
            )
            self.roster = roster
        return ShareRequest(self.run, self.round, tuple(self.adverts[n] for n in self.roster))

    def add_shares(self, node: int, raw: bytes) -> None:
        bundle = ShareBundle.from_bytes(raw)
        if node not in self.roster or self.shared:
            raise SecAggMessageInvalid(f"node {node}: shares outside the share stage")
        if (bundle.run, bundle.round, bundle.node) != (self.run, self.round, node):
            raise SecAggMessageInvalid(f"node {node}: shares for another run, round or node")
        if set(bundle.shares) != set(self._mask_graph().neighbours(node)):
            raise SecAggMessageInvalid(
                f"node {node}: shares not for exactly the other nodes among its neighbours"
            )
        self.bundles[node] = bundle

    # -- stage 3 -------------------------------------------------------------------------
    def close_shares(self) -> tuple[int, ...]:
        """Fix the nodes that shared (U2); SecAggFailed if fewer than the threshold, or
        than the graph's threshold among one of their holders."""
        if not self.shared:
            self._need(len(self.bundles), "share")
            self._need_holders(set(self.bundles), sorted(self.bundles), "share")
            self.shared = tuple(sorted(self.bundles))
        return self.shared

    def mask_request(self, node: int) -> MaskRequest:
        """``node``'s instruction to mask: the nodes that shared (U2, fixed at the first
        call) and the shares its neighbours among them sealed for it."""
        self.close_shares()
        shares = {
            sender: self.bundles[sender].shares[node]
            for sender in self._mask_graph().neighbours(node)
            if sender in self.bundles
        }
        return MaskRequest(self.run, self.round, self.shared, shares)

    @property
    def quantization(self) -> Quantization:
        return Quantization(self.clip, len(self.roster))

    def add_masked(self, node: int, masked: np.ndarray) -> None:
        """Fold one masked input into the running sum (mod 2^32); the input is dropped."""
        if node not in self.shared or node in self.survivors or self._check is not None:
            raise SecAggMessageInvalid(f"node {node}: a masked input it may not send now")
        vector = np.asarray(masked)
        if vector.dtype != np.uint32 or vector.shape != (self.length + 1,):
            raise SecAggMessageInvalid(
                f"node {node}: a masked input must be {self.length + 1} uint32 values"
            )
        if self._total is None:
            self._total = np.zeros(self.length + 1, np.uint32)
        self._total += vector
        self.survivors.append(node)

    # -- stage 4: the consistency check ---------------------------------------------------
    def check_request(self) -> CheckRequest:
        """Survivors (U3) and dropped (U2 minus U3), fixed at the first call. SecAggFailed,
        and no request at all, with fewer survivors than the threshold, or than the
        graph's threshold among a node's holders (too many dropped in one neighbourhood:
        its secret could not be rebuilt, and its survivors would refuse the split)."""
        if self._check is None:
            self._need(len(self.survivors), "masked input")
            survivors = tuple(sorted(self.survivors))
            dropped = tuple(n for n in self.shared if n not in self.survivors)
            self._need_holders(set(survivors), (*survivors, *dropped), "masked input")
            self._check = CheckRequest(self.run, self.round, survivors, dropped)
        return self._check

    def add_consistency(self, node: int, raw: bytes) -> None:
        """A survivor's signature over the split, checked with its advertised key."""
        check = self._check
        if check is None or node not in check.survivors or self._unmask is not None:
            raise SecAggMessageInvalid(f"node {node}: a split signature it may not send now")
        signed = Consistency.from_bytes(raw)
        if (signed.run, signed.round, signed.node) != (self.run, self.round, node):
            raise SecAggMessageInvalid(f"node {node}: a signature for another run, round or node")
        data = consistency_bytes(
            self.run, self.round, self.roster, check.survivors, check.dropped, self.graph
        )
        try:
            Ed25519PublicKey.from_public_bytes(self.adverts[node].signer).verify(
                signed.signature, data
            )
        except (InvalidSignature, ValueError):
            raise SecAggMessageInvalid(
                f"node {node}: its split signature does not verify"
            ) from None
        self.signatures[node] = signed.signature

    # -- stage 5 -------------------------------------------------------------------------
    @property
    def needs_check(self) -> bool:
        """Whether the split must be signed before anyone reveals: in the full graph only
        when a node dropped (then masking-key shares are asked for); with nobody dropped
        the nodes reveal seed shares of exactly the nodes they masked with, unsigned. In
        a sparse graph always (a node reveals only for a split its holders signed)."""
        return bool(self.check_request().dropped) or not self._mask_graph().full

    def unmask_request(self) -> UnmaskRequest:
        """The split, with the survivors' signatures when it needs them (every one; each
        node gets its holders' from :meth:`unmask_request_for`). SecAggFailed, and no
        request at all, with fewer survivors, or then signatures, than the threshold, or
        (in a sparse graph) when some secret would have fewer than the graph's threshold
        of holders willing to reveal it: those with the threshold of their own holders'
        signatures."""
        if self._unmask is None:
            check = self.check_request()
            if not self.needs_check and not self.signatures:
                self._unmask = UnmaskRequest(self.run, self.round, check.survivors, ())
                return self._unmask
            self._need(len(self.signatures), "check")
            graph = self._mask_graph()
            signers = set(self.signatures)
            unsigned = set(check.survivors) - signers
            if not graph.full and unsigned:
                # A holder reveals a survivor's seed share only for a split it signed.
                raise SecAggFailed(
                    f"round {self.round}: {len(unsigned)} survivors sent a masked input but "
                    "did not sign the split; in a sparse round their seeds are not revealed, "
                    "so nothing is unmasked"
                )
            willing = {v for v in signers if len(signers.intersection(graph.holders(v))) >= graph.t}
            self._need_holders(willing, (*check.survivors, *check.dropped), "check")
            self._unmask = UnmaskRequest(
                self.run, self.round, check.survivors, check.dropped, dict(self.signatures)
            )
        return self._unmask

    def unmask_request_for(self, node: int) -> UnmaskRequest:
        """``node``'s unmask request: :meth:`unmask_request` itself in the full graph (one
        message for all), else with only the signatures of ``node``'s holders."""
        request = self.unmask_request()
        graph = self._mask_graph()
        if graph.full:
            return request
        mine = {v: request.signatures[v] for v in graph.holders(node) if v in request.signatures}
        return UnmaskRequest(self.run, self.round, request.survivors, request.dropped, mine)

    @property
    def dropped(self) -> tuple[int, ...]:
        return () if self._check is None else self._check.dropped

    def add_reveal(self, node: int, raw: bytes) -> None:
        request = self._unmask
        if request is None or node not in request.survivors:
            raise SecAggMessageInvalid(f"node {node}: a reveal it may not send now")
        reveal = Reveal.from_bytes(raw)
        if (reveal.run, reveal.round, reveal.node) != (self.run, self.round, node):
            raise SecAggMessageInvalid(f"node {node}: a reveal for another run, round or node")
        if reveal.index != share_index(self.roster, node):
            raise SecAggMessageInvalid(f"node {node}: a reveal at another node's share index")
        near = set(self._mask_graph().holders(node))
        seeds, keys = near.intersection(request.survivors), near.intersection(request.dropped)
        if set(reveal.seeds) != seeds or set(reveal.keys) != keys:
            raise SecAggMessageInvalid(
                f"node {node}: a reveal for other nodes than asked (its holders' of the split)"
            )
        self.reveals[node] = reveal

    def _rebuild(self, owner: int, *, seed: bool) -> bytes:
        """``owner``'s seed (or ``s`` key) from the first threshold of its holders
        that revealed (sorted by node; more only cost interpolation time), each share at
        the holder's place among them. SecAggFailed with fewer."""
        graph = self._mask_graph()
        holders = graph.holders(owner)
        shares: dict[int, bytes] = {}
        for index, holder in enumerate(holders, start=1):
            reveal = self.reveals.get(holder)
            if reveal is not None:
                shares[index] = (reveal.seeds if seed else reveal.keys)[owner]
                if len(shares) == self.threshold:
                    return combine_secret(shares)
        raise SecAggFailed(
            f"round {self.round}: {len(shares)} of node {owner}'s holders revealed, fewer than "
            f"the threshold {self.threshold}; nothing is unmasked"
        )

    def result(self) -> tuple[np.ndarray, float]:
        """The unmasked sum of the survivors' weighted values and of their weights.

        SecAggFailed with fewer reveals than the threshold (overall, or among a node's
        holders), or when a rebuilt seed or key is not the one its node committed to or
        advertised (a wrong share)."""
        request = self._unmask
        if request is None or self._total is None:
            raise RuntimeError("result() before the unmask stage")
        self._need(len(self.reveals), "unmask")
        graph = self._mask_graph()
        total = self._total.copy()
        size = total.size
        for u in request.survivors:
            seed = self._rebuild(u, seed=True)
            if seed_commitment(seed, self.run, self.round, u) != self.adverts[u].seed_commitment:
                raise SecAggFailed(
                    f"round {self.round}: the revealed shares do not rebuild survivor {u}'s "
                    "committed seed; nothing is unmasked"
                )
            total -= self_mask(seed, self.run, self.round, u, size)
        survivors = set(request.survivors)
        for d in request.dropped:
            key = X25519PrivateKey.from_private_bytes(self._rebuild(d, seed=False))
            if key.public_key().public_bytes_raw() != self.adverts[d].s_pk:
                raise SecAggFailed(
                    f"round {self.round}: the revealed shares do not rebuild dropped node "
                    f"{d}'s advertised key; nothing is unmasked"
                )
            for v in graph.neighbours(d):
                if v in survivors:
                    shared = agree(key, self.adverts[v].s_pk)
                    apply_pair_mask(total, shared, self.run, self.round, v, d, sign=-1)
        return self.quantization.decode(total)
