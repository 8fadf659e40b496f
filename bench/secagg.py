"""Secure aggregation in one process: stage times and bytes per node (issue 17).

Every party is the real state machine: :class:`clients.secagg.NodeRound` for each
simulated node and :class:`server.secagg.ServerRound` for the aggregator, driven with
each other's wire bytes, and every advertisement carries a real EAR certification of the
node's Ed25519 signing key (``ResultSigner.affirm``, purpose ``signing``), verified by
every node and by the aggregator. Only the transport is missing.

**Times** at 10, 50 and 100 nodes, for the default adapter (LoRA of the default run on
all-MiniLM-L6-v2, mode fedavg: its trained values, counted from the model) and for a
4M-value adapter (a 7B model's r=8 on q and v: 32 layers x 2 modules x (4096*8 +
8*4096) = 4,194,304 values):

* a node's share stage (``NodeRound.share``: check every advertisement, two Shamir
  splits, one sealed share per peer), median over every node of the round;
* a node's mask stage (``NodeRound.mask``: open the peers' shares, quantize, one self
  mask and a pair mask per peer), median over 3 sampled nodes x repeats (the masked
  inputs of the other nodes are made once, untimed: the aggregator needs all of them);
* the aggregator: ``add_masked`` of every survivor, ``add_reveal`` of every reveal and
  ``result`` (rebuild each survivor's seed and each dropped node's key, remove the
  masks), with no node dropped and with 10% of the nodes (at least 1) dropped after
  sharing, so that rebuilding their keys and removing their pair masks is costed.

The advertise and share stages do not depend on the adapter, so both adapter sizes run
from one round's state after stage 2 (each a fresh copy of it); every decoded sum is
checked against the plaintext weighted sum within the quantization's bound.

**Mask and unmask costs over the full or the sparse mask graph** (:func:`mask_unmask_costs`,
for benches that compare the two at a given node count): one node's masking and the
aggregator's unmasking, with the real mask expansion and secret rebuilding, measured on
representative nodes and multiplied out.

**Bytes** a node sends per round (its advertisement, its share bundle, its masked input
as the HPKE envelope it travels in, sealed as a plain update is, and its reveal) and
receives beyond the global adapter (the share request with every advertisement, its
mask request and the unmask request), against the fp32 adapter, for the default adapter
at 3, 10 and 100 nodes. Flower's SecAgg+ sends its masked vector as int64: 2.0x.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import random
import secrets
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clients.secagg import NodeRound
from sandbox.attestation.measure import CODE, CONFIG
from sandbox.attestation.result import PURPOSE_SIGNING, SIGNING_SUITE, ResultContext, ResultSigner
from sandbox.attestation.stub import STUB_TEE
from sandbox.attestation.verifier import Appraisal
from sandbox.channel import EXAMPLES, TICKET, UPLINK, ChannelContext, model_dir_digest, seal_tensors
from sandbox.config import MODE_FEDAVG, TASK_CLASSIFICATION, RunSpec, SandboxConfig
from sandbox.digests import sha256_hex
from sandbox.lora import adapter_state, build_peft_model, is_trained
from sandbox.models import default_model_dir, inspect_model_dir, load_pretrained
from sandbox.ops.demo_data import DEMO_LABELS
from sandbox.seal.envelope import RecipientKey
from sandbox.secagg import (
    DROPOUT_RATE,
    MASKED_TENSOR,
    CheckRequest,
    MaskRequest,
    ShareRequest,
    UnmaskRequest,
    agree,
    apply_pair_mask,
    combine_secret,
    graph_parameters,
    seed_commitment,
    self_mask,
    threshold,
)
from server.secagg import ServerRound

TIMING_NODES = (10, 50, 100)
BYTES_NODES = (3, 10, 100)
# A 7B model's LoRA r=8 on q and v: 32 layers x 2 modules x (A 8x4096 + B 4096x8).
LARGE_ADAPTER = 32 * 2 * (4096 * 8 + 8 * 4096)
SAMPLED_NODES = 3
DROPPED_FRACTION = 0.1
REPEATS = 1
FLOWER_INT64_OVER_FP32 = 2.0
SENT_GOAL = 1.1
# Flower run ids are random unsigned 64-bit; the round is any training round.
RUN = 0x9E3779B97F4A7C15
ROUND = 1
# mask_unmask_costs: values per masked input, the share of the nodes that shared whose
# masked input is lost (the graph's design dropout rate), and timed repeats per median.
COST_VALUES = 10_000
COST_DROPOUT = DROPOUT_RATE
COST_REPEATS = 5
GRAPHS = ("full", "sparse")


def default_adapter_values() -> int:
    """Values a node sends per round in the default run: the trained tensors of the LoRA
    adapter on the default model (fedavg, the demo's labels), counted from the model."""
    spec = RunSpec(
        job_id="bench-secagg",
        task=TASK_CLASSIFICATION,
        model_path=default_model_dir(),
        labels=tuple(sorted(DEMO_LABELS)),
        mode=MODE_FEDAVG,
    )
    info = inspect_model_dir(spec.model_path, spec.task)
    base, _ = load_pretrained(info, num_labels=len(spec.labels))
    model = build_peft_model(
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.lora_mode
    )
    return sum(
        int(v.size) for k, v in adapter_state(model).items() if is_trained(k, spec.lora_mode)
    )


class _Certifier:
    """The key broker's result signing: certifies a sandbox's Ed25519 signing key for its
    TEE as an affirming EAR of purpose ``signing`` (the claims a stub-TEE node's have)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.signer = ResultSigner(
            self.key, {"developer": "ark-sandbox", "build": "ark-keybroker/bench"}
        )
        self.measurements = {CODE: sha256_hex(b"code"), CONFIG: sha256_hex(b"config")}

    def certify(self, key: Ed25519PrivateKey, now: dt.datetime) -> str:
        ueid = f"node-{secrets.token_hex(8)}"
        appraisal = Appraisal({"ueid": ueid, "measurements": self.measurements}, STUB_TEE, "p", now)
        context = ResultContext(
            session_id=secrets.token_urlsafe(24),
            tee=STUB_TEE,
            tee_pubkey=key.public_key().public_bytes_raw(),
            hpke_suite=SIGNING_SUITE,
            evidence=secrets.token_urlsafe(600),
            policy_id="provider",
            policy_digest=sha256_hex(b"policy"),
            purpose=PURPOSE_SIGNING,
        )
        return self.signer.affirm(appraisal, context, now=now).token


@dataclass
class _SharedRound:
    """One round after stage 2: every node shared, the aggregator routed the shares."""

    nodes: dict[int, NodeRound]
    server: ServerRound  # its ``length`` is set per adapter size
    mask_requests: dict[int, bytes]
    share_seconds: list[float]
    # The aggregator's stages 1 and 2: check every advertisement, route every share.
    route_seconds: float
    bytes: dict[str, list[int]]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _shared_round(count: int, certifier: _Certifier, rng: np.random.Generator) -> _SharedRound:
    """``count`` nodes advertise and share, through the aggregator, with every message
    passed as bytes; each node's ``NodeRound.share`` is timed, and the aggregator's work."""
    fraction, clip = RunSpec.secagg_threshold, RunSpec.secagg_clip
    now = dt.datetime.now(dt.UTC)
    ids = sorted({int(i) for i in rng.integers(1, 2**63, size=count)})
    nodes: dict[int, NodeRound] = {}
    for node in ids:
        key = Ed25519PrivateKey.generate()
        cert = certifier.certify(key, now)
        nodes[node] = NodeRound(
            RUN, ROUND, node, fraction, clip, key, cert, certifier.key.public_key()
        )
    server = ServerRound(RUN, ROUND, fraction, clip, 0, certifier.key.public_key())
    sizes: dict[str, list[int]] = {k: [] for k in ("advert", "share_request", "bundle", "mask")}
    adverts = {node: party.advertise().to_bytes() for node, party in nodes.items()}
    sizes["advert"] = [len(raw) for raw in adverts.values()]
    _, route = _timed(partial(_feed, server.add_advert, adverts))
    request, took = _timed(lambda: server.share_request().to_bytes())
    route += took
    sizes["share_request"] = [len(request)] * count
    parsed = ShareRequest.from_bytes(request)
    bundles, share_seconds = {}, []
    for node, party in nodes.items():
        bundle, took = _timed(partial(party.share, parsed))
        share_seconds.append(took)
        bundles[node] = bundle.to_bytes()
    sizes["bundle"] = [len(raw) for raw in bundles.values()]
    _, took = _timed(partial(_feed, server.add_shares, bundles))
    route += took
    mask_requests, took = _timed(lambda: {n: server.mask_request(n).to_bytes() for n in ids})
    route += took
    sizes["mask"] = [len(raw) for raw in mask_requests.values()]
    return _SharedRound(nodes, server, mask_requests, share_seconds, route, sizes)


@dataclass
class _MaskedRound:
    """Every node's masked input for one adapter size, and the plaintext to check it by."""

    nodes: dict[int, NodeRound]  # after stage 3
    inputs: dict[int, np.ndarray]
    mask_seconds: list[float]
    # The plaintext sums of the weighted values: of every node, of the nodes that drop.
    weighted_all: np.ndarray
    weighted_dropped: np.ndarray
    weights: dict[int, float]


def _values(length: int, node: int) -> tuple[np.ndarray, float]:
    """A node's update (LoRA-sized values) and weight, the same every time it is asked."""
    rng = np.random.default_rng(node)
    return rng.normal(0.0, 0.02, length), float(rng.uniform(0.05, 1.0))


def _masked_round(
    shared: _SharedRound, length: int, sampled: Sequence[int], dropped: Sequence[int], repeats: int
) -> _MaskedRound:
    """Stage 3 on a copy of every node: ``sampled`` nodes timed ``repeats`` times each (a
    fresh copy each time), every other node masked once, untimed."""
    nodes: dict[int, NodeRound] = {}
    inputs: dict[int, np.ndarray] = {}
    seconds: list[float] = []
    total = np.zeros(length, np.float64)
    lost = np.zeros(length, np.float64)
    weights: dict[int, float] = {}
    for node, party in shared.nodes.items():
        values, weight = _values(length, node)
        request = MaskRequest.from_bytes(shared.mask_requests[node])
        for _ in range(repeats if node in sampled else 1):
            copied = copy.copy(party)
            masked, took = _timed(partial(copied.mask, request, values, weight))
            if node in sampled:
                seconds.append(took)
        nodes[node], inputs[node], weights[node] = copied, masked, weight
        total += weight * values
        if node in dropped:
            lost += weight * values
    return _MaskedRound(nodes, inputs, seconds, total, lost, weights)


def _feed(add: Callable[[int, Any], object], messages: Mapping[int, Any]) -> None:
    for node, message in messages.items():
        add(node, message)


def _aggregate(
    shared: _SharedRound, masked: _MaskedRound, length: int, dropped: Sequence[int]
) -> dict[str, Any]:
    """The aggregator's stages 3 and 4 on a fresh copy of its round after stage 2: every
    survivor's masked input, every survivor's reveal, the unmasked sum (checked)."""
    server = dataclasses.replace(
        shared.server,
        length=length,
        survivors=[],
        signatures={},
        reveals={},
        _total=None,
        _check=None,
        _unmask=None,
    )
    survivors = [n for n in masked.nodes if n not in dropped]
    inputs = {n: masked.inputs[n] for n in survivors}
    _, add_masked = _timed(partial(_feed, server.add_masked, inputs))
    # The consistency check: each survivor signs the one split; the aggregator verifies.
    check = server.check_request().to_bytes()
    parsed_check = CheckRequest.from_bytes(check)
    nodes = {n: copy.copy(masked.nodes[n]) for n in survivors}
    signatures: dict[int, bytes] = {}
    check_seconds = []
    for node in survivors:
        signed, took = _timed(partial(nodes[node].check, parsed_check))
        signatures[node] = signed.to_bytes()
        check_seconds.append(took)
    _, add_consistency = _timed(partial(_feed, server.add_consistency, signatures))
    request = server.unmask_request().to_bytes()
    parsed = UnmaskRequest.from_bytes(request)
    reveals: dict[int, bytes] = {}
    unmask_seconds = []
    for node in survivors:
        reveal, took = _timed(partial(nodes[node].unmask, parsed))
        reveals[node] = reveal.to_bytes()
        unmask_seconds.append(took)
    _, add_reveal = _timed(partial(_feed, server.add_reveal, reveals))
    (weighted, weight), result = _timed(server.result)
    expected = masked.weighted_all - masked.weighted_dropped if dropped else masked.weighted_all
    expected_weight = sum(w for n, w in masked.weights.items() if n not in dropped)
    mean = expected / expected_weight
    error = float(np.abs(weighted / weight - mean).max())
    quantization = server.quantization
    bound = quantization.bound(len(survivors), expected_weight, float(np.abs(mean).max()))
    weight_bound = len(survivors) * 0.5 / quantization.weight_scale
    if error > bound or abs(weight - expected_weight) > weight_bound * (1 + 1e-9):
        raise RuntimeError(
            f"secure aggregation of {len(shared.nodes)} nodes decoded a wrong sum: "
            f"error {error:.3g} > bound {bound:.3g}"
        )
    return {
        "dropped": len(dropped),
        "add_masked_seconds": add_masked,
        "add_reveal_seconds": add_reveal,
        "result_seconds": result,
        "add_consistency_seconds": add_consistency,
        "aggregator_seconds": add_masked + add_consistency + add_reveal + result,
        "node_check_seconds": statistics.median(check_seconds),
        "node_unmask_seconds": statistics.median(unmask_seconds),
        "max_error": error,
        "error_bound": bound,
        "unmask_request_bytes": len(request),
        "check_request_bytes": len(check),
        "consistency_bytes": statistics.median_low(len(v) for v in signatures.values()),
        "reveal_bytes": statistics.median_low(len(r) for r in reveals.values()),
    }


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the runs' numbers (the first run's value for the rest)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def _envelope_bytes(masked: np.ndarray, node: int, aggregator: RecipientKey, digest: str) -> int:
    """The masked input as it travels: one tensor, sealed to the aggregator as a plain
    update is (``clients.channel.seal_update``: its ticket and example count inside)."""
    context = ChannelContext(str(RUN), ROUND, str(node), digest, UPLINK)
    return len(
        seal_tensors(
            {MASKED_TENSOR: masked},
            aggregator.public_key(),
            context,
            allowed=frozenset({MASKED_TENSOR}),
            suite=aggregator.suite,
            metadata={TICKET: secrets.token_hex(16), EXAMPLES: repr(100.0)},
        )
    )


