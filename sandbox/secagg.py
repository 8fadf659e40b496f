"""Secure aggregation (Bonawitz et al., CCS 2017): what the aggregator and the nodes share.

The protocol runs as five stages of a training round over Flower's Message API:

1. *advertise*: each node makes two fresh X25519 key pairs for the round (``c`` seals the
   shares it sends, ``s`` agrees its pairwise masks) and a 32-byte self-mask seed ``b``,
   and signs both public keys with its attested identity: the Ed25519 key whose
   certification (an EAR of purpose ``signing``) the key broker signed against the
   node sandbox's attestation. Nodes and aggregator check every advertisement against
   the verifier's result key, so the aggregator cannot put a key of its own in a node's
   place.
2. *share*: each node splits ``b`` and its ``s`` private key into Shamir shares
   (threshold ``t`` of the ``n`` advertised nodes; pycryptodome's GF(2^128) scheme, over
   two 16-byte halves) and seals each peer's shares with AES-GCM under a key derived
   from their ``c`` agreement; the aggregator only routes them.
3. *mask*: each node validates its update, quantizes it into 32-bit fixed point and adds
   a self mask expanded from ``b`` and, for every peer that shared, a pairwise mask
   expanded from the full ``s`` agreement (added by the lower node id, subtracted by the
   higher), all mod 2^32. Masks are ChaCha20 keystreams keyed by HKDF-SHA256 whose
   ``info`` names the purpose and binds run, round and the pair.
4. *check* (Bonawitz et al.'s consistency check), when a node dropped: the aggregator
   names one split of the nodes that shared into survivors (whose masked input it holds)
   and dropped; each survivor signs it, with the same attested key, only if it is
   exactly the set it masked with, and signs one split per round. With nobody dropped
   the split is "every node it masked with" and needs no signatures (only seed shares
   are revealed then).
5. *unmask*: with at least ``t`` survivors' signatures over that one split, each
   survivor reveals, once per round, its shares of the survivors' seeds and of the
   dropped nodes' ``s`` keys, never both for one node; the aggregator removes every mask
   and holds only the sum. Without the check, an aggregator could tell each node another
   split and unmask one node's update, or the sum of fewer than ``t`` of them.

**Sparse rounds** (Bell et al., CCS 2020, as in SecAgg+): with many nodes, stages 2 to 5
run over a :class:`MaskGraph` instead of between every pair. Each node shares ``b`` and
``s`` among its *holders* (its ``k`` neighbours and itself, threshold ``t``), masks only
with its neighbours that shared, and reveals only its neighbours' shares; a survivor's
seed is rebuilt from ``t`` of its holders, a dropped node's key from ``t`` of its
neighbours. Nobody sends the graph: every party derives it from the advertisements it
verified (:func:`graph_seed`) and ``k, t`` from their count (:func:`graph_parameters`).
The full graph (``k = n - 1``, the holders are every advertised node) is the protocol
above, byte for byte. What a sparse round changes in the rules:

* a node signs and reveals only for a split with at least ``t`` survivors among its own
  holders (besides the strict majority of survivors overall), and reveals only with at
  least ``t`` of its holders' signatures over it: the unmask request carries those;
* the check stage always runs (no unsigned reveal when nobody dropped);
* a node reveals a survivor's seed share only with that survivor's own signature over
  the split (the request carries it), which says the survivor masked with exactly the
  split's nodes: without it, the aggregator could leave some of a node's holders out of
  its mask roster and still have them reveal its seed.

Why it holds, for an honest node ``u`` with ``c`` colluding neighbours, while
``2t > k + 1 + c`` (what the parameters make true for every node with probability
``1 - 2^-SECURITY_BITS``): its honest holders each reveal one kind of share of it, so
``b`` and ``s`` cannot both reach ``t``; and a holder ``r`` that revealed (for a split
``t`` of *its* holders signed) never has its own ``s`` rebuilt, as that needs ``t`` of
its holders to have signed another split. So every pair mask between ``u`` and an honest
holder that revealed ``u``'s seed stays until that holder is in the sum too: every sum
the aggregator can unmask holds at least ``t - c`` honest inputs (``t`` without
colluders, which is what the client-level DP noise shares are sized for).

This module holds the wire formats (strictly parsed: every party's bytes are hostile),
the quantization, the mask expansion, the share sealing and the mask graph. The node's
state machine is ``clients/secagg.py``, the aggregator's ``server/secagg.py``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from hashlib import sha256
from typing import Any, Protocol

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandbox.attestation.result import (
    AFFIRMING,
    PURPOSE_SIGNING,
    SIGNING_SUITE,
    AttestationResult,
    verify_result,
)
from sandbox.errors import (
    AdvertisementInvalid,
    AttestationError,
    QuantizationOverflow,
    SecAggMessageInvalid,
)
from sandbox.strictjson import StrictJSONError, loads

FORMAT = "ark-secagg/1"
STAGE_ADVERTISE = "advertise"
STAGE_SHARE = "share"
STAGE_MASK = "mask"
STAGE_CHECK = "check"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASK, STAGE_CHECK, STAGE_UNMASK)
# The one tensor a masked input travels as inside the sealed uplink envelope.
MASKED_TENSOR = "secagg.masked"
# The masked sum is taken mod 2^32; quantized values are read back as signed 32-bit.
MODULUS = 2**32
INT32_MAX = 2**31 - 1
KEY_BYTES = 32
SEED_BYTES = 32
SIGNATURE_BYTES = 64
# One Shamir share of a 32-byte secret: two 16-byte shares of its halves.
SHARE_BYTES = 32
_HALF = 16
_NONCE_BYTES = 12
# A sealed share: nonce, the share index, the seed's share and the key's share, the tag.
SEALED_SHARE_BYTES = _NONCE_BYTES + 4 + 2 * SHARE_BYTES + 16
# The longest EAR token an advertisement may carry (as the hello's result limit).
MAX_CERTIFICATE = 16 * 1024
# The most nodes one round may have (message sizes grow with it).
MAX_NODES = 10_000
# The largest secure-aggregation message a node's reply may carry (a share bundle for
# thousands of peers fits; nothing near an adapter's size does): checked by the node's
# egress guard and by the aggregator before it parses one.
MAX_REPLY_BYTES = 4 * 1024 * 1024
_HKDF_SALT = b"ark/v1/secagg"
_ADVERTISE_DOMAIN = b"ark/v1/secagg/advertise\0"
_CONSISTENCY_DOMAIN = b"ark/v1/secagg/consistency\0"
_SEED_DOMAIN = b"ark/v1/secagg/seed\0"


# -- thresholds and quantization -------------------------------------------------------------


def threshold(nodes: int, fraction: float) -> int:
    """The shares needed to reconstruct a secret among ``nodes`` advertised nodes: at least
    ``fraction`` of them and always a strict majority, so that no two disjoint sets of
    honest survivors can each reveal one kind of share of the same node."""
    if nodes < 1:
        raise ValueError(f"threshold of {nodes} nodes")
    return min(nodes, max(nodes // 2 + 1, math.ceil(fraction * nodes - 1e-9), 2))


@dataclass(frozen=True)
class Quantization:
    """Fixed point into 32-bit integers for ``nodes`` nodes, each value in [-clip, clip].

    Values are scaled by ``scale = floor(floor((2^31 - 1) / nodes) / clip)`` and rounded, so
    a rounded value is at most ``floor((2^31 - 1) / nodes)`` in magnitude and the sum of
    ``nodes`` of them never leaves the signed 32-bit range: the sum mod 2^32, read as a
    signed integer, is the exact sum of the rounded values. (``floor((2^31 - 1) / (nodes *
    clip))`` is not enough: for a clip that is not a whole number ``clip * scale`` can end
    in .5 or more and round up, and ``nodes`` values at the clip then wrap.) The weight (in
    (0, 1]) is one more element, scaled by ``floor((2^31 - 1) / nodes)``. A value outside
    the range is refused (:class:`QuantizationOverflow`), never wrapped or silently clipped.
    """

    clip: float
    nodes: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)) or not 1 <= self.nodes <= MAX_NODES:
            raise QuantizationOverflow(
                f"no quantization for clip {self.clip!r} and {self.nodes!r} nodes"
            )
        if self.scale < 1:
            raise QuantizationOverflow(
                f"clip {self.clip:g} times {self.nodes} nodes leaves no 32-bit precision"
            )

    @property
    def scale(self) -> int:
        return int((INT32_MAX // self.nodes) / self.clip)

    @property
    def weight_scale(self) -> int:
        return INT32_MAX // self.nodes

    def encode(self, values: np.ndarray, weight: float) -> np.ndarray:
        """``weight * values`` and ``weight`` as uint32 (the weight last).

        QuantizationOverflow unless every weighted value is finite and within the clip
        range and the weight is in (0, 1]: such an input could overflow the sum."""
        if not (0 < weight <= 1 and math.isfinite(weight)):
            raise QuantizationOverflow(f"weight {weight!r} is outside (0, 1]")
        weighted = np.asarray(values, np.float64) * weight
        if not np.isfinite(weighted).all():
            raise QuantizationOverflow("the update contains NaN or Inf")
        peak = float(np.abs(weighted).max()) if weighted.size else 0.0
        if peak > self.clip:
            raise QuantizationOverflow(
                f"a weighted update value of magnitude {peak:.4g} is outside the clip "
                f"range [-{self.clip:g}, {self.clip:g}] (secagg-clip): {self.nodes} such "
                "values could overflow the 32-bit sum"
            )
        quantized = np.empty(weighted.size + 1, np.int64)
        np.rint(weighted * self.scale, out=quantized[:-1], casting="unsafe")
        quantized[-1] = round(weight * self.weight_scale)
        return quantized.astype(np.uint32)  # two's complement: the value mod 2^32

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """The summed weighted values and the summed weight from a uint32 sum."""
        signed = np.asarray(total, np.uint32).view(np.int32).astype(np.float64)
        weight = float(np.asarray(total, np.uint32)[-1]) / self.weight_scale
        return signed[:-1] / self.scale, weight

    def bound(self, count: int, weight: float, magnitude: float) -> float:
        """The most one element of the decoded weighted mean can differ from the plaintext
        weighted mean of ``count`` updates whose summed weight is ``weight`` and whose
        mean's largest element is ``magnitude``: half a step per value and per weight."""
        value_error = count * 0.5 / self.scale
        weight_error = count * 0.5 / self.weight_scale
        return (value_error + magnitude * weight_error) / max(weight - weight_error, 1e-300)


