"""Signed model catalogs (``ark-model-catalog/1``): which sealed models a provider offers.

A catalog folder holds ``catalog.json``, the RFC 8785 (JCS) bytes of::

    {"format": "ark-model-catalog/1", "provider": str, "issued": ISO 8601 UTC,
     "models": [{"model_id", "package", "manifest_sha256", "architecture", "layers",
                 "hidden_size", "parameters", "tasks", "licence",
                 "price": {"currency", "per_1k_training_examples", "per_1k_inferences"}}]}

``catalog.sig`` beside it (the raw 64-byte Ed25519 signature, as ``manifest.sig`` is
stored) by the provider's manifest-signing key over ``b"ark/v1/catalog\\x00"`` followed
by those bytes; the prefix keeps a catalog signature from ever verifying as a manifest
signature by the same key, or the other way round. Each entry's ``package`` is a sealed
package folder directly inside the catalog folder, and ``manifest_sha256`` pins its
``manifest.json`` byte for byte.

A node acts on a catalog only after :func:`load_catalog` verified it with a key its
operator added (:class:`~sandbox.errors.CatalogUntrusted` otherwise), and on one of its
packages only after :func:`package_for` matched the package's manifest to the entry
(:class:`~sandbox.errors.CatalogDigestMismatch` otherwise). The prices and licences are
what the provider states; the catalog carries them, signed, and nothing more.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox import canonical, strictjson
from sandbox.canonical import MAX_SAFE_INTEGER
from sandbox.config import LOCAL_MODEL, TASKS
from sandbox.errors import (
    CatalogDigestMismatch,
    CatalogEntryUnknown,
    CatalogInvalid,
    CatalogUntrusted,
    SealedModelError,
)
from sandbox.files import read_regular, write_atomic
from sandbox.seal.package import MANIFEST, MAX_MANIFEST_BYTES, read_manifest
from sandbox.strictjson import StrictJSONError

CATALOG_FORMAT = "ark-model-catalog/1"
CATALOG_FILE = "catalog.json"
CATALOG_SIGNATURE = "catalog.sig"
# Signed before the catalog's bytes: purpose and version, NUL-terminated.
SIGNATURE_DOMAIN = b"ark/v1/catalog\x00"
SIGNATURE_SIZE = 64
# A catalog lists models, not weights: a megabyte holds thousands of entries.
MAX_CATALOG_BYTES = 1 << 20
MAX_TEXT = 1024
# Model ids appear in command-line flags (``ID=...``), file names and reports.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_CURRENCY = re.compile(r"[A-Z]{3}")  # ISO 4217 alphabetic code
_HEX = frozenset("0123456789abcdef")


def _text(value: Any, key: str, *, limit: int = MAX_TEXT) -> None:
    """Refuse anything but non-empty printable text of at most ``limit`` characters."""
    if not isinstance(value, str) or not value:
        raise CatalogInvalid(f"must be a non-empty string, got {value!r:.80}", key=key)
    if len(value) > limit or not value.isprintable():
        raise CatalogInvalid(
            f"must be printable text of at most {limit} characters, got {value!r:.80}", key=key
        )


def _count(value: Any, key: str) -> None:
    """Refuse anything but an integer from 1 to 2**53 - 1 (what JCS holds exactly)."""
    if type(value) is not int or not 1 <= value <= MAX_SAFE_INTEGER:
        raise CatalogInvalid(
            f"must be an integer from 1 to {MAX_SAFE_INTEGER}, got {value!r:.40}", key=key
        )


def _amount(value: Any, key: str) -> float:
    """A price: a finite number of at least 0 (not a boolean), as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CatalogInvalid(f"must be a finite number, got {value!r:.40}", key=key)
    if value < 0 or value > MAX_SAFE_INTEGER:
        raise CatalogInvalid(f"must be from 0 to {MAX_SAFE_INTEGER}, got {value!r:.40}", key=key)
    return float(value)


