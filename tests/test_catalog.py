"""The signed model catalog: its format (vectors), the provider's publishing, the node's
trust in it, and the two attacks of issue 16 that target it.

A swapped package (the catalog pins another manifest) and a catalog signed by a key the
node's operator never added are both refused before the node asks the real key broker
(served over gRPC with TLS on loopback) for anything, and before a byte is unsealed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
import transformers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import event, given
from typer.testing import CliRunner

from clients.adapters import FINAL
from clients.channels import RunIds, SealedChannel, sealed_source, update_channel
from clients.model import load_base_model, model_package
from clients.sandbox import NodeSandbox
from sandbox.catalog import (
    CATALOG_FILE,
    CATALOG_SIGNATURE,
    Catalog,
    CatalogEntry,
    Price,
    load_catalog,
    manifest_sha256,
    package_for,
    sign_catalog,
    write_catalog,
)
from sandbox.config import NodeConfig
from sandbox.errors import (
    CatalogDigestMismatch,
    CatalogEntryUnknown,
    CatalogInvalid,
    CatalogUntrusted,
    ConfigError,
    SealedModelError,
)
from sandbox.events import JsonlEventSink, MemoryEventSink, ModelPublished
from sandbox.keyfiles import load_ed25519_public
from sandbox.lora import adapter_state
from sandbox.models import count_parameters
from sandbox.ops.catalog_models import DEFAULT_MODELS, build_default_models, publish_default_catalog
from sandbox.ops.cli import app
from sandbox.ops.provision import (
    LoopbackDeployment,
    ProviderWorkspace,
    catalog_sources,
    describe_package,
    init_aggregator,
    init_provider,
    publish_catalog,
    seal_model,
    trust_catalog_key,
)
from sandbox.seal.package import read_manifest, seal_model_dir
from server.app import _provider_model
from tests.conftest import make_spec, served_deployment
from tests.fuzzing import fuzz_settings, typed_errors_only
from tests.test_fuzz_files import documents
from tests.vectorload import load_vector, vector_cases

runner = CliRunner()
VECTORS = load_vector("catalog", "ark-model-catalog-1.json")
VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(VECTORS["private_seed"]))
ISSUED = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
PRICE = Price("EUR", 2.0, 0.2)


def _flat(output: str) -> str:
    return " ".join(output.split())


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _write(folder: Path, case: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CATALOG_FILE).write_bytes(case["catalog_json"].encode("utf-8"))
    (folder / CATALOG_SIGNATURE).write_bytes(bytes.fromhex(case["signature"]))
    return folder


# -- the format: vectors ------------------------------------------------------------------


@pytest.mark.parametrize("case", vector_cases(VECTORS["valid"], lambda c: c["name"]))
def test_a_valid_catalog_loads_and_signs_again_to_the_same_bytes(
    case: dict[str, Any], tmp_path: Path
) -> None:
    folder = _write(tmp_path / "catalog", case)
    public = VECTOR_KEY.public_key()
    assert _raw(public).hex() == VECTORS["public_key"]
    catalog = load_catalog(folder, [Ed25519PrivateKey.generate().public_key(), public])
    assert catalog.signer is not None
    assert _raw(catalog.signer) == _raw(public)
    body, signature = sign_catalog(catalog, VECTOR_KEY)
    assert body == case["catalog_json"].encode("utf-8")
    assert signature.hex() == case["signature"]
    assert Catalog.from_json(json.loads(body)) == catalog


@pytest.mark.parametrize("case", vector_cases(VECTORS["invalid"], lambda c: c["name"]))
def test_a_malformed_catalog_is_refused_naming_the_file_and_the_key(
    case: dict[str, Any], tmp_path: Path
) -> None:
    folder = _write(tmp_path / "catalog", case)
    with pytest.raises(CatalogInvalid) as caught:
        load_catalog(folder, [VECTOR_KEY.public_key()])
    key = case["error"]["key"]
    assert caught.value.key == key
    assert caught.value.path == folder / CATALOG_FILE
    assert str(folder / CATALOG_FILE) in str(caught.value)
    assert key is None or repr(key) in str(caught.value)


@pytest.mark.parametrize("case", vector_cases(VECTORS["untrusted"], lambda c: c["name"]))
def test_a_catalog_whose_signature_fails_is_untrusted(case: dict[str, Any], tmp_path: Path) -> None:
    folder = _write(tmp_path / "catalog", case)
    with pytest.raises(CatalogUntrusted, match=r"catalog\.sig"):
        load_catalog(folder, [VECTOR_KEY.public_key()])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example hypothesis runs in one test call."""
    return tmp_path_factory.mktemp("fuzz-catalog")


