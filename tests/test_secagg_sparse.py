"""Sparse secure aggregation (Bell et al., CCS 2020): the mask graph, its parameters, and
rounds over it, with the real state machines of tests/test_secagg.py.

The rounds use looser targets than a deployment (``SPARSE``: k = 8, t = 6 at 60 nodes) so
that a few dozen nodes make a sparse graph; every party derives the same graph from the
advertisements it verified. The attack tests play a hostile aggregator or node and check
the typed refusal and that nothing was revealed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import struct
from collections.abc import Iterator
from fractions import Fraction
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandbox.errors import SecAggFailed, SecAggMessageInvalid, SecAggRefused
from sandbox.secagg import (
    CORRECTNESS_BITS,
    CORRUPT_RATE,
    DROPOUT_RATE,
    GRINDING_BITS,
    SECURITY_BITS,
    SPARSE_MIN_NODES,
    CheckRequest,
    MaskGraph,
    MaskRequest,
    Reveal,
    ShareBundle,
    ShareRequest,
    UnmaskRequest,
    _below,
    combine_secret,
    consistency_bytes,
    graph_parameters,
    graph_seed,
    neighbours,
    ring_order,
    share_index,
    split_secret,
    threshold,
)
from server.secagg import ServerRound
from tests.test_secagg import (
    CLIP,
    FRACTION,
    LENGTH,
    ROUND,
    RUN,
    Federation,
    KeyBroker,
    _frozen,
    check_aggregate,
    federation,
    random_ids,
)

SPARSE = functools.partial(
    graph_parameters,
    dropout=0.02,
    corrupt=0.01,
    correctness_bits=5,
    security_bits=5,
    min_nodes=20,
    collusion_floor=False,
)
COUNT = 60


@pytest.fixture(scope="module")
def broker() -> KeyBroker:
    return KeyBroker.new()


def sparse(broker: KeyBroker, count: int = COUNT, seed: int = 1) -> Federation:
    return federation(broker, random_ids(count, seed=seed), seed=seed, parameters=SPARSE)


@pytest.fixture(scope="module")
def advertised(broker: KeyBroker) -> Federation:
    """Sixty nodes that advertised (shared fixture: tests only read it)."""
    fed = sparse(broker)
    fed.advertise()
    fed.server.share_request()
    return fed


def _graph(fed: Federation) -> MaskGraph:
    graph = fed.server.graph
    assert graph is not None
    return graph


# -- the graph ---------------------------------------------------------------------------------


def _independent_order(seed: bytes, nodes: list[int]) -> list[int]:
    """The documented construction from the primitives: Fisher-Yates over the sorted ids
    with indices from ChaCha20 under HKDF-SHA256(seed, salt ark/v1/secagg, info
    ark/v1/secagg/graph-order), little-endian 32-bit words, rejection above the largest
    multiple of the bound."""
    key = HKDF(hashes.SHA256(), 32, b"ark/v1/secagg", b"ark/v1/secagg/graph-order\0").derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    words = iter(struct.unpack("<4096I", stream.update(bytes(4 * 4096))))
    order = list(nodes)
    for i in range(len(order) - 1, 0, -1):
        while (word := next(words)) >= 2**32 - 2**32 % (i + 1):
            pass
        j = word % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def test_the_ring_is_the_documented_shuffle_and_a_pinned_vector() -> None:
    seed = sha256(b"ark/v1/secagg/graph test vector").digest()
    nodes = list(range(1, 13))
    assert ring_order(seed, nodes) == (5, 12, 4, 11, 10, 9, 3, 1, 2, 7, 8, 6)
    assert neighbours(seed, nodes, 4)[1] == (2, 3, 7, 9)  # two places either side of 1
    ids = random_ids(500, seed=9)
    assert list(ring_order(seed, ids)) == _independent_order(seed, ids)
    with pytest.raises(ValueError, match="sorted"):
        ring_order(seed, [2, 1])


def test_index_draws_reject_the_words_that_would_bias_them() -> None:
    """Bound 3: 2^32 - 1 is the one word past the largest multiple of 3; it is redrawn."""
    words: Iterator[int] = iter([2**32 - 1, 2**32 - 1, 2**32 - 2, 7])
    assert _below(words, 3) == (2**32 - 2) % 3
    assert next(words) == 7
    assert _below(iter([2**31]), 2**31) == 0


@pytest.mark.parametrize(("count", "k"), [(12, 2), (13, 4), (60, 8), (101, 20), (40, 39)])
def test_the_graph_is_k_regular_symmetric_and_deterministic(count: int, k: int) -> None:
    seed = sha256(f"seed {count}".encode()).digest()
    ids = random_ids(count, seed=count)
    graph = neighbours(seed, ids, k)
    assert graph == neighbours(seed, ids, k)  # deterministic
    assert sorted(graph) == ids
    for node, peers in graph.items():
        assert len(peers) == k == len(set(peers))
        assert node not in peers
        assert list(peers) == sorted(peers)
        assert all(node in graph[peer] for peer in peers)  # symmetric
    made = MaskGraph(seed, tuple(ids), k, t=(k + 3) // 2)
    assert {n: made.neighbours(n) for n in ids} == graph
    assert made.holders(ids[0]) == tuple(sorted((*graph[ids[0]], ids[0])))
    assert made.full == (k == count - 1)
    if k < count - 1:
        other = neighbours(sha256(b"another seed").digest(), ids, k)
        assert other != graph


@pytest.mark.parametrize(
    ("count", "k", "t"),
    [(12, 3, 3), (12, 12, 7), (12, 0, 1), (12, 4, 2), (12, 4, 5), (12, 11, 6), (1, 0, 1)],
)
def test_a_graph_that_breaks_the_rules_is_not_made(count: int, k: int, t: int) -> None:
    """An odd sparse degree, a degree past n - 1, a threshold that is no strict majority
    of the holders or that a dropped node's neighbours cannot reach, a single node."""
    with pytest.raises(ValueError, match=r"mask graph|threshold"):
        MaskGraph(bytes(32), tuple(range(count)), k, t)


