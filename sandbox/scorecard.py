"""Held-out commitments and scorecards: what a node's sandbox signs about a comparison.

In a 1+N comparison each node scores every model on its private held-out set, before and
after fine-tuning. Before it scores anything, the node's sandbox *commits* to that set: a
Merkle tree hash (RFC 9162, :mod:`sandbox.translog.merkle`) over one leaf per example,
salted with a secret of the node's so that the root says nothing about guessable rows.
Every scorecard names that root. Both are signed with the sandbox's Ed25519 key, which the
key broker certified for the purpose "signing" (the key is bound in the sandbox's
attestation evidence as a channel key is), and both are logged; the auditor
(:mod:`sandbox.ops.translog.audit`) checks that no model was scored on another set and
that none is missing.

Both travel as a *signed record*: ``{"body": BODY, "signer": b64url(raw public key),
"sig": b64url(Ed25519 signature over DOMAIN + canonical bytes of BODY)}``, base64url
unpadded. The canonical bytes are JCS (RFC 8785) of the body as the transparency log
spells it (:func:`~sandbox.canonical.canonical_entry`: an integer beyond 2**53 - 1, such
as a Flower run id, as its decimal text), so a record verifies the same before and after
it is logged. DOMAIN says which kind of body is signed, so one never passes for the other.

A record from anywhere else is untrusted: :func:`open_commitment` and
:func:`open_scorecard` check its size, its exact shape and every value, then the
signature, and raise :class:`~sandbox.errors.ScorecardInvalid` naming the field and value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox import canonical, strictjson
from sandbox.attestation.evidence import b64url, b64url_decode
from sandbox.canonical import MAX_SAFE_INTEGER, canonical_entry
from sandbox.digests import sha256_hex
from sandbox.errors import (
    EventInvalid,
    EvidenceFormatError,
    ScorecardInvalid,
)
from sandbox.events.schema import decode_value
from sandbox.strictjson import INT_LIMIT, StrictJSONError
from sandbox.translog import merkle

COMMITMENT_FORMAT = "ark-heldout-commitment/1"
SCORECARD_FORMAT = "ark-scorecard/1"
COMMITMENT_DOMAIN = b"ark/v1/heldout-commitment\x00"
SCORECARD_DOMAIN = b"ark/v1/scorecard\x00"
# The largest signed record (its canonical JSON) accepted or made; the field bounds below
# keep every honest one far under it.
MAX_RECORD_BYTES = 16 * 1024
SALT_BYTES = 32
MAX_TEXT = 256  # characters of an id: comparison, job, ueid, model id
MAX_METRICS = 32  # metrics in ``before`` or in ``after``
MAX_HELDOUT = 2**32 - 1  # examples in one node's held-out set
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
RECORD_KEYS = frozenset({"body", "signer", "sig"})

_METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHOWN = 64  # characters of a bad value an error message repeats
_P = 2**255 - 19
# The y coordinates (little-endian, sign bit clear) of the eight Ed25519 points of small
# order: 0 (the two of order 4), 1 (the identity), the two y values of the four of order 8,
# and p - 1 (order 2); libsodium refuses the same list. Under such a key a forged
# signature verifies for any message (OpenSSL accepts R = identity, S = 0 under the
# identity), so it may sign nothing. Encodings of y >= p are refused as non-canonical.
_SMALL_ORDER_ED25519 = frozenset(
    bytes.fromhex(y)
    for y in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)

Opened = TypeVar("Opened", "Commitment", "Scorecard")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


def _bad(field: str, value: Any, rule: str) -> ScorecardInvalid:
    return ScorecardInvalid(f"{field} must be {rule}, got {_shown(value)}")


def _check_text(field: str, value: Any) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise _bad(field, value, f"printable text of 1 to {MAX_TEXT} characters")


def _check_sha256(field: str, value: Any) -> None:
    if not isinstance(value, str) or not _HEX_SHA256.fullmatch(value):
        raise _bad(field, value, "a SHA-256 digest in lowercase hex (64 characters)")


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(field, value, f"an integer from {low} to {high}")


def _check_number(field: str, value: Any, *, non_negative: bool = False) -> None:
    """A JSON number JCS holds as it is: a finite float, or an integer within 2**53 - 1
    (a larger one would be logged as text and no longer read as a number)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER)
        or not math.isfinite(value)
        or (non_negative and value < 0)
    ):
        rule = "a finite number" + (" of at least 0" if non_negative else "")
        raise _bad(field, value, rule)


def _metrics(field: str, value: Any) -> Mapping[str, float]:
    """``value`` checked as ``{metric name: finite number}``, as a read-only mapping."""
    if not isinstance(value, Mapping) or len(value) > MAX_METRICS:
        raise _bad(field, value, f"an object of at most {MAX_METRICS} metrics")
    for name, number in value.items():
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise _bad(f"{field} metric name", name, f"text matching {_METRIC_NAME.pattern}")
        _check_number(f"{field}.{name}", number)
    return types.MappingProxyType(dict(value))