@fuzz_settings
@given(body=documents(json.loads(VECTORS["valid"][0]["catalog_json"]), canonical=True))
def test_fuzz_catalog(fuzz_dir: Path, body: bytes) -> None:
    """A catalog validly signed by a trusted key is still parsed strictly: a mutated one
    loads or raises a typed error, nothing else."""
    signature = VECTOR_KEY.sign(b"ark/v1/catalog\x00" + body)
    (fuzz_dir / CATALOG_FILE).write_bytes(body)
    (fuzz_dir / CATALOG_SIGNATURE).write_bytes(signature)
    catalog = typed_errors_only(load_catalog, fuzz_dir, [VECTOR_KEY.public_key()])
    event(f"catalog {'accepted' if catalog is not None else 'refused'}")


def test_the_signature_is_checked_before_a_byte_is_parsed(tmp_path: Path) -> None:
    stranger = Ed25519PrivateKey.generate()
    body = b'{"format": 1, "format": 2}'
    folder = _write(
        tmp_path / "catalog",
        {"catalog_json": body.decode(), "signature": stranger.sign(body).hex()},
    )
    with pytest.raises(CatalogUntrusted):
        load_catalog(folder, [VECTOR_KEY.public_key()])
    # A node that trusts no catalog key yet trusts no catalog, however well-formed.
    valid = _write(tmp_path / "valid", VECTORS["valid"][0])
    with pytest.raises(CatalogUntrusted, match="trusts no catalog key"):
        load_catalog(valid, [])


def test_a_catalog_signature_is_not_a_manifest_signature(tmp_path: Path) -> None:
    """Domain separation: the same provider key signs manifests and catalogs, and a
    signature over the bare bytes (as a manifest's is) never passes as a catalog's."""
    case = VECTORS["valid"][0]
    body = case["catalog_json"].encode("utf-8")
    bare = VECTOR_KEY.sign(body)
    folder = _write(tmp_path / "catalog", {**case, "signature": bare.hex()})
    with pytest.raises(CatalogUntrusted):
        load_catalog(folder, [VECTOR_KEY.public_key()])
    _, signature = sign_catalog(Catalog.from_json(json.loads(body)), VECTOR_KEY)
    VECTOR_KEY.public_key().verify(signature, b"ark/v1/catalog\x00" + body)


def test_catalog_files_are_read_as_regular_files_only(tmp_path: Path) -> None:
    real = _write(tmp_path / "real", VECTORS["valid"][0])
    folder = tmp_path / "linked"
    folder.mkdir()
    (folder / CATALOG_FILE).symlink_to(real / CATALOG_FILE)
    shutil.copyfile(real / CATALOG_SIGNATURE, folder / CATALOG_SIGNATURE)
    with pytest.raises(CatalogInvalid, match=str(folder / CATALOG_FILE)):
        load_catalog(folder, [VECTOR_KEY.public_key()])
    with pytest.raises(CatalogInvalid, match="cannot open"):
        load_catalog(tmp_path / "missing", [VECTOR_KEY.public_key()])


def test_an_unknown_model_id_names_the_ones_listed(tmp_path: Path) -> None:
    catalog = load_catalog(_write(tmp_path / "c", VECTORS["valid"][0]), [VECTOR_KEY.public_key()])
    assert catalog.entry("minilm-l3").layers == 3
    with pytest.raises(CatalogEntryUnknown, match=r"'gpt-9'.*'minilm-l6', 'minilm-l3'"):
        catalog.entry("gpt-9")


def _entry(model_id: str = "tiny", package: str = "tiny", **changes: Any) -> CatalogEntry:
    values: dict[str, Any] = {
        "model_id": model_id,
        "package": package,
        "manifest_sha256": "0" * 64,
        "architecture": "bert",
        "layers": 2,
        "hidden_size": 32,
        "parameters": 1000,
        "tasks": ("sequence-classification",),
        "licence": "Apache-2.0",
        "price": PRICE,
    }
    return CatalogEntry(**{**values, **changes})


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", "", ".hidden", "a\\b", "a\0b"])
def test_a_package_name_must_be_one_plain_folder_inside_the_catalog(name: str) -> None:
    with pytest.raises(CatalogInvalid) as caught:
        _entry(package=name)
    assert caught.value.key == "package"


