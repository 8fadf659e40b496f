"""Attestation results in the EAR shape (veraison/ear), signed as an ES256 JWT.

One submodule, ``ark-sandbox``, carries ``ear.status``, ``ear.trustworthiness-vector``
and ``ear.appraisal-policy-id``; ``ark.*`` extension claims say which TEE kind it was
(``ark.tee``, and ``ark.stub`` which is true for every result made from the evidence of
a development kind, the stub, as its backend registered it),
the node, its measurements, and the sandbox key and session the result is bound to.

Status is the worst tier of the vector (AR4SI tiers): 2 affirming, 32 warning,
96 contraindicated, 0 none (not appraised).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.attestation.evidence import (
    JWS_ALG,
    b64url,
    b64url_decode,
    decode_jws,
    encode_jws,
    es256_sign,
    es256_verify,
)
from sandbox.attestation.kinds import is_development
from sandbox.attestation.verifier import Appraisal
from sandbox.digests import sha256_hex
from sandbox.errors import (
    AttestationError,
    EvidenceFormatError,
    ResultExpired,
    ResultInvalid,
    SignatureInvalid,
)

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
EAR_TYP = "JWT"
SUBMOD = "ark-sandbox"
# What an affirming result's bound key may be used for: receiving a content key, a node's
# update channel (an HPKE key), or signing what the sandbox reports (an Ed25519 key:
# held-out commitments and scorecards, sandbox.scorecard).
PURPOSE_KEY_RELEASE = "key-release"
PURPOSE_CHANNEL = "channel"
PURPOSE_SIGNING = "signing"
PURPOSES = (PURPOSE_KEY_RELEASE, PURPOSE_CHANNEL, PURPOSE_SIGNING)
# The purposes whose result only certifies the bound key: nothing is released for them.
CERTIFYING_PURPOSES = frozenset({PURPOSE_CHANNEL, PURPOSE_SIGNING})
# The suite a signing key is bound under (in the result's ``ark.hpke-suite`` claim): a raw
# 32-byte Ed25519 public key (RFC 8032).
SIGNING_SUITE = "ed25519"
AFFIRMING, WARNING, CONTRAINDICATED, NONE = "affirming", "warning", "contraindicated", "none"
TIER_VALUE = {NONE: 0, AFFIRMING: 2, WARNING: 32, CONTRAINDICATED: 96}
# The AR4SI claims this verifier appraises; the others stay "none" (0).
DIMENSIONS = (
    "instance-identity",
    "configuration",
    "executables",
    "hardware",
    "runtime-opaque",
)
DEFAULT_LIFETIME = dt.timedelta(minutes=10)


def status_of(vector: Mapping[str, int]) -> str:
    """The worst tier in the vector; ``none`` when nothing was appraised."""
    worst = max(vector.values(), default=0)
    if worst >= TIER_VALUE[CONTRAINDICATED]:
        return CONTRAINDICATED
    if worst >= TIER_VALUE[WARNING]:
        return WARNING
    return AFFIRMING if worst else NONE


@dataclass(frozen=True)
class ResultContext:
    """What a result is about and bound to, beyond the appraisal itself."""

    session_id: str
    tee: str
    tee_pubkey: bytes
    hpke_suite: str
    evidence: str
    policy_id: str
    policy_digest: str
    # What the bound key is for: a key release, or a node's channel key (certified only).
    purpose: str = PURPOSE_KEY_RELEASE


@dataclass(frozen=True)
class AttestationResult:
    """A verified EAR: its claims and the fields callers act on.

    Its shape is checked when it is made (ResultInvalid naming the claim), so that no
    accessor below can fail on a claim of the wrong type, a missing one or a huge number.
    """

    token: str
    claims: dict[str, Any]

    def __post_init__(self) -> None:
        _check_shape(self.claims)

    @property
    def submod(self) -> dict[str, Any]:
        submod: dict[str, Any] = self.claims["submods"][SUBMOD]
        return submod

    @property
    def status(self) -> str:
        return str(self.submod["ear.status"])

    @property
    def is_stub(self) -> bool:
        return bool(self.submod["ark.stub"])

    @property
    def session_id(self) -> str:
        return str(self.submod["ark.session"])

    @property
    def tee_pubkey(self) -> bytes:
        return b64url_decode(self.submod["ark.tee-pubkey"], _TEE_PUBKEY)

    @property
    def purpose(self) -> str:
        """``key-release``, ``channel`` or ``signing`` (results from before purposes
        existed: release)."""
        return str(self.submod.get("ark.purpose", PURPOSE_KEY_RELEASE))

    @property
    def hpke_suite(self) -> str:
        return str(self.submod["ark.hpke-suite"])

    @property
    def ueid(self) -> str | None:
        ueid = self.submod.get("ark.ueid")
        return None if ueid is None else str(ueid)

    @property
    def measurements(self) -> dict[str, str]:
        return dict(self.submod.get("ark.measurements", {}))

    @property
    def tee(self) -> str:
        return str(self.submod["ark.tee"])

    @property
    def policy_digest(self) -> str | None:
        digest = self.submod.get("ark.policy-digest")
        return None if digest is None else str(digest)

    @property
    def expires_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.claims["exp"], dt.UTC)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the signed token, as the transparency log records it.

        One result has one token text: its base64url is strict and its signature low-S
        (:mod:`sandbox.attestation.evidence`), so no altered copy verifies under another id.
        """
        return sha256_hex(self.token.encode())