# -- masks -------------------------------------------------------------------------------------


def round_context(run: int, rnd: int) -> bytes:
    return struct.pack(">QQ", run, rnd)


def _keystream(ikm: bytes, purpose: bytes, context: bytes) -> CipherContext:
    """ChaCha20 under a key derived from ``ikm`` (the full secret) for ``purpose`` and
    ``context``: the key is unique to them, so the all-zero nonce is never reused."""
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_HKDF_SALT,
        info=b"ark/v1/secagg/" + purpose + b"\0" + context,
    ).derive(ikm)
    return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()


def _expand(ikm: bytes, purpose: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of :func:`_keystream`."""
    stream = _keystream(ikm, purpose, context)
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4")


def self_mask(seed: bytes, run: int, rnd: int, node: int, length: int) -> np.ndarray:
    """The mask node ``node`` adds from its own seed ``b``."""
    return _expand(seed, b"self-mask", round_context(run, rnd) + struct.pack(">Q", node), length)


def pair_mask(shared: bytes, run: int, rnd: int, u: int, v: int, length: int) -> np.ndarray:
    """The mask nodes ``u`` and ``v`` both expand from their ``s`` agreement (``shared``)."""
    low, high = sorted((u, v))
    context = round_context(run, rnd) + struct.pack(">QQ", low, high)
    return _expand(shared, b"pair-mask", context, length)


def apply_pair_mask(
    total: np.ndarray, shared: bytes, run: int, rnd: int, owner: int, peer: int, *, sign: int
) -> None:
    """Add (``sign=1``) or remove (``-1``) in place, mod 2^32, the pair mask ``owner``
    applied for ``peer``: the lower node id adds it, the higher subtracts it."""
    mask = pair_mask(shared, run, rnd, owner, peer, total.size)
    if (owner < peer) == (sign > 0):
        total += mask
    else:
        total -= mask


def agree(private: X25519PrivateKey, public: bytes) -> bytes:
    """The X25519 agreement with a peer's raw public key (AdvertisementInvalid for a key
    of small order, with which every agreement is zero)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise AdvertisementInvalid(f"unusable X25519 public key: {exc}") from None


