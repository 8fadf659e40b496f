"""The stub TEE: real ES256 signatures over real evidence, from a key certified by a
development "manufacturer" root that stands in for a CPU vendor's endorsement.

It is labelled as a stub everywhere: its evidence says ``"tee": "stub"``, it registers
itself as a development TEE kind, and a verifier accepts that only under a policy that
explicitly allows stubs. It proves nothing about hardware isolation; it exercises every
check a real backend's evidence goes through.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandbox.attestation.attester import X5cAttester
from sandbox.attestation.kinds import TeeKind, register_kind
from sandbox.errors import ConfigError

STUB_TEE = "stub"
STUB_HWMODEL = "ark-stub-tee/1"
UEID_URI_PREFIX = "urn:ark:ueid:"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class DevManufacturer:
    """A development endorsement root that certifies stub attestation keys."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, *, now: dt.datetime, valid_days: int = 3650) -> DevManufacturer:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("Ark DEVELOPMENT manufacturer root (stub TEE)")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def certify(
        self,
        public_key: ec.EllipticCurvePublicKey,
        ueid: str,
        *,
        now: dt.datetime,
        valid_days: int = 365,
    ) -> x509.Certificate:
        """Issue an attestation-key certificate for one stub TEE instance."""
        return (
            x509.CertificateBuilder()
            .subject_name(_name(f"stub attestation key {ueid}"))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ueid_uri(ueid))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def ueid_uri(ueid: str) -> str:
    """The SAN URI that ties an attestation certificate to one TEE instance's ueid."""
    return UEID_URI_PREFIX + ueid


def certified_ueids(cert: x509.Certificate) -> frozenset[str]:
    """The ueids a stub attestation certificate names (its ``urn:ark:ueid:`` SAN URIs)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(
        uri.removeprefix(UEID_URI_PREFIX)
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(UEID_URI_PREFIX)
    )


STUB = TeeKind(
    name=STUB_TEE,
    development=True,
    hwmodel=STUB_HWMODEL,
    certified_ueids=certified_ueids,
)
register_kind(STUB)


@dataclass(kw_only=True)
class StubAttester(X5cAttester):
    """Produces signed evidence for a stub TEE instance."""

    kind: TeeKind = STUB

    @classmethod
    def load(cls, key_path: Path, chain_path: Path, ueid: str) -> StubAttester:
        """The node's stub attester from its 0600 key file and its PEM certificate chain.

        A real TEE keeps this key in hardware; the stub keeps it in a file, which is the
        first thing the README's trust table says a stub cannot protect.
        """
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load stub attestation identity: {exc}", path=key_path
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("attestation key must be an EC P-256 key", path=key_path)
        return cls(key=key, chain=chain, ueid=ueid)
