"""Provider and node workspaces: identities, policy, sealed models, the key broker's parts.

Layout of a provider workspace (``ark provider init``)::

    identity/signing.key   Ed25519, signs sealed-model manifests (and later log checkpoints)
    identity/result.key    P-256, signs attestation results (EARs)
    tls/                   CA and server certificate for the SuperLink and the key broker
    public/                what nodes receive out of band: ca.crt, signing.pub, result.pub
    roots/<tee>/*.pem      manufacturer roots the verifier trusts, one folder per TEE kind
    policy.toml            the appraisal policy (reference values, TEE kinds, allowlist)
    keys/                  content keys of sealed models (0600), read only by the broker
    catalog/sources.json   model id -> the plaintext model folder it was sealed from
                           (provider-only: the ServerApp's model path; never published)
    events.jsonl           appraisal, release and denial events
    translog.db            the transparency log (SQLite): the same events, Merkle-proven
    public/log.vkey        the log's checkpoint key, as auditors pin it (C2SP vkey)

A node workspace (``ark node init``) holds the node's stub attestation key and chain and
a ``node.toml`` whose ``[node.sandbox]`` says how to attest and where the package is;
``catalog-keys/`` holds the provider catalog keys its operator trusts
(``ark node trust-catalog``).
Private keys are written 0600 and never overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import shutil
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox import canonical, strictjson
from sandbox.attestation.backends import load_trusted_roots, verifiers_for
from sandbox.attestation.measure import AGGREGATOR_PACKAGES, code_measurement
from sandbox.attestation.result import ResultSigner
from sandbox.attestation.stub import STUB, DevManufacturer
from sandbox.attestation.verifier import AppraisalPolicy
from sandbox.catalog import (
    Catalog,
    CatalogEntry,
    Price,
    check_package_name,
    manifest_sha256,
    package_for,
    write_catalog,
)
from sandbox.config import TASK_CLASSIFICATION, NodeConfig, PrivacyBudget, SandboxConfig
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import ConfigError
from sandbox.events import EventSink, FanOutSink, FileDigest, JsonlEventSink, ModelPublished
from sandbox.files import read_regular, write_atomic
from sandbox.keyfiles import (
    load_ed25519_public,
    load_private,
    private_pem,
    public_pem,
    write_openssh_keypair,
    write_private,
)
from sandbox.models import count_parameters, supported_tasks
from sandbox.ops.keybroker.broker import ContentKey, KeyBroker, KeyStore
from sandbox.ops.tls import issue_loopback_tls
from sandbox.seal.package import (
    MANIFEST,
    OpenedModel,
    loads_as_weights,
    new_content_key,
    open_sealed_package,
    read_manifest,
    seal_model_dir,
)
from sandbox.strictjson import StrictJSONError
from sandbox.translog.note import NoteSigner, log_origin
from sandbox.translog.store import LogSink, LogStore

VERSION = "0.1.0"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the development manufacturer ------------------------------------------------------


def load_or_create_manufacturer(directory: Path) -> DevManufacturer:
    """The development "manufacturer" root under ``directory``, created on first use.

    It stands in for a CPU vendor's endorsement root and exists only for stub TEEs.
    """
    key_path, cert_path = directory / "root.key", directory / "root.crt"
    if not key_path.exists():
        maker = DevManufacturer.create(now=_utcnow())
        write_private(key_path, private_pem(maker.key))
        cert_path.write_bytes(maker.certificate.public_bytes(serialization.Encoding.PEM))
        return maker
    key = load_private(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("manufacturer root key must be an EC key", path=key_path)
    return DevManufacturer(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


# -- provider ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderWorkspace:
    """Paths of a provider workspace (see the module docstring)."""

    root: Path

    @property
    def signing_key(self) -> Path:
        return self.root / "identity" / "signing.key"

    @property
    def result_key(self) -> Path:
        return self.root / "identity" / "result.key"

    @property
    def public(self) -> Path:
        return self.root / "public"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def roots(self) -> Path:
        return self.root / "roots"

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def catalog_sources(self) -> Path:
        """The provider-only map of model id -> plaintext model folder (JSON)."""
        return self.root / "catalog" / "sources.json"

    def require(self) -> ProviderWorkspace:
        """Raise ConfigError naming the folder unless ``ark provider init`` ran here."""
        if not self.signing_key.exists() or not self.policy.exists():
            raise ConfigError(
                "not a provider workspace; run `ark provider init` first", path=self.root
            )
        return self

    def signer(self) -> Ed25519PrivateKey:
        key = load_private(self.signing_key)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("manifest signing key must be Ed25519", path=self.signing_key)
        return key

    def result_signer(self) -> ResultSigner:
        key = load_private(self.result_key)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("result signing key must be EC P-256", path=self.result_key)
        return ResultSigner(key, {"developer": "ark-sandbox", "build": f"ark-keybroker/{VERSION}"})

    def trusted_roots(self) -> dict[str, list[x509.Certificate]]:
        return load_trusted_roots(self.roots)

    @property
    def log_db(self) -> Path:
        return self.root / "translog.db"

    @property
    def log_vkey(self) -> Path:
        return self.public / "log.vkey"

    def log_signer(self) -> NoteSigner:
        """Signs the log's checkpoints with the provider's Ed25519 key, named by origin."""
        key = self.signer()
        return NoteSigner(log_origin(key.public_key()), key)

    def event_sink(self, log: LogStore | None = None) -> EventSink:
        """Where provider events go: ``events.jsonl`` and the transparency log."""
        store = log if log is not None else LogStore(self.log_db)
        return FanOutSink([JsonlEventSink(self.events), LogSink(store)])

    @property
    def aggregator(self) -> Path:
        """The aggregator sandbox's attestation identity: key.pem, chain.pem, ueid, its TEE
        kind (``tee``) and the provider's result.pub."""
        return self.root / "aggregator"