def test_every_party_derives_one_graph_from_the_advertised_set(advertised: Federation) -> None:
    """The seed covers every advertised node's ids and keys: the same set gives the same
    graph to the aggregator and each node; one key more, less or different, another."""
    fed = advertised
    adverts = [fed.server.adverts[n] for n in fed.ids]
    graph = _graph(fed)
    assert (graph.k, graph.t) == SPARSE(COUNT, fraction=FRACTION) == (8, 6)
    assert not graph.full
    assert graph.seed == graph_seed(RUN, ROUND, adverts)
    assert graph == MaskGraph.derive(RUN, ROUND, adverts, fraction=FRACTION, parameters=SPARSE)
    victim = adverts[5]
    changed = [
        graph_seed(RUN, ROUND, adverts[1:]),
        graph_seed(RUN, ROUND, [*adverts[:5], *adverts[6:]]),
        graph_seed(RUN, ROUND + 1, adverts),
        *(
            graph_seed(RUN, ROUND, [*adverts[:5], other, *adverts[6:]])
            for other in (
                dataclasses.replace(victim, c_pk=bytes(32)),
                dataclasses.replace(victim, s_pk=bytes(32)),
                dataclasses.replace(victim, seed_commitment=bytes(32)),
                dataclasses.replace(victim, signer=bytes(32)),
            )
        ),
    ]
    assert len({graph.seed, *changed}) == len(changed) + 1
    orders = {ring_order(seed, fed.ids) for seed in changed[2:]}
    assert graph.order not in orders
    with pytest.raises(ValueError, match="sorted"):
        graph_seed(RUN, ROUND, adverts[::-1])


# -- rebuilding secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "n"), [(2, 3), (6, 9), (40, 137)])
def test_any_t_of_a_holder_sets_shares_rebuild_the_secret(t: int, n: int) -> None:
    """A sparse graph's holders give shares at their places among themselves: any t of
    the n rebuild the secret, t - 1 give something else."""
    picker = random.Random(t)
    for _ in range(3):
        secret = bytes(picker.getrandbits(8) for _ in range(32))
        shares = split_secret(secret, t, n)
        picked = sorted(picker.sample(range(1, n + 1), t))
        chosen = {i: shares[i - 1] for i in picked}
        assert combine_secret(chosen) == secret
        assert combine_secret(dict(list(chosen.items())[1:])) != secret


# -- the parameters ------------------------------------------------------------------------------


def _tail_below(k: int, p: Fraction, t: int) -> Fraction:
    return sum((math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(t)), Fraction(0))