# What each claim of an Ark EAR must be: (JSON type, required). The accessors above and
# the broker's events read these; every other claim is carried, never read.
_CLAIMS: dict[str, tuple[type, bool]] = {
    "eat_profile": (str, True),
    "iat": (int, True),
    "exp": (int, True),
    "ear.verifier-id": (dict, True),
    "submods": (dict, True),
}
_SUBMOD_CLAIMS: dict[str, tuple[type, bool]] = {
    "ear.status": (str, True),
    "ear.trustworthiness-vector": (dict, True),
    "ear.appraisal-policy-id": (str, True),
    "ark.tee": (str, True),
    "ark.stub": (bool, True),
    "ark.session": (str, True),
    "ark.tee-pubkey": (str, True),
    "ark.hpke-suite": (str, True),
    "ark.purpose": (str, False),
    "ark.ueid": (str, False),
    "ark.policy-digest": (str, False),
    "ark.measurements": (dict, False),
    "ark.failure": (str, False),
}
_TEE_PUBKEY = f"EAR claim 'submods.{SUBMOD}.ark.tee-pubkey'"


def _check_types(
    claims: Mapping[str, Any], table: Mapping[str, tuple[type, bool]], prefix: str
) -> None:
    for name, (kind, required) in table.items():
        if name not in claims:
            if required:
                raise ResultInvalid(f"EAR lacks claim {prefix + name!r}")
            continue
        if not _is_a(claims[name], kind):
            raise ResultInvalid(f"EAR claim {prefix + name!r} must be a {kind.__name__}")


