"""Streaming AEAD and sealed model packages: round trips, vectors, and tampering."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load as load_safetensors

from sandbox.errors import SealedModelError
from sandbox.seal.package import (
    MANIFEST,
    SIGNATURE,
    new_content_key,
    open_sealed_package,
    read_manifest,
    seal_model_dir,
)
from sandbox.seal.stream import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    decrypt_stream,
    encrypt_stream,
)

VECTORS = Path(__file__).parent / "vectors" / "stream" / "ark-stream-1.json"
KEY = bytes(range(32))
CHUNK = 16


def _seal(plain: bytes, *, key: bytes = KEY, context: bytes = b"", chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream(key, io.BytesIO(plain), out, context=context, chunk_size=chunk)
    return out.getvalue()


def _open(stream: bytes, *, key: bytes = KEY, context: bytes = b"") -> bytes:
    return b"".join(decrypt_stream(key, io.BytesIO(stream), context=context))


def _vectors() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]
    return cases


@pytest.mark.parametrize("case", _vectors(), ids=lambda c: c["name"])
def test_vectors_match_the_layout_built_from_raw_aes_gcm(case: dict[str, Any]) -> None:
    key, prefix = bytes.fromhex(case["key"]), bytes.fromhex(case["prefix"])
    plain, context = bytes.fromhex(case["plaintext"]), bytes.fromhex(case["context"])
    size = case["chunk_size"]
    header = MAGIC + struct.pack(">I", size) + prefix
    chunks = [plain[i : i + size] for i in range(0, len(plain), size)] or [b""]
    expected = header + b"".join(
        AESGCM(key).encrypt(
            prefix + struct.pack(">I", i) + bytes([i == len(chunks) - 1]), chunk, header + context
        )
        for i, chunk in enumerate(chunks)
    )
    assert bytes.fromhex(case["stream"]) == expected
    out = io.BytesIO()
    encrypt_stream(
        key, io.BytesIO(plain), out, context=context, chunk_size=size, rng=lambda n: prefix
    )
    assert out.getvalue() == expected
    assert _open(expected, key=key, context=context) == plain


@pytest.mark.parametrize("length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
def test_round_trip_in_chunks_of_bounded_size(length: int) -> None:
    plain = bytes(i % 251 for i in range(length))
    stream = _seal(plain, context=b"ctx")
    pieces = list(decrypt_stream(KEY, io.BytesIO(stream), context=b"ctx"))
    assert b"".join(pieces) == plain
    assert max(len(p) for p in pieces) <= CHUNK
    assert _seal(plain) != _seal(plain), "each stream must get a fresh nonce prefix"


def _chunks(stream: bytes) -> tuple[bytes, list[bytes]]:
    body = stream[HEADER_SIZE:]
    step = CHUNK + TAG_SIZE
    return stream[:HEADER_SIZE], [body[i : i + step] for i in range(0, len(body), step)]


def _tamper(stream: bytes, how: str) -> bytes:
    header, chunks = _chunks(stream)
    if how == "bit-flip-first-chunk":
        return header + bytes([chunks[0][0] ^ 1]) + chunks[0][1:] + b"".join(chunks[1:])
    if how == "bit-flip-last-tag":
        return stream[:-1] + bytes([stream[-1] ^ 1])
    if how == "drop-last-chunk":
        return header + b"".join(chunks[:-1])
    if how == "truncate-inside-last-chunk":
        return stream[:-3]
    if how == "append-extra-chunk":
        return stream + chunks[0]
    if how == "swap-chunks":
        return header + chunks[1] + chunks[0] + b"".join(chunks[2:])
    if how == "header-chunk-size":
        return MAGIC + struct.pack(">I", CHUNK + 1) + header[len(MAGIC) + 4 :] + b"".join(chunks)
    if how == "header-prefix":
        return header[:-1] + bytes([header[-1] ^ 1]) + b"".join(chunks)
    if how == "bad-magic":
        return b"X" + stream[1:]
    if how == "header-only":
        return header
    raise AssertionError(how)


ATTACKS = [
    "bit-flip-first-chunk",
    "bit-flip-last-tag",
    "drop-last-chunk",
    "truncate-inside-last-chunk",
    "append-extra-chunk",
    "swap-chunks",
    "header-chunk-size",
    "header-prefix",
    "bad-magic",
    "header-only",
]


@pytest.mark.parametrize("how", ATTACKS)
def test_tampered_stream_is_refused(how: str) -> None:
    plain = bytes(range(3 * CHUNK + 5))
    stream = _seal(plain)
    assert _open(stream) == plain
    with pytest.raises(SealedModelError):
        _open(_tamper(stream, how))


def test_wrong_key_or_context_is_refused() -> None:
    stream = _seal(b"weights", context=b"model-a")
    with pytest.raises(SealedModelError, match="failed authentication"):
        _open(stream, key=bytes(32), context=b"model-a")
    with pytest.raises(SealedModelError, match="failed authentication"):
        _open(stream, context=b"model-b")
    with pytest.raises(SealedModelError, match="32 bytes"):
        _open(stream, key=b"short")


@pytest.fixture
def package(tmp_path: Path, tiny_bert_dir: Path) -> tuple[Path, bytes, Ed25519PrivateKey]:
    signing = Ed25519PrivateKey.generate()
    key = new_content_key()
    out = tmp_path / "sealed"
    seal_model_dir(
        tiny_bert_dir, out, content_key=key, signing_key=signing, model_id="tiny-bert", key_id="k1"
    )
    return out, key, signing


def test_package_opens_in_memory_to_the_original_weights(
    package: tuple[Path, bytes, Ed25519PrivateKey], tiny_bert_dir: Path
) -> None:
    out, key, signing = package
    opened = open_sealed_package(
        out, content_key=key, verify_key=signing.public_key(), model_id="tiny-bert", key_id="k1"
    )
    original = (tiny_bert_dir / "model.safetensors").read_bytes()
    assert opened.weights == {"model.safetensors": original}
    assert opened.plain_files["config.json"] == (tiny_bert_dir / "config.json").read_bytes()
    assert load_safetensors(opened.weights["model.safetensors"])
    assert not (out / "model.safetensors").exists()
    sealed = (out / "model.safetensors.sealed").read_bytes()
    assert original[-4096:-2048] not in sealed, "plaintext weight bytes found in the package"
    manifest = read_manifest(out, signing.public_key())
    assert manifest["format"] == "ark-sealed-model/1"
    assert manifest["architecture"]["model_type"] == "bert"


def _rewrite_manifest(out: Path, signing: Ed25519PrivateKey, change: dict[str, Any]) -> None:
    import rfc8785

    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(change)
    body = rfc8785.dumps(manifest)
    (out / MANIFEST).write_bytes(body)
    (out / SIGNATURE).write_bytes(signing.sign(body))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ("edited-manifest", "signature is invalid"),
        ("signed-by-another-key", "signature is invalid"),
        ("flipped-ciphertext", "ciphertext digest"),
        ("truncated-sealed-file", "ciphertext digest"),
        ("swapped-chunks-in-sealed-file", "ciphertext digest"),
        ("flipped-plain-config", "plaintext digest of config.json"),
        ("wrong-content-key", "failed authentication"),
        ("missing-sealed-file", "ciphertext digest"),
        ("path-in-file-name", "malformed file list"),
        ("model-id-swapped-and-resigned", "failed authentication"),
        ("another-package-under-the-same-key", "expected 'tiny-bert'/'k1'"),
        ("dot-dot-file-name", "malformed file list"),
        ("nul-in-file-name", "malformed file list"),
        ("config-symlinked-to-dev-zero", "cannot open"),
        ("config-replaced-by-a-fifo", "not a regular file"),
    ],
)
def test_tampered_package_is_refused(
    package: tuple[Path, bytes, Ed25519PrivateKey], attack: str, message: str
) -> None:
    out, key, signing = package
    verify = signing.public_key()
    expected = "tiny-bert"
    if attack == "edited-manifest":
        (out / MANIFEST).write_bytes(
            (out / MANIFEST).read_bytes().replace(b"tiny-bert", b"tiny-berT")
        )
    elif attack == "signed-by-another-key":
        (out / SIGNATURE).write_bytes(
            Ed25519PrivateKey.generate().sign((out / MANIFEST).read_bytes())
        )
    elif attack == "flipped-ciphertext":
        _flip_byte(out / "model.safetensors.sealed", HEADER_SIZE + 3)
    elif attack == "truncated-sealed-file":
        sealed = out / "model.safetensors.sealed"
        sealed.write_bytes(sealed.read_bytes()[:-100])
    elif attack == "swapped-chunks-in-sealed-file":
        sealed = out / "model.safetensors.sealed"
        data = sealed.read_bytes()
        step = CHUNK_SIZE + TAG_SIZE
        first, second = HEADER_SIZE, HEADER_SIZE + step
        assert len(data) > second + step, "the tiny model must span several chunks"
        sealed.write_bytes(
            data[:first] + data[second : second + step] + data[first:second] + data[second + step :]
        )
    elif attack == "flipped-plain-config":
        _flip_byte(out / "config.json", 5)
    elif attack == "wrong-content-key":
        key = new_content_key()
    elif attack == "missing-sealed-file":
        (out / "model.safetensors.sealed").unlink()
    elif attack == "path-in-file-name":
        files = json.loads((out / MANIFEST).read_text())["files"]
        files[0]["name"] = "../escape"
        _rewrite_manifest(out, signing, {"files": files})
    elif attack == "model-id-swapped-and-resigned":
        # Even a validly signed manifest cannot move a sealed file to another model id:
        # the id is bound into every chunk's AAD.
        _rewrite_manifest(out, signing, {"model_id": "other-model"})
        expected = "other-model"
    elif attack == "another-package-under-the-same-key":
        _rewrite_manifest(out, signing, {"model_id": "old-model"})
    elif attack in ("dot-dot-file-name", "nul-in-file-name"):
        files = json.loads((out / MANIFEST).read_text())["files"]
        files[0]["name"] = ".." if attack == "dot-dot-file-name" else "config\x00.json"
        _rewrite_manifest(out, signing, {"files": files})
    elif attack == "config-symlinked-to-dev-zero":
        (out / "config.json").unlink()
        (out / "config.json").symlink_to("/dev/zero")
    elif attack == "config-replaced-by-a-fifo":
        (out / "config.json").unlink()
        os.mkfifo(out / "config.json")
    with pytest.raises(SealedModelError, match=message):
        open_sealed_package(out, content_key=key, verify_key=verify, model_id=expected, key_id="k1")


def test_sealing_needs_weights(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").unlink()
    with pytest.raises(SealedModelError, match=r"no \*\.safetensors weights"):
        seal_model_dir(
            model,
            tmp_path / "out",
            content_key=new_content_key(),
            signing_key=Ed25519PrivateKey.generate(),
            model_id="m",
            key_id="k",
        )
