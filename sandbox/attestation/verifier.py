"""Appraisal of evidence against a policy of reference values (the RATS Verifier role).

Every check raises a typed :class:`~sandbox.errors.AttestationError`; nothing about the
claims is trusted until the signature and the chain have verified. Time is an input.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox import canonical
from sandbox.attestation.evidence import (
    DBGSTAT_DISABLED,
    EAT_PROFILE,
    JWS_TYP,
    MIN_NONCE_BYTES,
    REQUIRED_CLAIMS,
    b64url_decode,
    decode_jws,
    es256_verify,
    report_data,
)
from sandbox.attestation.kinds import is_development, tee_kind
from sandbox.config import read_toml
from sandbox.digests import sha256_hex
from sandbox.errors import (
    AttestationError,
    ChainUntrusted,
    ConfigError,
    DebugEnabled,
    EvidenceFormatError,
    MeasurementRejected,
    NodeNotAllowed,
    NonceMismatch,
    ReportDataMismatch,
    SignatureInvalid,
    TeeNotAccepted,
)


@dataclass(frozen=True)
class AppraisalPolicy:
    """Reference values and TEE acceptance rules (the provider's or the node's own)."""

    policy_id: str
    accepted_tees: frozenset[str]
    allow_stub: bool
    reference_values: dict[str, frozenset[str]]
    allowed_nodes: frozenset[str] | None = None
    advisory_values: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the policy's content: results name it, so a changed policy shows."""
        content: dict[str, Any] = {
            "id": self.policy_id,
            "accepted-tees": sorted(self.accepted_tees),
            "allow-stub": self.allow_stub,
            "allowed-nodes": None if self.allowed_nodes is None else sorted(self.allowed_nodes),
            "reference-values": {k: sorted(v) for k, v in self.reference_values.items()},
            "advisory-values": {k: sorted(v) for k, v in self.advisory_values.items()},
        }
        return sha256_hex(canonical.dumps(content))

    def admit(self, *, tee: str, ueid: str, measurements: Mapping[str, str]) -> dict[str, str]:
        """Raise unless this TEE kind, node and measurements pass; return advisory warnings.

        Shared by appraisal of evidence and by every later use of a result, so a node
        the policy no longer admits gets nothing on an older result either.
        """
        if is_development(tee) and not self.allow_stub:
            raise TeeNotAccepted(
                f"stub evidence (development TEE kind {tee!r}), and the policy does not allow stubs"
            )
        if tee not in self.accepted_tees:
            raise TeeNotAccepted(f"TEE kind {tee!r} is not accepted by policy {self.policy_id}")
        if self.allowed_nodes is not None and ueid not in self.allowed_nodes:
            raise NodeNotAllowed(f"node {ueid!r} is not on the policy's allowlist")
        for name, accepted in self.reference_values.items():
            if measurements.get(name, "").lower() not in accepted:
                raise MeasurementRejected(f"measurement {name!r} is not a reference value")
        return {
            name: f"measurement {name!r} is not among the advisory values"
            for name, accepted in self.advisory_values.items()
            if measurements.get(name, "").lower() not in accepted
        }

    @classmethod
    def load(cls, path: Path) -> AppraisalPolicy:
        """Read ``[policy]`` and ``[policy.reference-values]`` from a TOML file."""
        raw = read_toml(path, "appraisal policy")
        section = raw.get("policy")
        if not isinstance(section, dict):
            raise ConfigError("missing [policy] table", path=path, key="policy")
        policy_id = section.get("id")
        if not isinstance(policy_id, str) or not policy_id:
            raise ConfigError(
                f"must be a non-empty string, got {policy_id!r}", path=path, key="policy.id"
            )
        tees = section.get("accepted-tees")
        if not isinstance(tees, list) or not all(isinstance(t, str) for t in tees):
            raise ConfigError(
                f"must be a list of strings, got {tees!r}", path=path, key="policy.accepted-tees"
            )
        allow_stub = section.get("allow-stub", False)
        if not isinstance(allow_stub, bool):
            raise ConfigError(
                f"must be true or false, got {allow_stub!r}", path=path, key="policy.allow-stub"
            )
        values = _digest_table(section, "reference-values", path)
        advisory = _digest_table(section, "advisory-values", path)
        nodes = section.get("allowed-nodes")
        if nodes is not None and (
            not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes)
        ):
            raise ConfigError(
                f"must be a list of node ueids, got {nodes!r}",
                path=path,
                key="policy.allowed-nodes",
            )
        return cls(
            policy_id,
            frozenset(tees),
            allow_stub,
            values,
            allowed_nodes=None if nodes is None else frozenset(nodes),
            advisory_values=advisory,
        )