# -- Shamir shares -------------------------------------------------------------------------


def split_secret(secret: bytes, t: int, n: int) -> list[bytes]:
    """``n`` shares of a 32-byte ``secret`` (share ``i`` for index ``i + 1``), any ``t``
    of which rebuild it."""
    if len(secret) != 2 * _HALF:
        raise ValueError("secrets are 32 bytes")
    halves = [Shamir.split(t, n, secret[i : i + _HALF], ssss=False) for i in (0, _HALF)]
    return [low[1] + high[1] for low, high in zip(*halves, strict=True)]


def combine_secret(shares: Mapping[int, bytes]) -> bytes:
    """The 32-byte secret from ``{index: share}`` (at least the threshold of them), by
    pycryptodome's ``Shamir.combine`` (pure Python: ``t^2`` field products a secret)."""
    halves = [
        Shamir.combine(
            [(index, share[i : i + _HALF]) for index, share in sorted(shares.items())], ssss=False
        )
        for i in (0, _HALF)
    ]
    return halves[0] + halves[1]


def _share_key(private: X25519PrivateKey, public: bytes, aad: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_HKDF_SALT,
        info=b"ark/v1/secagg/share\0" + aad,
    ).derive(agree(private, public))
    return AESGCM(key)


def _share_aad(run: int, rnd: int, sender: int, recipient: int) -> bytes:
    return round_context(run, rnd) + struct.pack(">QQ", sender, recipient)


def seal_share(
    private: X25519PrivateKey,
    peer_public: bytes,
    *,
    run: int,
    rnd: int,
    sender: int,
    recipient: int,
    index: int,
    seed_share: bytes,
    key_share: bytes,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """``recipient``'s shares of ``sender``'s seed and ``s`` key, sealed from ``sender``'s
    ``c`` key to ``recipient``'s; the direction, run and round are bound as AAD."""
    aad = _share_aad(run, rnd, sender, recipient)
    nonce = rng(_NONCE_BYTES)
    plain = struct.pack(">I", index) + seed_share + key_share
    return nonce + _share_key(private, peer_public, aad).encrypt(nonce, plain, aad)


def open_share(
    private: X25519PrivateKey,
    peer_public: bytes,
    sealed: bytes,
    *,
    run: int,
    rnd: int,
    sender: int,
    recipient: int,
) -> tuple[int, bytes, bytes]:
    """The share index, seed share and key share ``sender`` sealed for ``recipient``;
    SecAggMessageInvalid if it does not open under this exact context."""
    aad = _share_aad(run, rnd, sender, recipient)
    try:
        plain = _share_key(private, peer_public, aad).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad
        )
    except (InvalidTag, ValueError):
        raise SecAggMessageInvalid(f"the share from node {sender} does not open") from None
    if len(plain) != 4 + 2 * SHARE_BYTES:
        raise SecAggMessageInvalid(f"the share from node {sender} has the wrong length")
    (index,) = struct.unpack(">I", plain[:4])
    return index, plain[4 : 4 + SHARE_BYTES], plain[4 + SHARE_BYTES :]


# -- wire formats --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, where: str, size: int | None = None, limit: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecAggMessageInvalid(f"{where} must be base64 text")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SecAggMessageInvalid(f"{where} is not base64") from None
    if size is not None and len(data) != size:
        raise SecAggMessageInvalid(f"{where} must be {size} bytes, not {len(data)}")
    if limit is not None and len(data) > limit:
        raise SecAggMessageInvalid(f"{where} is longer than {limit} bytes")
    return data


def _uint(value: Any, where: str, limit: int = 2**64) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise SecAggMessageInvalid(f"{where} must be an integer in [0, {limit}), got {value!r}")
    return value


def _object(raw: bytes | Any, kind: str, keys: Iterable[str]) -> dict[str, Any]:
    """The JSON object of a ``kind`` message with exactly ``keys`` (and its format)."""
    if isinstance(raw, bytes):
        try:
            value = loads(raw)
        except (StrictJSONError, UnicodeDecodeError) as exc:
            raise SecAggMessageInvalid(f"a {kind} message is not JSON: {exc}") from None
    else:
        value = raw
    expected = {"format", *keys}
    if not isinstance(value, dict) or set(value) != expected:
        found = sorted(value)[:8] if isinstance(value, dict) else type(value).__name__
        raise SecAggMessageInvalid(f"a {kind} message must have keys {sorted(expected)}: {found}")
    if value["format"] != FORMAT:
        raise SecAggMessageInvalid(f"a {kind} message is not {FORMAT}")
    return value


