"""Secure aggregation in process: sandbox/secagg.py, clients/secagg.py, server/secagg.py.

Real crypto throughout: each node sandbox's Ed25519 signing key is certified by an EAR
that a real :class:`ResultSigner` signs, and nodes and aggregator verify it with that
signer's public key. :class:`Federation` runs one round with the honest aggregator
(:class:`ServerRound`) and passes every message as its wire bytes; the attack tests play a
hostile aggregator (or node) by building the requests it would send, and check both the
specific refusal and that nothing was revealed or produced.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.secagg import NodeRound
from sandbox.attestation.result import (
    PURPOSE_CHANNEL,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
    SIGNING_SUITE,
    ResultContext,
    ResultSigner,
)
from sandbox.attestation.verifier import Appraisal
from sandbox.errors import (
    AdvertisementInvalid,
    MeasurementRejected,
    QuantizationOverflow,
    SecAggFailed,
    SecAggMessageInvalid,
    SecAggRefused,
)
from sandbox.secagg import (
    INT32_MAX,
    MAX_CERTIFICATE,
    MAX_NODES,
    SEALED_SHARE_BYTES,
    STAGE_CHECK,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    Advertisement,
    CheckRequest,
    Consistency,
    GraphParameters,
    MaskRequest,
    Quantization,
    Reveal,
    ShareBundle,
    ShareRequest,
    UnmaskRequest,
    apply_pair_mask,
    combine_secret,
    consistency_bytes,
    flatten,
    graph_parameters,
    node_reply,
    open_share,
    seal_share,
    seed_commitment,
    self_mask,
    share_index,
    split_secret,
    threshold,
    unflatten,
)
from server.secagg import ServerRound

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
RUN = 2**63 + 4242  # Flower run and node ids are unsigned 64-bit
ROUND = 3
FRACTION = 0.6
CLIP = 4.0
LENGTH = 1000
FIVE = (11, 2**40 + 7, 2**63 + 5, 2**64 - 2, 2**64 - 1)


def _frozen() -> dt.datetime:
    return NOW


# -- attested identities ---------------------------------------------------------------------


@dataclasses.dataclass
class KeyBroker:
    """The verifier that certifies node sandboxes' signing keys: a real ResultSigner."""

    signer: ResultSigner

    @classmethod
    def new(cls, name: str = "verifier") -> KeyBroker:
        return cls(ResultSigner(ec.generate_private_key(ec.SECP256R1()), {"build": name}))

    @property
    def result_key(self) -> ec.EllipticCurvePublicKey:
        return self.signer.key.public_key()

    def _context(self, key: Ed25519PrivateKey, purpose: str, suite: str) -> ResultContext:
        raw = key.public_key().public_bytes_raw()
        return ResultContext("session", "stub", raw, suite, "evidence", "policy", "d", purpose)

    def certify(
        self,
        key: Ed25519PrivateKey,
        ueid: str,
        *,
        purpose: str = PURPOSE_SIGNING,
        suite: str = SIGNING_SUITE,
        now: dt.datetime = NOW,
    ) -> str:
        """An affirming EAR for ``key`` (the certification a node's advertisement carries)."""
        appraisal = Appraisal({"ueid": ueid, "measurements": {}}, "stub", "policy", now)
        return self.signer.affirm(appraisal, self._context(key, purpose, suite), now=now).token

    def refuse(self, key: Ed25519PrivateKey) -> str:
        """A contraindicated EAR for ``key`` (evidence that failed appraisal)."""
        context = self._context(key, PURPOSE_SIGNING, SIGNING_SUITE)
        return self.signer.contraindicate(MeasurementRejected("bad"), context, now=NOW).token


@pytest.fixture(scope="module")
def broker() -> KeyBroker:
    return KeyBroker.new()


def node_round(
    broker: KeyBroker,
    node: int,
    *,
    fraction: float = FRACTION,
    clip: float = CLIP,
    run: int = RUN,
    rnd: int = ROUND,
    parameters: GraphParameters = graph_parameters,
) -> NodeRound:
    """A node sandbox's state for one round, with a freshly certified signing key."""
    key = Ed25519PrivateKey.generate()
    cert = broker.certify(key, f"ueid-{node}")
    return NodeRound(
        run,
        rnd,
        node,
        fraction,
        clip,
        key,
        cert,
        broker.result_key,
        clock=_frozen,
        parameters=parameters,
    )


# -- an in-process round -----------------------------------------------------------------------