def _is_a(value: Any, kind: type) -> bool:
    """``isinstance`` as JSON types mean it: true and false are not integers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _check_shape(claims: Any) -> None:
    """ResultInvalid naming the claim unless ``claims`` has the shape of an Ark EAR."""
    if not isinstance(claims, dict):
        raise ResultInvalid("EAR claims must be a JSON object")
    _check_types(claims, _CLAIMS, "")
    if claims["eat_profile"] != EAR_PROFILE:
        raise ResultInvalid(f"EAR claim 'eat_profile' must be {EAR_PROFILE!r}")
    try:
        dt.datetime.fromtimestamp(claims["exp"], dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise ResultInvalid("EAR claim 'exp' is out of range") from None
    submod = claims["submods"].get(SUBMOD)
    if not isinstance(submod, dict):
        raise ResultInvalid(f"EAR claim 'submods.{SUBMOD}' must be a dict")
    prefix = f"submods.{SUBMOD}."
    _check_types(submod, _SUBMOD_CLAIMS, prefix)
    if submod["ear.status"] not in TIER_VALUE:
        raise ResultInvalid(f"EAR claim {prefix + 'ear.status'!r} is not an AR4SI tier")
    if submod.get("ark.purpose", PURPOSE_KEY_RELEASE) not in PURPOSES:
        raise ResultInvalid(f"EAR claim {prefix + 'ark.purpose'!r} must be one of {PURPOSES}")
    for name, kind in (("ear.trustworthiness-vector", int), ("ark.measurements", str)):
        if not all(_is_a(v, kind) for v in submod.get(name, {}).values()):
            raise ResultInvalid(f"EAR claim {prefix + name!r} must map names to {kind.__name__}s")
    try:
        b64url_decode(submod["ark.tee-pubkey"], _TEE_PUBKEY)
    except EvidenceFormatError as exc:
        raise ResultInvalid(str(exc)) from None


@dataclass
class ResultSigner:
    """The verifier's identity: signs EARs with its own ES256 key."""

    key: ec.EllipticCurvePrivateKey
    verifier_id: dict[str, str]
    lifetime: dt.timedelta = DEFAULT_LIFETIME

    def affirm(
        self, appraisal: Appraisal, context: ResultContext, *, now: dt.datetime
    ) -> AttestationResult:
        """The result for evidence that passed appraisal (affirming, or warning if advised)."""
        vector = {name: TIER_VALUE[AFFIRMING] for name in DIMENSIONS}
        for name in appraisal.warnings:
            vector[_dimension_of_measurement(name)] = TIER_VALUE[WARNING]
        claims = appraisal.claims
        return self._sign(
            vector,
            context,
            now=now,
            extra={
                "ark.ueid": claims["ueid"],
                "ark.measurements": dict(claims["measurements"]),
                "ark.warnings": dict(appraisal.warnings),
            },
        )

    def contraindicate(
        self, error: AttestationError, context: ResultContext, *, now: dt.datetime
    ) -> AttestationResult:
        """The result for evidence that failed: the failed dimension is contraindicated."""
        vector = {name: TIER_VALUE[NONE] for name in DIMENSIONS}
        vector[error.dimension] = TIER_VALUE[CONTRAINDICATED]
        return self._sign(vector, context, now=now, extra={"ark.failure": type(error).__name__})

    def _sign(
        self,
        vector: dict[str, int],
        context: ResultContext,
        *,
        now: dt.datetime,
        extra: dict[str, Any],
    ) -> AttestationResult:
        submod: dict[str, Any] = {
            "ear.status": status_of(vector),
            "ear.trustworthiness-vector": vector,
            "ear.appraisal-policy-id": context.policy_id,
            "ark.policy-digest": context.policy_digest,
            "ark.tee": context.tee,
            "ark.stub": is_development(context.tee),
            "ark.session": context.session_id,
            "ark.tee-pubkey": b64url(context.tee_pubkey),
            "ark.hpke-suite": context.hpke_suite,
            "ark.evidence-sha256": sha256_hex(context.evidence.encode()),
            "ark.purpose": context.purpose,
            **extra,
        }
        issued = int(now.timestamp())
        claims = {
            "eat_profile": EAR_PROFILE,
            "iat": issued,
            "exp": issued + int(self.lifetime.total_seconds()),
            "ear.verifier-id": dict(self.verifier_id),
            "submods": {SUBMOD: submod},
        }
        header = {"alg": JWS_ALG, "typ": EAR_TYP}
        token = encode_jws(header, claims, lambda data: es256_sign(self.key, data))
        return AttestationResult(token, claims)


def _dimension_of_measurement(name: str) -> str:
    return "executables" if name == "code" else "configuration"


_REQUIRED = ("eat_profile", "iat", "exp", "ear.verifier-id", "submods")


def verify_result(
    token: str, public_key: ec.EllipticCurvePublicKey, *, now: dt.datetime
) -> AttestationResult:
    """Verify an EAR's signature, shape and expiry; raise ResultInvalid or ResultExpired."""
    try:
        signed = decode_jws(token, typ=EAR_TYP, required=_REQUIRED)
        es256_verify(public_key, signed.signature, signed.signing_input)
    except (EvidenceFormatError, SignatureInvalid) as exc:
        raise ResultInvalid(f"attestation result does not verify: {exc}") from exc
    result = AttestationResult(token, signed.claims)
    if result.is_stub != is_development(result.tee):
        raise ResultInvalid("attestation result hides that it came from stub evidence")
    if now.timestamp() >= result.claims["exp"]:
        raise ResultExpired("attestation result has expired")
    return result