POLICY_HEADER = """\
# Appraisal policy: what evidence the key broker accepts before releasing a key.
#   accepted-tees     TEE kinds whose evidence is accepted
#   allow-stub        development only: stub evidence proves no hardware isolation
#   allowed-nodes     TEE instances (ueids) that may receive keys (`ark provider allow-node`)
#   reference-values  measurements that must match (code: SHA-256 of the node-side app)
#   advisory-values   measurements whose mismatch makes the result "warning"
"""


def save_policy(path: Path, raw: dict[str, Any]) -> AppraisalPolicy:
    """Write a policy atomically (a reader never sees half a file) and load it back."""
    try:
        text = POLICY_HEADER + "\n" + tomli_w.dumps(raw)
    except TypeError as exc:
        raise ConfigError(f"cannot write a policy file: {exc}", path=path) from exc
    write_atomic(path, text.encode("utf-8"), check=AppraisalPolicy.load)
    return AppraisalPolicy.load(path)


def write_policy(
    path: Path,
    *,
    policy_id: str,
    code_digests: list[str],
    allow_stub: bool,
    allowed_nodes: list[str] | None,
) -> AppraisalPolicy:
    """Write a fresh appraisal policy TOML (``allowed_nodes`` None: any node)."""
    policy: dict[str, Any] = {
        "id": policy_id,
        "accepted-tees": [STUB.name] if allow_stub else [],
        "allow-stub": allow_stub,
    }
    if allowed_nodes is not None:
        policy["allowed-nodes"] = allowed_nodes
    policy["reference-values"] = {"code": code_digests}
    return save_policy(path, {"policy": policy})


def init_provider(
    root: Path,
    *,
    trust_roots: Sequence[Path] = (),
    allow_stub: bool = True,
    hosts: Sequence[str] = (),
) -> ProviderWorkspace:
    """Create provider identities, TLS material, trusted roots and a policy under ``root``.

    ``hosts`` are the names or addresses nodes reach the provider's gateway and key broker
    at (its server certificate names them; loopback is always named)."""
    ws = ProviderWorkspace(root)
    if ws.signing_key.exists():
        raise ConfigError("already a provider workspace; refusing to replace its keys", path=root)
    signing = Ed25519PrivateKey.generate()
    result = ec.generate_private_key(ec.SECP256R1())
    write_private(ws.signing_key, private_pem(signing))
    write_private(ws.result_key, private_pem(result))
    try:
        tls = issue_loopback_tls(ws.tls, common_name="ark-provider", valid_days=365, hosts=hosts)
    except ValueError as exc:
        raise ConfigError(f"--host: {exc}", path=root) from exc
    ws.public.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tls.ca_cert, ws.public / "ca.crt")
    (ws.public / "signing.pub").write_bytes(public_pem(signing.public_key()))
    (ws.public / "result.pub").write_bytes(public_pem(result.public_key()))
    ws.log_vkey.write_text(ws.log_signer().verifier.vkey() + "\n", encoding="utf-8")
    (ws.roots / STUB.name).mkdir(parents=True, exist_ok=True)
    for number, pem in enumerate(trust_roots):
        add_trust_root(ws, pem, name=f"root-{number}")
    write_policy(
        ws.policy,
        policy_id=f"ark-provider-policy/{secrets.token_hex(4)}",
        code_digests=[code_measurement()],
        allow_stub=allow_stub,
        allowed_nodes=[],
    )
    ws.keys.mkdir(mode=0o700, exist_ok=True)
    return ws


