"""How a node gets its model: attest → key release → unseal in memory. There is no other way.

The provider's plaintext weights never reach this node. The sandbox makes an ephemeral
HPKE key, attests to the provider's key broker, opens the released content key with
that ephemeral key, verifies and decrypts the sealed package in memory, and builds the
model from those bytes. No plaintext weight byte is written to disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandbox.attestation.backends import Attester, load_attester
from sandbox.attestation.measure import CODE, CONFIG, code_measurement, config_measurement
from sandbox.attestation.result import AttestationResult
from sandbox.catalog import load_catalog, package_for
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import CatalogEntryUnknown, SealedModelError
from sandbox.keybroker.client import (
    KeyBrokerClient,
    ReleasedKey,
    certify_channel_key,
    certify_signing_key,
    obtain_content_key,
)
from sandbox.keybroker.transport import KeyBrokerTransport
from sandbox.keyfiles import load_ec_public, load_ed25519_public
from sandbox.models import ModelInfo, load_from_memory
from sandbox.seal.envelope import RecipientKey
from sandbox.seal.package import (
    loads_as_weights,
    open_sealed_package,
    read_manifest,
    ships_plain,
)

# A base model as a node loads it: model, tokenizer, what it is, and the attestation
# result its key was released on (None for an unprotected node's plaintext model).
BaseModel = tuple[Any, Any, ModelInfo, AttestationResult | None]


@dataclass
class NodeModel:
    """A base model wrapped with the run's LoRA adapter, its tokenizer, and how it came."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    # None only on an unprotected node (plaintext model, no attestation).
    attestation: AttestationResult | None


def node_measurements(node: NodeConfig) -> dict[str, str]:
    """What this sandbox's evidence measures: the code running here and the node config."""
    return {CODE: code_measurement(), CONFIG: config_measurement(node.effective())}


def _attester(node: NodeConfig) -> Attester:
    sandbox = node.require_sandbox()
    return load_attester(
        sandbox.tee, sandbox.attestation_key, sandbox.attestation_chain, sandbox.ueid
    )


def _broker(
    node: NodeConfig, transport: KeyBrokerTransport | None
) -> AbstractContextManager[KeyBrokerTransport]:
    """``transport`` if given (a test's in-process broker), else a TLS connection to the
    node's key broker, closed on exit."""
    if transport is not None:
        return contextlib.nullcontext(transport)
    sandbox = node.require_sandbox()
    return KeyBrokerClient(sandbox.key_broker, ca_cert=sandbox.provider_ca)


def attest_for_key(
    node: NodeConfig, key_id: str, *, transport: KeyBrokerTransport | None = None
) -> ReleasedKey:
    """Attest this node's sandbox to the key broker and open the released content key."""
    sandbox = node.require_sandbox()
    with _broker(node, transport) as broker:
        return obtain_content_key(
            broker,
            _attester(node),
            key_id=key_id,
            measurements=node_measurements(node),
            result_key=load_ec_public(sandbox.result_key),
            suite=sandbox.hpke_suite,
        )


def certify_channel(
    node: NodeConfig,
    key_id: str,
    channel_key: RecipientKey,
    *,
    transport: KeyBrokerTransport | None = None,
) -> str:
    """Attest this node's sandbox with its channel key bound; the signed result (EAR)."""
    return _certify(node, certify_channel_key, channel_key, key_id, transport).token


def certify_signing(
    node: NodeConfig,
    key_id: str,
    public_key: Ed25519PublicKey,
    *,
    transport: KeyBrokerTransport | None = None,
) -> AttestationResult:
    """Attest this node's sandbox with its scorecard signing key bound (purpose
    ``signing``): the log then says which attested sandbox holds that key."""
    return _certify(node, certify_signing_key, public_key, key_id, transport)


def _certify(
    node: NodeConfig,
    certify: Callable[..., AttestationResult],
    key: Any,
    key_id: str,
    transport: KeyBrokerTransport | None,
) -> AttestationResult:
    """Attest this node's sandbox with ``key`` bound, through ``certify`` (one of the
    key broker client's certifying calls); the broker's verified result."""
    sandbox = node.require_sandbox()
    with _broker(node, transport) as broker:
        return certify(
            broker,
            _attester(node),
            key,
            key_id=key_id,
            measurements=node_measurements(node),
            result_key=load_ec_public(sandbox.result_key),
        )


def check_model(spec: RunSpec, model_id: str, source: Path) -> None:
    """SealedModelError unless the sealed model is the one the run names (if it names one)."""
    if spec.model_id and model_id != spec.model_id:
        raise SealedModelError(
            f"{source}: holds model {model_id!r}, the run wants {spec.model_id!r}"
        )


@dataclass(frozen=True)
class Unsealed:
    """A base model's files as the node sandbox holds them in memory: the plain files and
    the decrypted weights, the attestation result its key was released on and the
    content key (None for an unprotected node's plaintext model)."""

    plain_files: dict[str, bytes] = field(repr=False)
    weights: dict[str, bytes] = field(repr=False)
    model_id: str
    source: Path
    released: ReleasedKey | None = field(default=None, repr=False)

    @property
    def attestation(self) -> AttestationResult | None:
        return None if self.released is None else self.released.result

    def expired(self, now: dt.datetime) -> bool:
        """Whether the result this model was released on has expired (never, unattested)."""
        result = self.attestation
        return result is not None and now >= result.expires_at

    def build(self, spec: RunSpec) -> BaseModel:
        """The base model for the run's task, built from these in-memory files."""
        if self.released is not None:
            check_model(spec, self.model_id, self.source)
        model, tokenizer, info = load_from_memory(
            self.plain_files,
            self.weights,
            task=spec.task,
            num_labels=len(spec.labels),
            source=self.source,
        )
        return model, tokenizer, info, self.attestation


