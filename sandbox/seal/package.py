"""Sealed model packages (``ark-sealed-model/1``): signed manifest, encrypted weights.

A package directory holds ``manifest.json``, its Ed25519 signature ``manifest.sig``,
the known non-weight files (:data:`PLAIN_FILES`: model config, tokenizer and vocabulary)
in plain, and every other file sealed with :mod:`sandbox.seal.stream` (``<name>.sealed``).
The manifest lists every file with its size and the SHA-256 of plaintext and ciphertext.
The content key never goes into the package: the provider keeps it for the key broker.

Plain is an allowlist, matched case-insensitively, not a list of weight formats: Hugging
Face snapshots carry the same weights again as ``pytorch_model.bin``, ``tf_model.h5``,
``rust_model.ot``, ``*.gguf``, ``*.onnx`` or ``model.SAFETENSORS``, and no list of
suffixes keeps up with them. Sealing therefore encrypts everything it does not know to
be harmless, and :func:`read_manifest` refuses a (validly signed) manifest that lists
any other file in plain, so ``ark provider check-package`` and the node both reject it
before a byte of it is used.

Opening verifies the signature before reading anything else and checks every digest.
Nodes load only ``*.safetensors`` weights; a sealed file in any other format is decrypted
in memory to check its digest, then dropped, so no plaintext weight byte is written to
disk in any format.
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
# The only weights a node loads (into tensors, from memory). Exact spelling, as
# transformers looks for them: a ``model.SAFETENSORS`` is sealed but never loaded.
WEIGHTS_SUFFIX = ".safetensors"

# The files a package may ship in plain, lower-cased: the node writes them to a private
# temporary folder, because transformers reads config and tokenizer from one, and none
# of them holds weights. ``tokenizer.model`` is a SentencePiece vocabulary, and the
# loader accepts it as a model's only tokenizer file.
PLAIN_FILES = frozenset(
    {
        # transformers' model configuration
        "config.json",
        "generation_config.json",
        # tokenizers and their vocabularies
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        # sentence-transformers' small configs, as the default all-MiniLM-L6-v2 has them
        "config_sentence_transformers.json",
        "modules.json",
        "sentence_bert_config.json",
    }
)


def ships_plain(name: str) -> bool:
    """Whether a package may carry the file ``name`` unencrypted: a known non-weight file.

    Case-insensitive (a ``Vocab.TXT`` holds no weights either); a name with a folder in it
    never matches, as packages are flat.
    """
    return name.lower() in PLAIN_FILES


def loads_as_weights(name: str) -> bool:
    """Whether a node loads the file ``name`` as model weights (``*.safetensors`` only)."""
    return name.endswith(WEIGHTS_SUFFIX)


@dataclass(frozen=True)
class OpenedModel:
    """A verified package: its manifest, plain files and decrypted weights, all in memory.

    ``weights`` holds the sealed ``*.safetensors`` files only; other sealed files (weights
    in other formats, a model card) were decrypted and checked, then dropped.
    """

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
    """Write a sealed package of ``model_dir`` to ``out_dir``; return the signed manifest.

    Every file outside :data:`PLAIN_FILES` is sealed, whatever its name or format.
    """
    # Hidden files (.gitattributes and the like) are repository metadata, not the model.
    # Subfolders are left out entirely: the node builds the model from transformers'
    # top-level files alone, and manifest names stay flat so that none can point outside
    # the package. So sentence-transformers' 1_Pooling/config.json is not shipped, and
    # neither is an onnx/model.onnx export, which therefore cannot leak either.
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not any(loads_as_weights(p.name) for p in files):
        raise SealedModelError(f"{model_dir}: no *{WEIGHTS_SUFFIX} weights to seal")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in files:
        digest, size = sha256_file(path)
        entry: dict[str, Any] = {"name": path.name, "size": size, "sha256": digest}
        if not ships_plain(path.name):
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
    for entry in files:
        if "sealed" not in entry and not ships_plain(entry["name"]):
            raise SealedModelError(
                f"{package_dir / MANIFEST}: lists {entry['name']!r} in plain, but only known "
                "config and tokenizer files may be plain; any other file may hold weights"
            )
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


def _check_plaintext(package_dir: Path, entry: dict[str, Any], size: int, digest: str) -> None:
    """Refuse a file whose plaintext size or SHA-256 differs from its manifest entry."""
    if size != entry["size"] or digest != entry["sha256"]:
        raise SealedModelError(f"{package_dir}: plaintext digest of {entry['name']} does not match")


def _decrypt_file(
    path: Path, entry: dict[str, Any], manifest: dict[str, Any], key: bytes, *, keep: bool
) -> bytes | None:
    """Check one sealed file's ciphertext, decrypt it in memory and check its plaintext.

    The file is read through one descriptor (no symlinks, FIFOs or devices) as a
    read-only memory map, so hashing and decryption work on the page cache without
    copying the ciphertext into the process heap. The plaintext is hashed as it streams
    and returned only if ``keep``, so checking a file the node will not load costs no
    more memory than one chunk.
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
        digest = hashlib.sha256()
        size = 0
        for chunk in decrypt_stream(key, view, context=context):
            size += len(chunk)
            if size > entry["size"]:
                raise SealedModelError(f"{path}: decrypts to more than the manifest's size")
            digest.update(chunk)
            if keep:
                buffer.write(chunk)
    _check_plaintext(path.parent, entry, size, digest.hexdigest())
    return buffer.getvalue() if keep else None


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
    older or different package sealed under the same key is refused. A manifest listing
    a plain file outside :data:`PLAIN_FILES` is refused before any file is read.
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
        if sealed_name is None:
            data = _read_regular(package_dir / name, entry["size"])
            _check_plaintext(package_dir, entry, len(data), hashlib.sha256(data).hexdigest())
            plain[name] = data
            continue
        # Only safetensors become weights; any other sealed file is checked, then dropped.
        keep = loads_as_weights(name)
        kept = _decrypt_file(package_dir / sealed_name, entry, manifest, content_key, keep=keep)
        if kept is not None:
            weights[name] = kept
    return OpenedModel(manifest=manifest, plain_files=plain, weights=weights)