def init_aggregator(ws: ProviderWorkspace, manufacturer: Path) -> str:
    """The aggregator sandbox's stub attestation key, certified by the (development)
    manufacturer; its ueid goes into the public bundle so nodes can pin it. Returns it.
    """
    maker = load_or_create_manufacturer(manufacturer)
    ueid = f"aggregator-{secrets.token_hex(8)}"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), ueid, now=_utcnow())
    write_private(ws.aggregator / "key.pem", private_pem(key))
    (ws.aggregator / "chain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (ws.aggregator / "ueid").write_text(ueid + "\n", encoding="utf-8")
    # The ServerApp loads the attester this kind's backend registered (the stub's here).
    (ws.aggregator / "tee").write_text(STUB.name + "\n", encoding="utf-8")
    # The ServerApp checks each node's attestation result against the provider's key.
    shutil.copyfile(ws.public / "result.pub", ws.aggregator / "result.pub")
    (ws.public / AGGREGATOR_UEID).write_text(ueid + "\n", encoding="utf-8")
    return ueid


# The file in the provider's public bundle that names the aggregator's ueid.
AGGREGATOR_UEID = "aggregator-ueid"


def pinned_aggregator(provider_public: Path) -> str:
    """The aggregator's ueid from the provider's public bundle: every node's aggregator
    policy pins it, so a node cannot be set up without it."""
    path = provider_public / AGGREGATOR_UEID
    try:
        ueid = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "cannot read the aggregator's ueid, which the node pins; the provider creates "
            "it with `ark provider init --manufacturer DIR`",
            path=path,
        ) from exc
    if not ueid or not ueid.isprintable():
        raise ConfigError(f"must name the aggregator's ueid, got {ueid[:64]!r}", path=path)
    return ueid


def add_trust_root(ws: ProviderWorkspace, pem: Path, *, tee: str = STUB.name, name: str) -> Path:
    """Trust a manufacturer root for ``tee`` (the stub's is the development root)."""
    try:
        x509.load_pem_x509_certificate(pem.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"not a PEM certificate: {exc}", path=pem) from exc
    target = ws.roots / tee / f"{name}.pem"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pem, target)
    return target


def allow_node(ws: ProviderWorkspace, ueid: str) -> AppraisalPolicy:
    """Add a node's ueid to the policy's allowlist; every other key is kept as it is."""
    AppraisalPolicy.load(ws.policy)  # refuse to edit a policy that does not load
    raw = tomllib.loads(ws.policy.read_text(encoding="utf-8"))
    nodes = raw["policy"].get("allowed-nodes", [])
    if ueid not in nodes:
        raw["policy"]["allowed-nodes"] = sorted([*nodes, ueid])
    return save_policy(ws.policy, raw)


def seal_model(
    ws: ProviderWorkspace,
    model_dir: Path,
    out_dir: Path,
    *,
    model_id: str,
    events: EventSink | None = None,
) -> dict[str, Any]:
    """Seal ``model_dir`` under a fresh content key kept in the workspace keystore."""
    ws.require()
    key_id = f"{model_id}-{secrets.token_hex(4)}"
    content_key = new_content_key()
    manifest = seal_model_dir(
        model_dir,
        out_dir,
        content_key=content_key,
        signing_key=ws.signer(),
        model_id=model_id,
        key_id=key_id,
    )
    KeyStore(ws.keys).put(ContentKey(key_id, model_id, content_key))
    record_source(ws, model_id, model_dir)
    (events or ws.event_sink()).emit(
        ModelPublished(
            time=_utcnow(),
            model_id=model_id,
            key_id=key_id,
            files=_file_digests(manifest),
            manifest_sha256=manifest_sha256(out_dir),
        )
    )
    return manifest


