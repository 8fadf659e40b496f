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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox import canonical, strictjson
from sandbox.digests import sha256_file
from sandbox.errors import SealedModelError
from sandbox.files import open_regular, read_regular
from sandbox.seal.stream import KEY_SIZE, decrypt_stream, encrypt_stream
from sandbox.strictjson import StrictJSONError

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
    return canonical.dumps(
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
    for path in files:
        if path.name.endswith(SEALED_SUFFIX):  # read_manifest would refuse the package
            raise SealedModelError(f"{path}: a model file may not end in {SEALED_SUFFIX}")
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
    body = canonical.dumps(manifest)
    (out_dir / MANIFEST).write_bytes(body)
    (out_dir / SIGNATURE).write_bytes(signing_key.sign(body))
    return manifest


MAX_MANIFEST_BYTES = 1 << 20


def _read_regular(path: Path, limit: int) -> bytes:
    """Read a regular file (no symlinks, FIFOs or devices) of at most ``limit`` bytes."""
    return read_regular(path, limit, lambda reason: SealedModelError(f"{path}: {reason}"))


def read_manifest(
    package_dir: Path, verify_key: Ed25519PublicKey, *, sha256: str | None = None
) -> dict[str, Any]:
    """The package's manifest, only if its signature verifies and it is well-formed.

    ``sha256``, when given, pins the manifest's bytes (a signed catalog entry names it):
    a manifest whose SHA-256 differs is refused before its signature is even checked,
    so what is verified here is exactly what whoever pinned it checked.

    Well-formed is strict, because the node acts on every field: the JSON itself
    (:mod:`sandbox.strictjson`), the keys present, and each file entry (see
    :func:`_check_entry`); the list holds at least one file and no name twice. A signed
    manifest is still the provider's input to the node, and a mistake in it must stop
    here, named, rather than surface as an untyped error while files are opened.
    """
    path = package_dir / MANIFEST
    body = _read_regular(path, MAX_MANIFEST_BYTES)
    if sha256 is not None and (found := hashlib.sha256(body).hexdigest()) != sha256:
        raise SealedModelError(f"{path}: SHA-256 {found} is not the pinned {sha256}")
    signature = _read_regular(package_dir / SIGNATURE, 64)
    try:
        verify_key.verify(signature, body)
    except InvalidSignature:
        raise SealedModelError(
            f"{package_dir / SIGNATURE}: manifest signature is invalid"
        ) from None
    try:
        manifest = strictjson.loads(body)
    except StrictJSONError as exc:
        raise SealedModelError(f"{path}: signed but not strict JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SealedModelError(f"{path}: not an {FORMAT} manifest")
    _check_keys(path, "the manifest", manifest, _MANIFEST_KEYS, _MANIFEST_KEYS)
    for key in ("model_id", "key_id"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise SealedModelError(f"{path}: {key} must be a non-empty string")
    if not isinstance(manifest["architecture"], dict):
        raise SealedModelError(f"{path}: architecture must be an object (the model config)")
    files = manifest["files"]
    if not isinstance(files, list) or not files:
        raise SealedModelError(f"{path}: files must be a non-empty list")
    seen: dict[str, int] = {}
    for index, entry in enumerate(files):
        name = _check_entry(path, index, entry)
        # Exact names: snapshots do carry model.safetensors beside model.SAFETENSORS.
        first = seen.setdefault(name, index)
        if first != index:
            raise SealedModelError(
                f"{path}: files[{index}] lists {name!r} again (as files[{first}] does)"
            )
    return manifest


# The keys a manifest and its file entries have: required, and (for entries) allowed.
_MANIFEST_KEYS = frozenset({"format", "model_id", "key_id", "architecture", "files"})
_ENTRY_KEYS = frozenset({"name", "size", "sha256"})
_SEALED_ENTRY_KEYS = _ENTRY_KEYS | {"sealed", "sealed_size", "sealed_sha256"}
# Sizes are file sizes: a file offset (off_t) holds at most 2**63 - 1.
MAX_FILE_SIZE = 2**63 - 1


def _check_keys(
    path: Path, where: str, value: dict[str, Any], required: frozenset[str], allowed: frozenset[str]
) -> None:
    """Refuse a missing or an unknown key in ``value`` (``where`` names it in the error)."""
    missing, unknown = sorted(required - value.keys()), sorted(value.keys() - allowed)
    if missing or unknown:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"unknown {[key[:64] for key in unknown]}"] if unknown else []
        raise SealedModelError(f"{path}: {where} has keys {' and '.join(problems)}")


def _check_entry(path: Path, index: int, entry: Any) -> str:
    """Refuse a malformed file entry, naming it by index and key; return its name.

    A name is a flat file name, never hidden and never ending in ``.sealed`` (that suffix
    names ciphertext, so a plain ``x.sealed`` or a sealed ``x.sealed.sealed`` is refused);
    sizes are integers from 0 to :data:`MAX_FILE_SIZE` (not booleans); digests are
    lowercase hex SHA-256; a file ships plain only if :func:`ships_plain` allows it.
    """
    where = f"files[{index}]"
    if not isinstance(entry, dict):
        raise SealedModelError(f"{path}: {where} must be an object")
    sealed = "sealed" in entry
    keys = _SEALED_ENTRY_KEYS if sealed else _ENTRY_KEYS
    _check_keys(path, where, entry, keys, keys)
    name = entry["name"]
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(c in name for c in "/\\\x00")
        or Path(name).name != name
    ):
        raise SealedModelError(f"{path}: {where}.name must be a flat file name, got {name!r:.80}")
    if name.endswith(SEALED_SUFFIX):
        raise SealedModelError(
            f"{path}: {where}.name {name!r:.80} ends in {SEALED_SUFFIX}, which names ciphertext"
        )
    fields = [("size", "sha256")] + ([("sealed_size", "sealed_sha256")] if sealed else [])
    for size_key, digest_key in fields:
        size = entry[size_key]
        if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
            raise SealedModelError(
                f"{path}: {where}.{size_key} must be an integer from 0 to {MAX_FILE_SIZE}, "
                f"got {size!r:.40}"
            )
        if not _is_sha256(entry[digest_key]):
            raise SealedModelError(f"{path}: {where}.{digest_key} must be a hex SHA-256")
    if sealed and entry["sealed"] != name + SEALED_SUFFIX:
        raise SealedModelError(f"{path}: {where}.sealed must be {name + SEALED_SUFFIX!r:.80}")
    if not sealed and not ships_plain(name):
        raise SealedModelError(
            f"{path}: lists {name!r} in plain, but only known "
            "config and tokenizer files may be plain; any other file may hold weights"
        )
    return name


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
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

    with open_regular(path, lambda reason: SealedModelError(f"{mismatch} ({reason})")) as handle:
        info = os.fstat(handle.fileno())
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
    manifest_sha256: str | None = None,
) -> OpenedModel:
    """Verify and decrypt a package in memory; raise SealedModelError on any mismatch.

    ``model_id`` and ``key_id`` are the ones the content key was released for, so an
    older or different package sealed under the same key is refused. A manifest listing
    a plain file outside :data:`PLAIN_FILES` is refused before any file is read.
    ``manifest_sha256`` pins the manifest's bytes (see :func:`read_manifest`).
    """
    manifest = read_manifest(package_dir, verify_key, sha256=manifest_sha256)
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