def _dump(kind_fields: Mapping[str, Any]) -> bytes:
    return json.dumps({"format": FORMAT, **kind_fields}, separators=(",", ":")).encode()


def _node_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggMessageInvalid(f"{where} must be a list of at most {MAX_NODES} node ids")
    nodes = tuple(_uint(v, f"{where}[{i}]") for i, v in enumerate(value))
    if list(nodes) != sorted(set(nodes)):
        raise SecAggMessageInvalid(f"{where} must be sorted node ids without repeats")
    return nodes


def _blob_map(value: Any, where: str, size: int) -> dict[int, bytes]:
    """``[[node, base64], ...]`` sorted by node, each blob exactly ``size`` bytes."""
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggMessageInvalid(f"{where} must be a list of at most {MAX_NODES} pairs")
    pairs: dict[int, bytes] = {}
    last = -1
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise SecAggMessageInvalid(f"{where}[{i}] must be a [node, data] pair")
        node = _uint(pair[0], f"{where}[{i}][0]")
        if node <= last:
            raise SecAggMessageInvalid(f"{where} must be sorted by node without repeats")
        last = node
        pairs[node] = _unb64(pair[1], f"{where}[{i}][1]", size)
    return pairs


def _pairs(blobs: Mapping[int, bytes]) -> list[list[Any]]:
    return [[node, _b64(blob)] for node, blob in sorted(blobs.items())]


@dataclass(frozen=True)
class Advertisement:
    """A node's two public keys for one round, signed by its attested signing key, with
    the key broker's certification (EAR token) of that signing key."""

    run: int
    round: int
    node: int
    c_pk: bytes
    s_pk: bytes
    # SHA-256 commitment to the node's self-mask seed (:func:`seed_commitment`): a seed
    # rebuilt from wrong shares is caught instead of silently spoiling the sum.
    seed_commitment: bytes
    signer: bytes
    signature: bytes
    certificate: str

    @staticmethod
    def signed_bytes(
        run: int, rnd: int, node: int, c_pk: bytes, s_pk: bytes, seed_commitment: bytes
    ) -> bytes:
        return (
            _ADVERTISE_DOMAIN + struct.pack(">QQQ", run, rnd, node) + c_pk + s_pk + seed_commitment
        )

    @classmethod
    def sign(
        cls,
        key: Ed25519PrivateKey,
        certificate: str,
        *,
        run: int,
        rnd: int,
        node: int,
        c_pk: bytes,
        s_pk: bytes,
        seed_commitment: bytes,
    ) -> Advertisement:
        signature = key.sign(cls.signed_bytes(run, rnd, node, c_pk, s_pk, seed_commitment))
        signer = key.public_key().public_bytes_raw()
        return cls(run, rnd, node, c_pk, s_pk, seed_commitment, signer, signature, certificate)

    def verify(self, result_key: Any, *, now: dt.datetime, run: int, rnd: int) -> AttestationResult:
        """The certification of the signing key; AdvertisementInvalid unless this
        advertisement is for ``run`` and ``rnd``, its signature verifies under the signing
        key, and an affirming result of purpose ``signing`` signed by ``result_key``
        certifies exactly that key for a named TEE (ueid)."""
        where = f"node {self.node}'s key advertisement"
        if (self.run, self.round) != (run, rnd):
            raise AdvertisementInvalid(f"{where} is for run {self.run} round {self.round}")
        try:
            result = verify_result(self.certificate, result_key, now=now)
        except AttestationError as exc:
            raise AdvertisementInvalid(
                f"{where} is not signed by an attested identity: its certification fails: {exc}"
            ) from None
        if (
            result.status != AFFIRMING
            or result.purpose != PURPOSE_SIGNING
            or result.hpke_suite != SIGNING_SUITE
            or result.tee_pubkey != self.signer
            or not result.ueid
        ):
            raise AdvertisementInvalid(
                f"{where} is not signed by an attested identity: its certification is not "
                "an affirming signing result for the key that signed it"
            )
        try:
            Ed25519PublicKey.from_public_bytes(self.signer).verify(
                self.signature,
                self.signed_bytes(
                    self.run, self.round, self.node, self.c_pk, self.s_pk, self.seed_commitment
                ),
            )
        except (InvalidSignature, ValueError):
            raise AdvertisementInvalid(f"{where}: the signature does not verify") from None
        return result

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "run": self.run,
            "round": self.round,
            "node": self.node,
            "c_pk": _b64(self.c_pk),
            "s_pk": _b64(self.s_pk),
            "b_commit": _b64(self.seed_commitment),
            "signer": _b64(self.signer),
            "sig": _b64(self.signature),
            "cert": self.certificate,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | Any) -> Advertisement:
        keys = ("run", "round", "node", "c_pk", "s_pk", "b_commit", "signer", "sig", "cert")
        value = _object(raw, "key advertisement", keys)
        cert = value["cert"]
        if not isinstance(cert, str) or not 0 < len(cert) <= MAX_CERTIFICATE:
            raise SecAggMessageInvalid(
                f"a key advertisement's cert must be text of at most {MAX_CERTIFICATE} bytes"
            )
        return cls(
            run=_uint(value["run"], "run"),
            round=_uint(value["round"], "round"),
            node=_uint(value["node"], "node"),
            c_pk=_unb64(value["c_pk"], "c_pk", KEY_BYTES),
            s_pk=_unb64(value["s_pk"], "s_pk", KEY_BYTES),
            seed_commitment=_unb64(value["b_commit"], "b_commit", KEY_BYTES),
            signer=_unb64(value["signer"], "signer", KEY_BYTES),
            signature=_unb64(value["sig"], "sig", SIGNATURE_BYTES),
            certificate=cert,
        )