def _byte_row(
    shared: _SharedRound, masked: _MaskedRound, aggregate: Mapping[str, Any], envelope: int
) -> dict[str, Any]:
    length = next(iter(masked.inputs.values())).size - 1
    fp32 = 4 * length
    sent = {
        "advertisement": statistics.median_low(shared.bytes["advert"]),
        "share_bundle": statistics.median_low(shared.bytes["bundle"]),
        "masked_envelope": envelope,
        "consistency": aggregate["consistency_bytes"],
        "reveal": aggregate["reveal_bytes"],
    }
    received = {
        "share_request": statistics.median_low(shared.bytes["share_request"]),
        "mask_request": statistics.median_low(shared.bytes["mask"]),
        "check_request": aggregate["check_request_bytes"],
        "unmask_request": aggregate["unmask_request_bytes"],
    }
    return {
        "nodes": len(shared.nodes),
        "values": length,
        "fp32_bytes": fp32,
        "masked_raw_bytes": 4 * (length + 1),
        "envelope_overhead_bytes": envelope - 4 * (length + 1),
        "sent": sent,
        "received": received,
        "sent_bytes": sum(sent.values()),
        "received_bytes": sum(received.values()),
        "sent_over_fp32": sum(sent.values()) / fp32,
        "received_over_fp32": sum(received.values()) / fp32,
    }