def _digest_table(section: dict[str, Any], name: str, path: Path) -> dict[str, frozenset[str]]:
    """``[policy.<name>]``: measurement name → list of accepted hex digests."""
    table = section.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError("must be a table", path=path, key=f"policy.{name}")
    values: dict[str, frozenset[str]] = {}
    for measurement, digests in table.items():
        if not isinstance(digests, list) or not all(_is_hex(d) for d in digests):
            raise ConfigError(
                f"must be a list of hex digests, got {digests!r}",
                path=path,
                key=f"policy.{name}.{measurement}",
            )
        values[measurement] = frozenset(d.lower() for d in digests)
    return values


def _is_hex(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Appraisal:
    """What passed appraisal: the verified claims, under which policy, at what time."""

    claims: dict[str, Any]
    tee: str
    policy_id: str
    appraised_at: dt.datetime
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def is_stub(self) -> bool:
        """Whether the evidence came from a development TEE kind, as its backend says."""
        return is_development(self.tee)


class Verifier:
    """Appraises x5c-signed EAT evidence against manufacturers' roots, one set per TEE kind.

    It serves every registered TEE kind whose evidence is a JWS with an ``x5c`` chain
    (:class:`~sandbox.attestation.attester.X5cAttester`; the stub today); the kind's
    backend says which hardware model its evidence claims and how its certificate names
    the instance. A kind with another evidence format brings its own
    :class:`EvidenceVerifier`.

    A root vouches only for its own TEE kind: evidence signed under the development
    (stub) root can never pass as another kind, whatever its claims say.
    """

    def __init__(self, trusted_roots: Mapping[str, Sequence[x509.Certificate]]):
        self.trusted_roots = {kind: list(roots) for kind, roots in trusted_roots.items()}

    def appraise(
        self,
        token: str,
        *,
        nonce: bytes,
        tee_pubkey: bytes,
        policy: AppraisalPolicy,
        now: dt.datetime,
    ) -> Appraisal:
        """Raise an AttestationError subclass unless the evidence satisfies ``policy``."""
        try:
            return self._appraise(token, nonce=nonce, tee_pubkey=tee_pubkey, policy=policy, now=now)
        except AttestationError:
            raise
        except (
            ValueError,
            TypeError,
            RecursionError,
            OverflowError,
            x509.DuplicateExtension,
            UnsupportedAlgorithm,
        ) as exc:
            # Hostile encodings (deep nesting, huge numbers, odd certificates) that the
            # parsers reject in their own ways: one typed error, whatever the parser.
            raise EvidenceFormatError(
                f"evidence could not be parsed ({type(exc).__name__})"
            ) from exc

    def _appraise(
        self,
        token: str,
        *,
        nonce: bytes,
        tee_pubkey: bytes,
        policy: AppraisalPolicy,
        now: dt.datetime,
    ) -> Appraisal:
        if len(token) > MAX_EVIDENCE_CHARS:
            raise EvidenceFormatError(f"evidence longer than {MAX_EVIDENCE_CHARS} characters")
        evidence = decode_jws(token, typ=JWS_TYP)
        leaf, root_kind = self._verified_leaf(evidence.header.get("x5c"), now)
        public_key = leaf.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ChainUntrusted("attestation key is not an ECDSA P-256 key")
        try:
            es256_verify(public_key, evidence.signature, evidence.signing_input)
        except SignatureInvalid as exc:
            raise SignatureInvalid(f"evidence {exc}") from None

        claims = evidence.claims
        _check_claim_types(claims, now)
        if claims["tee"] != root_kind:
            raise TeeNotAccepted(
                f"evidence claims TEE kind {claims['tee']!r} but its key is certified by a "
                f"{root_kind!r} root"
            )
        kind = tee_kind(root_kind)
        if claims["hwmodel"] != kind.hwmodel:
            raise TeeNotAccepted(
                f"{root_kind} evidence claims hardware model {claims['hwmodel']!r}"
            )
        if claims["ueid"] not in kind.certified_ueids(leaf):
            raise ChainUntrusted("the ueid claim does not match the attestation certificate")
        claimed_nonce = b64url_decode(claims["eat_nonce"], "claim 'eat_nonce'")
        if len(claimed_nonce) < MIN_NONCE_BYTES or len(nonce) < MIN_NONCE_BYTES:
            raise NonceMismatch(f"nonce shorter than {MIN_NONCE_BYTES} bytes")
        if not hmac.compare_digest(claimed_nonce, nonce):
            raise NonceMismatch("evidence was made for a different nonce")
        if not hmac.compare_digest(str(claims["report_data"]), report_data(nonce, tee_pubkey)):
            raise ReportDataMismatch("report_data does not bind this nonce and TEE public key")
        if claims.get("dbgstat") not in DBGSTAT_DISABLED:
            raise DebugEnabled(f"debug status {claims.get('dbgstat')!r} is not disabled")
        tee = claims["tee"]
        warnings = policy.admit(tee=tee, ueid=claims["ueid"], measurements=claims["measurements"])
        return Appraisal(
            claims=claims,
            tee=tee,
            policy_id=policy.policy_id,
            appraised_at=now,
            warnings=warnings,
        )

    def _verified_leaf(self, x5c: Any, now: dt.datetime) -> tuple[x509.Certificate, str]:
        """The leaf certificate and the TEE kind of the trusted root its chain reaches."""
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise ChainUntrusted("evidence carries no x5c certificate chain")
        if len(x5c) > MAX_CHAIN:
            raise ChainUntrusted(f"x5c chain longer than {MAX_CHAIN} certificates")
        try:
            chain = [
                x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in x5c
            ]
        except (ValueError, TypeError, binascii.Error) as exc:
            raise EvidenceFormatError("x5c holds an unreadable certificate") from exc
        for cert in chain:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise ChainUntrusted(
                    f"certificate {cert.subject.rfc4514_string()} is expired or not yet valid"
                )
        if _is_ca(chain[0]):
            raise ChainUntrusted("the attestation key's certificate is a CA certificate")
        for child, parent in itertools.pairwise(chain):
            _issued_by(child, parent)
        top = chain[-1]
        for kind, roots in self.trusted_roots.items():
            for root in roots:
                if top.issuer != root.subject:
                    continue
                try:
                    top.verify_directly_issued_by(root)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                if not root.not_valid_before_utc <= now <= root.not_valid_after_utc:
                    raise ChainUntrusted("the trusted root is expired")
                return chain[0], kind
        raise ChainUntrusted("certificate chain does not lead to a trusted root")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


CLOCK_SKEW = dt.timedelta(seconds=60)
MAX_EVIDENCE_CHARS = 64 * 1024
MAX_CHAIN = 4
_STRING_CLAIMS = tuple(c for c in REQUIRED_CLAIMS if c not in ("measurements", "iat"))


def _check_claim_types(claims: dict[str, Any], now: dt.datetime) -> None:
    """Signed claims still come from an untrusted attester: check every type before use."""
    for name in _STRING_CLAIMS:
        if not isinstance(claims[name], str) or not claims[name].isascii():
            raise EvidenceFormatError(f"claim {name!r} must be an ASCII string")
    if claims["eat_profile"] != EAT_PROFILE:
        # Another profile gives the same claim names other meanings: never guess.
        raise EvidenceFormatError(
            f"claim 'eat_profile' is {claims['eat_profile'][:64]!r}, not {EAT_PROFILE!r}"
        )
    if "dbgstat" in claims and not isinstance(claims["dbgstat"], str):
        raise EvidenceFormatError("claim 'dbgstat' must be a string")
    measurements = claims["measurements"]
    if not isinstance(measurements, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k.isascii() and v.isascii()
        for k, v in measurements.items()
    ):
        raise EvidenceFormatError("claim 'measurements' must map ASCII names to digest strings")
    iat = claims["iat"]
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise EvidenceFormatError("claim 'iat' must be an integer timestamp")
    try:
        issued = dt.datetime.fromtimestamp(iat, dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise EvidenceFormatError("claim 'iat' is out of range") from exc
    if issued > now + CLOCK_SKEW:
        raise EvidenceFormatError("claim 'iat' is in the future")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ChainUntrusted("broken certificate chain") from exc
    try:
        constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ChainUntrusted(
            "a chain certificate without basic constraints issued another"
        ) from None
    if not constraints.ca:
        raise ChainUntrusted("a chain certificate that is not a CA issued another")
