"""Fine-tuned adapters kept on the node for local inference, encrypted at rest.

When the node sandbox accepts a sealed run's instructions it keeps two global adapters
per run: ``baseline``, the adapter round 1's train instruction carried (the run's
starting point), and ``final``, the one the final evaluation carried. Each is one file,
``<node workspace>/sandbox/adapters/run-<run id>-<which>.sealed``, written atomically
and 0600::

    4-byte big-endian header length | header (JCS) | AES-256-GCM(safetensors bytes)

The header is the AEAD's associated data: format, run id, which adapter, round, the
run config that rebuilds the model's shape (task, labels, LoRA settings, mode, model id,
max length), the HKDF salt and the GCM nonce. The key is HKDF-SHA256 over the model's
content key, with ``info`` the JCS of ``{"purpose": "ark/adapter-at-rest/v1", "ueid",
"code", "model_id"}``: this node's TEE identity, the code measurement its key release
was attested with, and the model. Any flipped byte, a file renamed to another run or to
the other adapter, or a header edit fails as :class:`AdapterStoreError` naming the file.

What protects the file in this stub: the content key is released only to a sandbox
that attested (so an unprotected node or a failed attestation has no key, and keeps and
serves nothing), and the derivation binds the code measurement, so a sandbox whose code
changed derives another key and cannot decrypt what an earlier one wrote. What only
hardware adds: in a real TEE the key is never in memory the host OS can read; here the
stub sandbox is an ordinary process, and its owner (or root) can read its memory.

No plaintext weight byte is written anywhere: the staging file of the atomic write
already holds ciphertext.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from sandbox import canonical, strictjson
from sandbox.config import RunSpec
from sandbox.errors import AdapterStoreError, ArkError
from sandbox.files import PRIVATE, read_regular, write_atomic
from sandbox.strictjson import StrictJSONError

FORMAT = "ark/adapter-at-rest/v1"
PURPOSE = "ark/adapter-at-rest/v1"
BASELINE = "baseline"
FINAL = "final"
WHICH = (FINAL, BASELINE)
ADAPTERS_DIR = ("sandbox", "adapters")
SUFFIX = ".sealed"
MAX_FILE_BYTES = 1024 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
HEADER_LENGTH_BYTES = 4
SALT_BYTES = 32
NONCE_BYTES = 12
# The run-config keys a stored adapter keeps: what rebuilds the model it fits.
RUN_CONFIG_KEYS = (
    "task",
    "labels",
    "mode",
    "model-id",
    "max-length",
    "lora-r",
    "lora-alpha",
    "lora-dropout",
    "lora-target-modules",
)
_NAME = re.compile(r"run-(\d+)-(final|baseline)\.sealed")


@dataclass(frozen=True)
class AdapterKey:
    """What the at-rest key is derived from: the model's content key (released only after
    attesting) and the context it is bound to."""

    content_key: bytes
    ueid: str
    code: str
    model_id: str

    def derive(self, salt: bytes) -> bytes:
        info = canonical.dumps(
            {"purpose": PURPOSE, "ueid": self.ueid, "code": self.code, "model_id": self.model_id}
        )
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(
            self.content_key
        )


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter read back: whose run, which one, its round, the run's model shape."""

    run_id: int
    which: str
    round: int
    spec: RunSpec
    tensors: dict[str, np.ndarray]


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _file(directory: Path, run_id: int, which: str) -> Path:
    _check_which(which)
    return directory / f"run-{int(run_id)}-{which}{SUFFIX}"