@dataclasses.dataclass
class Federation:
    """One round: the honest aggregator and the nodes, every message as its wire bytes.

    ``masked`` keeps each node's masked input as it left the node, so that tests can
    look at what the aggregator receives; ServerRound itself keeps only the running sum.
    """

    broker: KeyBroker
    nodes: dict[int, NodeRound]
    server: ServerRound
    values: dict[int, np.ndarray]
    weights: dict[int, float]
    masked: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    reveals: dict[int, Reveal] = dataclasses.field(default_factory=dict)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted(self.nodes))

    def advertise(self) -> None:
        for node, state in self.nodes.items():
            assert self.server.add_advert(node, state.advertise().to_bytes()) == f"ueid-{node}"

    def share(self, *, stop: Iterable[int] = ()) -> None:
        request = self.server.share_request().to_bytes()
        for node, state in self.nodes.items():
            if node not in stop:
                bundle = state.share(ShareRequest.from_bytes(request))
                self.server.add_shares(node, bundle.to_bytes())

    def mask_request(self, node: int) -> MaskRequest:
        return MaskRequest.from_bytes(self.server.mask_request(node).to_bytes())

    def mask(
        self,
        *,
        stop: Iterable[int] = (),
        lose: Iterable[int] = (),
        alter: Callable[[int, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Nodes in ``stop`` never answer; those in ``lose`` mask, but their input is lost;
        ``alter`` changes an input on its way to the aggregator."""
        stop, lose = set(stop), set(lose)
        for node in sorted(self.server.bundles):  # the nodes that shared
            if node in stop:
                continue
            request = self.mask_request(node)
            masked = self.nodes[node].mask(request, self.values[node], self.weights[node])
            self.masked[node] = masked.copy()
            if alter is not None:
                masked = alter(node, masked)
            if node not in lose:
                self.server.add_masked(node, masked)

    def check(self) -> CheckRequest:
        """The consistency check: every survivor signs the aggregator's one split."""
        request = CheckRequest.from_bytes(self.server.check_request().to_bytes())
        for node in request.survivors:
            signed = Consistency.from_bytes(self.nodes[node].check(request).to_bytes())
            self.server.add_consistency(node, signed.to_bytes())
        return request

    def unmask(self) -> UnmaskRequest:
        self.check()
        request = UnmaskRequest.from_bytes(self.server.unmask_request().to_bytes())
        for node in request.survivors:
            mine = UnmaskRequest.from_bytes(self.server.unmask_request_for(node).to_bytes())
            reveal = Reveal.from_bytes(self.nodes[node].unmask(mine).to_bytes())
            self.reveals[node] = reveal
            self.server.add_reveal(node, reveal.to_bytes())
        return request

    def run(
        self, *, stop_share: Iterable[int] = (), stop_mask: Iterable[int] = ()
    ) -> tuple[np.ndarray, float]:
        self.advertise()
        self.share()
        self.mask(stop=stop_share, lose=stop_mask)
        self.unmask()
        return self.server.result()

    def plain(self, members: Iterable[int]) -> tuple[np.ndarray, float]:
        """The plaintext weighted sum and summed weight of ``members``' updates."""
        members = list(members)
        total = sum((self.weights[n] * self.values[n] for n in members), np.zeros(self.length))
        return total, math.fsum(self.weights[n] for n in members)

    @property
    def length(self) -> int:
        return self.server.length

    def quantized(self, node: int) -> np.ndarray:
        """``node``'s quantized update before any mask (what its masked input hides)."""
        return self.server.quantization.encode(self.values[node], self.weights[node])


def federation(
    broker: KeyBroker,
    ids: Iterable[int],
    *,
    length: int = LENGTH,
    fraction: float = FRACTION,
    clip: float = CLIP,
    seed: int = 0,
    spread: float = 0.1,
    values: Mapping[int, np.ndarray] | None = None,
    weights: Mapping[int, float] | None = None,
    parameters: GraphParameters = graph_parameters,
) -> Federation:
    """Nodes ``ids`` with random updates (normal, ``spread``, clipped) and weights, unless
    given, and the honest aggregator; the mask graph's ``parameters`` are every party's."""
    ids = sorted(ids)
    rng = np.random.default_rng(seed)
    nodes = {
        n: node_round(broker, n, fraction=fraction, clip=clip, parameters=parameters) for n in ids
    }
    server = ServerRound(
        RUN,
        ROUND,
        fraction,
        clip,
        length,
        broker.result_key,
        clock=_frozen,
        parameters=parameters,
    )
    if values is None:
        values = {n: np.clip(rng.normal(0, spread, length), -clip, clip) for n in ids}
    if weights is None:
        weights = {n: float(rng.uniform(0.05, 1.0)) for n in ids}
    return Federation(broker, nodes, server, dict(values), dict(weights))


def random_ids(count: int, seed: int) -> list[int]:
    """``count`` distinct random 64-bit node ids (Flower's are random uint64)."""
    rng = random.Random(seed)
    ids = {2**64 - 1}
    while len(ids) < count:
        ids.add(rng.getrandbits(64))
    return sorted(ids)


def check_aggregate(
    fed: Federation, total: np.ndarray, weight: float, members: Iterable[int]
) -> None:
    """The decoded sum and weight equal ``members``' plaintext ones within half a
    quantization step per member, and the decoded mean within Quantization.bound()."""
    members = list(members)
    count = len(members)
    q = fed.server.quantization
    expected, expected_weight = fed.plain(members)
    assert np.abs(total - expected).max() <= count * 0.5 / q.scale * (1 + 1e-6)
    assert abs(weight - expected_weight) <= count * 0.5 / q.weight_scale * (1 + 1e-6)
    mean = expected / expected_weight
    bound = q.bound(count, expected_weight, float(np.abs(mean).max()))
    assert np.abs(total / weight - mean).max() <= bound


# -- the protocol as it should run ---------------------------------------------------------------


@pytest.mark.parametrize("count", [3, 7])
def test_the_aggregator_gets_the_weighted_sum_of_every_node(broker: KeyBroker, count: int) -> None:
    fed = federation(broker, random_ids(count, seed=count), seed=count)
    total, weight = fed.run()
    check_aggregate(fed, total, weight, fed.ids)
    assert sorted(fed.server.survivors) == list(fed.ids)
    assert fed.server.dropped == ()
    assert fed.server.threshold == threshold(count, FRACTION)
    for node, state in fed.nodes.items():
        assert state.confirmed == (fed.ids, ())
        assert state.revealed_seeds == fed.ids
        assert state.revealed_keys == ()
        assert state.threshold == fed.server.threshold
        assert fed.reveals[node].keys == {}
        assert fed.reveals[node].index == share_index(fed.ids, node)


FFA_SHAPES = {"layer.0.lora_B": (32, 8), "layer.1.lora_B": (32, 8), "head.lora_B": (3, 8)}
FFA_EXAMPLES = dict(zip(FIVE, (120, 37, 410, 5, 90), strict=True))


def ffa_round(
    broker: KeyBroker, alter: Callable[[int, np.ndarray], np.ndarray] | None = None
) -> tuple[Federation, np.ndarray, float]:
    """FFA-style updates: the B matrices of LoRA adapters (small values), each node
    weighted by its share of the examples (the weights sum to 1). Always the same data."""
    rng = np.random.default_rng(7)
    names = list(FFA_SHAPES)
    values = {
        node: flatten(
            {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in FFA_SHAPES.items()}, names
        )
        for node in FIVE
    }
    weights = {n: e / sum(FFA_EXAMPLES.values()) for n, e in FFA_EXAMPLES.items()}
    length = sum(math.prod(s) for s in FFA_SHAPES.values())
    fed = federation(broker, FIVE, length=length, values=values, weights=weights)
    fed.advertise()
    fed.share()
    fed.mask(alter=alter)
    fed.unmask()
    total, weight = fed.server.result()
    return fed, total, weight


def test_the_decoded_ffa_mean_is_exact_within_the_bound(broker: KeyBroker) -> None:
    fed, total, weight = ffa_round(broker)
    check_aggregate(fed, total, weight, FIVE)
    assert fed.plain(FIVE)[1] == pytest.approx(1.0)
    mean = unflatten(total / weight, FFA_SHAPES, dict.fromkeys(FFA_SHAPES, "float32"))
    assert {k: v.shape for k, v in mean.items()} == FFA_SHAPES


@pytest.mark.parametrize("where", ["a value", "the weight"])
def test_one_masked_input_off_by_count_steps_fails_the_bound(broker: KeyBroker, where: str) -> None:
    """The negative control: the bound is tight enough that one masked input off by
    count + 1 quantization steps in one element (a value, or the weight) is caught."""
    count = len(FIVE)
    element = 17 if where == "a value" else -1

    def off(node: int, masked: np.ndarray) -> np.ndarray:
        if node == FIVE[2]:
            masked = masked.copy()
            masked[element] += np.uint32(count + 1)
        return masked

    fed, total, weight = ffa_round(broker, alter=off)
    q = fed.server.quantization
    expected, expected_weight = fed.plain(FIVE)
    mean = expected / expected_weight
    bound = q.bound(count, expected_weight, float(np.abs(mean).max()))
    error = np.abs(total / weight - mean)
    if where == "a value":
        assert error[element] > bound
        assert np.delete(error, element).max() <= bound
        assert abs(weight - expected_weight) <= count * 0.5 / q.weight_scale
    else:
        assert abs(weight - expected_weight) > count * 0.5 / q.weight_scale
        assert np.abs(total - expected).max() <= count * 0.5 / q.scale * (1 + 1e-6)
    with pytest.raises(AssertionError):
        check_aggregate(fed, total, weight, FIVE)


@pytest.mark.parametrize("stage", ["share", "mask"])
def test_a_dropped_node_s_key_is_rebuilt_and_its_seed_never_asked_for(
    broker: KeyBroker, stage: str
) -> None:
    """One node stops after the share stage (never masks) or masks but its input is lost:
    the result is the survivors' aggregate; the survivors reveal shares of its ``s`` key,
    never of its seed, so its late masked input stays hidden."""
    fed = federation(broker, FIVE, seed=3)
    gone = FIVE[1]
    if stage == "share":
        total, weight = fed.run(stop_share=[gone])
    else:
        total, weight = fed.run(stop_mask=[gone])
    survivors = [n for n in FIVE if n != gone]
    check_aggregate(fed, total, weight, survivors)
    assert fed.server.dropped == (gone,)
    assert sorted(fed.reveals) == survivors
    for node, reveal in fed.reveals.items():
        assert gone not in reveal.seeds
        assert sorted(reveal.seeds) == survivors
        assert list(reveal.keys) == [gone]
        assert fed.nodes[node].revealed_keys == (gone,)
    shares = {r.index: r.keys[gone] for r in fed.reveals.values()}
    rebuilt = X25519PrivateKey.from_private_bytes(combine_secret(shares))
    assert rebuilt.public_key().public_bytes_raw() == fed.server.adverts[gone].s_pk

    # The dropped node would refuse to sign or reveal anything for this split, and its
    # input is refused when it arrives late.
    reason = "named as dropped" if stage == "mask" else "before this node sent"
    with pytest.raises(SecAggRefused, match=reason):
        fed.nodes[gone].check(fed.server.check_request())
    assert fed.nodes[gone].confirmed is None
    request = fed.server.unmask_request()
    assert sorted(request.signatures) == survivors
    with pytest.raises(SecAggRefused, match=reason):
        fed.nodes[gone].unmask(request)
    assert fed.nodes[gone].revealed_seeds is None
    if stage == "mask":
        with pytest.raises(SecAggMessageInvalid):
            fed.server.add_masked(gone, fed.masked[gone])
        # With the rebuilt key the aggregator removes every pair mask of the late input;
        # the self mask (whose seed nobody revealed) still hides the update.
        late = fed.masked[gone].copy()
        for peer in survivors:
            public = X25519PublicKey.from_public_bytes(fed.server.adverts[peer].s_pk)
            shared = rebuilt.exchange(public)
            apply_pair_mask(late, shared, RUN, ROUND, gone, peer, sign=-1)
        assert_hidden(late, fed.quantized(gone))


# -- privacy: what the aggregator sees ------------------------------------------------------------


def assert_hidden(seen: np.ndarray, secret: np.ndarray) -> None:
    """``seen`` (uint32) says nothing visible about ``secret`` (uint32): nearly no element
    is equal, their signed values are uncorrelated, and read as a plain quantized input
    it decodes far from the secret."""
    assert seen.shape == secret.shape
    assert np.mean(seen == secret) < 0.01
    a = seen.view(np.int32).astype(np.float64)
    b = secret.view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.2
    # A masked element is uniform over the 32-bit range, a quantized one within
    # +-(2^31 - 1) / nodes: read as quantized, a masked input is typically 2^30 units
    # (nodes / 2 clip ranges) away from the true one.
    assert np.median(np.abs(a - b)) > 2**28


def test_the_aggregator_sees_no_individual_update(broker: KeyBroker) -> None:
    fed = federation(broker, FIVE, seed=5, spread=1.0)
    fed.run()
    q = fed.server.quantization
    for node in FIVE:
        assert_hidden(fed.masked[node], fed.quantized(node))
        decoded, _ = q.decode(fed.masked[node])
        assert np.median(np.abs(decoded - fed.weights[node] * fed.values[node])) > CLIP
    # Any proper subset of the masked inputs is still masked (the pair masks cancel only
    # in the sum of all of them).
    subset = sum((fed.masked[n] for n in FIVE[:4]), np.zeros(LENGTH + 1, np.uint32))
    assert_hidden(subset, sum((fed.quantized(n) for n in FIVE[:4]), np.zeros_like(subset)))
    # ServerRound kept no node's input: only arrays it computed (the running sum).
    for name, value in vars(fed.server).items():
        if isinstance(value, np.ndarray):
            assert name == "_total"
            assert all(not np.array_equal(value, m) for m in fed.masked.values())


def test_the_shares_the_aggregator_routes_do_not_open_with_any_key_it_holds(
    broker: KeyBroker,
) -> None:
    fed = federation(broker, FIVE, length=8)
    fed.run()
    own = X25519PrivateKey.generate()  # the only X25519 private key the aggregator has
    for sender, bundle in fed.server.bundles.items():
        for recipient, sealed in bundle.shares.items():
            # The recipient opened it, and the plaintext shares do not show in the blob.
            seed_share, key_share = fed.nodes[recipient].held[sender]
            assert seed_share not in sealed
            assert key_share not in sealed
            for public in (
                fed.server.adverts[sender].c_pk,
                fed.server.adverts[recipient].c_pk,
                fed.server.adverts[sender].s_pk,
                fed.server.adverts[recipient].s_pk,
            ):
                with pytest.raises(SecAggMessageInvalid):
                    open_share(
                        own, public, sealed, run=RUN, rnd=ROUND, sender=sender, recipient=recipient
                    )


# -- attacks on the advertisements --------------------------------------------------------------


def _bad_advert(broker: KeyBroker, case: str, victim: NodeRound) -> Advertisement:
    """``victim``'s keys advertised in a way that an attested identity did not sign."""
    genuine = victim.advert
    assert genuine is not None
    key = Ed25519PrivateKey.generate()
    fields: dict[str, Any] = {
        "run": RUN,
        "rnd": ROUND,
        "node": victim.node,
        "c_pk": genuine.c_pk,
        "s_pk": genuine.s_pk,
        "seed_commitment": genuine.seed_commitment,
    }
    if case == "certified for another key":
        cert = broker.certify(Ed25519PrivateKey.generate(), "ueid-x")
    elif case == "a channel certification":
        cert = broker.certify(key, "ueid-x", purpose=PURPOSE_CHANNEL)
    elif case == "a key-release certification":
        cert = broker.certify(key, "ueid-x", purpose=PURPOSE_KEY_RELEASE)
    elif case == "another suite":
        cert = broker.certify(key, "ueid-x", suite="x25519-hkdf-sha256")
    elif case == "another result key":
        cert = KeyBroker.new("impostor").certify(key, "ueid-x")
    elif case == "contraindicated":
        cert = broker.refuse(key)
    elif case == "expired":
        cert = broker.certify(key, "ueid-x", now=NOW - dt.timedelta(hours=1))
    elif case == "no ueid":
        cert = broker.certify(key, "")
    elif case == "another round":
        return Advertisement.sign(
            key, broker.certify(key, "ueid-x"), **{**fields, "rnd": ROUND + 1}
        )
    elif case == "substituted s_pk":
        return dataclasses.replace(
            genuine, s_pk=X25519PrivateKey.generate().public_key().public_bytes_raw()
        )
    elif case == "substituted c_pk":
        return dataclasses.replace(
            genuine, c_pk=X25519PrivateKey.generate().public_key().public_bytes_raw()
        )
    elif case == "substituted seed commitment":
        return dataclasses.replace(genuine, seed_commitment=bytes(32))
    elif case == "another node's signature":
        return dataclasses.replace(genuine, node=genuine.node + 1)
    else:
        raise AssertionError(case)
    return Advertisement.sign(key, cert, **fields)


ADVERT_ATTACKS = [
    "certified for another key",
    "a channel certification",
    "a key-release certification",
    "another suite",
    "another result key",
    "contraindicated",
    "expired",
    "no ueid",
    "another round",
    "substituted s_pk",
    "substituted c_pk",
    "substituted seed commitment",
    "another node's signature",
]


@pytest.mark.parametrize("case", ADVERT_ATTACKS)
def test_an_advertisement_not_signed_by_an_attested_identity_is_refused(
    broker: KeyBroker, case: str
) -> None:
    """Refused by the aggregator (the node is left out) and by every node when a hostile
    aggregator slips it into the share request (no share leaves the node)."""
    fed = federation(broker, FIVE[:4])
    for node in FIVE[:3]:
        fed.server.add_advert(node, fed.nodes[node].advertise().to_bytes())
    victim = fed.nodes[FIVE[3]]
    victim.advertise()
    bad = _bad_advert(broker, case, victim)
    if bad.node == victim.node:
        with pytest.raises(AdvertisementInvalid):
            fed.server.add_advert(bad.node, bad.to_bytes())
    else:  # claimed for its own node id, then for the one it names
        with pytest.raises(SecAggMessageInvalid, match="for node"):
            fed.server.add_advert(victim.node, bad.to_bytes())
        with pytest.raises(AdvertisementInvalid, match="signature does not verify"):
            fed.server.add_advert(bad.node, bad.to_bytes())
    assert sorted(fed.server.adverts) == list(FIVE[:3])

    honest = fed.server.share_request()
    hostile = ShareRequest(RUN, ROUND, (*honest.adverts, bad))
    for node in FIVE[:3]:
        with pytest.raises(AdvertisementInvalid):
            fed.nodes[node].share(ShareRequest.from_bytes(hostile.to_bytes()))
        assert fed.nodes[node].roster == ()
        assert fed.nodes[node].held == {}
    # The refusal leaves the node able to take part in the honest round.
    bundle = fed.nodes[FIVE[0]].share(ShareRequest.from_bytes(honest.to_bytes()))
    assert sorted(bundle.shares) == list(FIVE[1:3])


def test_a_node_refuses_a_share_request_that_swaps_its_own_keys_or_names_it_twice(
    broker: KeyBroker,
) -> None:
    fed = federation(broker, FIVE[:3])
    fed.advertise()
    a, b, c = (fed.nodes[n] for n in FIVE[:3])
    assert b.advert is not None
    assert c.advert is not None
    # One attested identity advertised as two nodes (the aggregator replays b's identity).
    twin = Advertisement.sign(
        b.signer,
        b.certificate,
        run=RUN,
        rnd=ROUND,
        node=FIVE[3],
        c_pk=b.advert.c_pk,
        s_pk=b.advert.s_pk,
        seed_commitment=b.advert.seed_commitment,
    )
    with pytest.raises(SecAggMessageInvalid, match="attested identity"):
        fed.server.add_advert(FIVE[3], twin.to_bytes())
    assert FIVE[3] not in fed.server.adverts
    honest = fed.server.share_request()
    # Without this node's own advertisement, or with an older one of its own.
    with pytest.raises(SecAggRefused, match="own keys"):
        a.share(ShareRequest(RUN, ROUND, honest.adverts[1:]))
    old = node_round(broker, a.node)
    old.signer, old.certificate = a.signer, a.certificate
    with pytest.raises(SecAggRefused, match="own keys"):
        a.share(ShareRequest(RUN, ROUND, (old.advertise(), *honest.adverts[1:])))
    with pytest.raises(SecAggRefused, match="one attested identity"):
        a.share(ShareRequest(RUN, ROUND, (*honest.adverts, twin)))
    # A hostile node copies c's masking key into its own (genuinely signed) advertisement.
    mallory = node_round(broker, FIVE[4])
    mallory.advertise()
    assert mallory.advert is not None
    copy = Advertisement.sign(
        mallory.signer,
        mallory.certificate,
        run=RUN,
        rnd=ROUND,
        node=FIVE[4],
        c_pk=mallory.advert.c_pk,
        s_pk=c.advert.s_pk,
        seed_commitment=mallory.advert.seed_commitment,
    )
    with pytest.raises(SecAggRefused, match="two advertised keys are the same"):
        a.share(ShareRequest(RUN, ROUND, (*honest.adverts, copy)))
    # A roster of one: no sum to hide in.
    with pytest.raises(SecAggRefused, match="fewer than 2"):
        a.share(ShareRequest(RUN, ROUND, honest.adverts[:1]))
    assert a.roster == ()
    a.share(honest)
    with pytest.raises(SecAggRefused, match="second share request"):
        a.share(honest)


def test_the_aggregator_refuses_an_advertisement_that_reuses_another_node_s_keys(
    broker: KeyBroker,
) -> None:
    """A node with its own attested identity advertises another node's ``s`` or ``c``
    public key (in either place): refused, so no two advertised nodes share a masking or
    sealing key. Its own keys, under the same identity, are accepted."""
    fed = federation(broker, FIVE[:3])
    fed.advertise()
    victim = fed.nodes[FIVE[2]].advert
    assert victim is not None
    mallory = node_round(broker, FIVE[3])
    own = mallory.advertise()

    def advert(**keys: bytes) -> Advertisement:
        fields = {"c_pk": own.c_pk, "s_pk": own.s_pk, "seed_commitment": own.seed_commitment}
        return Advertisement.sign(
            mallory.signer,
            mallory.certificate,
            run=RUN,
            rnd=ROUND,
            node=FIVE[3],
            **{**fields, **keys},
        )

    for keys in (
        {"s_pk": victim.s_pk},
        {"c_pk": victim.c_pk},
        {"c_pk": victim.s_pk},
        {"s_pk": victim.c_pk},
    ):
        copy = advert(**keys)
        copy.verify(broker.result_key, now=NOW, run=RUN, rnd=ROUND)  # genuinely signed
        reused = f"keys already advertised as node {FIVE[2]}"
        with pytest.raises(SecAggMessageInvalid, match=reused):
            fed.server.add_advert(FIVE[3], copy.to_bytes())
        assert sorted(fed.server.adverts) == list(FIVE[:3])
    assert fed.server.add_advert(FIVE[3], advert().to_bytes()) == f"ueid-{FIVE[3]}"
    assert fed.server.adverts[FIVE[3]] == own


# -- attacks on the mask stage --------------------------------------------------------------------


@pytest.fixture
def shared(broker: KeyBroker) -> Federation:
    """Five nodes that advertised and shared; nobody has masked yet."""
    fed = federation(broker, FIVE, length=64)
    fed.advertise()
    fed.share()
    return fed


def _mask_request(fed: Federation, node: int, roster: Iterable[int]) -> MaskRequest:
    roster = tuple(sorted(roster))
    shares = {s: fed.server.bundles[s].shares[node] for s in roster if s != node}
    return MaskRequest(RUN, ROUND, roster, shares)


def _flip(blob: bytes, bit: int) -> bytes:
    data = bytearray(blob)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def test_a_node_masks_only_with_an_advertised_roster_and_its_own_shares(shared: Federation) -> None:
    fed, node = shared, FIVE[0]
    state, honest = fed.nodes[node], fed.mask_request(node)
    values, weight = fed.values[node], fed.weights[node]
    others = dict(honest.shares)
    cases: list[tuple[MaskRequest, type[Exception], str]] = [
        (dataclasses.replace(honest, round=ROUND + 1), SecAggRefused, "a request for run"),
        (dataclasses.replace(honest, run=RUN - 1), SecAggRefused, "a request for run"),
        (_mask_request(fed, node, FIVE[1:]), SecAggRefused, "not this node"),
        (
            MaskRequest(RUN, ROUND, tuple(sorted((12345, *FIVE))), others),
            SecAggRefused,
            "did not advertise",
        ),
        (_mask_request(fed, node, FIVE[:2]), SecAggRefused, "fewer than the threshold"),
        (
            dataclasses.replace(honest, shares={s: b for s, b in others.items() if s != FIVE[1]}),
            SecAggRefused,
            "exactly the roster",
        ),
        # a share bit-flipped, in its nonce, its ciphertext or its tag
        *(
            (
                dataclasses.replace(
                    honest, shares={**others, FIVE[2]: _flip(others[FIVE[2]], bit)}
                ),
                SecAggMessageInvalid,
                "does not open",
            )
            for bit in (3, 8 * 12 + 5, 8 * SEALED_SHARE_BYTES - 1)
        ),
        # re-addressed: the share FIVE[2] sealed for FIVE[3], handed to FIVE[0]
        (
            dataclasses.replace(
                honest, shares={**others, FIVE[2]: fed.server.bundles[FIVE[2]].shares[FIVE[3]]}
            ),
            SecAggMessageInvalid,
            "does not open",
        ),
        # reflected: this node's own share for FIVE[2] (the same X25519 agreement) handed
        # back as FIVE[2]'s share for it
        (
            dataclasses.replace(
                honest, shares={**others, FIVE[2]: fed.server.bundles[node].shares[FIVE[2]]}
            ),
            SecAggMessageInvalid,
            "does not open",
        ),
        # FIVE[1]'s share to this node presented as FIVE[2]'s
        (
            dataclasses.replace(honest, shares={**others, FIVE[2]: others[FIVE[1]]}),
            SecAggMessageInvalid,
            "does not open",
        ),
    ]
    for request, error, reason in cases:
        with pytest.raises(error, match=reason):
            state.mask(MaskRequest.from_bytes(request.to_bytes()), values, weight)
        assert state.masked_with == ()
        assert list(state.held) == [node]
    # None of the refusals spent the round: the honest request still works, once.
    state.mask(honest, values, weight)
    assert state.masked_with == FIVE
    with pytest.raises(SecAggRefused, match="second mask request"):
        state.mask(honest, values, weight)


def test_a_share_sealed_for_another_round_or_at_another_index_is_refused(
    shared: Federation,
) -> None:
    """A hostile node's shares: one replayed from another round (its AAD differs), one
    sealed for the right recipient at another Shamir index."""
    fed, node, sender = shared, FIVE[0], FIVE[1]
    honest = fed.mask_request(node)
    peer = fed.nodes[sender]
    assert peer._c is not None
    advert = fed.nodes[node].advert
    assert advert is not None
    secret = bytes(range(32))
    common: dict[str, Any] = {
        "sender": sender,
        "recipient": node,
        "seed_share": secret,
        "key_share": secret,
    }
    target = advert.c_pk
    replayed = seal_share(peer._c, target, run=RUN, rnd=ROUND - 1, index=1, **common)
    misplaced = seal_share(peer._c, target, run=RUN, rnd=ROUND, index=2, **common)
    state = fed.nodes[node]
    with pytest.raises(SecAggMessageInvalid, match="does not open"):
        state.mask(
            dataclasses.replace(honest, shares={**honest.shares, sender: replayed}),
            fed.values[node],
            fed.weights[node],
        )
    with pytest.raises(SecAggRefused, match="another index"):
        state.mask(
            dataclasses.replace(honest, shares={**honest.shares, sender: misplaced}),
            fed.values[node],
            fed.weights[node],
        )
    assert state.masked_with == ()


@pytest.mark.parametrize(
    ("values", "weight"),
    [
        pytest.param(np.full(64, CLIP * 1.0001), 1.0, id="beyond the clip"),
        pytest.param(np.r_[np.zeros(63), -CLIP * 1.5], 1.0, id="below the clip"),
        pytest.param(np.full(64, CLIP * 1.5), 0.7, id="beyond the clip once weighted"),
        pytest.param(np.r_[np.zeros(63), np.nan], 0.5, id="NaN"),
        pytest.param(np.r_[np.zeros(63), np.inf], 0.5, id="Inf"),
        pytest.param(np.zeros(64), 1.0000001, id="weight above 1"),
        pytest.param(np.zeros(64), 0.0, id="weight 0"),
        pytest.param(np.zeros(64), -0.5, id="negative weight"),
        pytest.param(np.zeros(64), math.nan, id="NaN weight"),
        pytest.param(np.zeros(64), math.inf, id="Inf weight"),
    ],
)
def test_an_input_that_could_overflow_the_sum_is_refused_before_anything_is_masked(
    shared: Federation, values: np.ndarray, weight: float
) -> None:
    """QuantizationOverflow before any mask is computed; the node stays unmasked, so the
    round can go on with a valid input (nothing left the node)."""
    fed, node = shared, FIVE[2]
    state = fed.nodes[node]
    with pytest.raises(QuantizationOverflow):
        state.mask(fed.mask_request(node), values, weight)
    assert state.masked_with == ()
    assert list(state.held) == [node]
    fed.mask()
    fed.unmask()
    total, total_weight = fed.server.result()
    check_aggregate(fed, total, total_weight, FIVE)


def test_a_value_at_the_clip_once_weighted_is_accepted(shared: Federation) -> None:
    fed = shared
    fed.values[FIVE[0]] = np.full(64, 2 * CLIP)
    fed.weights[FIVE[0]] = 0.5
    fed.values[FIVE[1]] = np.full(64, -CLIP)
    fed.weights[FIVE[1]] = 1.0
    fed.mask()
    fed.unmask()
    total, weight = fed.server.result()
    check_aggregate(fed, total, weight, FIVE)


# -- attacks on the check and unmask stages -------------------------------------------------------


@pytest.fixture
def masked(shared: Federation) -> Federation:
    """Five nodes that all masked; the aggregator holds every masked input."""
    shared.mask()
    return shared


Nodes = tuple[int, ...]
Split = tuple[Nodes, Nodes]


def _split(survivors: Iterable[int], dropped: Iterable[int]) -> Split:
    return tuple(sorted(survivors)), tuple(sorted(dropped))


def _sign_split(
    fed: Federation,
    signers: Iterable[int],
    survivors: Nodes,
    dropped: Nodes,
    *,
    rnd: int = ROUND,
    roster: Nodes | None = None,
) -> dict[int, bytes]:
    """``signers``' signatures over a split, made with their attested keys directly (not
    through check()): what nodes colluding with the aggregator would sign for any split."""
    data = consistency_bytes(RUN, rnd, fed.ids if roster is None else roster, survivors, dropped)
    return {n: fed.nodes[n].signer.sign(data) for n in signers}


def _checked(fed: Federation, split: Split, signers: Iterable[int]) -> UnmaskRequest:
    """The unmask request for ``split`` with the signatures ``signers`` gave for it in
    check() (each node's own decision), as it arrives."""
    request = CheckRequest.from_bytes(CheckRequest(RUN, ROUND, *split).to_bytes())
    signatures = {n: fed.nodes[n].check(request).signature for n in signers}
    unmask = UnmaskRequest(RUN, ROUND, *split, signatures)
    return UnmaskRequest.from_bytes(unmask.to_bytes())


def test_a_node_signs_and_reveals_nothing_for_a_split_that_could_unmask_a_node(
    masked: Federation,
) -> None:
    """Each hostile split is refused at the check stage (nothing signed) and at the unmask
    stage, even with every other named survivor's signature over it (nodes colluding with
    the aggregator sign anything). No refusal spends the node's one signature."""
    fed, node = masked, FIVE[0]
    state = fed.nodes[node]
    hostile = [
        # a node both surviving and dropped: its seed and its key would both be revealed
        (FIVE, (FIVE[1],), "both surviving and dropped"),
        # a node that masked left out of the split
        (FIVE[:4], (), "not exactly the nodes"),
        # a node this node never masked with named as dropped, or as a survivor
        (FIVE, (12345,), "not exactly the nodes"),
        ((*FIVE, 2**64 - 3), (), "not exactly the nodes"),
        # this node named as dropped (its own key share would be revealed)
        (FIVE[1:], FIVE[:1], "named as dropped"),
        # fewer survivors than the threshold
        (FIVE[:2], FIVE[2:], "fewer than the threshold"),
        # another round
        (FIVE, (), "a request for run"),
    ]
    for i, (survivors, dropped, reason) in enumerate(hostile):
        rnd = ROUND + 1 if reason == "a request for run" else ROUND
        split = _split(survivors, dropped)
        check = CheckRequest(RUN, rnd, *split)
        with pytest.raises(SecAggRefused, match=reason):
            state.check(CheckRequest.from_bytes(check.to_bytes()))
        assert state.confirmed is None, i
        colluders = [n for n in split[0] if n != node and n in fed.nodes]
        signatures = _sign_split(fed, colluders, *split, rnd=rnd)
        request = UnmaskRequest(RUN, rnd, *split, signatures)
        with pytest.raises(SecAggRefused, match=reason):
            state.unmask(UnmaskRequest.from_bytes(request.to_bytes()))
        assert state.revealed_seeds is None, i
        assert state.revealed_keys == ()
    # The honest split is still signed.
    assert state.check(CheckRequest(RUN, ROUND, FIVE, ())).node == node
    assert state.confirmed == (FIVE, ())


def test_a_node_signs_one_split_per_round(masked: Federation) -> None:
    """The signature is over the split with the node's attested key; the same split may
    be asked again (the same signature), a different one is refused although the node's
    rules alone would allow it (a fresh node signs each of them)."""
    fed, node = masked, FIVE[0]
    state = fed.nodes[node]
    first = CheckRequest(RUN, ROUND, FIVE[:4], FIVE[4:])
    signed = state.check(CheckRequest.from_bytes(first.to_bytes()))
    assert (signed.run, signed.round, signed.node) == (RUN, ROUND, node)
    public = Ed25519PublicKey.from_public_bytes(fed.server.adverts[node].signer)
    public.verify(signed.signature, consistency_bytes(RUN, ROUND, FIVE, FIVE[:4], FIVE[4:]))
    assert state.confirmed == (FIVE[:4], FIVE[4:])
    assert state.check(first) == signed
    others = [
        ((FIVE, ()), FIVE[1]),
        ((FIVE[:3], FIVE[3:]), FIVE[2]),
        (_split((FIVE[0], FIVE[2], FIVE[3]), (FIVE[1], FIVE[4])), FIVE[3]),
    ]
    for split, fresh in others:
        request = CheckRequest(RUN, ROUND, *split)
        with pytest.raises(SecAggRefused, match="second, different split"):
            state.check(request)
        assert state.confirmed == (FIVE[:4], FIVE[4:])
        assert fed.nodes[fresh].check(request).node == fresh
        assert fed.nodes[fresh].confirmed == split
    assert state.check(first) == signed


def test_a_node_reveals_only_for_the_split_it_signed_once_the_threshold_signed_it(
    masked: Federation,
) -> None:
    """Four survivors signed one split through check(). The node reveals nothing for a
    split it did not sign (although colluders signed it), with fewer than the threshold
    of signatures, with a signature from a node that is not a survivor, or with one that
    does not verify under that survivor's advertised key over these very bytes; with
    exactly the threshold of good signatures it reveals, once."""
    fed, node = masked, FIVE[0]
    state = fed.nodes[node]
    t = state.threshold
    assert t == 3
    split = _split(FIVE[:4], FIVE[4:])
    other = _split(FIVE, ())
    request = _checked(fed, split, FIVE[:4])
    signed = dict(request.signatures)
    enough = {n: signed[n] for n in FIVE[:t]}
    data = consistency_bytes(RUN, ROUND, FIVE, *split)
    victim, stranger = FIVE[2], Ed25519PrivateKey.generate()
    forged = f"node {victim}'s signature of the split does not verify"
    cases: list[tuple[Split, dict[int, bytes], str]] = [
        # a split this node did not sign, with every other node's signature over it
        (other, _sign_split(fed, FIVE[1:], *other), "not the one this node signed"),
        # too few signatures
        (split, {n: signed[n] for n in FIVE[: t - 1]}, "fewer than the threshold"),
        (split, {}, "fewer than the threshold"),
        # the dropped node's genuine signature over this split, a stranger's
        (split, {**enough, FIVE[4]: fed.nodes[FIVE[4]].signer.sign(data)}, "not a survivor"),
        (split, {**enough, 12345: stranger.sign(data)}, "not a survivor"),
        # forged: signed by another survivor's key, or by a key nobody advertised
        (split, {**enough, victim: fed.nodes[FIVE[1]].signer.sign(data)}, forged),
        (split, {**enough, victim: stranger.sign(data)}, forged),
        # the victim's own key, over another split, round or roster, or its advertisement
        (split, {**enough, **_sign_split(fed, [victim], *other)}, forged),
        (split, {**enough, **_sign_split(fed, [victim], *split, rnd=ROUND + 1)}, forged),
        (split, {**enough, **_sign_split(fed, [victim], *split, roster=FIVE[:4])}, forged),
        (split, {**enough, victim: fed.server.adverts[victim].signature}, forged),
    ]
    for i, (asked, signatures, reason) in enumerate(cases):
        hostile = UnmaskRequest(RUN, ROUND, *asked, signatures)
        with pytest.raises(SecAggRefused, match=reason):
            state.unmask(UnmaskRequest.from_bytes(hostile.to_bytes()))
        assert state.revealed_seeds is None, i
        assert state.revealed_keys == ()
    # A node that signed nothing reveals nothing, whoever else signed.
    late = fed.nodes[FIVE[4]]
    with pytest.raises(SecAggRefused, match="not the one this node signed"):
        late.unmask(UnmaskRequest(RUN, ROUND, *other, _sign_split(fed, FIVE[:4], *other)))
    assert late.revealed_seeds is None
    # Exactly the threshold of good signatures.
    reveal = state.unmask(UnmaskRequest(RUN, ROUND, *split, enough))
    assert sorted(reveal.seeds) == list(FIVE[:4])
    assert sorted(reveal.keys) == [FIVE[4]]
    with pytest.raises(SecAggRefused, match="second unmask request"):
        state.unmask(request)


def test_a_second_unmask_request_with_another_split_is_refused(masked: Federation) -> None:
    """The first split is honoured; a second one (which would give the aggregator the
    other kind of share of the same nodes) is refused and reveals nothing more, even with
    the other survivors' signatures over it."""
    fed, node = masked, FIVE[0]
    state = fed.nodes[node]
    first = _checked(fed, _split(FIVE[:4], FIVE[4:]), FIVE[:3])
    reveal = state.unmask(first)
    assert sorted(reveal.seeds) == list(FIVE[:4])
    assert sorted(reveal.keys) == [FIVE[4]]
    for survivors, dropped in ((FIVE, ()), (FIVE[:3], FIVE[3:])):
        colluders = [n for n in survivors if n != node]
        signatures = _sign_split(fed, colluders, survivors, dropped)
        with pytest.raises(SecAggRefused, match="second unmask request"):
            state.unmask(UnmaskRequest(RUN, ROUND, survivors, dropped, signatures))
    with pytest.raises(SecAggRefused, match="second unmask request"):
        state.unmask(first)
    assert state.revealed_seeds == FIVE[:4]
    assert state.revealed_keys == FIVE[4:]


def test_the_aggregator_fails_closed_with_fewer_than_the_threshold(broker: KeyBroker) -> None:
    """Too few masked inputs: SecAggFailed and no check or unmask request at all; a node
    refuses to sign or to reveal for a split naming fewer survivors than its threshold."""
    fed = federation(broker, FIVE, length=16)
    fed.advertise()
    fed.share()
    t = fed.server.threshold
    assert t == 3
    fed.mask(stop=FIVE[t - 1 :])
    assert len(fed.server.survivors) == t - 1
    for _ in range(2):
        for ask in (fed.server.check_request, fed.server.unmask_request):
            with pytest.raises(SecAggFailed, match="fewer than the threshold"):
                ask()
        assert fed.server._check is None
        assert fed.server._unmask is None
        assert fed.server.dropped == ()
    with pytest.raises(RuntimeError):
        fed.server.result()
    # A node asked anyway (by a hostile aggregator) refuses.
    split = (FIVE[: t - 1], FIVE[t - 1 :])
    signatures = _sign_split(fed, split[0], *split)
    for node in split[0]:
        with pytest.raises(SecAggRefused, match="fewer than the threshold"):
            fed.nodes[node].check(CheckRequest(RUN, ROUND, *split))
        assert fed.nodes[node].confirmed is None
        with pytest.raises(SecAggRefused, match="fewer than the threshold"):
            fed.nodes[node].unmask(UnmaskRequest(RUN, ROUND, *split, signatures))
        assert fed.nodes[node].revealed_seeds is None


def test_the_aggregator_fails_closed_at_every_stage(broker: KeyBroker) -> None:
    lonely = federation(broker, FIVE[:1])
    lonely.advertise()
    with pytest.raises(SecAggFailed, match="fewer than 2"):
        lonely.server.share_request()

    fed = federation(broker, FIVE, length=16)
    fed.advertise()
    fed.share(stop=FIVE[2:])  # two of five shared: below the threshold of 3
    with pytest.raises(SecAggFailed, match="share stage"):
        fed.server.mask_request(FIVE[0])
    assert fed.server.shared == ()

    fed = federation(broker, FIVE, length=16)
    fed.advertise()
    fed.share()
    fed.mask()
    fed.check()
    request = fed.server.unmask_request()
    for node in request.survivors[:2]:
        fed.server.add_reveal(node, fed.nodes[node].unmask(request).to_bytes())
    with pytest.raises(SecAggFailed, match="unmask stage"):
        fed.server.result()


def test_the_aggregator_keeps_only_split_signatures_that_verify_and_needs_the_threshold(
    shared: Federation,
) -> None:
    """A split signature before the check request, from a non-survivor, for another
    node or round, or that does not verify under the survivor's advertised key over the
    checked split is refused and not kept; with fewer good signatures than the threshold
    there is no unmask request; with exactly the threshold the round completes."""
    fed = shared
    server = fed.server
    gone = FIVE[4]
    fed.mask(lose=[gone])
    u, a = FIVE[0], FIVE[1]
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_consistency(u, Consistency(RUN, ROUND, u, bytes(64)).to_bytes())
    checked = server.check_request()
    split = (checked.survivors, checked.dropped)
    assert split == (FIVE[:4], (gone,))
    assert server.check_request() == checked
    # The split is fixed: the lost input arriving now is refused.
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_masked(gone, fed.masked[gone])
    replies = {n: fed.nodes[n].check(checked) for n in checked.survivors}

    def signed_by_u(signature: bytes) -> Consistency:
        return dataclasses.replace(replies[u], signature=signature)

    data = consistency_bytes(RUN, ROUND, FIVE, *split)
    bad: list[tuple[int, Consistency, str]] = [
        (u, signed_by_u(fed.nodes[a].signer.sign(data)), "does not verify"),
        (u, signed_by_u(Ed25519PrivateKey.generate().sign(data)), "does not verify"),
        (u, signed_by_u(_sign_split(fed, [u], FIVE, ())[u]), "does not verify"),
        (u, signed_by_u(_sign_split(fed, [u], *split, rnd=ROUND + 1)[u]), "does not verify"),
        (u, signed_by_u(server.adverts[u].signature), "does not verify"),
        (u, replies[a], "another run, round or node"),
        (u, dataclasses.replace(replies[u], round=ROUND + 1), "another run, round or node"),
        (gone, Consistency(RUN, ROUND, gone, fed.nodes[gone].signer.sign(data)), "may not send"),
        (12345, Consistency(RUN, ROUND, 12345, bytes(64)), "may not send"),
    ]
    for node, message, reason in bad:
        with pytest.raises(SecAggMessageInvalid, match=reason):
            server.add_consistency(node, message.to_bytes())
    assert server.signatures == {}
    t = server.threshold
    for node in FIVE[: t - 1]:
        server.add_consistency(node, replies[node].to_bytes())
    for _ in range(2):
        with pytest.raises(SecAggFailed, match="check stage, fewer than the threshold"):
            server.unmask_request()
        assert server._unmask is None
    server.add_consistency(FIVE[t - 1], replies[FIVE[t - 1]].to_bytes())
    request = UnmaskRequest.from_bytes(server.unmask_request().to_bytes())
    assert (request.survivors, request.dropped) == split
    assert request.signatures == {n: replies[n].signature for n in FIVE[:t]}
    # The unmask request is fixed: a late signature is refused.
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_consistency(FIVE[3], replies[FIVE[3]].to_bytes())
    for node in request.survivors:
        server.add_reveal(node, fed.nodes[node].unmask(request).to_bytes())
    total, weight = server.result()
    check_aggregate(fed, total, weight, FIVE[:4])


def test_key_shares_that_do_not_rebuild_the_advertised_key_fail_the_round(
    broker: KeyBroker,
) -> None:
    fed = federation(broker, FIVE, length=16)
    gone = FIVE[4]
    fed.advertise()
    fed.share()
    fed.mask(stop=[gone])
    fed.check()
    request = fed.server.unmask_request()
    for node in request.survivors:
        reveal = fed.nodes[node].unmask(request)
        if node == FIVE[0]:  # the lowest id: its shares are among those used
            # (not a low bit of the first byte: with indices 1, 2, 3 this share's Lagrange
            # coefficient is 1, and X25519 clamps those bits away)
            reveal = dataclasses.replace(reveal, keys={gone: _flip(reveal.keys[gone], 85)})
        fed.server.add_reveal(node, reveal.to_bytes())
    with pytest.raises(SecAggFailed, match="do not rebuild"):
        fed.server.result()


def test_a_wrong_seed_share_is_detected(masked: Federation) -> None:
    """Every advertisement commits its node's self-mask seed; a seed rebuilt from a wrong
    share does not match it, and the round fails instead of silently spoiling the sum."""
    fed = masked
    for node, state in fed.nodes.items():
        assert state.advert is not None
        assert state.advert.seed_commitment == seed_commitment(state._seed, RUN, ROUND, node)
        assert fed.server.adverts[node].seed_commitment == state.advert.seed_commitment
    fed.check()
    request = fed.server.unmask_request()
    for node in request.survivors:
        reveal = fed.nodes[node].unmask(request)
        if node == FIVE[0]:  # the lowest id: its shares are among those used
            reveal = dataclasses.replace(
                reveal, seeds={**reveal.seeds, FIVE[3]: _flip(reveal.seeds[FIVE[3]], 0)}
            )
        fed.server.add_reveal(node, reveal.to_bytes())
    with pytest.raises(SecAggFailed, match=f"survivor {FIVE[3]}'s committed seed"):
        fed.server.result()


U, A, B, C, D = FIVE
# A hostile aggregator's plan: the mask roster it shows each node (all five unless named),
# the survivors and dropped it tells each node, and whose sum it recovers from the reveals.
# Every node's own checks pass: its split is exactly its mask roster, it survives, and
# so do at least three (the threshold). Each node it wants unmasked is told surviving by
# three nodes (its seed), and each of their mask partners dropped by three (its s key).
VIEW_ATTACKS: dict[str, tuple[dict[int, Nodes], dict[int, Split], Nodes]] = {
    # U masks only with A and B; A's and B's keys are asked of three nodes each.
    "one node isolated": (
        {U: (U, A, B)},
        {
            U: ((U, A, B), ()),
            A: ((A, U, C), (B, D)),
            B: ((B, U, C), (A, D)),
            C: ((C, D, U), (A, B)),
            D: ((D, U, C), (A, B)),
        },
        (U,),
    ),
    # Everyone masks with everyone; still the sum of two nodes, below the threshold.
    "two of five summed": (
        {},
        {
            U: ((U, D, A), (B, C)),
            D: ((D, U, B), (A, C)),
            A: ((A, U, D), (B, C)),
            B: ((B, U, D), (A, C)),
            C: ((C, U, D), (A, B)),
        },
        (U, D),
    ),
}


def _recover(
    fed: Federation, rosters: Mapping[int, Nodes], targets: Nodes, reveals: Iterable[Reveal]
) -> tuple[np.ndarray, np.ndarray]:
    """What the aggregator rebuilds from ``reveals`` for the sum of ``targets``' inputs,
    and that sum's true quantized value."""
    reveals = list(reveals)
    size = fed.length + 1
    recovered = np.zeros(size, np.uint32)
    secret = np.zeros(size, np.uint32)
    for x in targets:
        recovered += fed.masked[x]
        secret += fed.quantized(x)
        seeds = {r.index: r.seeds[x] for r in reveals if x in r.seeds}
        recovered -= self_mask(combine_secret(seeds), RUN, ROUND, x, size)
        public = X25519PublicKey.from_public_bytes(fed.server.adverts[x].s_pk)
        for y in rosters.get(x, FIVE):
            if y not in targets:
                keys = {r.index: r.keys[y] for r in reveals if y in r.keys}
                key = X25519PrivateKey.from_private_bytes(combine_secret(keys))
                apply_pair_mask(recovered, key.exchange(public), RUN, ROUND, x, y, sign=-1)
    return recovered, secret


@pytest.mark.parametrize("attack", list(VIEW_ATTACKS))
def test_inconsistent_views_unmask_no_node_and_no_small_sum(broker: KeyBroker, attack: str) -> None:
    """The hostile aggregator shows each node its own mask roster and split (the plan
    would work: the shares each node would reveal for its split rebuild the targets'
    sum). Each node signs the split it is told, as its rules allow, but it signs only one
    split, so no split gathers the threshold of signatures; every node then refuses to
    reveal, whether it gets the signatures over its own split (too few) or every
    survivor's signature over whatever that survivor signed (they do not verify)."""
    rosters, plan, targets = VIEW_ATTACKS[attack]
    told = {node: _split(*split) for node, split in plan.items()}
    fed = federation(broker, FIVE, length=32, spread=1.0)
    fed.advertise()
    fed.share()
    t = fed.server.threshold
    for node in FIVE:
        mask = _mask_request(fed, node, rosters.get(node, FIVE))
        fed.masked[node] = fed.nodes[node].mask(mask, fed.values[node], fed.weights[node])
    # The control: had each node revealed for its own split, the aggregator would hold
    # the targets' sum (one update, or fewer than the threshold of them).
    would = [
        Reveal(
            RUN,
            ROUND,
            node,
            share_index(FIVE, node),
            {u: fed.nodes[node].held[u][0] for u in survivors},
            {d: fed.nodes[node].held[d][1] for d in dropped},
        )
        for node, (survivors, dropped) in told.items()
    ]
    recovered, secret = _recover(fed, rosters, targets, would)
    assert np.array_equal(recovered, secret)
    assert len(targets) < t

    # The check stage: each node signs the split it is told (its own rules pass).
    signed: dict[int, bytes] = {}
    for node, split in told.items():
        request = CheckRequest.from_bytes(CheckRequest(RUN, ROUND, *split).to_bytes())
        signed[node] = fed.nodes[node].check(request).signature
    signers = {split: [n for n in FIVE if told[n] == split] for split in told.values()}
    assert len(signers) > 1
    assert all(len(nodes) < t for nodes in signers.values())
    # Nobody signs a second split, so no split gets more signatures.
    for split, nodes in signers.items():
        for node in FIVE:
            if node not in nodes:
                with pytest.raises(SecAggRefused, match="second, different split"):
                    fed.nodes[node].check(CheckRequest(RUN, ROUND, *split))
                assert fed.nodes[node].confirmed == told[node]

    # The unmask stage: nobody reveals.
    for node, split in told.items():
        state = fed.nodes[node]
        own = {n: signed[n] for n in signers[split]}
        with pytest.raises(SecAggRefused, match="fewer than the threshold"):
            state.unmask(UnmaskRequest(RUN, ROUND, *split, own))
        mixed = {n: signed[n] for n in split[0]}
        assert len(mixed) >= t
        with pytest.raises(SecAggRefused, match="signature of the split does not verify"):
            state.unmask(UnmaskRequest(RUN, ROUND, *split, mixed))
    for state in fed.nodes.values():
        assert state.revealed_seeds is None
        assert state.revealed_keys == ()


# -- the aggregator's own checks of what nodes send --------------------------------------------


def test_the_aggregator_refuses_messages_out_of_place(
    shared: Federation, broker: KeyBroker
) -> None:
    fed = shared
    server = fed.server
    fed.mask(lose=FIVE[:1])
    u, a = FIVE[0], FIVE[1]
    # stage 1 and 2 messages after their stage
    advert = fed.nodes[u].advert
    assert advert is not None
    with pytest.raises(SecAggMessageInvalid, match="after the share stage"):
        server.add_advert(u, advert.to_bytes())
    bundle = ShareBundle(RUN, ROUND, u, dict(server.bundles[u].shares))
    with pytest.raises(SecAggMessageInvalid, match="outside the share stage"):
        server.add_shares(u, bundle.to_bytes())
    # masked inputs of the wrong type or size, from a stranger, or twice
    good = fed.masked[u]
    for bad in (
        good.astype(np.int64),
        good.astype(np.float64),
        good[:-1],
        np.r_[good, good[:1]],
        good.reshape(1, -1),
    ):
        with pytest.raises(SecAggMessageInvalid, match="uint32"):
            server.add_masked(u, bad)
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_masked(12345, good)
    assert sorted(server.survivors) == list(FIVE[1:])
    server.add_masked(u, good)
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_masked(u, good)
    # reveals: at another index, for other nodes, for another node, from a non-survivor
    fed.check()
    request = server.unmask_request()
    reveal = fed.nodes[u].unmask(request)
    for wrong, reason in (
        (dataclasses.replace(reveal, index=reveal.index + 1), "another node's share index"),
        (dataclasses.replace(reveal, seeds=dict(list(reveal.seeds.items())[1:])), "other nodes"),
        (dataclasses.replace(reveal, keys={a: reveal.seeds[a]}), "other nodes"),
        (dataclasses.replace(reveal, node=a), "another run, round or node"),
        (dataclasses.replace(reveal, round=ROUND + 1), "another run, round or node"),
    ):
        with pytest.raises(SecAggMessageInvalid, match=reason):
            server.add_reveal(u, wrong.to_bytes())
    with pytest.raises(SecAggMessageInvalid, match="may not send"):
        server.add_reveal(12345, reveal.to_bytes())
    assert server.reveals == {}

    # before the share stage: a node advertising for another node; shares from a stranger
    fresh = federation(broker, FIVE[:3], length=4)
    fresh.advertise()
    first = fresh.nodes[FIVE[0]].advert
    assert first is not None
    with pytest.raises(SecAggMessageInvalid, match="for node"):
        fresh.server.add_advert(FIVE[1], first.to_bytes())
    assert fresh.server.adverts[FIVE[1]].node == FIVE[1]
    fresh.share()
    shares = fresh.server.bundles[FIVE[0]]
    with pytest.raises(SecAggMessageInvalid, match="outside the share stage"):
        fresh.server.add_shares(12345, shares.to_bytes())
    with pytest.raises(SecAggMessageInvalid, match="another run, round or node"):
        fresh.server.add_shares(FIVE[1], shares.to_bytes())
    partial = ShareBundle(RUN, ROUND, FIVE[0], {FIVE[1]: shares.shares[FIVE[1]]})
    with pytest.raises(SecAggMessageInvalid, match="exactly the other nodes"):
        fresh.server.add_shares(FIVE[0], partial.to_bytes())


def test_a_node_keeps_to_the_order_of_stages(broker: KeyBroker) -> None:
    fed = federation(broker, FIVE[:3], length=4)
    state = fed.nodes[FIVE[0]]
    with pytest.raises(SecAggRefused, match="before this node advertised"):
        state.share(ShareRequest(RUN, ROUND, ()))
    with pytest.raises(SecAggRefused, match="before shares"):
        state.mask(MaskRequest(RUN, ROUND, FIVE[:3], {}), np.zeros(4), 1.0)
    for _ in range(2):
        with pytest.raises(SecAggRefused, match="before this node sent"):
            state.check(CheckRequest(RUN, ROUND, FIVE[:3], ()))
        with pytest.raises(SecAggRefused, match="before this node sent"):
            state.unmask(UnmaskRequest(RUN, ROUND, FIVE[:3], ()))
        if state.advert is None:
            fed.advertise()
            with pytest.raises(SecAggRefused, match="already advertised"):
                state.advertise()
            fed.share()
    assert state.confirmed is None
    assert state.revealed_seeds is None


# -- wire formats ----------------------------------------------------------------------------------


@functools.cache
def _samples() -> dict[str, tuple[Callable[[bytes], Any], bytes]]:
    """One real message of each type (from a round with a dropped node), as wire bytes,
    with its parser."""
    fed = federation(KeyBroker.new("wire"), FIVE[:4], length=4)
    fed.advertise()
    share_request = fed.server.share_request()
    fed.share()
    mask_request = fed.server.mask_request(FIVE[0])
    fed.mask(stop=FIVE[3:])
    unmask_request = fed.unmask()
    check_request = fed.server.check_request()
    consistency = fed.nodes[FIVE[0]].check(check_request)  # the same split again
    advert = fed.nodes[FIVE[0]].advert
    assert advert is not None
    return {
        "advertisement": (Advertisement.from_json, advert.to_bytes()),
        "share request": (ShareRequest.from_bytes, share_request.to_bytes()),
        "share bundle": (ShareBundle.from_bytes, fed.server.bundles[FIVE[0]].to_bytes()),
        "mask request": (MaskRequest.from_bytes, mask_request.to_bytes()),
        "check request": (CheckRequest.from_bytes, check_request.to_bytes()),
        "consistency": (Consistency.from_bytes, consistency.to_bytes()),
        "unmask request": (UnmaskRequest.from_bytes, unmask_request.to_bytes()),
        "reveal": (Reveal.from_bytes, fed.reveals[FIVE[0]].to_bytes()),
    }


INT_FIELDS = {"run", "round", "node", "index"}
BLOB_FIELDS = {"c_pk": 32, "s_pk": 32, "b_commit": 32, "signer": 32, "sig": 64}
NODE_LISTS = {"roster", "survivors", "dropped"}
PAIR_LISTS = {"shares": SEALED_SHARE_BYTES, "seeds": 32, "keys": 32, "signatures": 64}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bad_ints(key: str) -> Iterator[Any]:
    yield from (-1, 2**64, 10**400, True, False, 1.0, "1", None, [1])
    if key == "index":
        yield MAX_NODES + 1


def _bad_blobs(size: int) -> Iterator[Any]:
    yield from (
        _b64(bytes(size - 1)),
        _b64(bytes(size + 1)),
        _b64(b""),
        "*not base64*",
        _b64(bytes(size))[:-1],
        7,
        None,
        [_b64(bytes(size))],
    )


def _mutations(message: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Hostile variants of one message's JSON object, each of which its parser refuses."""
    for key in message:
        yield f"without {key}", {k: v for k, v in message.items() if k != key}
    yield "an extra key", {**message, "extra": 1}
    yield "another format", {**message, "format": "ark-secagg/2"}
    yield "format as a number", {**message, "format": 1}
    yield "a list", [message]
    if "stage" in message:
        stage = "advertise" if message["stage"] != "advertise" else "share"
        yield "another stage", {**message, "stage": stage}
    for key, value in message.items():
        if key in INT_FIELDS:
            for bad in _bad_ints(key):
                yield f"{key} = {bad!r:.20}", {**message, key: bad}
        elif key in BLOB_FIELDS:
            for bad in _bad_blobs(BLOB_FIELDS[key]):
                yield f"{key} = {bad!r:.20}", {**message, key: bad}
        elif key in NODE_LISTS:
            nodes = value or [5, 6]
            variants: dict[str, Any] = {
                "unsorted": [*nodes[1:], nodes[0]] if len(nodes) > 1 else [9, 5],
                "repeated": [nodes[0], *nodes],
                "negative": [-1, *nodes],
                "bool": [True],
                "huge": [2**64],
                "float": [1.0],
                "not a list": {"1": 1},
                "too long": list(range(MAX_NODES + 1)),
            }
            for label, bad in variants.items():
                yield f"{key} {label}", {**message, key: bad}
        elif key in PAIR_LISTS:
            pairs = value or [[5, _b64(bytes(PAIR_LISTS[key]))]]
            node, blob = pairs[0]
            variants = {
                "repeated": [pairs[0], *pairs],
                "unsorted": [*pairs[1:], pairs[0]] if len(pairs) > 1 else None,
                "a triple": [[node, blob, blob], *pairs[1:]],
                "a dict": [{"node": node, "blob": blob}],
                "node as bool": [[True, blob]],
                "node huge": [[2**64, blob]],
                "not a list": {str(node): blob},
            }
            variants.update(
                {
                    f"blob {bad!r:.12}": [[node, bad], *pairs[1:]]
                    for bad in _bad_blobs(PAIR_LISTS[key])
                }
            )
            for label, bad in variants.items():
                if bad is not None:
                    yield f"{key} {label}", {**message, key: bad}
        elif key == "cert":
            for bad in ("", "x" * (MAX_CERTIFICATE + 1), 5, None, ["a"]):
                yield f"cert = {bad!r:.20}", {**message, key: bad}
        elif key == "adverts":
            first = value[0]
            variants = {
                "unsorted": [*value[1:], first],
                "repeated": [first, *value],
                "not a list": {"a": first},
                "an advert a list": [list(first)],
                "an advert without sig": [
                    {k: v for k, v in first.items() if k != "sig"},
                    *value[1:],
                ],
                "an advert of another format": [{**first, "format": "x"}, *value[1:]],
                "an advert's node a bool": [{**first, "node": True}, *value[1:]],
                "an advert's s_pk short": [{**first, "s_pk": _b64(bytes(31))}, *value[1:]],
            }
            for label, bad in variants.items():
                yield f"adverts {label}", {**message, key: bad}


RAW_GARBAGE = [
    b"",
    b"not json",
    b"\xff\xfe{}",
    b"null",
    b"[]",
    b'"ark-secagg/1"',
    b"[" * 5000 + b"]" * 5000,
    b'{"format": NaN}',
    b'{"format": "ark-secagg/1", "format": "ark-secagg/1"}',
    b'{"format": "\\ud800"}',
]


KINDS = [
    "advertisement",
    "share request",
    "share bundle",
    "mask request",
    "check request",
    "consistency",
    "unmask request",
    "reveal",
]


@pytest.mark.parametrize("kind", KINDS)
def test_each_wire_format_round_trips_and_refuses_malformed_input(kind: str) -> None:
    parse, raw = _samples()[kind]
    message = parse(raw)
    again = message.to_bytes()
    assert again == raw
    assert parse(again) == message
    value = json.loads(raw)
    missed = []
    count = 0
    for label, bad in _mutations(value):
        count += 1
        try:
            parse(json.dumps(bad).encode())
        except SecAggMessageInvalid:
            continue
        missed.append(label)
    for garbage in RAW_GARBAGE:
        count += 1
        try:
            parse(garbage)
        except SecAggMessageInvalid:
            continue
        missed.append(repr(garbage[:20]))
    assert not missed, f"{kind}: parsed although malformed: {missed}"
    assert count > 20


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, database=None)
@given(kind=st.sampled_from(KINDS), key=st.integers(0, 8), replacement=_JSON)
def test_a_parser_returns_or_refuses_with_its_own_error(
    kind: str, key: int, replacement: Any
) -> None:
    """Any one field replaced by any JSON value: the parser returns a message that
    serializes back to what it read, or raises SecAggMessageInvalid, nothing else."""
    parse, raw = _samples()[kind]
    value = json.loads(raw)
    name = sorted(value)[key % len(value)]
    value[name] = replacement
    data = json.dumps(value).encode()
    try:
        message = parse(data)
    except SecAggMessageInvalid:
        return
    assert parse(message.to_bytes()) == message


def test_a_node_reply_is_parsed_by_the_stage_it_names() -> None:
    """Share bundles, split signatures and reveals come back as what they are; the
    aggregator's requests of the same stages (other keys) are no reply."""
    samples = _samples()
    replies = {"share bundle": ShareBundle, "consistency": Consistency, "reveal": Reveal}
    for kind, cls in replies.items():
        parse, raw = samples[kind]
        reply = node_reply(raw)
        assert type(reply) is cls
        assert reply == parse(raw)
    for kind in ("share request", "check request", "unmask request", "advertisement"):
        with pytest.raises(SecAggMessageInvalid):
            node_reply(samples[kind][1])


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.binary(max_size=64))
def test_bytes_that_are_no_message_are_refused(data: bytes) -> None:
    for parse, _ in _samples().values():
        with pytest.raises(SecAggMessageInvalid):
            parse(data)


# -- thresholds and quantization ---------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.6, 2 / 3, 0.7, 0.9, 1.0, 1.5])
def test_the_threshold_is_a_strict_majority_and_respects_the_fraction(fraction: float) -> None:
    for nodes in [*range(1, 130), 999, 1000, 1001, MAX_NODES]:
        t = threshold(nodes, fraction)
        assert 1 <= t <= nodes
        assert 2 * t > nodes  # no two disjoint sets of t
        if nodes >= 2:
            assert t >= 2
        # at least the fraction (exact rational arithmetic), and no more than needed
        wanted = math.ceil(Fraction(fraction).limit_denominator(1000) * nodes)
        assert t >= min(nodes, wanted)
        assert t == min(nodes, max(nodes // 2 + 1, wanted, 2))


def test_the_threshold_of_round_fractions_has_no_float_error() -> None:
    assert threshold(5, 0.6) == 3  # 0.6 * 5 is 3.0000000000000004 in floats
    assert threshold(10, 0.7) == 7  # 7.000000000000001
    assert threshold(100, 0.29) == 51
    assert threshold(3, 0.6) == 2
    assert threshold(2, 0.0) == 2
    for bad in (0, -1):
        with pytest.raises(ValueError, match="threshold"):
            threshold(bad, 0.6)


NODE_COUNTS = [1, 2, 3, 4, 5, 7, 10, 13, 28, 100, 333, 1000, 4097, MAX_NODES]
CLIPS = [1e-6, 0.001, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0, 2.5, 3.3, 4.0, 7.5, 10.0, 1e3, 1e5]


def test_n_values_at_the_clip_never_overflow_the_32_bit_sum() -> None:
    """For every node count and clip: n * clip * scale fits, and so does the sum of n
    values at +clip or -clip after rounding (the encoded integers, summed exactly)."""
    for clip in CLIPS:
        for nodes in [*NODE_COUNTS, *range(1, 60)]:
            q = Quantization(clip, nodes)
            assert nodes * clip * q.scale <= INT32_MAX
            assert nodes * q.weight_scale <= INT32_MAX
            encoded = q.encode(np.array([clip, -clip, clip * (1 - 1e-12)]), 1.0)
            signed = encoded.view(np.int32).astype(np.int64)
            assert nodes * signed[:3].max() <= INT32_MAX, (clip, nodes)
            assert nodes * signed[:3].min() >= -INT32_MAX, (clip, nodes)
            assert nodes * signed[3] <= INT32_MAX
            # and the sum mod 2^32 of n such inputs decodes to n * clip
            total = (encoded.astype(np.uint64) * nodes % 2**32).astype(np.uint32)
            values, weight = q.decode(total)
            assert values[0] == pytest.approx(nodes * clip, rel=1e-6, abs=nodes / q.scale)
            assert values[1] == pytest.approx(-nodes * clip, rel=1e-6, abs=nodes / q.scale)
            assert weight == pytest.approx(nodes, rel=1e-6)


@pytest.mark.parametrize(("clip", "count"), [(0.5, 2), (1.5, 4), (0.1, 4)])
def test_every_node_at_the_clip_sums_without_wrapping(
    broker: KeyBroker, clip: float, count: int
) -> None:
    """The whole protocol with every value at +clip or -clip and every weight 1: the sum
    is count * clip, not wrapped around to the other end of the 32-bit range (with a
    scale of floor((2^31 - 1) / (count * clip)) these cases wrapped by one unit)."""
    ids = FIVE[:count]
    values = {n: np.array([clip, -clip, clip, 0.0]) for n in ids}
    fed = federation(
        broker, ids, length=4, clip=clip, values=values, weights=dict.fromkeys(ids, 1.0)
    )
    total, weight = fed.run()
    check_aggregate(fed, total, weight, ids)
    assert total[:3] == pytest.approx([count * clip, -count * clip, count * clip], rel=1e-6)


def test_quantization_refuses_what_it_cannot_represent() -> None:
    for clip, nodes in (
        (0.0, 3),
        (-1.0, 3),
        (math.nan, 3),
        (math.inf, 3),
        (4.0, 0),
        (4.0, MAX_NODES + 1),
        (1e9, 10),
    ):
        with pytest.raises(QuantizationOverflow):
            Quantization(clip, nodes)


@settings(max_examples=40, deadline=None, database=None)
@given(
    nodes=st.integers(1, MAX_NODES),
    clip=st.floats(1e-6, 1e4),
    weight=st.floats(1e-6, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_inverts_encode_within_half_a_step(
    nodes: int, clip: float, weight: float, seed: int
) -> None:
    q = Quantization(clip, nodes)
    values = np.random.default_rng(seed).uniform(-clip, clip, 50)
    values[:2] = (clip, -clip)
    decoded, decoded_weight = q.decode(q.encode(values, weight))
    assert np.abs(decoded - values * weight).max() <= 0.5 / q.scale * (1 + 1e-6)
    assert abs(decoded_weight - weight) <= 0.5 / q.weight_scale * (1 + 1e-6)


def test_shamir_shares_rebuild_with_any_threshold_and_not_with_fewer() -> None:
    secret = bytes(range(100, 132))
    shares = split_secret(secret, 3, 5)
    assert len(shares) == 5
    assert all(len(s) == 32 for s in shares)
    for picked in ((1, 2, 3), (5, 1, 4), (2, 3, 4, 5)):
        assert combine_secret({i: shares[i - 1] for i in picked}) == secret
    assert combine_secret({1: shares[0], 2: shares[1]}) != secret
    with pytest.raises(ValueError, match="32 bytes"):
        split_secret(secret[:31], 3, 5)


# -- nobody dropped: the unsigned split ----------------------------------------------------------


def test_with_nobody_dropped_the_round_unmasks_without_the_check_stage(broker: KeyBroker) -> None:
    """No node dropped: the aggregator skips the check, every node reveals seed shares
    only (of exactly the nodes it masked with), and the sum is exact."""
    fed = federation(broker, FIVE)
    fed.advertise()
    fed.share()
    fed.mask()
    assert not fed.server.needs_check
    request = UnmaskRequest.from_bytes(fed.server.unmask_request().to_bytes())
    assert request.dropped == ()
    assert dict(request.signatures) == {}
    for node in request.survivors:
        reveal = fed.nodes[node].unmask(request)
        assert dict(reveal.keys) == {}
        assert set(reveal.seeds) == set(FIVE)
        fed.server.add_reveal(node, reveal.to_bytes())
    total, weight = fed.server.result()
    plain, plain_weight = fed.plain(FIVE)
    assert np.abs(total - plain).max() <= len(FIVE) * 0.5 / fed.server.quantization.scale + 1e-12
    assert weight == pytest.approx(plain_weight, abs=1e-6)


def test_an_unsigned_split_is_refused_when_it_drops_a_node_or_the_node_signed_another(
    broker: KeyBroker,
) -> None:
    """Masking-key shares never leave without the threshold of signatures; a node that
    signed a split (naming a node dropped) refuses the unsigned one, and a node that
    revealed for the unsigned split signs no other."""
    fed = federation(broker, FIVE)
    fed.advertise()
    fed.share()
    fed.mask()
    u, a, b = FIVE[0], FIVE[1], FIVE[2]
    dropping = UnmaskRequest(RUN, ROUND, FIVE[:4], FIVE[4:])
    with pytest.raises(SecAggRefused, match="not the one this node signed"):
        fed.nodes[u].unmask(dropping)
    assert fed.nodes[u].revealed_seeds is None
    fed.nodes[a].check(CheckRequest(RUN, ROUND, FIVE[:4], FIVE[4:]))
    with pytest.raises(SecAggRefused, match="not the one this node signed"):
        fed.nodes[a].unmask(UnmaskRequest(RUN, ROUND, FIVE, ()))
    assert fed.nodes[a].revealed_seeds is None
    fed.nodes[b].unmask(UnmaskRequest(RUN, ROUND, FIVE, ()))
    with pytest.raises(SecAggRefused, match="second, different split"):
        fed.nodes[b].check(CheckRequest(RUN, ROUND, FIVE[:4], FIVE[4:]))


def test_unsigned_and_signed_splits_together_never_unmask_a_node(broker: KeyBroker) -> None:
    """A hostile aggregator asks some nodes for the unsigned split (seed shares of
    everyone) and has the others sign a split that drops the target (its masking-key
    share): with a strict-majority threshold the two groups cannot both reach it."""
    fed = federation(broker, FIVE)
    fed.advertise()
    fed.share()
    fed.mask()
    target = FIVE[0]
    seeds: dict[int, bytes] = {}
    keys: dict[int, bytes] = {}
    unsigned = UnmaskRequest(RUN, ROUND, FIVE, ())
    signed_split = (FIVE[1:], (target,))
    signers = FIVE[2:]  # three nodes: the threshold of five
    for node in FIVE[:2]:  # the target itself and one more reveal for the unsigned split
        reveal = fed.nodes[node].unmask(unsigned)
        seeds[reveal.index] = reveal.seeds[target]
    for node in signers:
        fed.nodes[node].check(CheckRequest(RUN, ROUND, *signed_split))
    request = _checked(fed, signed_split, signers)
    for node in signers:
        reveal = fed.nodes[node].unmask(request)
        assert target not in reveal.seeds
        keys[reveal.index] = reveal.keys[target]
    threshold = fed.nodes[target].threshold
    assert len(keys) >= threshold  # its masking key is out
    assert len(seeds) < threshold  # but its seed never reaches the threshold
    for node in FIVE[:2]:  # and no node that revealed reveals again
        with pytest.raises(SecAggRefused, match="revealed once"):
            fed.nodes[node].unmask(request)


# -- the egress guard: each stage's reply carries that stage's answer only -------------------


def test_the_egress_guard_lets_each_stage_answer_only_its_own_kind(broker: KeyBroker) -> None:
    """A share bundle may leave only as the share stage's answer, a signature only as the
    check stage's, a reveal only as the unmask stage's; the sealed input and metrics only
    in the mask stage's reply; a query that names no stage lets nothing out."""
    from flwr.app import ConfigRecord, RecordDict

    from clients.egress import check_reply
    from sandbox.config import EgressPolicy
    from sandbox.errors import EgressViolation
    from sandbox.protocol import (
        SEALED_KEY,
        SEALED_UPDATE_KEY,
        SECAGG_KEY,
        SECAGG_MESSAGE_TYPE,
        secagg_record,
    )

    fed = federation(broker, FIVE)
    fed.advertise()
    request = fed.server.share_request()
    bundle = fed.nodes[FIVE[0]].share(ShareRequest.from_bytes(request.to_bytes()))
    fed.server.add_shares(FIVE[0], bundle.to_bytes())
    policy = EgressPolicy()
    content = RecordDict({SECAGG_KEY: secagg_record(bundle.to_bytes())})
    check_reply(content, policy, SECAGG_MESSAGE_TYPE, stage=STAGE_SHARE)  # its own stage
    for stage in (STAGE_CHECK, STAGE_UNMASK, STAGE_MASK, None):
        with pytest.raises(EgressViolation):
            check_reply(content, policy, SECAGG_MESSAGE_TYPE, stage=stage)
    sealed = RecordDict({SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: b"\0" * 64})})
    check_reply(sealed, policy, SECAGG_MESSAGE_TYPE, stage=STAGE_MASK)
    for stage in (STAGE_SHARE, STAGE_CHECK, STAGE_UNMASK):
        with pytest.raises(EgressViolation, match="may not leave"):
            check_reply(sealed, policy, SECAGG_MESSAGE_TYPE, stage=stage)