@dataclass(frozen=True)
class ShareRequest:
    """Stage 2's instruction: every advertisement the aggregator accepted (sorted by node)."""

    run: int
    round: int
    adverts: tuple[Advertisement, ...]

    def to_bytes(self) -> bytes:
        adverts = [a.to_json() for a in self.adverts]
        return _dump(
            {"stage": STAGE_SHARE, "run": self.run, "round": self.round, "adverts": adverts}
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShareRequest:
        value = _object(raw, "share request", ("stage", "run", "round", "adverts"))
        adverts = value["adverts"]
        if value["stage"] != STAGE_SHARE or not isinstance(adverts, list):
            raise SecAggMessageInvalid("a share request must list advertisements")
        if len(adverts) > MAX_NODES:
            raise SecAggMessageInvalid(f"a share request lists more than {MAX_NODES} nodes")
        parsed = tuple(Advertisement.from_json(a) for a in adverts)
        _node_list([a.node for a in parsed], "adverts' nodes")
        return cls(_uint(value["run"], "run"), _uint(value["round"], "round"), parsed)


@dataclass(frozen=True)
class ShareBundle:
    """Stage 2's reply: one sealed share per neighbour in the round's mask graph (every
    other advertised node in the full graph), keyed by recipient."""

    run: int
    round: int
    node: int
    shares: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_SHARE,
                "run": self.run,
                "round": self.round,
                "node": self.node,
                "shares": _pairs(self.shares),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShareBundle:
        value = _object(raw, "share bundle", ("stage", "run", "round", "node", "shares"))
        if value["stage"] != STAGE_SHARE:
            raise SecAggMessageInvalid("a share bundle must be of stage share")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _uint(value["node"], "node"),
            _blob_map(value["shares"], "shares", SEALED_SHARE_BYTES),
        )


@dataclass(frozen=True)
class MaskRequest:
    """Stage 3's instruction: the nodes that shared (the node masks with those among its
    neighbours), and the sealed shares its neighbours among them sent it (by sender)."""

    run: int
    round: int
    roster: tuple[int, ...]
    shares: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_MASK,
                "run": self.run,
                "round": self.round,
                "roster": list(self.roster),
                "shares": _pairs(self.shares),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> MaskRequest:
        value = _object(raw, "mask request", ("stage", "run", "round", "roster", "shares"))
        if value["stage"] != STAGE_MASK:
            raise SecAggMessageInvalid("a mask request must be of stage mask")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _node_list(value["roster"], "roster"),
            _blob_map(value["shares"], "shares", SEALED_SHARE_BYTES),
        )


def seed_commitment(seed: bytes, run: int, rnd: int, node: int) -> bytes:
    """What a node's advertisement commits its self-mask seed as."""
    return sha256(_SEED_DOMAIN + struct.pack(">QQQ", run, rnd, node) + seed).digest()


def consistency_bytes(
    run: int,
    rnd: int,
    roster: Sequence[int],
    survivors: Sequence[int],
    dropped: Sequence[int],
    graph: MaskGraph | None = None,
) -> bytes:
    """What each survivor signs in the check stage: the round, the advertised nodes (as a
    digest) and the split of the nodes that shared into survivors and dropped; with a
    sparse ``graph``, its seed, degree and threshold too, so that nodes shown different
    advertisement sets (hence graphs) cannot count each other's signatures. The full
    graph adds nothing: its bytes are as they were before sparse rounds."""

    def ids(nodes: Sequence[int]) -> bytes:
        return struct.pack(f">I{len(nodes)}Q", len(nodes), *nodes)

    sparse = (
        b"" if graph is None or graph.full else graph.seed + struct.pack(">II", graph.k, graph.t)
    )
    return (
        _CONSISTENCY_DOMAIN
        + struct.pack(">QQ", run, rnd)
        + sha256(ids(roster)).digest()
        + ids(survivors)
        + ids(dropped)
        + sparse
    )


@dataclass(frozen=True)
class CheckRequest:
    """The check stage's instruction (Bonawitz et al.'s consistency check): the one split
    of the nodes that shared into survivors (whose masked input the aggregator holds) and
    dropped, which every survivor must sign before any of them reveals a share."""

    run: int
    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_CHECK,
                "run": self.run,
                "round": self.round,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CheckRequest:
        keys = ("stage", "run", "round", "survivors", "dropped")
        value = _object(raw, "check request", keys)
        if value["stage"] != STAGE_CHECK:
            raise SecAggMessageInvalid("a check request must be of stage check")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _node_list(value["survivors"], "survivors"),
            _node_list(value["dropped"], "dropped"),
        )