def secagg_bench(
    repeats: int = REPEATS,
    timing_nodes: Sequence[int] = TIMING_NODES,
    bytes_nodes: Sequence[int] = BYTES_NODES,
    large: int = LARGE_ADAPTER,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Stage times at ``timing_nodes`` (default and ``large`` adapters) and bytes per node
    at ``bytes_nodes`` (default adapter); medians of ``repeats``."""
    started, load = time.perf_counter(), os.getloadavg()[0]
    default = default_adapter_values()
    certifier = _Certifier()
    aggregator = RecipientKey.generate(SandboxConfig.hpke_suite)
    digest = model_dir_digest(default_model_dir())
    rng = np.random.default_rng(17)
    timings: list[dict[str, Any]] = []
    traffic: list[dict[str, Any]] = []
    for count in sorted({*timing_nodes, *bytes_nodes}):
        shared, setup = _timed(partial(_shared_round, count, certifier, rng))
        roster = sorted(shared.nodes)
        sampled = sorted({roster[0], roster[len(roster) // 2], roster[-1]})[:SAMPLED_NODES]
        k = max(1, round(DROPPED_FRACTION * count))
        dropped = sorted(int(n) for n in rng.choice(roster, size=k, replace=False))
        sizes = (default, large) if count in timing_nodes else (default,)
        for length in sizes:
            masked, made = _timed(partial(_masked_round, shared, length, sampled, dropped, repeats))
            runs = {
                label: [_aggregate(shared, masked, length, gone) for _ in range(repeats)]
                for label, gone in (("no_dropout", ()), ("dropout", dropped))
            }
            if count in timing_nodes:
                timings.append(
                    {
                        "nodes": count,
                        "values": length,
                        "threshold": shared.server.threshold,
                        "share_seconds": statistics.median(shared.share_seconds),
                        "route_seconds": shared.route_seconds,
                        "mask_seconds": statistics.median(masked.mask_seconds),
                        "mask_samples": len(masked.mask_seconds),
                        **{label: _median_runs(r) for label, r in runs.items()},
                    }
                )
            if count in bytes_nodes and length == default:
                whole = runs["no_dropout"][0]
                first = sampled[0]
                envelope = _envelope_bytes(masked.inputs[first], first, aggregator, digest)
                traffic.append(_byte_row(shared, masked, whole, envelope))
            log(
                f"secagg: {count} nodes x {length:,} values: setup {setup:.1f} s, "
                f"inputs {made:.1f} s, total {time.perf_counter() - started:.0f} s"
            )
            del masked
    return {
        "default_values": default,
        "large_values": large,
        "threshold_fraction": RunSpec.secagg_threshold,
        "clip": RunSpec.secagg_clip,
        "dropped_fraction": DROPPED_FRACTION,
        "sampled_nodes": SAMPLED_NODES,
        "repeats": repeats,
        "timings": timings,
        "bytes": traffic,
        "flower_int64_over_fp32": FLOWER_INT64_OVER_FP32,
        "sent_goal": SENT_GOAL,
        "seconds": time.perf_counter() - started,
        "load_average": [load, os.getloadavg()[0]],
    }


def _median_seconds(fn: Callable[[], Any], repeats: int = COST_REPEATS) -> float:
    return statistics.median(_timed(fn)[1] for _ in range(repeats))


def _median_of_fresh(fn: Callable[[Any], Any], make: Callable[[], Any]) -> float:
    """The median time of ``fn`` on fresh inputs from ``make``, over COST_REPEATS runs; a
    single run when the first takes over a second (a full graph's rebuild at ``t = 600``
    takes tens of seconds, and its spread is small next to it)."""
    first = _timed(partial(fn, make()))[1]
    if first > 1.0:
        return first
    return statistics.median(
        [first, *(_timed(partial(fn, make()))[1] for _ in range(COST_REPEATS - 1))]
    )


def _random_shares(indices: Sequence[int]) -> dict[int, bytes]:
    """Shares at ``indices`` of a random secret: any ``t`` values at ``t`` distinct
    indices are the shares of exactly one polynomial of degree ``t - 1``."""
    return {i: os.urandom(32) for i in indices}


def mask_unmask_costs(n: int, graph: str) -> dict[str, float]:
    """Median seconds of one node's masking and of the aggregator's unmasking in a round
    of ``n`` nodes over the ``"full"`` mask graph (every pair) or the ``"sparse"`` one
    (what :func:`sandbox.secagg.graph_parameters` gives at the run's default threshold:
    the full graph below ``SPARSE_MIN_NODES``), and ``peers``, the degree ``k``.

    ``mask_seconds``: one node's self mask and a pair mask for each of its ``k`` peers
    (X25519 agreement, HKDF, ChaCha20 over COST_VALUES + 1 words, the mod 2^32 add) on a
    quantized input, as ``NodeRound.mask`` does after opening its shares.

    ``unmask_seconds``: the aggregator's ``result()`` with ``max(1, COST_DROPOUT n)`` nodes
    dropped: each survivor's seed rebuilt from ``t`` shares, checked against its
    commitment and its self mask removed; each dropped node's key rebuilt, checked and its
    pair masks with its surviving neighbours (``k`` times the surviving share) removed.
    It is one representative survivor's and one dropped node's median time, multiplied
    by their counts. Each rebuild is pycryptodome's ``Shamir.combine`` over ``t`` shares
    (pure Python, ``t^2`` field products), from a random index set of the node's holders.

    Only these three keys (``bench/scale.py`` makes a row of each); ``t`` is
    ``graph_parameters``'s, or ``threshold(n, fraction)`` in the full graph."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, not {graph!r}")
    fraction = RunSpec.secagg_threshold
    k, t = (
        (n - 1, threshold(n, fraction))
        if graph == "full"
        else graph_parameters(n, fraction=fraction)
    )
    full = k == n - 1
    dropped = max(1, round(COST_DROPOUT * n))
    survivors = n - dropped
    alive_peers = round(k * survivors / (n - 1))
    pick = random.Random(n)
    node, length = 0, COST_VALUES + 1
    own = X25519PrivateKey.generate()
    peers = [X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(k)]
    seed = os.urandom(32)
    quantized = np.zeros(length, np.uint32)

    def mask() -> None:
        total = quantized + self_mask(seed, RUN, ROUND, node, length)
        for peer, public in enumerate(peers, start=1):
            apply_pair_mask(total, agree(own, public), RUN, ROUND, node, peer, sign=1)

    holders = n if full else k + 1
    round_set = sorted(pick.sample(range(1, holders + 1), t))  # the full graph's one set

    def shares() -> dict[int, bytes]:
        indices = round_set if full else sorted(pick.sample(range(1, holders + 1), t))
        return _random_shares(indices)

    def survivor(given: dict[int, bytes]) -> None:
        rebuilt = combine_secret(given)
        if seed_commitment(rebuilt, RUN, ROUND, node) == seed:  # as result() checks it
            raise RuntimeError("a random seed matched a commitment")
        self_mask(rebuilt, RUN, ROUND, node, length)

    def gone(given: dict[int, bytes]) -> None:
        key = X25519PrivateKey.from_private_bytes(combine_secret(given))
        if key.public_key().public_bytes_raw() == seed:  # as result() checks it
            raise RuntimeError("a random key matched a public key")
        total = np.zeros(length, np.uint32)
        for peer, public in enumerate(peers[:alive_peers], start=1):
            apply_pair_mask(total, agree(key, public), RUN, ROUND, peer, node, sign=-1)

    per_survivor = _median_of_fresh(survivor, shares)
    per_dropped = _median_of_fresh(gone, shares)
    return {
        "peers": float(k),
        "mask_seconds": _median_seconds(mask),
        "unmask_seconds": survivors * per_survivor + dropped * per_dropped,
    }