def test_the_parameters_meet_their_targets_and_no_smaller_degree_does() -> None:
    """Exact binomial tails, computed here independently: the round's correctness (n x
    P[fewer than t of k neighbours alive] <= 2^-20) and security (n x P[at least 2t - k - 1
    colluding neighbours] <= 2^-70) hold at (k, t), and at k - 2 no t meets both."""
    alive, corrupt = 1 - Fraction(str(DROPOUT_RATE)), Fraction(str(CORRUPT_RATE))
    bits = SECURITY_BITS + GRINDING_BITS

    def fails(n: int, k: int, t: int) -> Fraction:
        return n * _tail_below(k, alive, t)

    def exposed(n: int, k: int, t: int) -> Fraction:
        return n * (1 - _tail_below(k, corrupt, 2 * t - k - 1))

    for n in (1000, 5000):
        k, t = graph_parameters(n, fraction=FRACTION)
        assert k % 2 == 0
        assert k < n - 1
        assert k + 1 < 2 * t <= 2 * k
        assert fails(n, k, t) <= Fraction(1, 2**CORRECTNESS_BITS) < fails(n, k, t + 1)
        assert exposed(n, k, t) <= Fraction(1, 2**bits)
        smaller = k - 2
        assert not any(
            fails(n, smaller, s) <= Fraction(1, 2**CORRECTNESS_BITS)
            and exposed(n, smaller, s) <= Fraction(1, 2**bits)
            for s in range(smaller // 2 + 1, smaller + 1)
        )


def test_the_parameters_table_is_sane_and_monotone() -> None:
    table = {n: graph_parameters(n, fraction=FRACTION) for n in (10, 100, 1000, 5000, 10000)}
    assert table[10] == (9, threshold(10, FRACTION))
    assert table[100] == (99, threshold(100, FRACTION))
    assert table[1000] == (136, 110)
    assert table[5000] == (144, 116)
    assert table[10000] == (148, 119)
    previous = (0, 0)
    for n in range(SPARSE_MIN_NODES, 10001, 389):
        k, t = graph_parameters(n, fraction=FRACTION)
        assert k < n - 1
        assert k >= previous[0]
        assert t >= previous[1]
        previous = (k, t)
    # More dropout or more colluders need more neighbours; a higher threshold fraction
    # tolerates more colluders (below).
    assert graph_parameters(1000, 0.1, fraction=FRACTION)[0] > table[1000][0]
    assert graph_parameters(1000, corrupt=0.3, fraction=FRACTION)[0] > table[1000][0]
    assert graph_parameters(100, fraction=0.9) == (99, 90)


def test_a_higher_threshold_asks_a_sparse_graph_sized_for_as_many_colluders() -> None:
    """secagg-threshold 0.9 tolerates fewer than 0.8 n colluders on the full graph: no
    sparse graph meets that, so the round keeps the full graph; 0.6 is the default."""
    assert graph_parameters(1000, fraction=0.9) == (999, threshold(1000, 0.9))
    assert graph_parameters(1000, fraction=0.6) == graph_parameters(1000, fraction=0.5)
    k, t = graph_parameters(1000, fraction=0.65)
    assert (k, t) != graph_parameters(1000, fraction=0.6)
    assert k > graph_parameters(1000, fraction=0.6)[0] or k == 999


def test_small_rounds_and_unreachable_targets_use_the_full_graph() -> None:
    for n in (2, 5, SPARSE_MIN_NODES - 1):
        assert graph_parameters(n, fraction=FRACTION) == (n - 1, threshold(n, FRACTION))
    # Colluders and dropouts together past what any degree can meet (a threshold both
    # below the survivors and past half the holders plus the colluders needs
    # 1 - 2 dropout > corrupt): the full graph.
    assert graph_parameters(2000, 0.3, 0.45, fraction=FRACTION) == (1999, 1200)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="dropout"):
            graph_parameters(1000, bad, fraction=FRACTION)
    with pytest.raises(ValueError, match="nodes"):
        graph_parameters(0, fraction=FRACTION)


def test_a_five_node_round_keeps_the_full_graph(broker: KeyBroker) -> None:
    fed = federation(broker, random_ids(5, seed=3))
    fed.advertise()
    fed.share()
    graph = _graph(fed)
    assert graph.full
    assert graph.order == fed.ids
    for node, bundle in fed.server.bundles.items():
        assert sorted(bundle.shares) == [n for n in fed.ids if n != node]


# -- a sparse round --------------------------------------------------------------------------------