@dataclass(frozen=True)
class Consistency:
    """The check stage's reply: the survivor's signature over the split it was sent."""

    run: int
    round: int
    node: int
    signature: bytes

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_CHECK,
                "run": self.run,
                "round": self.round,
                "node": self.node,
                "sig": _b64(self.signature),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Consistency:
        value = _object(raw, "consistency signature", ("stage", "run", "round", "node", "sig"))
        if value["stage"] != STAGE_CHECK:
            raise SecAggMessageInvalid("a consistency signature must be of stage check")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _uint(value["node"], "node"),
            _unb64(value["sig"], "sig", SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 5's instruction: whose masked input the aggregator holds (survivors) and who
    shared but sent none (dropped)."""

    run: int
    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    # The survivors' check-stage signatures over this very split (at least the threshold):
    # every one in the full graph, those of the recipient's holders in a sparse one.
    signatures: Mapping[int, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_UNMASK,
                "run": self.run,
                "round": self.round,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "signatures": _pairs(self.signatures),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> UnmaskRequest:
        keys = ("stage", "run", "round", "survivors", "dropped", "signatures")
        value = _object(raw, "unmask request", keys)
        if value["stage"] != STAGE_UNMASK:
            raise SecAggMessageInvalid("an unmask request must be of stage unmask")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _node_list(value["survivors"], "survivors"),
            _node_list(value["dropped"], "dropped"),
            _blob_map(value["signatures"], "signatures", SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class Reveal:
    """Stage 5's reply: this node's shares of each survivor's seed and of each dropped
    node's ``s`` key, among the nodes it holds shares of (its neighbours and itself), and
    its place among the advertised nodes (from 1: in the full graph the index of every
    share; in a sparse graph each share's index is its place among the owner's
    holders, :meth:`MaskGraph.holders`)."""

    run: int
    round: int
    node: int
    index: int
    seeds: Mapping[int, bytes]
    keys: Mapping[int, bytes]

    def to_bytes(self) -> bytes:
        return _dump(
            {
                "stage": STAGE_UNMASK,
                "run": self.run,
                "round": self.round,
                "node": self.node,
                "index": self.index,
                "seeds": _pairs(self.seeds),
                "keys": _pairs(self.keys),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Reveal:
        keys = ("stage", "run", "round", "node", "index", "seeds", "keys")
        value = _object(raw, "reveal", keys)
        if value["stage"] != STAGE_UNMASK:
            raise SecAggMessageInvalid("a reveal must be of stage unmask")
        return cls(
            _uint(value["run"], "run"),
            _uint(value["round"], "round"),
            _uint(value["node"], "node"),
            _uint(value["index"], "index", MAX_NODES + 1),
            _blob_map(value["seeds"], "seeds", SHARE_BYTES),
            _blob_map(value["keys"], "keys", SHARE_BYTES),
        )


def node_reply(raw: bytes) -> ShareBundle | Consistency | Reveal:
    """A node's reply to a share, check or unmask request, by the stage it names."""
    try:
        value = loads(raw)
    except (StrictJSONError, UnicodeDecodeError) as exc:
        raise SecAggMessageInvalid(f"a secure-aggregation reply is not JSON: {exc}") from None
    stage = value.get("stage") if isinstance(value, dict) else None
    if stage == STAGE_SHARE:
        return ShareBundle.from_bytes(raw)
    if stage == STAGE_CHECK:
        return Consistency.from_bytes(raw)
    if stage == STAGE_UNMASK:
        return Reveal.from_bytes(raw)
    raise SecAggMessageInvalid("a secure-aggregation reply must be of stage share, check or unmask")


def share_index(roster: Sequence[int], node: int) -> int:
    """``node``'s place in ``roster``, from 1: among the advertised nodes, the index of its
    shares in the full graph; among a node's holders, its index for that node's secrets."""
    return list(roster).index(node) + 1


# -- the mask graph (sparse rounds) ----------------------------------------------------------

# What the sparse graph's degree and threshold are derived for (graph_parameters). The
# dropout rate is the chance that a node which shared is gone before it reveals (lost
# mid-round, timed out): 5% is what a round should be built to survive routinely, and a
# round with more dropouts in one neighbourhood fails closed. The corrupt rate is the
# share of attested nodes that may collude with the aggregator: a fifth, what the full
# graph's default ``secagg-threshold`` (0.6: ``t > (n + c) / 2`` for ``c < 0.2 n``)
# tolerates, so that going sparse keeps the promise (as a bound in probability).
DROPOUT_RATE = 0.05
CORRUPT_RATE = 0.2
# The targets (Bell et al.'s style, union-bounded over the n nodes of a round): with
# independent dropouts at DROPOUT_RATE a round fails for want of ``t`` surviving holders
# with probability at most 2^-CORRECTNESS_BITS; with colluders placed independently at
# CORRUPT_RATE some honest node has too many colluding neighbours (``2t <= k + 1 + c``)
# with probability at most 2^-SECURITY_BITS, even for an aggregator that tries
# 2^GRINDING_BITS advertised sets for a graph it likes (see graph_seed), so one graph is
# held to 2^-(SECURITY_BITS + GRINDING_BITS).
CORRECTNESS_BITS = 20
SECURITY_BITS = 40
GRINDING_BITS = 30
# Below this many advertised nodes every round uses the full graph: there the sparse
# degree (at least 120 at the rates above) saves little, and the full graph's promise
# holds for any colluding set below the threshold, not just with high probability.
SPARSE_MIN_NODES = 300
# The largest sparse degree searched for; rates that need more get the full graph.
MAX_SPARSE_DEGREE = 512
_GRAPH_DOMAIN = b"ark/v1/secagg/graph\0"
_WORDS_PER_DRAW = 1024


class GraphParameters(Protocol):
    """What derives a round's ``(k, t)`` from its advertised count: :func:`graph_parameters`
    (or the same with other rates, for tests and benches)."""

    def __call__(self, n: int, *, fraction: float) -> tuple[int, int]: ...


def _rational(value: float, where: str) -> Fraction:
    if not (0 <= value < 1 and math.isfinite(value)):
        raise ValueError(f"{where} must be in [0, 1), got {value!r}")
    return Fraction(repr(value))


class _Binomial:
    """Binomial(k, p) for ``p = a / D``, exactly, for every ``k`` up to a bound: the weights
    ``C(k, i) a^i (D - a)^(k - i)`` over the one denominator ``D^k``, from powers made
    once (every party must get the same numbers, whatever its floating point)."""

    def __init__(self, p: Fraction, most: int):
        a, d = p.numerator, p.denominator
        self.hits, self.misses, self.whole = [1], [1], [1]
        for _ in range(most):
            self.hits.append(self.hits[-1] * a)
            self.misses.append(self.misses[-1] * (d - a))
            self.whole.append(self.whole[-1] * d)

    def weights(self, k: int) -> list[int]:
        return [math.comb(k, i) * self.hits[i] * self.misses[k - i] for i in range(k + 1)]


def _threshold_range(
    k: int,
    n: int,
    alive: _Binomial,
    colluding: _Binomial,
    correctness_bits: int,
    security_bits: int,
) -> tuple[int, int]:
    """The least ``t`` that meets the security target at degree ``k`` and the largest that
    meets the correctness target (none meets both when the first is larger)."""
    # Correctness: a dropped node's ``s`` needs ``t`` of its ``k`` neighbours alive (a
    # survivor's seed has itself too, so this is the harder of the two). The largest ``t``
    # with n * 2^bits * P[Binomial(k, 1 - dropout) < t] <= 1.
    weights, whole = alive.weights(k), alive.whole[k]
    below, t_max = 0, 0
    for t in range(1, k + 1):
        below += weights[t - 1]
        if n * 2**correctness_bits * below > whole:
            break
        t_max = t
    # Security: the fewest colluding neighbours ``c`` with n * 2^bits * P[Binomial(k,
    # corrupt) >= c] <= 1; then ``2t > k + 1 + (c - 1)`` keeps every node safe.
    weights, whole = colluding.weights(k), colluding.whole[k]
    above, c = 0, k + 1
    while c > 0 and n * 2**security_bits * (above + weights[c - 1]) <= whole:
        c -= 1
        above += weights[c]
    return (k + c + 2) // 2, t_max  # the least t with 2t >= k + 1 + c


@functools.lru_cache(maxsize=256)
def _sparse_parameters(
    n: int, dropout: Fraction, corrupt: Fraction, correctness_bits: int, security_bits: int
) -> tuple[int, int] | None:
    """The smallest even ``k`` (and its ``t``) that meets both targets, or None below
    MAX_SPARSE_DEGREE and ``n - 1``; None at once when the largest degree searched does
    not meet them (the search would be long and, the tails only thinning with ``k``,
    find nothing; and the full graph is the safe answer anyway)."""
    most = min(n - 2, MAX_SPARSE_DEGREE) // 2 * 2
    if most < 2:
        return None
    alive, colluding = _Binomial(1 - dropout, most), _Binomial(corrupt, most)
    bits = (correctness_bits, security_bits)
    least, most_t = _threshold_range(most, n, alive, colluding, *bits)
    if least > most_t:
        return None
    for k in range(2, most, 2):
        low, high = _threshold_range(k, n, alive, colluding, *bits)
        if low <= high:
            return k, high
    return most, most_t


def graph_parameters(
    n: int,
    dropout: float = DROPOUT_RATE,
    corrupt: float = CORRUPT_RATE,
    *,
    fraction: float,
    correctness_bits: int = CORRECTNESS_BITS,
    security_bits: int = SECURITY_BITS + GRINDING_BITS,
    min_nodes: int = SPARSE_MIN_NODES,
    collusion_floor: bool = True,
) -> tuple[int, int]:
    """The mask graph's degree ``k`` and share threshold ``t`` for ``n`` advertised nodes.

    Sparse: the smallest even ``k`` for which some ``t`` meets both targets when each
    neighbour independently drops with probability ``dropout`` and colludes with the
    aggregator with probability ``corrupt``: ``n * P[Binomial(k, 1 - dropout) < t] <=
    2^-correctness_bits`` (every node's secrets can be rebuilt) and ``n *
    P[Binomial(k, corrupt) >= 2t - k - 1] <= 2^-security_bits`` (no honest node has
    enough colluding holders to have both its seed and its key rebuilt); of the ``t``
    that meet both, the largest (the spare margin goes to security). ``corrupt`` is at
    least ``2 fraction - 1``, what the run's ``secagg-threshold`` tolerates on the full
    graph, so asking a higher threshold never buys a weaker sparse graph (unless
    ``collusion_floor`` is off: tests and benches of other rates). The full graph,
    ``(n - 1, threshold(n, fraction))`` as before sparse rounds existed, below
    ``min_nodes`` nodes or when the sparse ``k`` would not be below ``n - 1``."""
    if not 1 <= n <= MAX_NODES:
        raise ValueError(f"graph parameters for {n} nodes")
    if correctness_bits < 1 or security_bits < 1:
        raise ValueError(f"targets of {correctness_bits} and {security_bits} bits")
    # A run that asks a higher threshold than the default tolerates more colluders on the
    # full graph (``c < (2 fraction - 1) n``): its sparse graph is sized for as many.
    if collusion_floor:
        corrupt = max(corrupt, 2 * fraction - 1)
    rates = (_rational(dropout, "dropout"), _rational(corrupt, "corrupt"))
    if n >= min_nodes:
        sparse = _sparse_parameters(n, *rates, correctness_bits, security_bits)
        if sparse is not None:
            return sparse
    return n - 1, threshold(n, fraction)


def graph_seed(run: int, rnd: int, adverts: Sequence[Advertisement]) -> bytes:
    """The seed of a round's mask graph: SHA-256 over a domain string, run, round and
    every advertised node's id, public keys, seed commitment and signing key, in node
    order. Each node recomputes it from the advertisements it verified; the aggregator
    sends no graph.

    It is fixed only when every advertisement is: honest nodes' keys are fresh random
    values, so nobody knows the graph before the share request. What the aggregator can
    still do is grind: pick which advertisements to include (leave some out, or have
    colluding nodes advertise fresh keys again and again) and keep the graph it likes
    best, since every candidate set is a new pseudo-random graph it can compute. It
    cannot pick a graph, only sample them, one SHA-256 and one ``n``-element shuffle per
    try, within the round's timeout; graph_parameters holds one graph to
    2^-(SECURITY_BITS + GRINDING_BITS), so 2^GRINDING_BITS tries leave it a chance of at
    most 2^-SECURITY_BITS. Leaving honest nodes out also shows: every refused
    advertisement is logged, and the sum holds fewer nodes."""
    nodes = [a.node for a in adverts]
    if nodes != sorted(set(nodes)):
        raise ValueError("a graph seed is over advertisements sorted by node, without repeats")
    digest = sha256(_GRAPH_DOMAIN + struct.pack(">QQI", run, rnd, len(adverts)))
    for a in adverts:
        digest.update(struct.pack(">Q", a.node) + a.c_pk + a.s_pk + a.seed_commitment + a.signer)
    return digest.digest()


def _words(seed: bytes) -> Iterator[int]:
    """uint32 words of the graph's ChaCha20 stream, keyed by HKDF over the full seed."""
    stream = _keystream(seed, b"graph-order", b"")
    while True:
        yield from struct.unpack(f"<{_WORDS_PER_DRAW}I", stream.update(bytes(4 * _WORDS_PER_DRAW)))


def _below(words: Iterator[int], bound: int) -> int:
    """A uniform integer in [0, bound): rejection sampling, so no index is favoured."""
    limit = 2**32 - 2**32 % bound
    word = next(words)
    while word >= limit:
        word = next(words)
    return word % bound


def ring_order(seed: bytes, nodes: Sequence[int]) -> tuple[int, ...]:
    """``nodes`` (sorted, distinct) in the ring order the seed draws: a Fisher-Yates
    shuffle with every index drawn from the seed's ChaCha20 stream."""
    if list(nodes) != sorted(set(nodes)):
        raise ValueError("a ring is over node ids sorted without repeats")
    order = list(nodes)
    words = _words(seed)
    for i in range(len(order) - 1, 0, -1):
        j = _below(words, i + 1)
        order[i], order[j] = order[j], order[i]
    return tuple(order)


def _check_graph(nodes: Sequence[int], k: int) -> None:
    """ValueError unless ``nodes`` are 2 or more sorted distinct ids and ``k`` is ``n - 1``
    or an even degree in [2, n - 1)."""
    n = len(nodes)
    if n < 2 or list(nodes) != sorted(set(nodes)):
        raise ValueError("a mask graph is over 2 or more node ids, sorted without repeats")
    if not (k == n - 1 or (k % 2 == 0 and 2 <= k < n - 1)):
        raise ValueError(f"no mask graph of degree {k} over {n} nodes")


def _ring_neighbours(order: Sequence[int], place: int, k: int) -> tuple[int, ...]:
    """The ``k / 2`` nodes on either side of ``order[place]`` on the ring, sorted."""
    n, half = len(order), k // 2
    return tuple(sorted(order[(place + step) % n] for step in range(-half, half + 1) if step))


def neighbours(seed: bytes, nodes: Sequence[int], k: int) -> dict[int, tuple[int, ...]]:
    """Each node's ``k`` neighbours (sorted): the Harary graph H(k, n) over the ring the
    seed draws (each node linked to the ``k / 2`` nearest on either side), or every other
    node when ``k = n - 1``."""
    _check_graph(nodes, k)
    if k == len(nodes) - 1:
        return {node: tuple(v for v in nodes if v != node) for node in nodes}
    order = ring_order(seed, nodes)
    return {node: _ring_neighbours(order, place, k) for place, node in enumerate(order)}


@dataclass(frozen=True)
class MaskGraph:
    """A round's mask graph: whom each node masks with and shares to.

    ``nodes`` are the advertised nodes (sorted). ``k = n - 1`` is the full graph, every
    pair; otherwise ``k`` is even and the graph is H(k, n) over :func:`ring_order`. ``t``
    of a node's *holders* (its neighbours and itself) rebuild its secrets; ``2t > k + 1``
    always, so no two disjoint halves of one node's holders both reach it."""

    seed: bytes
    nodes: tuple[int, ...]
    k: int
    t: int
    order: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _place: Mapping[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("a mask graph's seed is 32 bytes")
        _check_graph(self.nodes, self.k)
        full = self.full
        if not self.k + 1 < 2 * self.t <= 2 * (self.k + 1 if full else self.k):
            raise ValueError(f"threshold {self.t} is no strict majority of {self.k + 1} holders")
        order = self.nodes if full else ring_order(self.seed, self.nodes)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "_place", {node: i for i, node in enumerate(order)})

    @classmethod
    def derive(
        cls,
        run: int,
        rnd: int,
        adverts: Sequence[Advertisement],
        *,
        fraction: float,
        parameters: GraphParameters = graph_parameters,
    ) -> MaskGraph:
        """The graph of a round with these advertisements (sorted by node)."""
        k, t = parameters(len(adverts), fraction=fraction)
        return cls(graph_seed(run, rnd, adverts), tuple(a.node for a in adverts), k, t)

    @property
    def full(self) -> bool:
        return self.k == len(self.nodes) - 1

    def neighbours(self, node: int) -> tuple[int, ...]:
        """``node``'s ``k`` neighbours, sorted (KeyError for a node not in the graph)."""
        place = self._place[node]
        if self.full:
            return self.nodes[:place] + self.nodes[place + 1 :]
        return _ring_neighbours(self.order, place, self.k)

    def holders(self, node: int) -> tuple[int, ...]:
        """Who holds a share of ``node``'s secrets, sorted: its neighbours and itself (every
        node, in the full graph). A holder's share index is its place here, from 1."""
        if self.full:
            self._place[node]  # KeyError for a stranger, as neighbours()
            return self.nodes
        return tuple(sorted((*self.neighbours(node), node)))


def flatten(tensors: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The tensors named ``names``, in that order, as one float64 vector."""
    if not names:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in names])


def unflatten(
    vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten` over ``shapes`` (in their order), cast to ``dtypes``."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = vector[offset : offset + size].reshape(shape).astype(dtypes[name])
        offset += size
    return out
