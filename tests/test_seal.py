"""Streaming AEAD and sealed model packages: round trips, vectors, and tampering."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load as load_safetensors

from sandbox.config import TASK_CLASSIFICATION
from sandbox.errors import SealedModelError
from sandbox.models import TOKENIZER_FILES, load_from_memory
from sandbox.seal.package import (
    FORMAT,
    MANIFEST,
    PLAIN_FILES,
    SIGNATURE,
    OpenedModel,
    new_content_key,
    open_sealed_package,
    read_manifest,
    seal_model_dir,
    ships_plain,
)
from sandbox.seal.stream import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    decrypt_stream,
    encrypt_stream,
)
from tests.vectorload import load_vector

KEY = bytes(range(32))
CHUNK = 16


def _seal(plain: bytes, *, key: bytes = KEY, context: bytes = b"", chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    encrypt_stream(key, io.BytesIO(plain), out, context=context, chunk_size=chunk)
    return out.getvalue()


def _open(stream: bytes, *, key: bytes = KEY, context: bytes = b"") -> bytes:
    return b"".join(decrypt_stream(key, io.BytesIO(stream), context=context))


def _vectors() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = load_vector("stream", "ark-stream-1.json")["cases"]
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
    return _seal_tiny(tiny_bert_dir, tmp_path / "sealed")


def _seal_tiny(model_dir: Path, out: Path) -> tuple[Path, bytes, Ed25519PrivateKey]:
    """Seal ``model_dir`` into ``out`` as tiny-bert under key k1, with fresh keys."""
    signing, key = Ed25519PrivateKey.generate(), new_content_key()
    seal_model_dir(
        model_dir, out, content_key=key, signing_key=signing, model_id="tiny-bert", key_id="k1"
    )
    return out, key, signing


def _open_tiny(package: tuple[Path, bytes, Ed25519PrivateKey]) -> OpenedModel:
    out, key, signing = package
    return open_sealed_package(
        out, content_key=key, verify_key=signing.public_key(), model_id="tiny-bert", key_id="k1"
    )


def test_package_opens_in_memory_to_the_original_weights(
    package: tuple[Path, bytes, Ed25519PrivateKey], tiny_bert_dir: Path
) -> None:
    out, _, signing = package
    opened = _open_tiny(package)
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
    from sandbox import canonical

    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(change)
    body = canonical.dumps(manifest)
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
        ("path-in-file-name", r"files\[0\]\.name must be a flat file name"),
        ("model-id-swapped-and-resigned", "failed authentication"),
        ("another-package-under-the-same-key", "expected 'tiny-bert'/'k1'"),
        ("dot-dot-file-name", r"files\[0\]\.name must be a flat file name"),
        ("nul-in-file-name", "the value of key 'name' holds NUL"),
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


# Weights as Hugging Face snapshots carry them beside model.safetensors, in other formats
# and spellings; and two files in subfolders, which are not packaged at all.
OTHER_WEIGHTS = (
    "pytorch_model.bin",
    "tf_model.h5",
    "rust_model.ot",
    "model.gguf",
    "model.pt",
    "model.onnx",
    "model.SAFETENSORS",
)
NESTED = ("1_Pooling/config.json", "onnx/model.onnx")
# What the tiny model has beside its weights: config and tokenizer, all shipped plain.
HONEST_PLAIN = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
}


def _marker(name: str) -> bytes:
    """Bytes no ciphertext, config or manifest can hold by chance: stand-in weights."""
    return f"PLAINTEXT-WEIGHTS-OF-{name}|".encode() * 64


def forge_plain_file(out: Path, signing: Ed25519PrivateKey, name: str, data: bytes) -> None:
    """List ``name`` in plain in a package's manifest and re-sign it with ``signing``.

    The signature verifies: only the plain-file allowlist can catch such a package.
    """
    (out / name).write_bytes(data)
    files = [f for f in json.loads((out / MANIFEST).read_text())["files"] if f["name"] != name]
    files.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    _rewrite_manifest(out, signing, {"files": files})


@pytest.fixture
def snapshot_package(tmp_path: Path, tiny_bert_dir: Path) -> tuple[Path, bytes, Ed25519PrivateKey]:
    """The tiny model as a snapshot with weights in every format beside it, sealed."""
    model = tmp_path / "snapshot"
    shutil.copytree(tiny_bert_dir, model)
    for name in OTHER_WEIGHTS + NESTED:
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_bytes(_marker(name))
    return _seal_tiny(model, tmp_path / "sealed")


def test_weights_in_any_format_or_spelling_are_sealed(
    snapshot_package: tuple[Path, bytes, Ed25519PrivateKey],
) -> None:
    out, _, signing = snapshot_package
    package_bytes = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for name in OTHER_WEIGHTS + NESTED:
        holders = [str(p) for p, data in package_bytes.items() if _marker(name)[:64] in data]
        assert holders == [], f"plaintext of {name} found in the package"
    entries = {f["name"]: f for f in read_manifest(out, signing.public_key())["files"]}
    assert all("sealed" in entries[name] for name in OTHER_WEIGHTS)
    assert not any(name in entries for name in NESTED), "subfolders are not packaged"
    plain = {name for name, entry in entries.items() if "sealed" not in entry}
    assert plain == HONEST_PLAIN


def test_honest_package_with_extra_weight_formats_opens_and_loads(
    snapshot_package: tuple[Path, bytes, Ed25519PrivateKey], tiny_bert_dir: Path
) -> None:
    opened = _open_tiny(snapshot_package)
    # Other formats were decrypted and checked, then dropped: the node loads safetensors.
    assert opened.weights == {
        "model.safetensors": (tiny_bert_dir / "model.safetensors").read_bytes()
    }
    assert set(opened.plain_files) == HONEST_PLAIN
    model, _, info = load_from_memory(
        opened.plain_files,
        opened.weights,
        task=TASK_CLASSIFICATION,
        num_labels=3,
        source=snapshot_package[0],
    )
    assert info.model_type == "bert"
    assert model.config.num_labels == 3


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.safetensors", "model.SAFETENSORS", "tf_model.h5"]
)
def test_validly_signed_plain_weight_file_is_refused_by_the_loader(
    package: tuple[Path, bytes, Ed25519PrivateKey], name: str
) -> None:
    out, _, signing = package
    forge_plain_file(out, signing, name, _marker(name))
    signing.public_key().verify((out / SIGNATURE).read_bytes(), (out / MANIFEST).read_bytes())
    with pytest.raises(SealedModelError, match=f"lists {re.escape(repr(name))} in plain"):
        _open_tiny(package)


def test_every_tokenizer_file_the_loader_accepts_ships_plain() -> None:
    # A sealed tokenizer file would be dropped on the node, leaving it no tokenizer.
    assert set(TOKENIZER_FILES) <= PLAIN_FILES
    assert ships_plain("Vocab.TXT")
    assert not ships_plain("1_Pooling/config.json")


def write_signed_manifest(directory: Path, signing: Ed25519PrivateKey, body: bytes) -> Path:
    """``body`` as a package's manifest, validly signed: only the parser can refuse it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_bytes(body)
    (directory / SIGNATURE).write_bytes(signing.sign(body))
    return directory