def _file_digests(manifest: dict[str, Any]) -> list[FileDigest]:
    return [FileDigest(name=f["name"], sha256=f["sha256"]) for f in manifest["files"]]


# -- the provider's catalog -------------------------------------------------------------
# Bounds the provider-only sources map (model ids and folder paths, nothing else).
MAX_SOURCES_BYTES = 1 << 20


def catalog_sources(ws: ProviderWorkspace) -> dict[str, Path]:
    """Model id -> the plaintext model folder it was sealed from (``ark provider seal``
    records it). Provider-only: the ServerApp builds a run's adapter shapes from it, and
    it never goes into a published catalog. Empty before anything was sealed."""
    path = ws.catalog_sources

    def fail(reason: str) -> ConfigError:
        return ConfigError(reason, path=path)

    if not path.exists():
        return {}
    try:
        raw = strictjson.loads(read_regular(path, MAX_SOURCES_BYTES, fail))
    except StrictJSONError as exc:
        raise fail(f"not strict JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise fail("must be an object of model id -> model folder")
    for model_id, folder in raw.items():
        if not isinstance(folder, str) or not Path(folder).is_absolute():
            raise ConfigError(
                f"must be an absolute folder path, got {folder!r:.120}", path=path, key=model_id
            )
    return {model_id: Path(folder) for model_id, folder in raw.items()}


def record_source(ws: ProviderWorkspace, model_id: str, model_dir: Path) -> None:
    """Remember that ``model_id`` was sealed from ``model_dir`` (made absolute)."""
    sources = {k: str(v) for k, v in catalog_sources(ws).items()}
    sources[model_id] = str(model_dir.resolve())
    ws.catalog_sources.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ws.catalog_sources, canonical.dumps(sources))


def describe_package(
    ws: ProviderWorkspace,
    folder: Path,
    package: str,
    *,
    licence: str,
    price: Price,
    tasks: Sequence[str] = (TASK_CLASSIFICATION,),
    model_dir: Path | None = None,
) -> CatalogEntry:
    """The catalog entry for the package ``folder/package``, sealed by this workspace.

    Model id, manifest digest and architecture (``model_type``, layers, hidden size)
    come from the package's signed manifest; the parameter count from the safetensors
    headers of the plaintext model it was sealed from (``model_dir``, by default the one
    :func:`record_source` recorded), whose weight files must hash to the manifest's
    plaintext digests. Nothing sealed is decrypted. ``tasks`` must be ones transformers
    can build this architecture for.
    """
    ws.require()
    check_package_name(package)
    where = folder / package
    manifest = read_manifest(where, ws.signer().public_key())
    model_id = manifest["model_id"]
    config = manifest["architecture"]
    shape = _architecture(where / MANIFEST, config)
    if model_dir is None:
        model_dir = catalog_sources(ws).get(model_id)
        if model_dir is None:
            raise ConfigError(
                f"no plaintext source recorded for model {model_id!r}: seal it with "
                "`ark provider seal` in this workspace, or name its folder",
                path=ws.catalog_sources,
                key=model_id,
            )
    weights = [f for f in manifest["files"] if loads_as_weights(f["name"])]
    for entry in weights:
        path = model_dir / entry["name"]
        if not path.is_file() or sha256_file(path) != (entry["sha256"], entry["size"]):
            raise ConfigError(
                f"is not the {entry['name']} sealed into {where} (missing or different bytes)",
                path=path,
            )
    unsupported = [t for t in tasks if t not in supported_tasks(shape[0])]
    if unsupported:
        raise ConfigError(
            f"{shape[0]} models cannot serve {', '.join(unsupported)}", path=where, key="tasks"
        )
    return CatalogEntry(
        model_id=model_id,
        package=package,
        manifest_sha256=manifest_sha256(where),
        architecture=shape[0],
        layers=shape[1],
        hidden_size=shape[2],
        parameters=count_parameters([model_dir / f["name"] for f in weights]),
        tasks=tuple(tasks),
        licence=licence,
        price=price,
    )


