"""Sealed model packages (``ark-sealed-model/1``): signed manifest, encrypted weights.

A package directory holds ``manifest.json``, its Ed25519 signature ``manifest.sig``,
every ``*.safetensors`` file sealed with :mod:`sandbox.seal.stream` (``<name>.sealed``)
and the other files (config, tokenizer) in plain. The manifest lists every file with
its size and the SHA-256 of plaintext and ciphertext. The content key never goes into
the package: the provider keeps it for the key broker.

Opening verifies the signature before reading anything else, checks every digest,
and returns the weights in memory; no plaintext weight byte is written to disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox.digests import sha256_file
from sandbox.errors import SealedModelError
from sandbox.seal.stream import KEY_SIZE, decrypt_stream, encrypt_stream

FORMAT = "ark-sealed-model/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SEALED_SUFFIX = ".sealed"


@dataclass(frozen=True)
class OpenedModel:
    """A verified package: its manifest, plain files and decrypted weights, all in memory."""

    manifest: dict[str, Any]
    plain_files: dict[str, bytes]
    weights: dict[str, bytes]


def _stream_context(model_id: str, key_id: str, name: str) -> bytes:
    """AAD binding a sealed file to its purpose, model, key and file name."""
    return rfc8785.dumps(
        {
            "purpose": "ark/v1/sealed-model-file",
            "model_id": model_id,
            "key_id": key_id,
            "file": name,
        }
    )


def new_content_key(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh random 256-bit content key."""
    return rng(KEY_SIZE)


def seal_model_dir(
    model_dir: Path,
    out_dir: Path,
    *,
    content_key: bytes,
    signing_key: Ed25519PrivateKey,
    model_id: str,
    key_id: str,
) -> dict[str, Any]:
    """Write a sealed package of ``model_dir`` to ``out_dir``; return the signed manifest."""
    # Hidden files (.gitattributes and the like) are repository metadata, not the model.
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(p.suffix == ".safetensors" for p in files):
        raise SealedModelError(f"{model_dir}: no *.safetensors weights to seal")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in files:
        digest, size = sha256_file(path)
        entry: dict[str, Any] = {"name": path.name, "size": size, "sha256": digest}
        if path.suffix == ".safetensors":
            sealed = out_dir / (path.name + SEALED_SUFFIX)
            with path.open("rb") as src, sealed.open("wb") as dst:
                encrypt_stream(
                    content_key, src, dst, context=_stream_context(model_id, key_id, path.name)
                )
            entry["sealed"] = sealed.name
            entry["sealed_sha256"], entry["sealed_size"] = sha256_file(sealed)
        else:
            (out_dir / path.name).write_bytes(path.read_bytes())
        entries.append(entry)
    config = (
        json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if (model_dir / "config.json").exists()
        else {}
    )
    manifest = {
        "format": FORMAT,
        "model_id": model_id,
        "key_id": key_id,
        "architecture": config,
        "files": entries,
    }
    body = rfc8785.dumps(manifest)
    (out_dir / MANIFEST).write_bytes(body)
    (out_dir / SIGNATURE).write_bytes(signing_key.sign(body))
    return manifest


MAX_MANIFEST_BYTES = 1 << 20