def _spread(graph: MaskGraph, count: int, start: int = 0) -> list[int]:
    """``count`` nodes far apart on the ring (no two sharing a neighbourhood)."""
    step = len(graph.order) // count
    return sorted(graph.order[start + i * step] for i in range(count))


def test_a_sparse_round_with_dropouts_unmasks_the_exact_sum(broker: KeyBroker) -> None:
    """Sixty nodes over k = 8: one never shares, two stop after sharing, one's masked
    input is lost; the aggregator gets the survivors' sum exactly, and every share,
    mask, signature and reveal stayed within one node's neighbourhood."""
    fed = sparse(broker)
    fed.advertise()
    fed.server.share_request()
    graph = _graph(fed)
    silent, *gone = _spread(graph, 4)
    fed.share(stop=[silent])
    for node, state in fed.nodes.items():
        if node != silent:
            assert state.graph == graph
            assert (state.threshold, state.minimum) == (6, threshold(COUNT, FRACTION))
            assert sorted(fed.server.bundles[node].shares) == list(graph.neighbours(node))
    fed.mask(stop=gone[:2], lose=gone[2:])
    for node in fed.masked:
        held = tuple(n for n in graph.holders(node) if n != silent)
        assert fed.nodes[node].masked_with == held
        assert sorted(fed.nodes[node].held) == list(held)
    request = fed.unmask()
    assert request.dropped == tuple(sorted(gone))
    total, weight = fed.server.result()
    survivors = [n for n in fed.ids if n not in (silent, *gone)]
    check_aggregate(fed, total, weight, survivors)
    for node in survivors:
        holders = set(graph.holders(node))
        reveal = fed.reveals[node]
        assert set(reveal.seeds) == holders & set(survivors)
        assert set(reveal.keys) == holders & set(gone)
        assert silent not in {*reveal.seeds, *reveal.keys}
        assert reveal.index == share_index(fed.ids, node)
        mine = fed.server.unmask_request_for(node)
        assert set(mine.signatures) == holders & set(survivors)
        assert (mine.survivors, mine.dropped) == (request.survivors, request.dropped)


def test_with_nobody_dropped_a_sparse_round_still_signs_its_split(broker: KeyBroker) -> None:
    """The full graph's shortcut (no dropout: seed shares on an unsigned split) is refused
    in a sparse round, nothing revealed; the signed split then unmasks the whole sum."""
    fed = sparse(broker, seed=2)
    fed.advertise()
    fed.share()
    fed.mask()
    assert fed.server.needs_check
    node = fed.ids[0]
    with pytest.raises(SecAggRefused, match="split its holders signed"):
        fed.nodes[node].unmask(UnmaskRequest(RUN, ROUND, fed.ids, ()))
    assert fed.nodes[node].revealed_seeds is None
    fed.unmask()
    total, weight = fed.server.result()
    check_aggregate(fed, total, weight, fed.ids)


def test_a_survivor_that_did_not_sign_fails_a_sparse_round_closed(shared: Federation) -> None:
    """A node that sent its masked input and then dropped before signing: its holders
    reveal its seed only for a split it signed, so the aggregator asks for nothing."""
    fed = shared
    fed.mask()
    check = fed.check()
    late = check.survivors[3]
    fed.server.signatures.pop(late)
    with pytest.raises(SecAggFailed, match="did not sign the split"):
        fed.server.unmask_request()
    assert all(state.revealed_seeds is None for state in fed.nodes.values())


# -- a hostile aggregator --------------------------------------------------------------------------


@pytest.fixture
def shared(broker: KeyBroker) -> Federation:
    fed = sparse(broker, count=40, seed=5)
    fed.advertise()
    fed.share()
    return fed


def test_a_node_masks_with_no_share_from_outside_its_neighbourhood(shared: Federation) -> None:
    """The aggregator hands a node a share from a node that is not its neighbour (as if it
    had asked that node to share to it), or leaves a neighbour's out: refused before
    anything is masked."""
    fed = shared
    graph = _graph(fed)
    node = fed.ids[0]
    honest = fed.mask_request(node)
    stranger = next(n for n in fed.ids if n != node and n not in graph.neighbours(node))
    assert node not in fed.server.bundles[stranger].shares  # it shared only to neighbours
    foreign = dict(honest.shares)
    foreign[stranger] = next(iter(fed.server.bundles[stranger].shares.values()))
    missing = dict(list(honest.shares.items())[1:])
    state = fed.nodes[node]
    for shares in (foreign, missing):
        request = MaskRequest(RUN, ROUND, honest.roster, shares)
        with pytest.raises(SecAggRefused, match="exactly the roster"):
            state.mask(request, fed.values[node], fed.weights[node])
        assert state.masked_with == ()