def test_prices_are_held_as_floats_and_entries_round_trip() -> None:
    entry = _entry(price=Price("EUR", 6, 0.6))
    assert entry.price.per_1k_training_examples == 6.0
    assert isinstance(entry.price.per_1k_training_examples, float)
    assert CatalogEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    with pytest.raises(CatalogInvalid, match="per_1k_inferences"):
        Price("EUR", 1, float("nan"))
    with pytest.raises(CatalogInvalid, match="currency"):
        Price("euro", 1, 1)


# -- packages: the digest a catalog pins ------------------------------------------------


@dataclasses.dataclass
class SealedCatalog:
    folder: Path
    key: Ed25519PrivateKey
    entries: dict[str, CatalogEntry]


def _seal(model_dir: Path, out: Path, key: Ed25519PrivateKey, model_id: str) -> None:
    seal_model_dir(
        model_dir,
        out,
        content_key=bytes(32),
        signing_key=key,
        model_id=model_id,
        key_id=f"{model_id}-{os.urandom(4).hex()}",
    )


@pytest.fixture
def sealed_catalog(tmp_path: Path, tiny_bert_dir: Path) -> SealedCatalog:
    """Two packages of the tiny BERT sealed into a catalog folder, and its signed catalog."""
    key = Ed25519PrivateKey.generate()
    folder = tmp_path / "catalog"
    entries = {}
    for model_id in ("tiny-a", "tiny-b"):
        _seal(tiny_bert_dir, folder / model_id, key, model_id)
        entries[model_id] = _entry(
            model_id, model_id, manifest_sha256=manifest_sha256(folder / model_id)
        )
    write_catalog(folder, Catalog("test", ISSUED, tuple(entries.values())), key)
    return SealedCatalog(folder, key, entries)


def test_package_for_gives_the_package_whose_manifest_the_entry_pins(
    sealed_catalog: SealedCatalog,
) -> None:
    folder, key = sealed_catalog.folder, sealed_catalog.key
    catalog = load_catalog(folder, [key.public_key()])
    assert catalog.models == tuple(sealed_catalog.entries.values())
    assert package_for(folder, catalog.entry("tiny-b"), key.public_key()) == folder / "tiny-b"


def test_attack_a_swapped_package_does_not_match_its_catalog_entry(
    sealed_catalog: SealedCatalog, tiny_bert_dir: Path
) -> None:
    """The package behind an entry is replaced by another validly signed one (here the
    same model sealed again, under a new key id): its manifest is not the pinned one."""
    folder, key = sealed_catalog.folder, sealed_catalog.key
    entry = sealed_catalog.entries["tiny-a"]
    shutil.rmtree(folder / "tiny-a")
    _seal(tiny_bert_dir, folder / "tiny-a", key, "tiny-a")
    found = manifest_sha256(folder / "tiny-a")
    with pytest.raises(CatalogDigestMismatch) as caught:
        package_for(folder, entry, key.public_key())
    assert (caught.value.model_id, caught.value.expected, caught.value.found) == (
        "tiny-a",
        entry.manifest_sha256,
        found,
    )
    assert entry.manifest_sha256 in str(caught.value)
    assert found in str(caught.value)
    # Read pinned, the manifest is refused on every read, not only by package_for.
    with pytest.raises(SealedModelError, match="pinned"):
        read_manifest(folder / "tiny-a", key.public_key(), sha256=entry.manifest_sha256)


def test_an_entry_naming_another_models_package_is_refused(sealed_catalog: SealedCatalog) -> None:
    folder, key = sealed_catalog.folder, sealed_catalog.key
    other = sealed_catalog.entries["tiny-b"]
    entry = dataclasses.replace(sealed_catalog.entries["tiny-a"], package="tiny-b")
    entry = dataclasses.replace(entry, manifest_sha256=other.manifest_sha256)
    with pytest.raises(CatalogInvalid, match="sealed as model 'tiny-b'"):
        package_for(folder, entry, key.public_key())
    # A manifest that matches but was signed by another key is no better.
    with pytest.raises(SealedModelError, match="signature is invalid"):
        package_for(folder, other, Ed25519PrivateKey.generate().public_key())