def _fields_of(field: str, value: Any, names: Sequence[str]) -> dict[str, Any]:
    """The members of JSON object ``value``, which must have exactly the keys ``names``."""
    if not isinstance(value, Mapping):
        raise _bad(field, value, "a JSON object")
    for name in names:
        if name not in value:
            raise ScorecardInvalid(f"{field} lacks {name!r}")
    for name in value:
        if name not in names:
            raise ScorecardInvalid(f"{field} has an unknown key {_shown(name)}")
    return {name: value[name] for name in names}


def _body_fields(body: Any, format_name: str, names: Sequence[str]) -> dict[str, Any]:
    """The fields of a signed body of format ``format_name`` (exactly ``names`` besides)."""
    fields = _fields_of("body", body, ["format", *names])
    if fields.pop("format") != format_name:
        raise _bad("body.format", body["format"], repr(format_name))
    return fields


def _names(cls: type) -> list[str]:
    return [spec.name for spec in dataclasses.fields(cls)]


def heldout_leaf(salt: bytes, text: str, label: str) -> bytes:
    """The leaf one held-out example adds to its node's commitment: JCS of the salt
    (base64url), the text and the label. The salt keeps guessable rows out of the root."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"a held-out salt is {SALT_BYTES} bytes, got {len(salt)}")
    return canonical.dumps({"salt": b64url(salt), "text": text, "label": label})


def heldout_root(leaves: Sequence[bytes]) -> str:
    """The Merkle tree hash (RFC 9162) of a held-out set's leaves, in hex."""
    if not leaves:
        raise ValueError("a held-out set to commit to has at least one example")
    return merkle.root_hash(leaves).hex()


