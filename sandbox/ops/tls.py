"""TLS material for loopback deployments (a private CA and server certificates) and the
TLS gRPC server the provider's services share. Operator tooling: nothing here runs in a
sandbox, which only ever opens client channels (``sandbox.tls``).

Flower's SuperLink launcher connects back to 127.0.0.1, so the server certificate
carries ``DNS:localhost``, ``IP:127.0.0.1`` and ``IP:::1`` (see FLOWER-NOTES).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.keyfiles import private_pem, write_private

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one CA certificate and one server key pair signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        """The files :func:`issue_loopback_tls` writes under ``directory``."""
        return cls(directory / "ca.crt", directory / "server.crt", directory / "server.key")

    def missing(self) -> list[Path]:
        """The files of this set that do not exist."""
        return [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]


def issue_loopback_tls(
    out_dir: Path,
    *,
    common_name: str = "ark-sandbox",
    valid_days: int = 30,
    now: dt.datetime | None = None,
    hosts: Sequence[str] = (),
) -> TlsFiles:
    """Create a CA and a server certificate for loopback services under ``out_dir``.

    ``hosts`` are further names or IP addresses the server is reached at (the address
    nodes on other machines use); the loopback names are always in. Keys are fresh P-256
    keys; private keys are written with mode 0600.
    """
    now = now or dt.datetime.now(dt.UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    not_before = now - dt.timedelta(minutes=5)
    not_after = now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in LOOPBACK_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    sans += [_san(host) for host in hosts if host not in (*LOOPBACK_NAMES, *LOOPBACK_IPS)]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles.in_dir(out_dir)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(files.server_key, private_pem(server_key), overwrite=True)
    return files


def _san(host: str) -> x509.GeneralName:
    """A subjectAltName for ``host``: an IP address entry if it parses as one, else DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        labels = host.split(".")
        # An all-digit last label is a mistyped IP address, not a name (RFC 3696 §2).
        if len(host) > 253 or labels[-1].isdigit() or not all(map(_LABEL.fullmatch, labels)):
            raise ValueError(f"not a host name or IP address: {host!r}") from None
        return x509.DNSName(host)


def require_name(cert_path: Path, host: str) -> None:
    """ConfigError unless the server certificate at ``cert_path`` names ``host`` (an IP
    address or DNS entry of its subjectAltName): clients reaching it as ``host`` would
    refuse it otherwise."""
    from sandbox.errors import ConfigError

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(f"not a server certificate with names ({exc})", path=cert_path) from exc
    known = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    known += names.get_values_for_type(x509.DNSName)
    try:
        wanted = str(ipaddress.ip_address(host))
    except ValueError:
        wanted = host.lower()
    if wanted not in [name.lower() for name in known]:
        raise ConfigError(
            f"the certificate does not name {host!r} (it names {', '.join(known)}), so nodes "
            f"would refuse it; make the workspace with `ark provider init --host {host}`",
            path=cert_path,
        )


def start_tls_server(
    services: Sequence[Callable[[grpc.Server], None]],
    *,
    address: str,
    cert: Path,
    key: Path,
    workers: int = 4,
    max_request_bytes: int | None = None,
) -> tuple[grpc.Server, int]:
    """A started gRPC server with ``services`` registered, serving TLS only on ``address``
    (port 0 picks a free one); returns it and its port. OSError if it cannot bind."""
    options = (
        []
        if max_request_bytes is None
        else [("grpc.max_receive_message_length", max_request_bytes)]
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    for register in services:
        register(server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind a TLS gRPC server to {address}")
    server.start()
    return server, port