@dataclass(frozen=True)
class ModelPackage:
    """The sealed package a run's model is read from on this node, the key its manifest
    verifies with, and (for a catalog model) the manifest SHA-256 the catalog pins."""

    path: Path
    manifest_key: Ed25519PublicKey = field(repr=False)
    manifest_sha256: str | None = None

    def manifest(self) -> dict[str, Any]:
        """The package's verified manifest (pinned to the catalog's digest, if any)."""
        return read_manifest(self.path, self.manifest_key, sha256=self.manifest_sha256)


def model_package(node: NodeConfig, model_id: str = "") -> ModelPackage:
    """Where this node reads the model ``model_id`` from.

    A run that names a model listed in the node's catalog (``[node.sandbox] catalog``)
    gets that model's package, and only after the catalog verified with a key the
    operator trusts (:class:`~sandbox.errors.CatalogUntrusted`) and the package's
    manifest matched the entry (:class:`~sandbox.errors.CatalogDigestMismatch`): all
    before anything is attested for or unsealed. Its manifest must verify with the key
    that signed the catalog. Any other run gets the node's own ``package``, as a node
    without a catalog always does; a model in neither is
    :class:`~sandbox.errors.CatalogEntryUnknown`.
    """
    sandbox = node.require_sandbox()
    own = ModelPackage(sandbox.package, load_ed25519_public(sandbox.manifest_key))
    if not model_id or sandbox.catalog is None:
        return own
    catalog = load_catalog(
        sandbox.catalog, [load_ed25519_public(path) for path in sandbox.catalog_keys]
    )
    try:
        entry = catalog.entry(model_id)
    except CatalogEntryUnknown:
        if _holds(own, model_id):
            return own
        raise
    assert catalog.signer is not None  # load_catalog sets the key that verified it
    path = package_for(sandbox.catalog, entry, catalog.signer)
    return ModelPackage(path, catalog.signer, entry.manifest_sha256)


def _holds(package: ModelPackage, model_id: str) -> bool:
    """Whether ``package`` is sealed as ``model_id`` (False if it cannot be read)."""
    try:
        return bool(package.manifest()["model_id"] == model_id)
    except SealedModelError:
        return False


def unseal_package(
    node: NodeConfig,
    package: Path,
    *,
    manifest_key: Ed25519PublicKey | None = None,
    manifest_sha256: str | None = None,
    transport: KeyBrokerTransport | None = None,
) -> Unsealed:
    """Attest, receive the content key, and verify and decrypt ``package`` in memory.

    ``manifest_key`` verifies its manifest (default: the node's ``manifest-key``);
    ``manifest_sha256``, when a catalog pins it, is checked on every read of the
    manifest, so the package unsealed is the one the catalog entry was checked against.
    """
    if manifest_key is None:
        manifest_key = load_ed25519_public(node.require_sandbox().manifest_key)
    manifest = read_manifest(package, manifest_key, sha256=manifest_sha256)
    released = attest_for_key(node, manifest["key_id"], transport=transport)
    opened = open_sealed_package(
        package,
        content_key=released.content_key,
        verify_key=manifest_key,
        model_id=released.model_id,
        key_id=released.key_id,
        manifest_sha256=manifest_sha256,
    )
    return Unsealed(opened.plain_files, opened.weights, released.model_id, package, released)


def unseal(node: NodeConfig, package: ModelPackage) -> Unsealed:
    """:func:`unseal_package` for a package :func:`model_package` found."""
    return unseal_package(
        node,
        package.path,
        manifest_key=package.manifest_key,
        manifest_sha256=package.manifest_sha256,
    )


def load_base_model(spec: RunSpec, node: NodeConfig) -> BaseModel:
    """Attest, receive the content key, unseal in memory, and build the base model; a run
    for another model is refused before attesting."""
    package = model_package(node, spec.model_id)
    check_model(spec, package.manifest()["model_id"], package.path)
    return unseal(node, package).build(spec)


def plaintext_files(spec: RunSpec) -> Unsealed:
    """An unprotected node's model: the run's plaintext directory, read into memory and
    built by the same in-memory builder as a sealed package (so the overhead bench
    compares like with like)."""
    return plaintext_dir(spec.model_path, spec.model_id)


def plaintext_dir(folder: Path, model_id: str) -> Unsealed:
    """A plaintext model folder read into memory as a package is: the allowlisted plain
    files and the ``*.safetensors`` weights; weights in other formats are not read."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name[0] != "."]
    weights = {p.name: p.read_bytes() for p in files if loads_as_weights(p.name)}
    plain = {p.name: p.read_bytes() for p in files if ships_plain(p.name)}
    return Unsealed(plain, weights, model_id, folder)


def load_node_model(spec: RunSpec, base: BaseModel) -> NodeModel:
    """The base model plus a fresh LoRA adapter of the run's shape (its weights come from
    the server). ``base`` is what the node sandbox built from its in-memory files:
    unsealed after attestation, or (an unprotected node) the run's plaintext directory."""
    from sandbox.lora import build_peft_model  # torch: only where a model is built

    model, tokenizer, info, result = base
    peft_model = build_peft_model(
        model, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.lora_mode
    )
    return NodeModel(model=peft_model, tokenizer=tokenizer, info=info, attestation=result)