class AdapterStore:
    """The node's stored adapters, sealed under ``key`` (see the module docstring).

    ``model_path`` is what a rebuilt :class:`RunSpec` names as its model (the sandbox's
    in-memory source; nothing is read from it here). ``rng`` is injectable for tests.
    """

    def __init__(
        self,
        directory: Path,
        key: AdapterKey,
        *,
        model_path: Path,
        rng: Callable[[int], bytes] = os.urandom,
    ):
        self.directory = directory
        self._key = key
        self._model_path = model_path
        self._rng = rng

    @staticmethod
    def directory_of(workspace: Path) -> Path:
        return workspace.joinpath(*ADAPTERS_DIR)

    def path(self, run_id: int, which: str) -> Path:
        return _file(self.directory, run_id, which)

    @staticmethod
    def path_in(workspace: Path, run_id: int, which: str) -> Path:
        """Where the node workspace ``workspace`` keeps run ``run_id``'s ``which`` adapter."""
        return _file(AdapterStore.directory_of(workspace), run_id, which)

    def store(
        self, run_id: int, which: str, rnd: int, spec: RunSpec, tensors: Mapping[str, np.ndarray]
    ) -> Path:
        """Seal ``tensors`` as run ``run_id``'s ``which`` adapter (replacing an older one)."""
        config = spec.to_run_config()
        salt, nonce = self._rng(SALT_BYTES), self._rng(NONCE_BYTES)
        header = canonical.dumps(
            {
                "format": FORMAT,
                "run_id": str(int(run_id)),
                "which": which,
                "round": int(rnd),
                "run_config": {name: config[name] for name in RUN_CONFIG_KEYS},
                "salt": salt.hex(),
                "nonce": nonce.hex(),
            }
        )
        plain = save_tensors({name: np.ascontiguousarray(a) for name, a in tensors.items()})
        sealed = AESGCM(self._key.derive(salt)).encrypt(nonce, plain, header)
        path = self.path(run_id, which)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(
            path, len(header).to_bytes(HEADER_LENGTH_BYTES, "big") + header + sealed, PRIVATE
        )
        return path

    def load(self, run_id: int, which: str) -> StoredAdapter:
        """Run ``run_id``'s ``which`` adapter, verified and decrypted; AdapterStoreError
        naming the file if it is missing or fails any check."""
        path = self.path(run_id, which)

        def fail(reason: str) -> AdapterStoreError:
            return AdapterStoreError(path, reason)

        blob, header_bytes, header = _read(path)
        if header["run_id"] != str(int(run_id)) or header["which"] != which:
            raise fail(
                f"holds run {header['run_id']}'s {header['which']} adapter, "
                f"not run {run_id}'s {which}"
            )
        try:
            key = self._key.derive(bytes.fromhex(header["salt"]))
            plain = AESGCM(key).decrypt(
                bytes.fromhex(header["nonce"]),
                blob[HEADER_LENGTH_BYTES + len(header_bytes) :],
                header_bytes,
            )
        except (InvalidTag, ValueError):
            raise fail(
                "does not decrypt under this sandbox's key: altered, or sealed by another "
                "sandbox code, node or model"
            ) from None
        try:
            tensors = dict(load_tensors(plain))
        except Exception as exc:  # safetensors raises its own error types
            raise fail(f"its adapter is not safetensors: {type(exc).__name__}") from None
        spec = _spec(path, header, self._model_path)
        return StoredAdapter(int(run_id), which, header["round"], spec, tensors)


def _read(path: Path) -> tuple[bytes, bytes, dict[str, Any]]:
    """A stored adapter file's bytes, its header's bytes and its header, checked for shape
    only (nothing decrypted, so nothing in the header is authenticated yet)."""

    def fail(reason: str) -> AdapterStoreError:
        return AdapterStoreError(path, reason)

    blob = read_regular(path, MAX_FILE_BYTES, fail)
    size = int.from_bytes(blob[:HEADER_LENGTH_BYTES], "big")
    if len(blob) < HEADER_LENGTH_BYTES or not 0 < size <= MAX_HEADER_BYTES:
        raise fail("not a stored adapter (bad header length)")
    header_bytes = blob[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + size]
    return blob, header_bytes, _header(header_bytes, fail)


def _spec(path: Path, header: dict[str, Any], model_path: Path) -> RunSpec:
    """The run config a header keeps, as a RunSpec naming ``model_path`` as its model."""
    try:
        return RunSpec.from_run_config(
            {**header["run_config"], "model-path": str(model_path)}, source=path
        )
    except ArkError as exc:
        raise AdapterStoreError(path, f"its run config is not valid: {exc}") from exc


def stored_spec(path: Path) -> RunSpec:
    """The run config the stored adapter at ``path`` says it was trained with, read from
    its header without decrypting: it names the model to unseal before
    :meth:`AdapterStore.load` can decrypt the adapter (under that model's key). Not yet
    authenticated: a header edited to name another model fails to decrypt under that
    model's key. Its ``model_path`` is ``path`` itself, as no model folder is known yet."""
    _, _, header = _read(path)
    return _spec(path, header, path)


def stored_runs(directory: Path, which: str = FINAL) -> list[int]:
    """The runs with a stored ``which`` adapter under ``directory``, the one written last
    at the end (by modification time, then run id). Names only: nothing is decrypted."""
    _check_which(which)
    found: list[tuple[int, int]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match and match.group(2) == which and entry.is_file(follow_symlinks=False):
            found.append((entry.stat(follow_symlinks=False).st_mtime_ns, int(match.group(1))))
    return [run for _, run in sorted(found)]


_HEADER_TYPES: dict[str, type] = {
    "format": str,
    "run_id": str,
    "which": str,
    "round": int,
    "run_config": dict,
    "salt": str,
    "nonce": str,
}


def _header(data: bytes, fail: Callable[[str], AdapterStoreError]) -> dict[str, Any]:
    """The file's header, strictly: exactly its keys, each of its type, the format ours."""
    try:
        header = strictjson.loads(data)
    except StrictJSONError as exc:
        raise fail(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.keys() != _HEADER_TYPES.keys():
        raise fail(f"its header must hold exactly {sorted(_HEADER_TYPES)}")
    for name, kind in _HEADER_TYPES.items():
        if not isinstance(header[name], kind) or isinstance(header[name], bool):
            raise fail(f"its header's {name!r} must be a {kind.__name__}")
    if header["format"] != FORMAT:
        raise fail(f"format {header['format']!r}, not {FORMAT!r}")
    if canonical.dumps(header) != data:
        raise fail("its header is not canonical JSON (RFC 8785), as it is written")
    return header