def valid_manifest() -> dict[str, Any]:
    """A well-formed manifest of one plain and one sealed file (no files behind it)."""
    return {
        "format": FORMAT,
        "model_id": "tiny-bert",
        "key_id": "k1",
        "architecture": {"model_type": "bert", "hidden_size": 32},
        "files": [
            {"name": "config.json", "size": 2, "sha256": "0" * 64},
            {
                "name": "model.safetensors",
                "size": 10,
                "sha256": "1" * 64,
                "sealed": "model.safetensors.sealed",
                "sealed_size": 50,
                "sealed_sha256": "2" * 64,
            },
        ],
    }


def _with_entry(**change: Any) -> bytes:
    manifest = valid_manifest()
    manifest["files"][0].update(change)
    return json.dumps(manifest).encode()


def _with_files(files: list[dict[str, Any]]) -> bytes:
    return json.dumps({**valid_manifest(), "files": files}).encode()


_PLAIN = valid_manifest()["files"][0]
HOSTILE_MANIFESTS: dict[str, tuple[bytes, str]] = {
    # Each raised an untyped error (RecursionError, ValueError, OverflowError,
    # UnicodeEncodeError) or was accepted before the manifest was parsed strictly.
    "nested-2000-deep": (
        json.dumps({**valid_manifest(), "architecture": "X"})
        .replace('"X"', "[" * 2000 + "]" * 2000)
        .encode(),
        "nested more than 64 deep",
    ),
    "5000-digit-integer": (
        _with_entry(size=0).replace(b'"size": 0', b'"size": ' + b"7" * 5000),
        "integer of 5000 characters is out of range",
    ),
    "size-2**63": (_with_entry(size=2**63), r"files\[0\]\.size must be an integer from 0"),
    "lone-surrogate-in-name": (
        _with_entry(name="X").replace(b'"X"', b'"config\\ud800.json"'),
        "lone surrogate",
    ),
    "negative-size": (_with_entry(size=-1), r"files\[0\]\.size must be an integer from 0"),
    "boolean-size": (_with_entry(size=True), r"files\[0\]\.size must be an integer from 0"),
    "duplicate-names": (
        _with_files([_PLAIN, _PLAIN]),
        r"files\[1\] lists 'config\.json' again \(as files\[0\] does\)",
    ),
    "empty-file-list": (_with_files([]), "files must be a non-empty list"),
    "sealed-file-listed-as-plain": (
        _with_entry(name="model.safetensors.sealed"),
        r"files\[0\]\.name 'model\.safetensors\.sealed' ends in \.sealed",
    ),
    "duplicate-key": (
        _with_entry(size=0).replace(b'"size": 0', b'"size": 0, "size": 2'),
        "duplicate key 'size'",
    ),
    "nan-size": (_with_entry(size=0).replace(b'"size": 0', b'"size": NaN'), "NaN is not JSON"),
    "not-hex-digest": (_with_entry(sha256="g" * 64), r"files\[0\]\.sha256 must be a hex"),
    "unknown-entry-key": (_with_entry(mode="0777"), r"files\[0\] has keys unknown \['mode'\]"),
    "missing-architecture": (
        json.dumps({k: v for k, v in valid_manifest().items() if k != "architecture"}).encode(),
        r"has keys missing \['architecture'\]",
    ),
}


def test_a_well_formed_manifest_reads_back(tmp_path: Path) -> None:
    signing = Ed25519PrivateKey.generate()
    body = json.dumps(valid_manifest()).encode()
    assert read_manifest(write_signed_manifest(tmp_path, signing, body), signing.public_key()) == (
        valid_manifest()
    )


@pytest.mark.parametrize(("body", "message"), HOSTILE_MANIFESTS.values(), ids=HOSTILE_MANIFESTS)
def test_a_validly_signed_hostile_manifest_is_refused_naming_the_file(
    tmp_path: Path, body: bytes, message: str
) -> None:
    signing = Ed25519PrivateKey.generate()
    package = write_signed_manifest(tmp_path, signing, body)
    with pytest.raises(SealedModelError, match=message) as raised:
        read_manifest(package, signing.public_key())
    assert str(raised.value).startswith(f"{package / MANIFEST}: ")


def test_a_model_file_named_like_ciphertext_is_not_sealed(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "notes.sealed").write_bytes(b"x")
    with pytest.raises(SealedModelError, match=r"notes\.sealed: a model file may not end in"):
        _seal_tiny(model, tmp_path / "out")
