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
import os
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
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
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


def read_manifest(package_dir: Path, verify_key: Ed25519PublicKey) -> dict[str, Any]:
    """The package's manifest, only if its signature verifies and it is well-formed."""
    try:
        body = (package_dir / MANIFEST).read_bytes()
        signature = (package_dir / SIGNATURE).read_bytes()
    except OSError as exc:
        raise SealedModelError(f"{package_dir}: cannot read manifest or signature: {exc}") from exc
    try:
        verify_key.verify(signature, body)
    except InvalidSignature:
        raise SealedModelError(
            f"{package_dir / SIGNATURE}: manifest signature is invalid"
        ) from None
    manifest = json.loads(body)
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
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
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


def open_sealed_package(
    package_dir: Path, *, content_key: bytes, verify_key: Ed25519PublicKey
) -> OpenedModel:
    """Verify and decrypt a package in memory; raise SealedModelError on any mismatch."""
    manifest = read_manifest(package_dir, verify_key)
    plain: dict[str, bytes] = {}
    weights: dict[str, bytes] = {}
    for entry in manifest["files"]:
        name = entry["name"]
        sealed_name = entry.get("sealed")
        stored = package_dir / (sealed_name or name)
        if sealed_name is not None:
            digest, size = sha256_file(stored) if stored.is_file() else ("", -1)
            if (digest, size) != (entry["sealed_sha256"], entry["sealed_size"]):
                raise SealedModelError(f"{stored}: ciphertext digest or size does not match")
            buffer = io.BytesIO()
            context = _stream_context(manifest["model_id"], manifest["key_id"], name)
            with stored.open("rb") as src:
                for chunk in decrypt_stream(content_key, src, context=context):
                    buffer.write(chunk)
            data = buffer.getvalue()
        else:
            try:
                data = stored.read_bytes()
            except OSError as exc:
                raise SealedModelError(f"{stored}: missing from the package") from exc
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SealedModelError(f"{package_dir}: plaintext digest of {name} does not match")
        (weights if sealed_name is not None else plain)[name] = data
    return OpenedModel(manifest=manifest, plain_files=plain, weights=weights)