def _read_regular(path: Path, limit: int) -> bytes:
    """Read a regular file (no symlinks, FIFOs or devices) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SealedModelError(f"{path}: cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SealedModelError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise SealedModelError(f"{path}: {info.st_size} bytes, more than the {limit} expected")
        return handle.read(limit + 1)


def read_manifest(package_dir: Path, verify_key: Ed25519PublicKey) -> dict[str, Any]:
    """The package's manifest, only if its signature verifies and it is well-formed."""
    body = _read_regular(package_dir / MANIFEST, MAX_MANIFEST_BYTES)
    signature = _read_regular(package_dir / SIGNATURE, 64)
    try:
        verify_key.verify(signature, body)
    except InvalidSignature:
        raise SealedModelError(
            f"{package_dir / SIGNATURE}: manifest signature is invalid"
        ) from None
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SealedModelError(f"{package_dir / MANIFEST}: signed but not JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SealedModelError(f"{package_dir / MANIFEST}: not an {FORMAT} manifest")
    if not all(isinstance(manifest.get(k), str) for k in ("model_id", "key_id")):
        raise SealedModelError(f"{package_dir / MANIFEST}: model_id and key_id must be strings")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(_valid_entry(e) for e in files):
        raise SealedModelError(f"{package_dir / MANIFEST}: malformed file list")
    return manifest


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    name = entry.get("name")
    if not isinstance(name, str) or not name or name.startswith("."):
        return False
    if any(c in name for c in "/\\\x00") or Path(name).name != name:
        return False
    if not (isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
        return False
    if "sealed" not in entry:
        return True
    return (
        entry["sealed"] == name + SEALED_SUFFIX
        and isinstance(entry.get("sealed_size"), int)
        and isinstance(entry.get("sealed_sha256"), str)
    )


def _decrypt_file(path: Path, entry: dict[str, Any], manifest: dict[str, Any], key: bytes) -> bytes:
    """Check one sealed file's size and ciphertext digest, then decrypt it in memory.

    The file is read through one descriptor (no symlinks, FIFOs or devices) as a
    read-only memory map, so hashing and decryption work on the page cache without
    copying the ciphertext into the process heap.
    """
    mismatch = f"{path}: ciphertext digest or size does not match"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise SealedModelError(f"{mismatch} (cannot open: {exc.strerror})") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SealedModelError(f"{path}: not a regular file")
        if info.st_size != entry["sealed_size"] or info.st_size == 0:
            raise SealedModelError(mismatch)
        # Not closed explicitly: after a failure, the traceback may still hold chunk views
        # into the map; it is unmapped when the last of them is gone.
        try:
            view = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
        except (ValueError, OSError) as exc:  # changed under us, or not mappable
            raise SealedModelError(f"{mismatch} (cannot map: {exc})") from exc
        if hashlib.sha256(view).hexdigest() != entry["sealed_sha256"]:
            raise SealedModelError(mismatch)
        context = _stream_context(manifest["model_id"], manifest["key_id"], entry["name"])
        buffer = io.BytesIO()
        for chunk in decrypt_stream(key, view, context=context):
            buffer.write(chunk)
            if buffer.tell() > entry["size"]:
                raise SealedModelError(f"{path}: decrypts to more than the manifest's size")
    return buffer.getvalue()


def open_sealed_package(
    package_dir: Path,
    *,
    content_key: bytes,
    verify_key: Ed25519PublicKey,
    model_id: str,
    key_id: str,
) -> OpenedModel:
    """Verify and decrypt a package in memory; raise SealedModelError on any mismatch.

    ``model_id`` and ``key_id`` are the ones the content key was released for, so an
    older or different package sealed under the same key is refused.
    """
    manifest = read_manifest(package_dir, verify_key)
    if (manifest["model_id"], manifest["key_id"]) != (model_id, key_id):
        raise SealedModelError(
            f"{package_dir}: package is {manifest['model_id']!r}/{manifest['key_id']!r}, "
            f"expected {model_id!r}/{key_id!r}"
        )
    plain: dict[str, bytes] = {}
    weights: dict[str, bytes] = {}
    for entry in manifest["files"]:
        name = entry["name"]
        sealed_name = entry.get("sealed")
        if sealed_name is not None:
            data = _decrypt_file(package_dir / sealed_name, entry, manifest, content_key)
        else:
            data = _read_regular(package_dir / name, entry["size"])
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SealedModelError(f"{package_dir}: plaintext digest of {name} does not match")
        (weights if sealed_name is not None else plain)[name] = data
    return OpenedModel(manifest=manifest, plain_files=plain, weights=weights)
