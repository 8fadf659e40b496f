"""PEM key files: private keys written 0600, public keys loaded with errors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox.errors import ConfigError
from sandbox.files import PRIVATE, create_new, write_atomic


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write ``path`` with mode 0600; refuse to replace an existing key unless told to.

    Nothing is ever written through what is already at ``path``. A new key is created
    exclusively, and ``overwrite`` writes a new 0600 file beside it that then replaces
    it (:func:`os.replace`): a symlink there is replaced, not followed, an old file's
    looser mode is not kept, and no reader sees half a key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        write_atomic(path, data, PRIVATE)
        return
    try:
        create_new(path, data, PRIVATE)
    except FileExistsError:
        raise ConfigError("refusing to overwrite an existing private key", path=path) from None


def private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: ec.EllipticCurvePublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load private key: {exc}", path=path) from exc


def load_public(path: Path) -> Any:
    try:
        return serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load public key: {exc}", path=path) from exc


def load_ed25519_public(path: Path) -> Ed25519PublicKey:
    key = load_public(path)
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("expected an Ed25519 public key", path=path)
    return key


def load_ec_public(path: Path) -> ec.EllipticCurvePublicKey:
    key = load_public(path)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError("expected an EC P-256 public key", path=path)
    return key


def write_openssh_keypair(private_path: Path) -> Path:
    """A fresh ECDSA P-256 key pair in OpenSSH format (what Flower's node auth takes).

    The private key goes to ``private_path`` (0600), the public key next to it with
    ``.pub``; returns the public key's path.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return public_path