def test_a_forged_graph_from_the_aggregator_is_never_used(broker: KeyBroker) -> None:
    """No message can carry a graph or seed (strict keys), and an aggregator that routes by
    a graph of its own finds the nodes sharing by theirs and refusing its requests."""
    fed = sparse(broker, count=40, seed=6)
    fed.advertise()
    request = fed.server.share_request()
    raw = json.loads(request.to_bytes())
    for key, value in (("seed", "AAAA"), ("graph", [[1, 2]]), ("k", 2)):
        with pytest.raises(SecAggMessageInvalid, match="must have keys"):
            ShareRequest.from_bytes(json.dumps({**raw, key: value}).encode())
    honest = _graph(fed)
    forged = MaskGraph(sha256(b"the aggregator's choice").digest(), honest.nodes, 8, 6)
    assert forged != honest
    fed.server.graph = forged  # the hostile aggregator's routing
    bundles: dict[int, ShareBundle] = {}
    for node, state in fed.nodes.items():
        bundles[node] = state.share(ShareRequest.from_bytes(request.to_bytes()))
        assert state.graph == honest  # its own, from the advertisements it verified
        assert sorted(bundles[node].shares) == list(honest.neighbours(node))
        if honest.neighbours(node) != forged.neighbours(node):
            with pytest.raises(SecAggMessageInvalid, match="among its neighbours"):
                fed.server.add_shares(node, bundles[node].to_bytes())
    # Shares routed by the forged graph reach a node from its forged neighbours: refused.
    node = next(n for n in fed.ids if forged.neighbours(n) != honest.neighbours(n))
    routed = {
        s: bundles[s].shares[node] for s in forged.neighbours(node) if node in bundles[s].shares
    }
    with pytest.raises(SecAggRefused, match="exactly the roster"):
        fed.nodes[node].mask(MaskRequest(RUN, ROUND, fed.ids, routed), fed.values[node], 1.0)


def test_too_many_dropouts_in_one_neighbourhood_fail_closed(shared: Federation) -> None:
    """Four of a node's eight neighbours lose their masked inputs: 5 of its 9 holders
    survive, below the threshold 6 (its seed could not be rebuilt), although the round
    keeps a strict majority. The round fails before the check stage, with nothing asked
    or revealed; a hostile aggregator naming them dropped anyway gets no signature and
    no reveal from the node."""
    fed = shared
    graph = _graph(fed)
    victim = fed.ids[3]
    gone = list(graph.neighbours(victim)[:4])
    fed.mask(lose=gone)
    with pytest.raises(SecAggFailed, match="holders reached the masked input stage, fewer"):
        fed.server.check_request()
    assert fed.server._check is None
    survivors = tuple(n for n in fed.ids if n not in gone)
    split = CheckRequest(RUN, ROUND, survivors, tuple(gone))
    with pytest.raises(SecAggRefused, match="among this node's holders"):
        fed.nodes[victim].check(split)
    assert fed.nodes[victim].confirmed is None
    with pytest.raises(SecAggRefused, match="among this node's holders"):
        fed.nodes[victim].unmask(UnmaskRequest(RUN, ROUND, survivors, tuple(gone), {}))
    assert fed.nodes[victim].revealed_seeds is None