def new_salt(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """A node's held-out salt: 32 random bytes, kept secret in its workspace."""
    return rng(SALT_BYTES)


@dataclass(frozen=True)
class Commitment:
    """A node's commitment to its held-out set for one comparison: the set's root and size."""

    comparison: str
    ueid: str
    root: str
    count: int

    def __post_init__(self) -> None:
        _check_text("comparison", self.comparison)
        _check_text("ueid", self.ueid)
        _check_sha256("root", self.root)
        _check_int("count", self.count, 1, MAX_HELDOUT)

    def to_body(self) -> dict[str, Any]:
        """The body that is signed and logged."""
        return {"format": COMMITMENT_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_body(cls, body: Any) -> Commitment:
        """Parse a body strictly; :class:`ScorecardInvalid` names the field and value."""
        return cls(**_body_fields(body, COMMITMENT_FORMAT, _names(cls)))


@dataclass(frozen=True)
class Cost:
    """What fine-tuning and serving a model cost on a node, as the node measured it."""

    train_seconds_per_step: float
    inference_ms_per_example: float
    update_bytes_per_round: float
    adapter_bytes: int

    def __post_init__(self) -> None:
        for name in ("train_seconds_per_step", "inference_ms_per_example"):
            _check_number(f"cost.{name}", getattr(self, name), non_negative=True)
        _check_number("cost.update_bytes_per_round", self.update_bytes_per_round, non_negative=True)
        _check_int("cost.adapter_bytes", self.adapter_bytes, 0, MAX_SAFE_INTEGER)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> Cost:
        return cls(**_fields_of("body.cost", value, _names(cls)))


@dataclass(frozen=True)
class Scorecard:
    """One model scored on one node's committed held-out set, before and after fine-tuning
    (``run`` and ``job``: the Flower run and job that fine-tuned it)."""

    comparison: str
    run: int
    job: str
    ueid: str
    model_id: str
    manifest_sha256: str
    adapter_sha256: str
    heldout_root: str
    heldout_count: int
    before: Mapping[str, float]
    after: Mapping[str, float]
    cost: Cost

    def __post_init__(self) -> None:
        _check_text("comparison", self.comparison)
        _check_int("run", self.run, 0, INT_LIMIT - 1)
        for name in ("job", "ueid", "model_id"):
            _check_text(name, getattr(self, name))
        for name in ("manifest_sha256", "adapter_sha256", "heldout_root"):
            _check_sha256(name, getattr(self, name))
        _check_int("heldout_count", self.heldout_count, 1, MAX_HELDOUT)
        # Copied read-only: a frozen scorecard does not change under its signature.
        object.__setattr__(self, "before", _metrics("before", self.before))
        object.__setattr__(self, "after", _metrics("after", self.after))
        if not isinstance(self.cost, Cost):
            raise _bad("cost", self.cost, "a Cost")

    def to_body(self) -> dict[str, Any]:
        """The body that is signed and logged."""
        body: dict[str, Any] = {"format": SCORECARD_FORMAT}
        for name in _names(type(self)):
            value = getattr(self, name)
            body[name] = value.to_json() if isinstance(value, Cost) else value
        body["before"], body["after"] = dict(self.before), dict(self.after)
        return body

    @classmethod
    def from_body(cls, body: Any) -> Scorecard:
        """Parse a body strictly; :class:`ScorecardInvalid` names the field and value."""
        fields = _body_fields(body, SCORECARD_FORMAT, _names(cls))
        fields["run"] = _logged_int(fields["run"])
        fields["cost"] = Cost.from_json(fields["cost"])
        return cls(**fields)


def _logged_int(value: Any) -> Any:
    """An integer as the log spells it (beyond 2**53 - 1 as its decimal text, one spelling
    per value, as :mod:`sandbox.events` reads it); anything else is left for the field's
    own check to refuse."""
    try:
        return decode_value(value, int, None, "run")
    except EventInvalid:
        return value


def signing_public_key(raw: bytes) -> Ed25519PublicKey:
    """A sandbox's raw Ed25519 public key, as a signer's: 32 bytes, canonically encoded
    (y below p), not of small order. :class:`ScorecardInvalid` otherwise."""
    if not isinstance(raw, bytes) or len(raw) != PUBLIC_KEY_BYTES:
        size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise ScorecardInvalid(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {size}")
    y = raw[:-1] + bytes([raw[-1] & 0x7F])
    if y in _SMALL_ORDER_ED25519:
        raise ScorecardInvalid("the Ed25519 public key has small order: it can sign nothing")
    if int.from_bytes(y, "little") >= _P:
        raise ScorecardInvalid("the Ed25519 public key is not canonically encoded (y >= p)")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ScorecardInvalid("malformed Ed25519 public key") from exc


def signer_sha256(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of a signer's raw public key: how the key broker's ``channel_certified``
    (``tee_pubkey_sha256``) and the auditor name it."""
    return sha256_hex(public_key.public_bytes_raw())


def sign_record(key: Ed25519PrivateKey, body: Mapping[str, Any], domain: bytes) -> dict[str, Any]:
    """``body`` signed by ``key`` under ``domain``, as a signed record."""
    if domain not in (COMMITMENT_DOMAIN, SCORECARD_DOMAIN):
        raise ValueError(f"unknown signing domain {domain!r}")
    signed = canonical_entry(body)
    signer = b64url(key.public_key().public_bytes_raw())
    sig = b64url(key.sign(domain + signed))
    _check_size(_record_size(signed, signer, sig))
    return {"body": dict(body), "signer": signer, "sig": sig}


def _record_size(body: bytes, signer: str, sig: str) -> int:
    """The length of a signed record's canonical JSON, from its parts (no second encoding):
    JCS writes the keys in order body, sig, signer, and base64url text needs no escapes."""
    return len(body) + len(signer) + len(sig) + len('{"body":,"sig":"","signer":""}')


def _check_size(size: int) -> None:
    if size > MAX_RECORD_BYTES:
        raise ScorecardInvalid(f"the signed record is {size} bytes, over {MAX_RECORD_BYTES}")


def sign_commitment(key: Ed25519PrivateKey, commitment: Commitment) -> dict[str, Any]:
    """A held-out commitment signed by the node sandbox's key."""
    return sign_record(key, commitment.to_body(), COMMITMENT_DOMAIN)


def sign_scorecard(key: Ed25519PrivateKey, scorecard: Scorecard) -> dict[str, Any]:
    """A scorecard signed by the node sandbox's key."""
    return sign_record(key, scorecard.to_body(), SCORECARD_DOMAIN)


def open_commitment(record: Any) -> tuple[Commitment, str]:
    """A signed commitment from elsewhere (a JSON object, or its UTF-8 bytes), verified:
    the commitment and the hex SHA-256 of its signer's raw key. :class:`ScorecardInvalid`
    if it is malformed, too large or its signature does not verify."""
    return _open(record, COMMITMENT_DOMAIN, Commitment.from_body)


def open_scorecard(record: Any) -> tuple[Scorecard, str]:
    """A signed scorecard from elsewhere, verified, as :func:`open_commitment`."""
    return _open(record, SCORECARD_DOMAIN, Scorecard.from_body)


def _open(record: Any, domain: bytes, parse: Callable[[Any], Opened]) -> tuple[Opened, str]:
    """Bytes are refused over the size limit before they are parsed; an object
    (as a parsed log entry holds it) is checked field by field, each bounded, so its
    size is known, and checked, once its body is encoded for the signature."""
    if isinstance(record, bytes):
        _check_size(len(record))
        try:
            record = strictjson.loads(record)
        except StrictJSONError as exc:
            raise ScorecardInvalid(f"the signed record is not strict JSON: {exc}") from exc
    fields = _fields_of("the signed record", record, sorted(RECORD_KEYS))
    try:
        public_raw = b64url_decode(fields["signer"], "signer")
        signature = b64url_decode(fields["sig"], "sig")
    except EvidenceFormatError as exc:
        raise ScorecardInvalid(str(exc)) from None
    public_key = signing_public_key(public_raw)
    if len(signature) != SIGNATURE_BYTES:
        raise ScorecardInvalid(
            f"sig must be an Ed25519 signature of {SIGNATURE_BYTES} bytes, got {len(signature)}"
        )
    opened = parse(fields["body"])
    # The parsed body's canonical bytes: what is returned is exactly what was signed.
    signed = canonical_entry(opened.to_body())
    _check_size(_record_size(signed, fields["signer"], fields["sig"]))
    try:
        public_key.verify(signature, domain + signed)
    except InvalidSignature:
        raise ScorecardInvalid("the signature does not verify under the signer's key") from None
    return opened, sha256_hex(public_raw)