def is_sha256(value: Any) -> bool:
    """Whether ``value`` is a lowercase hex SHA-256 digest."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def check_package_name(name: Any, key: str = "package") -> None:
    """Refuse a package name that is not one plain path component inside the catalog
    folder: empty, hidden (``.``, ``..``, ``.x``), or holding a separator or NUL."""
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or any(c in name for c in "/\\\x00")
        or not name.isprintable()
        or len(name) > 255
    ):
        raise CatalogInvalid(
            f"must be one plain folder name inside the catalog folder, got {name!r:.80}", key=key
        )


def _refuse_keys(value: Any, keys: Iterable[str]) -> dict[str, Any]:
    """``value`` as a dict with exactly ``keys``; CatalogInvalid naming the first missing
    or unknown key (no key when ``value`` is no object at all)."""
    if not isinstance(value, dict):
        raise CatalogInvalid(f"must be an object, got {type(value).__name__}")
    wanted = list(keys)
    for key in wanted:
        if key not in value:
            raise CatalogInvalid("is missing", key=key)
    for key in sorted(value):
        if key not in wanted:
            raise CatalogInvalid("is not a catalog key", key=key[:64])
    return value


def _under(prefix: str, exc: CatalogInvalid) -> CatalogInvalid:
    """``exc`` with its key moved under ``prefix`` (the object it sits in)."""
    return CatalogInvalid(exc.problem, key=prefix if exc.key is None else f"{prefix}.{exc.key}")


@dataclasses.dataclass(frozen=True)
class Price:
    """What the provider charges for a model, in ``currency`` (ISO 4217): per 1,000
    training examples and per 1,000 inferences. Figures the provider chooses."""

    currency: str
    per_1k_training_examples: float
    per_1k_inferences: float

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise CatalogInvalid(
                f"must be an ISO 4217 code (three capital letters), got {self.currency!r:.40}",
                key="currency",
            )
        for name in ("per_1k_training_examples", "per_1k_inferences"):
            # Held as floats, so an entry read back (JCS writes 6.0 as 6) compares equal.
            object.__setattr__(self, name, _amount(getattr(self, name), name))

    def to_json(self) -> dict[str, Any]:
        """The ``price`` object of a catalog entry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> Price:
        """Strictly: exactly the three keys (CatalogInvalid naming the key)."""
        return cls(**_refuse_keys(value, (f.name for f in dataclasses.fields(cls))))


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One sealed model a catalog offers; every field checked on construction (the bad
    value and its key in a :class:`~sandbox.errors.CatalogInvalid`)."""

    model_id: str
    package: str
    manifest_sha256: str
    architecture: str
    layers: int
    hidden_size: int
    parameters: int
    tasks: tuple[str, ...]
    licence: str
    price: Price

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _MODEL_ID.fullmatch(self.model_id):
            raise CatalogInvalid(
                "must be 1 to 128 letters, digits or ._+- starting with a letter or digit, "
                f"got {self.model_id!r:.80}",
                key="model_id",
            )
        if self.model_id == LOCAL_MODEL:
            # A comparison's runs of each node's own model are named so: no catalog model
            # may take the name (its run would fine-tune the operator's model instead).
            raise CatalogInvalid(
                f"{LOCAL_MODEL!r} is reserved for each node's own model", key="model_id"
            )
        check_package_name(self.package)
        if not is_sha256(self.manifest_sha256):
            raise CatalogInvalid(
                f"must be a lowercase hex SHA-256, got {self.manifest_sha256!r:.80}",
                key="manifest_sha256",
            )
        _text(self.architecture, "architecture", limit=128)
        for name in ("layers", "hidden_size", "parameters"):
            _count(getattr(self, name), name)
        tasks = self.tasks
        if (
            not isinstance(tasks, list | tuple)
            or not tasks
            or not all(isinstance(t, str) and t in TASKS for t in tasks)
            or len(set(tasks)) != len(tasks)
        ):
            raise CatalogInvalid(
                f"must be distinct tasks among {', '.join(TASKS)}, got {tasks!r:.120}", key="tasks"
            )
        object.__setattr__(self, "tasks", tuple(tasks))
        _text(self.licence, "licence")
        if not isinstance(self.price, Price):
            raise CatalogInvalid(f"must be a Price, got {self.price!r:.80}", key="price")

    def to_json(self) -> dict[str, Any]:
        """The entry as ``catalog.json`` lists it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "tasks": list(self.tasks), "price": self.price.to_json()}

    @classmethod
    def from_json(cls, value: Any) -> CatalogEntry:
        """Strictly: exactly the entry's keys, each valid (CatalogInvalid naming it)."""
        raw = dict(_refuse_keys(value, (f.name for f in dataclasses.fields(cls))))
        try:
            raw["price"] = Price.from_json(raw["price"])
        except CatalogInvalid as exc:
            raise _under("price", exc) from None
        return cls(**raw)


def _issued_text(issued: dt.datetime) -> str:
    return issued.isoformat()