def test_a_catalog_is_not_written_for_a_package_it_does_not_hold(
    sealed_catalog: SealedCatalog,
) -> None:
    missing = _entry("ghost", "ghost")
    catalog = Catalog("test", ISSUED, (*sealed_catalog.entries.values(), missing))
    with pytest.raises(CatalogInvalid) as caught:
        write_catalog(sealed_catalog.folder, catalog, sealed_catalog.key)
    assert caught.value.key == "models[2].package"


# -- the provider: sealing, describing, publishing ---------------------------------------


@pytest.fixture
def provider(tmp_path: Path) -> ProviderWorkspace:
    return init_provider(tmp_path / "provider")


def _torch_parameters(model_dir: Path) -> int:
    model = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return sum(p.numel() for p in model.parameters())


def test_publish_signs_the_catalog_and_logs_each_model(
    provider: ProviderWorkspace, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "catalog"
    sealed = MemoryEventSink()
    seal_model(provider, tiny_bert_dir, folder / "bert", model_id="tiny-bert", events=sealed)
    seal_model(provider, tiny_llama_dir, folder / "llama", model_id="tiny-llama", events=sealed)
    assert catalog_sources(provider) == {
        "tiny-bert": tiny_bert_dir.resolve(),
        "tiny-llama": tiny_llama_dir.resolve(),
    }
    bert = describe_package(provider, folder, "bert", licence="Apache-2.0", price=PRICE)
    llama = describe_package(
        provider,
        folder,
        "llama",
        licence="research only",
        price=Price("EUR", 1, 0.1),
        tasks=("causal-lm",),
    )
    assert (bert.architecture, bert.layers, bert.hidden_size) == ("bert", 2, 32)
    assert (llama.architecture, llama.layers, llama.hidden_size) == ("llama", 2, 32)
    assert bert.parameters == _torch_parameters(tiny_bert_dir)
    assert llama.parameters == count_parameters([tiny_llama_dir / "model.safetensors"])

    published = MemoryEventSink()
    path = publish_catalog(
        provider,
        folder,
        [bert, llama],
        provider="tiny-provider",
        events=published,
        now=lambda: ISSUED,
    )
    catalog = load_catalog(folder, [load_ed25519_public(provider.public / "signing.pub")])
    assert catalog.provider == "tiny-provider"
    assert (catalog.issued, catalog.models) == (ISSUED, (bert, llama))
    digest = manifest_sha256(folder / "bert")
    events = [e for e in published.events if isinstance(e, ModelPublished)]
    assert [(e.model_id, e.manifest_sha256) for e in events] == [
        ("tiny-bert", digest),
        ("tiny-llama", llama.manifest_sha256),
    ]
    assert {e.catalog for e in events} == {hashlib.sha256(path.read_bytes()).hexdigest()}
    # Sealing logs the manifest digest too, the same one the catalog pins.
    assert [e.manifest_sha256 for e in sealed.events if isinstance(e, ModelPublished)] == [
        digest,
        llama.manifest_sha256,
    ]
    # The provider-only sources map is not in the published folder.
    assert not any("sources" in p.name for p in folder.rglob("*"))


def test_describe_refuses_a_source_that_is_not_what_was_sealed(
    provider: ProviderWorkspace, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "catalog"
    seal_model(provider, tiny_bert_dir, folder / "bert", model_id="tiny-bert")
    changed = tmp_path / "changed"
    shutil.copytree(tiny_bert_dir, changed)
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ConfigError, match=r"not the model\.safetensors sealed into"):
        describe_package(provider, folder, "bert", licence="MIT", price=PRICE, model_dir=changed)
    provider.catalog_sources.unlink()
    with pytest.raises(ConfigError, match="no plaintext source recorded for model 'tiny-bert'"):
        describe_package(provider, folder, "bert", licence="MIT", price=PRICE)
    with pytest.raises(ConfigError, match=r"key 'tasks'.*translation"):
        describe_package(
            provider,
            folder,
            "bert",
            licence="MIT",
            price=PRICE,
            tasks=("translation",),
            model_dir=tiny_bert_dir,
        )


def _catalog_cli(provider: ProviderWorkspace, folder: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["provider", "catalog", str(folder), "--workdir", str(provider.root), *args]
    )
    return result.exit_code, _flat(result.output)


def test_ark_provider_catalog(
    provider: ProviderWorkspace, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "catalog"
    for model_id in ("small", "large"):
        result = runner.invoke(
            app,
            [
                "provider",
                "seal",
                str(tiny_bert_dir),
                "--out",
                str(folder / model_id),
                "--model-id",
                model_id,
                "--workdir",
                str(provider.root),
            ],
        )
        assert result.exit_code == 0, result.output
    assert set(catalog_sources(provider)) == {"small", "large"}
    code, output = _catalog_cli(
        provider,
        folder,
        "--model",
        "small=small",
        "--model",
        f"large={folder / 'large'}",
        "--licence",
        "small=Apache-2.0",
        "--licence",
        "large=Licence of Example AG",
        "--price",
        "small=1.5,0.15",
        "--price",
        "large=6,0.6",
        "--provider",
        "example",
    )
    assert code == 0, output
    assert "catalog signed" in output
    assert "(2 models)" in output
    assert "EUR 6 per 1k training examples, 0.6 per 1k inferences" in output
    catalog = load_catalog(folder, [provider.signer().public_key()])
    assert [m.model_id for m in catalog.models] == ["small", "large"]
    assert catalog.entry("large").licence == "Licence of Example AG"
    assert catalog.provider == "example"

    refusals = {
        "--licence: missing for model 'large'": [
            *("--model", "large=large", "--model", "small=small", "--licence", "small=MIT"),
            *("--price", "large=1,1", "--price", "small=1,1"),
        ],
        "--price 'medium=1,1': no --model names 'medium'": [
            "--model",
            "large=large",
            "--licence",
            "large=MIT",
            "--price",
            "large=1,1",
            "--price",
            "medium=1,1",
        ],
        "--model 'large': expected ID=VALUE": [
            *("--model", "large", "--licence", "x=y", "--price", "x=1,1"),
        ],
        "--model 'small=x': model 'small' is given twice": [
            *("--model", "small=small", "--model", "small=x"),
            *("--licence", "small=MIT", "--price", "small=1,1"),
        ],
        "--price large=6: expected TRAIN,INFER (two prices)": [
            "--model",
            "large=large",
            "--licence",
            "large=MIT",
            "--price",
            "large=6",
        ],
        "--currency 'euro': must be an ISO 4217 code": [
            "--model",
            "large=large",
            "--licence",
            "large=MIT",
            "--price",
            "large=6,1",
            "--currency",
            "euro",
        ],
        "--model small=large: the package is sealed as model 'large'": [
            "--model",
            "small=large",
            "--licence",
            "small=MIT",
            "--price",
            "small=6,1",
        ],
        "is not a package folder directly inside": [
            "--model",
            f"large={tmp_path}",
            "--licence",
            "large=MIT",
            "--price",
            "large=6,1",
        ],
    }
    for message, args in refusals.items():
        code, output = _catalog_cli(provider, folder, *args)
        assert code == 2, (message, output)
        assert message in output, (message, output)


# -- the node: trusting catalog keys -----------------------------------------------------


@pytest.fixture
def node_config(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    """A node initialised with ``ark node init --catalog``, and its provider."""
    provider_ws = init_provider(tmp_path / "provider")
    init_aggregator(provider_ws, tmp_path / "maker")
    (tmp_path / "data.jsonl").write_text('{"text": "t", "label": "a"}\n', encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "node",
            "init",
            "--workdir",
            str(tmp_path / "node"),
            "--name",
            "alpine",
            "--data",
            str(tmp_path / "data.jsonl"),
            "--provider-public",
            str(provider_ws.public),
            "--key-broker",
            "localhost:1",
            "--package",
            str(tmp_path / "package"),
            "--manufacturer",
            str(tmp_path / "maker"),
            "--catalog",
            str(tmp_path / "catalog"),
        ],
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "node" / "node.toml"


def _trust(config: Path, key: Path) -> tuple[int, str]:
    result = runner.invoke(
        app, ["node", "trust-catalog", str(key), "--workdir", str(config.parent)]
    )
    return result.exit_code, _flat(result.output)


def test_ark_node_trust_catalog(node_config: Path, tmp_path: Path) -> None:
    sandbox = NodeConfig.load(node_config).require_sandbox()
    assert sandbox.catalog == (tmp_path / "catalog").resolve()
    assert sandbox.catalog_keys == ()
    signing = tmp_path / "provider" / "public" / "signing.pub"
    code, output = _trust(node_config, signing)
    assert code == 0, output
    trusted = NodeConfig.load(node_config).require_sandbox().catalog_keys
    assert len(trusted) == 1
    assert trusted[0].parent == node_config.parent / "catalog-keys"
    assert _raw(load_ed25519_public(trusted[0])) == _raw(load_ed25519_public(signing))

    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    link = tmp_path / "link.pub"
    link.symlink_to(other)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n", encoding="utf-8")
    refusals = {
        "already trusted": signing,
        "is a symlink": link,
        "expected an Ed25519 public key": tmp_path / "provider" / "public" / "result.pub",
        "not a PEM public key": garbage,
    }
    for message, key in refusals.items():
        code, output = _trust(node_config, key)
        assert code == 2, (message, output)
        assert message in output, (message, output)
        assert str(key) in output, (message, output)
    assert NodeConfig.load(node_config).require_sandbox().catalog_keys == trusted
    code, output = _trust(node_config, other)
    assert code == 0, output
    assert len(NodeConfig.load(node_config).require_sandbox().catalog_keys) == 2


def test_the_catalog_settings_round_trip_through_node_toml(node_config: Path) -> None:
    node = NodeConfig.load(node_config)
    sandbox = node.require_sandbox()
    keys = (node_config.parent / "k1.pub", node_config.parent / "k2.pub")
    changed = dataclasses.replace(node, sandbox=dataclasses.replace(sandbox, catalog_keys=keys))
    node_config.write_text(changed.to_toml(), encoding="utf-8")
    assert NodeConfig.load(node_config).sandbox == changed.sandbox
    # Relative paths are taken from the config's folder, as every other path there.
    text = node_config.read_text(encoding="utf-8").replace(str(node_config.parent) + "/", "")
    node_config.write_text(text, encoding="utf-8")
    assert NodeConfig.load(node_config).require_sandbox().catalog_keys == keys
    for bad, message in (("k1.pub", "list of non-empty paths"), (["k", "k"], "duplicates")):
        raw = tomllib.loads(text)
        raw["node"]["sandbox"]["catalog-keys"] = bad
        node_config.write_text(tomli_w.dumps(raw), encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"key 'node\.sandbox\.catalog-keys'.*{message}"):
            NodeConfig.load(node_config)


# -- the node sandbox's model source, against the real key broker ------------------------


@dataclasses.dataclass
class CatalogWorld:
    deployment: LoopbackDeployment
    node_config: Path
    folder: Path
    entry: CatalogEntry

    @property
    def ws(self) -> ProviderWorkspace:
        return self.deployment.provider

    def node(self) -> NodeConfig:
        return NodeConfig.load(self.node_config)

    def broker_kinds(self) -> list[str]:
        """What the key broker logged: appraisals, releases, certifications, denials."""
        return [
            e["kind"]
            for e in JsonlEventSink(self.ws.events).read()
            if e["kind"] != ModelPublished.kind
        ]


def _use_catalog(config: Path, folder: Path) -> None:
    node = NodeConfig.load(config)
    sandbox = dataclasses.replace(node.require_sandbox(), catalog=folder)
    config.write_text(dataclasses.replace(node, sandbox=sandbox).to_toml(), encoding="utf-8")


@pytest.fixture
def catalog_world(tmp_path: Path, tiny_bert_dir: Path) -> Iterator[CatalogWorld]:
    """A node whose own package is the tiny BERT sealed as ``tiny``, whose provider also
    publishes a catalog with ``tiny-cat`` (the same weights, sealed under another key),
    and whose operator trusts that provider's catalog key; the key broker serving."""
    (tmp_path / "alpine.jsonl").write_text('{"text": "t", "label": "a"}\n', encoding="utf-8")
    data = {"alpine": tmp_path / "alpine.jsonl"}
    with served_deployment(tmp_path / "w", tiny_bert_dir, data, model_id="tiny", threads=1) as (
        deployed,
        _,
    ):
        ws = deployed.provider
        folder = tmp_path / "catalog"
        seal_model(ws, tiny_bert_dir, folder / "tiny-cat", model_id="tiny-cat")
        entry = describe_package(ws, folder, "tiny-cat", licence="Apache-2.0", price=PRICE)
        publish_catalog(ws, folder, [entry], provider="tiny-provider")
        config = deployed.node_configs["alpine"]
        _use_catalog(config, folder)
        trust_catalog_key(config, ws.public / "signing.pub")
        yield CatalogWorld(deployed, config, folder, entry)


def test_a_node_unseals_a_catalog_model_and_binds_its_channel_to_it(
    catalog_world: CatalogWorld, tiny_bert_dir: Path
) -> None:
    node = catalog_world.node()
    spec = make_spec(tiny_bert_dir, model_id="tiny-cat")
    package = model_package(node, "tiny-cat")
    assert package.path == catalog_world.folder / "tiny-cat"
    manifest = package.manifest()
    unsealed = sealed_source(node, spec).load()
    assert (unsealed.model_id, unsealed.source) == ("tiny-cat", catalog_world.folder / "tiny-cat")
    assert unsealed.released is not None
    assert unsealed.released.key_id == manifest["key_id"]
    # The channel is certified for the run's model; its envelopes bind that manifest.
    channel = SealedChannel(node, {}, spec)
    channel.hello(RunIds(run_id=5, node_id=3))
    events = JsonlEventSink(catalog_world.ws.events).read()
    certified = [e for e in events if e["kind"] == "channel_certified"]
    assert [e["key_id"] for e in certified] == [manifest["key_id"]]
    assert channel._manifest() == manifest
    assert SealedChannel(node, {})._manifest()["model_id"] == "tiny"
    # The node's own package still serves runs for its model, and runs naming none.
    assert model_package(node, "tiny").path == node.require_sandbox().package
    assert model_package(node).path == node.require_sandbox().package
    with pytest.raises(CatalogEntryUnknown, match="'gpt-9'"):
        sealed_source(node, make_spec(tiny_bert_dir, model_id="gpt-9"))
    checked = _check_catalog(catalog_world.node_config)
    assert checked.exit_code == 0, checked.output
    assert "tiny-cat" in checked.output
    assert "every package verified (1 models)" in checked.output


def _check_catalog(config: Path) -> Any:
    """``ark node catalog`` as the node's operator runs it."""
    return runner.invoke(app, ["node", "catalog", "--config", str(config)])


def test_attack_a_catalog_entry_not_matching_its_package_is_refused_before_any_key(
    catalog_world: CatalogWorld, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Issue 16's attack: the package behind a catalog entry is not the one the provider
    signed into the catalog (here the same model id sealed again, validly signed, under
    another key). The node's model source refuses it: nothing is attested for, no key
    is asked for or released, nothing is unsealed."""
    ws, folder = catalog_world.ws, catalog_world.folder
    seal_model(ws, tiny_bert_dir, tmp_path / "resealed", model_id="tiny-cat")
    shutil.rmtree(folder / "tiny-cat")
    shutil.copytree(tmp_path / "resealed", folder / "tiny-cat")
    node = catalog_world.node()
    spec = make_spec(tiny_bert_dir, model_id="tiny-cat")
    before = catalog_world.broker_kinds()
    channel = update_channel(spec, node, {})
    with pytest.raises(CatalogDigestMismatch, match="tiny-cat") as caught:
        channel.model_source(spec)
    assert caught.value.expected == catalog_world.entry.manifest_sha256
    with pytest.raises(CatalogDigestMismatch):
        channel.hello(RunIds(run_id=5, node_id=3))
    with pytest.raises(CatalogDigestMismatch):
        load_base_model(spec, node)
    sandbox = NodeSandbox(node)
    with pytest.raises(CatalogDigestMismatch):
        sandbox.hello(RunIds(run_id=6, node_id=3), 1, spec)
    assert sandbox.attestation is None
    assert catalog_world.broker_kinds() == before
    checked = _check_catalog(catalog_world.node_config)
    assert checked.exit_code == CatalogDigestMismatch.exit_code == 52, checked.output
    assert "tiny-cat" in checked.output
    assert catalog_world.broker_kinds() == before
    # Negative control: the node's own model still loads through attestation.
    sealed_source(node, make_spec(tiny_bert_dir, model_id="tiny")).load()
    assert catalog_world.broker_kinds()[len(before) :] == ["attestation_appraised", "key_released"]


def test_attack_a_catalog_signed_by_a_key_the_node_did_not_add_is_refused(
    catalog_world: CatalogWorld, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Issue 16's attack: a catalog signed by another provider, whose key this node's
    operator never added. Refused before any key is asked for; trusting that key (the
    operator's decision) is what makes the node read it."""
    stranger = init_provider(tmp_path / "stranger")
    folder = tmp_path / "stranger-catalog"
    seal_model(stranger, tiny_bert_dir, folder / "tiny-cat", model_id="tiny-cat")
    entry = describe_package(stranger, folder, "tiny-cat", licence="MIT", price=PRICE)
    publish_catalog(stranger, folder, [entry], provider="stranger")
    _use_catalog(catalog_world.node_config, folder)
    node = catalog_world.node()
    spec = make_spec(tiny_bert_dir, model_id="tiny-cat")
    before = catalog_world.broker_kinds()
    with pytest.raises(CatalogUntrusted, match="none of the 1 catalog key"):
        sealed_source(node, spec)
    with pytest.raises(CatalogUntrusted):
        SealedChannel(node, {}, spec).hello(RunIds(run_id=5, node_id=3))
    checked = _check_catalog(catalog_world.node_config)
    assert checked.exit_code == CatalogUntrusted.exit_code == 51, checked.output
    # The stranger's signature beside the trusted provider's catalog verifies with no key.
    shutil.copyfile(folder / CATALOG_SIGNATURE, catalog_world.folder / CATALOG_SIGNATURE)
    _use_catalog(catalog_world.node_config, catalog_world.folder)
    with pytest.raises(CatalogUntrusted):
        sealed_source(catalog_world.node(), spec)
    assert catalog_world.broker_kinds() == before
    # Negative control: once the operator trusts the stranger's key, its catalog reads.
    _use_catalog(catalog_world.node_config, folder)
    trust_catalog_key(catalog_world.node_config, stranger.public / "signing.pub")
    assert model_package(catalog_world.node(), "tiny-cat").path == folder / "tiny-cat"


def test_inference_unseals_the_model_the_stored_adapter_was_trained_on(
    catalog_world: CatalogWorld, tiny_bert_dir: Path
) -> None:
    node = catalog_world.node()
    spec = make_spec(tiny_bert_dir, model_id="tiny-cat")
    sandbox = NodeSandbox(node)
    held = sandbox._unsealed(sealed_source(node, spec))
    sandbox._store(held).store(7, FINAL, 2, spec, adapter_state(_provider_model(spec)))
    sandbox.start()  # now holds the node's own model, whose key cannot open that adapter
    assert sandbox._held is not None
    assert sandbox._held.unsealed.model_id == "tiny"
    answer = sandbox.infer(json.dumps({"texts": ["pole down"], "run_id": 7}).encode(), "classify")
    assert answer["run_id"] == 7
    assert len(answer["predictions"]) == 1
    assert sandbox._held.unsealed.model_id == "tiny-cat"


# -- the default catalog, built from the installed MiniLM -------------------------------


def test_the_default_models_are_minilm_at_three_depths(tmp_path: Path) -> None:
    from sandbox.digests import sha256_file
    from sandbox.models import default_model_dir

    models = build_default_models(tmp_path / "models")
    assert list(models) == ["minilm-l6", "minilm-l3", "minilm-l1"]
    source = default_model_dir() / "model.safetensors"
    assert sha256_file(models["minilm-l6"] / "model.safetensors") == sha256_file(source)
    reference = transformers.AutoModel.from_pretrained(
        str(default_model_dir()), local_files_only=True
    ).state_dict()
    sizes = []
    for (model_id, folder), layers in zip(models.items(), (6, 3, 1), strict=True):
        assert DEFAULT_MODELS[model_id].layers == layers
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
        assert model.config.num_hidden_layers == layers == len(model.encoder.layer)
        kept = model.state_dict()
        assert all(torch.equal(kept[k], reference[k]) for k in kept)
        transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        sizes.append(count_parameters([folder / "model.safetensors"]))
    assert sizes[0] > sizes[1] > sizes[2]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*") if p.is_file()}
    build_default_models(tmp_path / "models")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    ws = init_provider(tmp_path / "provider")
    folder = tmp_path / "catalog"
    publish_default_catalog(ws, folder, tmp_path / "models", build=lambda out: models)
    catalog = load_catalog(folder, [ws.signer().public_key()])
    assert [(m.model_id, m.layers, m.hidden_size, m.licence) for m in catalog.models] == [
        ("minilm-l6", 6, 384, "Apache-2.0"),
        ("minilm-l3", 3, 384, "Apache-2.0"),
        ("minilm-l1", 1, 384, "Apache-2.0"),
    ]
    assert [m.parameters for m in catalog.models] == sizes
    prices = [m.price.per_1k_training_examples for m in catalog.models]
    assert prices == sorted(prices, reverse=True)