def _architecture(manifest: Path, config: dict[str, Any]) -> tuple[str, int, int]:
    """``(model_type, layers, hidden size)`` of a manifest's model config, read through
    transformers' config class, which knows each architecture's spelling of them."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"names no architecture transformers knows, got {model_type!r:.80}",
            path=manifest,
            key="architecture.model_type",
        )
    try:
        parsed = CONFIG_MAPPING[model_type].from_dict(config)
        layers, hidden = parsed.num_hidden_layers, parsed.hidden_size
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{model_type} config without layers or hidden size: {exc}",
            path=manifest,
            key="architecture",
        ) from exc
    return model_type, layers, hidden


def publish_catalog(
    ws: ProviderWorkspace,
    folder: Path,
    entries: Sequence[CatalogEntry],
    *,
    provider: str,
    events: EventSink | None = None,
    now: Callable[[], dt.datetime] = _utcnow,
) -> Path:
    """Sign ``entries`` into ``folder``'s catalog with this workspace's manifest key and
    log one ``model_published`` per entry (with the catalog's SHA-256); return the
    ``catalog.json`` path.

    Every entry's package must already be sealed into ``folder`` by this workspace: its
    manifest is checked against the entry (:func:`~sandbox.catalog.package_for`) before
    anything is signed, so the provider never publishes an entry a node would refuse.
    """
    ws.require()
    signer = ws.signer()
    manifests = []
    for entry in entries:
        package = package_for(folder, entry, signer.public_key())
        manifests.append(read_manifest(package, signer.public_key(), sha256=entry.manifest_sha256))
    catalog = Catalog(provider=provider, issued=now(), models=tuple(entries))
    path = write_catalog(folder, catalog, signer)
    digest, _ = sha256_file(path)
    sink = events or ws.event_sink()
    for entry, manifest in zip(catalog.models, manifests, strict=True):
        sink.emit(
            ModelPublished(
                time=now(),
                model_id=entry.model_id,
                key_id=manifest["key_id"],
                files=_file_digests(manifest),
                manifest_sha256=entry.manifest_sha256,
                catalog=digest,
            )
        )
    return path


def check_package(ws: ProviderWorkspace, package: Path) -> OpenedModel:
    """Decrypt a package with the provider's own keystore and verify every digest.

    A package that lists any file outside the plain allowlist unencrypted is refused
    (by :func:`read_manifest`, as a node refuses it), even when its signature is valid.
    """
    ws.require()
    verify_key = ws.signer().public_key()
    manifest = read_manifest(package, verify_key)
    key = KeyStore(ws.keys).get(manifest["key_id"])
    return open_sealed_package(
        package,
        content_key=key.key,
        verify_key=verify_key,
        model_id=key.model_id,
        key_id=key.key_id,
    )


def build_broker(ws: ProviderWorkspace, events: EventSink) -> KeyBroker:
    """The key broker for this workspace: its policy, roots, result key and keystore."""
    ws.require()
    roots = ws.trusted_roots()
    if not roots:
        raise ConfigError("no trusted manufacturer roots; add one with --trust-root", path=ws.roots)
    return KeyBroker(
        verifiers=verifiers_for(roots),
        policy=AppraisalPolicy.load(ws.policy),
        signer=ws.result_signer(),
        keystore=KeyStore(ws.keys),
        events=events,
    )


# -- node -------------------------------------------------------------------------------


def init_node(
    root: Path,
    *,
    name: str,
    data_path: Path,
    manufacturer: Path,
    provider_public: Path,
    key_broker: str,
    package: Path,
    journal: bool = True,
    threads: int = 0,
    catalog: Path | None = None,
    catalog_keys: Sequence[Path] = (),
    local_model: Path | None = None,
    privacy: PrivacyBudget | None = None,
) -> Path:
    """Create a node's stub attestation identity and its ``node.toml``; return that path.

    ``catalog`` is a provider's catalog folder the node may take models from, once its
    operator trusts the catalog's key: ``catalog_keys`` here, or ``ark node
    trust-catalog`` later (:func:`trust_catalog_key`). ``local_model`` is the
    operator's own model folder, which a comparison may score beside the catalog's;
    ``privacy`` its differential-privacy budget (``[node.privacy]``)."""
    root = root.resolve()
    config_path = root / "node.toml"
    if config_path.exists():
        raise ConfigError("already a node workspace; refusing to replace it", path=config_path)
    for needed in ("ca.crt", "signing.pub", "result.pub"):
        if not (provider_public / needed).is_file():
            raise ConfigError(f"the provider's public bundle lacks {needed}", path=provider_public)
    aggregator_ueid = pinned_aggregator(provider_public)
    maker = load_or_create_manufacturer(manufacturer)
    ueid = f"{name}-{secrets.token_hex(8)}"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), ueid, now=_utcnow())
    attestation = root / "attestation"
    write_private(attestation / "key.pem", private_pem(key))
    # The SuperNode's Flower identity: its public half is registered with the SuperLink.
    write_openssh_keypair(node_auth_key(root))
    (attestation / "chain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    provider_dir = root / "provider"
    provider_dir.mkdir(parents=True, exist_ok=True)
    for needed in ("ca.crt", "signing.pub", "result.pub"):
        shutil.copyfile(provider_public / needed, provider_dir / needed)
    # The node's own passport policy for the aggregator: the ServerApp code it approves
    # (measured from the code it reviewed, here this checkout) and the roots it trusts.
    roots = root / "roots"
    (roots / STUB.name).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manufacturer / "root.crt", roots / STUB.name / "dev-manufacturer.pem")
    write_policy(
        root / "aggregator-policy.toml",
        policy_id=f"{name}-aggregator-policy/{secrets.token_hex(4)}",
        code_digests=[code_measurement(AGGREGATOR_PACKAGES)],
        allow_stub=True,
        allowed_nodes=[aggregator_ueid],
    )
    node = NodeConfig(
        name=name,
        data_path=data_path.resolve(),
        journal_path=(root / "journal.jsonl") if journal else None,
        threads=threads,
        sandbox=SandboxConfig(
            tee=STUB.name,
            ueid=ueid,
            attestation_key=attestation / "key.pem",
            attestation_chain=attestation / "chain.pem",
            key_broker=key_broker,
            provider_ca=provider_dir / "ca.crt",
            manifest_key=provider_dir / "signing.pub",
            result_key=provider_dir / "result.pub",
            package=package.resolve(),
            aggregator_policy=root / "aggregator-policy.toml",
            trusted_roots=roots,
            catalog=None if catalog is None else catalog.resolve(),
            local_model=None if local_model is None else local_model.resolve(),
        ),
        privacy=privacy,
    )
    config_path.write_text(node.to_toml(), encoding="utf-8")
    for key_file in catalog_keys:
        trust_catalog_key(config_path, key_file)
    return config_path


# The folder of a node workspace that holds the catalog keys its operator trusts.
CATALOG_KEYS_DIR = "catalog-keys"
MAX_KEY_FILE_BYTES = 64 * 1024


def trust_catalog_key(config_path: Path, key_file: Path) -> Path:
    """Trust the Ed25519 public key (PEM) in ``key_file`` to sign model catalogs for the
    node whose config is ``config_path``; return the copy made in the node workspace.

    The key is copied (named by its SHA-256 fingerprint under ``catalog-keys/``), so a later
    change to the file handed over does not change what the node trusts. Refused, with
    a ConfigError naming the file: a symlink, anything but an Ed25519 public key, and a
    key already trusted.
    """
    node = NodeConfig.load(config_path)
    sandbox = node.require_sandbox()

    def fail(reason: str) -> ConfigError:
        return ConfigError(reason, path=key_file)

    if key_file.is_symlink():
        raise fail("is a symlink; give the key file itself")
    data = read_regular(key_file, MAX_KEY_FILE_BYTES, fail)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise fail(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise fail(
            f"expected an Ed25519 public key (a provider's signing.pub), got {type(key).__name__}"
        )
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for trusted in sandbox.catalog_keys:
        known = load_ed25519_public(trusted)
        if known.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw:
            raise fail(f"this key is already trusted, as {trusted}")
    # Named by the whole fingerprint: one name, one key.
    target = node.workspace() / CATALOG_KEYS_DIR / f"{sha256_hex(raw)}.pub"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, public_pem(key))
    trusted_node = dataclasses.replace(
        node,
        sandbox=dataclasses.replace(sandbox, catalog_keys=(*sandbox.catalog_keys, target)),
    )
    write_atomic(config_path, trusted_node.to_toml().encode("utf-8"), check=NodeConfig.load)
    return target


@dataclass(frozen=True)
class LoopbackDeployment:
    """A provider workspace, a sealed model, and node workspaces that attest to it."""

    provider: ProviderWorkspace
    package: Path
    model_id: str
    node_configs: dict[str, Path]
    key_broker: str
    # The provider's signed catalog folder, when it published one.
    catalog: Path | None = None

    def auth_key(self, name: str) -> Path:
        """The private key a node's SuperNode authenticates to the SuperLink with."""
        return node_auth_key(self.node_configs[name].parent)


def node_auth_key(node_root: Path) -> Path:
    """Where ``ark node init`` puts the SuperNode's OpenSSH private key (``.pub`` beside it)."""
    return node_root / "flower" / "node-auth"


def init_unprotected_nodes(
    root: Path, node_data: dict[str, Path], *, approved_apps: tuple[str, ...] = ()
) -> dict[str, Path]:
    """``nodes/<name>/node.toml`` with every protection off, for the canary test's negative
    control and the overhead bench's baseline only; never for a deployment."""
    configs = {}
    for name, data in node_data.items():
        node_root = root / "nodes" / name
        node_root.mkdir(parents=True)
        node = NodeConfig(
            name=name,
            data_path=data,
            journal_path=node_root / "journal.jsonl",
            threads=1,
            approved_apps=approved_apps,
            unprotected=True,
        )
        configs[name] = node_root / "node.toml"
        configs[name].write_text(node.to_toml(), encoding="utf-8")
    return configs


def provision_loopback(
    root: Path,
    *,
    model_dir: Path,
    node_data: dict[str, Path],
    key_broker_port: int,
    model_id: str = "base-model",
    threads: int = 0,
    provider_host: str = "localhost",
    catalog: Callable[[ProviderWorkspace, Path], Path] | None = None,
    local_models: dict[str, Path] | None = None,
    privacy: PrivacyBudget | None = None,
) -> LoopbackDeployment:
    """Everything ``ark provider init|seal|allow-node|catalog`` and ``ark node init`` do,
    for a demo.

    The provider seals ``model_dir`` into ``root/distribution``, the folder standing in
    for however the sealed package reaches the nodes; each node then attests for its key,
    at ``provider_host`` (loopback, or the provider's test host). With ``catalog`` (which
    seals models into a folder and signs their catalog there), the provider also
    publishes a catalog into ``root/distribution/catalog``, and each node's operator
    trusts the provider's signing key for catalogs. ``local_models`` names the own
    model folder of the nodes that keep one; ``privacy`` is every node's privacy budget.
    """
    manufacturer = root / "dev-manufacturer"
    load_or_create_manufacturer(manufacturer)
    ws = init_provider(
        root / "provider", trust_roots=[manufacturer / "root.crt"], hosts=[provider_host]
    )
    init_aggregator(ws, manufacturer)
    package = root / "distribution" / model_id
    seal_model(ws, model_dir, package, model_id=model_id)
    folder = None
    if catalog is not None:
        folder = root / "distribution" / "catalog"
        catalog(ws, folder)
    address = f"{provider_host}:{key_broker_port}"
    configs: dict[str, Path] = {}
    for name, data in node_data.items():
        configs[name] = init_node(
            root / "nodes" / name,
            name=name,
            data_path=data,
            manufacturer=manufacturer,
            provider_public=ws.public,
            key_broker=address,
            package=package,
            threads=threads,
            catalog=folder,
            catalog_keys=() if folder is None else (ws.public / "signing.pub",),
            local_model=(local_models or {}).get(name),
            privacy=privacy,
        )
        sandbox = NodeConfig.load(configs[name]).sandbox
        assert sandbox is not None  # init_node always writes one
        allow_node(ws, sandbox.ueid)
    return LoopbackDeployment(ws, package, model_id, configs, address, folder)