@dataclasses.dataclass(frozen=True)
class Catalog:
    """A provider's catalog: who offers it, when it was issued, and its models in order.

    ``signer`` is not part of the signed bytes: :func:`load_catalog` sets it to the
    trusted key that verified them, which is also the key the catalog's package
    manifests must verify with (one provider signs both).
    """

    provider: str
    issued: dt.datetime
    models: tuple[CatalogEntry, ...]
    signer: Ed25519PublicKey | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _text(self.provider, "provider", limit=256)
        issued = self.issued
        if (
            not isinstance(issued, dt.datetime)
            or issued.tzinfo is None
            or issued.utcoffset() != dt.timedelta(0)
        ):
            raise CatalogInvalid(f"must be a UTC time, got {issued!r:.80}", key="issued")
        models = tuple(self.models)
        if not models or not all(isinstance(m, CatalogEntry) for m in models):
            raise CatalogInvalid("must list at least one model entry", key="models")
        for field in ("model_id", "package"):
            seen: dict[str, int] = {}
            for index, entry in enumerate(models):
                first = seen.setdefault(getattr(entry, field), index)
                if first != index:
                    raise CatalogInvalid(
                        f"{getattr(entry, field)!r} again (as models[{first}] has)",
                        key=f"models[{index}].{field}",
                    )
        object.__setattr__(self, "models", models)

    def entry(self, model_id: str) -> CatalogEntry:
        """The entry for ``model_id``; :class:`~sandbox.errors.CatalogEntryUnknown` if none."""
        for entry in self.models:
            if entry.model_id == model_id:
                return entry
        raise CatalogEntryUnknown(model_id, [m.model_id for m in self.models])

    def to_json(self) -> dict[str, Any]:
        """The object ``catalog.json`` holds (``signer`` is not part of it)."""
        return {
            "format": CATALOG_FORMAT,
            "provider": self.provider,
            "issued": _issued_text(self.issued),
            "models": [m.to_json() for m in self.models],
        }

    def canonical(self) -> bytes:
        """The bytes ``catalog.json`` holds and the signature covers (JCS)."""
        return canonical.dumps(self.to_json())

    @classmethod
    def from_json(cls, value: Any) -> Catalog:
        """Strictly (CatalogInvalid naming the key; an entry's as ``models[i].key``)."""
        raw = _refuse_keys(value, ("format", "provider", "issued", "models"))
        if raw["format"] != CATALOG_FORMAT:
            raise CatalogInvalid(
                f"must be {CATALOG_FORMAT!r}, got {raw['format']!r:.80}", key="format"
            )
        issued = raw["issued"]
        try:
            parsed = dt.datetime.fromisoformat(issued) if isinstance(issued, str) else None
        except ValueError:
            parsed = None
        # The exact text it is written as, so the parsed catalog re-signs to the same bytes.
        if parsed is None or parsed.tzinfo is None or _issued_text(parsed) != issued:
            raise CatalogInvalid(
                f"must be an ISO 8601 UTC time as isoformat() writes it, got {issued!r:.80}",
                key="issued",
            )
        models = raw["models"]
        if not isinstance(models, list):
            raise CatalogInvalid("must be a list of model entries", key="models")
        entries = []
        for index, item in enumerate(models):
            try:
                entries.append(CatalogEntry.from_json(item))
            except CatalogInvalid as exc:
                raise _under(f"models[{index}]", exc) from None
        return cls(provider=raw["provider"], issued=parsed, models=tuple(entries))


def signed_bytes(body: bytes) -> bytes:
    """What a catalog signature covers: the domain, then the catalog's bytes."""
    return SIGNATURE_DOMAIN + body