def test_a_node_reveals_only_with_the_threshold_of_its_holders_signatures(
    shared: Federation,
) -> None:
    """Signatures from outside its neighbourhood, or fewer than t of its holders', are
    refused; with exactly t it reveals its holders' shares, once."""
    fed = shared
    graph = _graph(fed)
    fed.mask()
    check = fed.check()
    signatures = dict(fed.server.signatures)
    node = fed.ids[7]
    holders = graph.holders(node)
    stranger = next(n for n in fed.ids if n not in holders)
    state = fed.nodes[node]
    split = (check.survivors, check.dropped)
    full = MaskGraph(graph.seed, graph.nodes, len(graph.nodes) - 1, threshold(40, FRACTION))
    assert consistency_bytes(RUN, ROUND, fed.ids, *split, full) == consistency_bytes(
        RUN, ROUND, fed.ids, *split
    )  # the full graph signs what it always signed
    ours = {v: signatures[v] for v in holders}
    # The same split signed by its holders as nodes shown another advertisement set (so
    # another graph) would sign it: those signatures are not over this node's round.
    other = MaskGraph(sha256(b"another view").digest(), graph.nodes, graph.k, graph.t)
    elsewhere = consistency_bytes(RUN, ROUND, fed.ids, *split, other)
    assert consistency_bytes(RUN, ROUND, fed.ids, *split, graph) != elsewhere
    viewed = {v: fed.nodes[v].signer.sign(elsewhere) for v in holders}
    cases = [
        ({**ours, stranger: signatures[stranger]}, "not this node's neighbour"),
        (dict(list(ours.items())[: graph.t - 1]), "fewer than the threshold"),
        ({}, "fewer than the threshold"),
        (viewed, "does not verify"),
    ]
    for given, reason in cases:
        with pytest.raises(SecAggRefused, match=reason):
            state.unmask(UnmaskRequest(RUN, ROUND, *split, given))
        assert state.revealed_seeds is None
    # The threshold of signatures, but not every surviving holder's: that holder's seed
    # share would go to a split it never agreed it masked with.
    enough = dict(list(ours.items())[: graph.t])
    with pytest.raises(SecAggRefused, match="did not sign the split"):
        state.unmask(UnmaskRequest(RUN, ROUND, *split, enough))
    assert state.revealed_seeds is None
    enough = {v: sig for v, sig in ours.items() if v in check.survivors}
    reveal = state.unmask(UnmaskRequest(RUN, ROUND, *split, enough))
    assert sorted(reveal.seeds) == list(holders)
    assert reveal.keys == {}
    with pytest.raises(SecAggRefused, match="second unmask request"):
        state.unmask(UnmaskRequest(RUN, ROUND, *split, enough))


# -- a hostile node --------------------------------------------------------------------------------


def test_the_aggregator_refuses_shares_or_reveals_for_non_neighbours(broker: KeyBroker) -> None:
    fed = sparse(broker, count=40, seed=8)
    fed.advertise()
    request = ShareRequest.from_bytes(fed.server.share_request().to_bytes())
    graph = _graph(fed)
    node = fed.ids[0]
    stranger = next(n for n in fed.ids if n != node and n not in graph.neighbours(node))
    bundle = fed.nodes[node].share(request)
    extra = {**bundle.shares, stranger: next(iter(bundle.shares.values()))}
    for shares in (extra, {n: bundle.shares[n] for n in list(bundle.shares)[1:]}):
        forged = ShareBundle(RUN, ROUND, node, shares)
        with pytest.raises(SecAggMessageInvalid, match="among its neighbours"):
            fed.server.add_shares(node, forged.to_bytes())
    fed.server.add_shares(node, bundle.to_bytes())
    for other, state in fed.nodes.items():
        if other != node:
            fed.server.add_shares(other, state.share(request).to_bytes())
    fed.mask()
    fed.check()
    unmask = fed.server.unmask_request()
    honest = fed.nodes[node].unmask(fed.server.unmask_request_for(node))
    seed_share = next(iter(honest.seeds.values()))
    for seeds in ({**honest.seeds, stranger: seed_share}, dict(list(honest.seeds.items())[1:])):
        reveal = Reveal(RUN, ROUND, node, honest.index, seeds, honest.keys)
        with pytest.raises(SecAggMessageInvalid, match="other nodes than asked"):
            fed.server.add_reveal(node, reveal.to_bytes())
    assert node not in fed.server.reveals
    assert unmask.survivors == fed.ids


def test_a_server_round_over_the_default_parameters_stays_full(broker: KeyBroker) -> None:
    """ServerRound's and NodeRound's default is graph_parameters itself: a small round is
    the full graph, exactly as before sparse rounds."""
    server = ServerRound(RUN, ROUND, FRACTION, CLIP, LENGTH, broker.result_key, clock=_frozen)
    assert server.parameters is graph_parameters
    fed = federation(broker, random_ids(7, seed=11))
    total, weight = fed.run(stop_mask=[fed.ids[2]])
    check_aggregate(fed, total, weight, [n for n in fed.ids if n != fed.ids[2]])
    assert _graph(fed).full
    for reveal in fed.reveals.values():
        assert list(reveal.keys) == [fed.ids[2]]
        assert len(reveal.seeds) == 6
