"""The aggregator's side of secure aggregation: one round's state machine, no I/O.

The ServerApp's secure job (``server/secure_job.py``) feeds it the nodes' replies stage by
stage (``sandbox/secagg.py`` has the protocol). It routes shares it cannot open, folds
masked inputs into one running sum mod 2^32 as they arrive (no node's input is kept),
has the survivors sign the round's one split when a node dropped, and at the end
rebuilds the survivors' seeds and the dropped nodes' ``s`` keys from the revealed shares
to remove every mask. With fewer than the threshold of nodes at any stage it fails
closed (:class:`SecAggFailed`): it never asks for shares then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
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
    adverts: dict[int, Advertisement] = field(default_factory=dict)
    ueids: dict[int, str] = field(default_factory=dict)
    roster: tuple[int, ...] = ()  # U1: advertised, fixed by the share request
    bundles: dict[int, ShareBundle] = field(default_factory=dict)
    shared: tuple[int, ...] = ()  # U2: shared, fixed by the first mask request
    survivors: list[int] = field(default_factory=list)  # U3: sent a masked input
    signatures: dict[int, bytes] = field(default_factory=dict)  # the check stage's
    reveals: dict[int, Reveal] = field(default_factory=dict)
    _total: np.ndarray | None = None
    _check: CheckRequest | None = None
    _unmask: UnmaskRequest | None = None

    @property
    def threshold(self) -> int:
        return threshold(len(self.roster), self.fraction)

    def _need(self, count: int, stage: str) -> None:
        if not self.roster or count < self.threshold:
            raise SecAggFailed(
                f"round {self.round}: {count} nodes reached the {stage} stage, fewer than "
                f"the threshold {self.threshold if self.roster else 2}; it fails closed, "
                "nothing is unmasked"
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
        """The advertised nodes (U1) are fixed here; every node gets all advertisements."""
        if not self.roster:
            self.roster = tuple(sorted(self.adverts))
            if len(self.roster) < 2:
                raise SecAggFailed(
                    f"round {self.round}: {len(self.roster)} nodes advertised keys; a sum of "
                    "fewer than 2 hides nothing"
                )
        return ShareRequest(self.run, self.round, tuple(self.adverts[n] for n in self.roster))

    def add_shares(self, node: int, raw: bytes) -> None:
        bundle = ShareBundle.from_bytes(raw)
        if node not in self.roster or self.shared:
            raise SecAggMessageInvalid(f"node {node}: shares outside the share stage")
        if (bundle.run, bundle.round, bundle.node) != (self.run, self.round, node):
            raise SecAggMessageInvalid(f"node {node}: shares for another run, round or node")
        if set(bundle.shares) != set(self.roster) - {node}:
            raise SecAggMessageInvalid(f"node {node}: shares not for exactly the other nodes")
        self.bundles[node] = bundle

    # -- stage 3 -------------------------------------------------------------------------
    def close_shares(self) -> tuple[int, ...]:
        """Fix the nodes that shared (U2); SecAggFailed if fewer than the threshold."""
        if not self.shared:
            self._need(len(self.bundles), "share")
            self.shared = tuple(sorted(self.bundles))
        return self.shared

    def mask_request(self, node: int) -> MaskRequest:
        """``node``'s instruction to mask: the nodes that shared (U2, fixed at the first
        call) and the shares they sealed for it."""
        self.close_shares()
        shares = {
            sender: self.bundles[sender].shares[node] for sender in self.shared if sender != node
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
        and no request at all, with fewer survivors than the threshold."""
        if self._check is None:
            self._need(len(self.survivors), "masked input")
            survivors = tuple(sorted(self.survivors))
            dropped = tuple(n for n in self.shared if n not in self.survivors)
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
        data = consistency_bytes(self.run, self.round, self.roster, check.survivors, check.dropped)
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
        """Whether the split must be signed before anyone reveals: only when a node
        dropped (then masking-key shares are asked for); with nobody dropped the nodes
        reveal seed shares of exactly the nodes they masked with, unsigned."""
        return bool(self.check_request().dropped)

    def unmask_request(self) -> UnmaskRequest:
        """The split, with the survivors' signatures when anyone dropped. SecAggFailed,
        and no request at all, with fewer survivors, or then signatures, than the
        threshold."""
        if self._unmask is None:
            check = self.check_request()
            if not check.dropped and not self.signatures:
                self._unmask = UnmaskRequest(self.run, self.round, check.survivors, ())
                return self._unmask
            self._need(len(self.signatures), "check")
            self._unmask = UnmaskRequest(
                self.run, self.round, check.survivors, check.dropped, dict(self.signatures)
            )
        return self._unmask

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
        if set(reveal.seeds) != set(request.survivors) or set(reveal.keys) != set(request.dropped):
            raise SecAggMessageInvalid(f"node {node}: a reveal for other nodes than asked")
        self.reveals[node] = reveal

    def result(self) -> tuple[np.ndarray, float]:
        """The unmasked sum of the survivors' weighted values and of their weights.

        SecAggFailed with fewer reveals than the threshold, or when a dropped node's
        rebuilt key is not the one it advertised (a wrong share)."""
        request = self._unmask
        if request is None or self._total is None:
            raise RuntimeError("result() before the unmask stage")
        self._need(len(self.reveals), "unmask")
        total = self._total.copy()
        size = total.size
        # Any threshold of them rebuild each secret; more only cost interpolation time.
        reveals = [self.reveals[n] for n in sorted(self.reveals)][: self.threshold]
        for u in request.survivors:
            seed = combine_secret({r.index: r.seeds[u] for r in reveals})
            if seed_commitment(seed, self.run, self.round, u) != self.adverts[u].seed_commitment:
                raise SecAggFailed(
                    f"round {self.round}: the revealed shares do not rebuild survivor {u}'s "
                    "committed seed; nothing is unmasked"
                )
            total -= self_mask(seed, self.run, self.round, u, size)
        for d in request.dropped:
            raw = combine_secret({r.index: r.keys[d] for r in reveals})
            key = X25519PrivateKey.from_private_bytes(raw)
            if key.public_key().public_bytes_raw() != self.adverts[d].s_pk:
                raise SecAggFailed(
                    f"round {self.round}: the revealed shares do not rebuild dropped node "
                    f"{d}'s advertised key; nothing is unmasked"
                )
            for v in request.survivors:
                shared = agree(key, self.adverts[v].s_pk)
                apply_pair_mask(total, shared, self.run, self.round, v, d, sign=-1)
        return self.quantization.decode(total)