def sign_catalog(catalog: Catalog, signing_key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """``(catalog.json bytes, catalog.sig bytes)`` for ``catalog``, signed by the
    provider's manifest-signing key."""
    body = catalog.canonical()
    return body, signing_key.sign(signed_bytes(body))


def write_catalog(folder: Path, catalog: Catalog, signing_key: Ed25519PrivateKey) -> Path:
    """Sign ``catalog`` and write ``catalog.json`` and ``catalog.sig`` into ``folder``
    (each replaced atomically); return the ``catalog.json`` path.

    Every entry's package must already lie in ``folder``: a catalog naming a package it
    does not hold would only fail later, on a node.
    """
    for index, entry in enumerate(catalog.models):
        if not (folder / entry.package / MANIFEST).is_file():
            raise CatalogInvalid(
                f"names {entry.package!r}, but {folder / entry.package / MANIFEST} does not exist",
                path=folder / CATALOG_FILE,
                key=f"models[{index}].package",
            )
    body, signature = sign_catalog(catalog, signing_key)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CATALOG_FILE
    write_atomic(path, body)
    write_atomic(folder / CATALOG_SIGNATURE, signature)
    return path


def load_catalog(folder: Path, trusted_keys: Sequence[Ed25519PublicKey]) -> Catalog:
    """The catalog in ``folder``, only if a trusted key verifies it and it is well-formed.

    The signature is checked before a byte of the catalog is parsed: with no trusted key,
    or none that verifies it, :class:`~sandbox.errors.CatalogUntrusted`. Then strictly
    (:class:`~sandbox.errors.CatalogInvalid` naming the file and the key): strict JSON
    (:mod:`sandbox.strictjson`), canonical (JCS, as it is written), exactly the known
    keys, every value valid, no model id or package twice.
    """
    path = folder / CATALOG_FILE
    sig_path = folder / CATALOG_SIGNATURE

    def unreadable(file: Path) -> Any:
        return lambda reason: CatalogInvalid(reason, path=file)

    body = read_regular(path, MAX_CATALOG_BYTES, unreadable(path))
    signature = read_regular(sig_path, SIGNATURE_SIZE, unreadable(sig_path))
    if len(body) > MAX_CATALOG_BYTES:  # grew while being read
        raise CatalogInvalid(f"more than {MAX_CATALOG_BYTES} bytes", path=path)
    if not trusted_keys:
        raise CatalogUntrusted(f"{path}: this node trusts no catalog key (ark node trust-catalog)")
    signer = _verifying_key(body, signature, trusted_keys)
    if signer is None:
        raise CatalogUntrusted(
            f"{sig_path}: the signature verifies with none of the {len(trusted_keys)} "
            "catalog key(s) this node trusts"
        )
    try:
        value = strictjson.loads(body)
    except StrictJSONError as exc:
        raise CatalogInvalid(f"signed but not strict JSON: {exc}", path=path) from exc
    try:
        catalog = Catalog.from_json(value)
    except CatalogInvalid as exc:
        raise CatalogInvalid(exc.problem, path=path, key=exc.key) from None
    if catalog.canonical() != body:
        raise CatalogInvalid("signed but not canonical JSON (RFC 8785), as written", path=path)
    return dataclasses.replace(catalog, signer=signer)


def _verifying_key(
    body: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey]
) -> Ed25519PublicKey | None:
    """The first of ``keys`` that ``signature`` over the catalog verifies with; None if none."""
    message = signed_bytes(body)
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return key
    return None


def manifest_sha256(package_dir: Path) -> str:
    """SHA-256 of a package's ``manifest.json`` bytes (regular file only, bounded)."""
    path = package_dir / MANIFEST
    body = read_regular(path, MAX_MANIFEST_BYTES, lambda r: SealedModelError(f"{path}: {r}"))
    return hashlib.sha256(body).hexdigest()


def package_for(folder: Path, entry: CatalogEntry, manifest_key: Ed25519PublicKey) -> Path:
    """The package folder of ``entry`` in the catalog ``folder``, after checking that its
    manifest is the one the entry pins and that it is validly signed for that model.

    :class:`~sandbox.errors.CatalogDigestMismatch` (naming the model, the pinned and the
    found digest) when the manifest's SHA-256 differs; the manifest is then read pinned to
    the entry's digest (:func:`~sandbox.seal.package.read_manifest`), so a package swapped
    between the two reads is refused as well, as is a bad signature
    (:class:`~sandbox.errors.SealedModelError`). A signed manifest of another model id than
    the entry's is :class:`~sandbox.errors.CatalogInvalid`.
    """
    check_package_name(entry.package)
    package = folder / entry.package
    found = manifest_sha256(package)
    if found != entry.manifest_sha256:
        raise CatalogDigestMismatch(entry.model_id, entry.manifest_sha256, found, package)
    manifest = read_manifest(package, manifest_key, sha256=entry.manifest_sha256)
    if manifest["model_id"] != entry.model_id:
        raise CatalogInvalid(
            f"model {entry.model_id!r} names package {entry.package!r}, which is sealed as "
            f"model {manifest['model_id']!r}",
            path=folder / CATALOG_FILE,
            key="package",
        )
    return package
