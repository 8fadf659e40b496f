"""Writes ``catalog/ark-model-catalog-1.json``: signed model catalogs, valid and not.

The catalogs are written out here by hand, as JSON objects made canonical with
``rfc8785`` and signed with ``cryptography`` over ``b"ark/v1/catalog\\x00" + bytes`` by
a fixed test key (they are not built with :mod:`sandbox.catalog`, so a renamed field or
a changed domain fails them). Each ``invalid`` case changes one thing in the first valid
catalog and is signed again, so the signature verifies and the parser must refuse it,
naming the key in ``error`` (null: the file as a whole). Each ``untrusted`` case keeps
the valid catalog but breaks its signature. Run ``python tests/vectors/catalog_vectors.py``
to regenerate.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).parent / "catalog"
DOMAIN = b"ark/v1/catalog\x00"
SEED = bytes(range(32))  # a test key, and nothing else
OTHER_SEED = bytes(range(32, 64))
H1 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
H2 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
T = "2026-11-23T03:00:00+00:00"


def _entry(model_id: str, package: str, digest: str, layers: int, **changes: Any) -> dict[str, Any]:
    entry = {
        "model_id": model_id,
        "package": package,
        "manifest_sha256": digest,
        "architecture": "bert",
        "layers": layers,
        "hidden_size": 384,
        "parameters": 22713216,
        "tasks": ["sequence-classification"],
        "licence": "Apache-2.0",
        "price": {"currency": "EUR", "per_1k_training_examples": 6, "per_1k_inferences": 0.6},
    }
    entry.update(changes)
    return entry


VALID: list[tuple[str, dict[str, Any]]] = [
    (
        "two models",
        {
            "format": "ark-model-catalog/1",
            "provider": "ark-demo-provider",
            "issued": T,
            "models": [
                _entry("minilm-l6", "minilm-l6", H1, 6),
                _entry("minilm-l3", "minilm-l3", H2, 3, parameters=17388288),
            ],
        },
    ),
    (
        "a free causal-lm model, a licence in words, microseconds in the time",
        {
            "format": "ark-model-catalog/1",
            "provider": "Fournisseur d'exemple",
            "issued": "2026-11-23T03:00:00.250000+00:00",
            "models": [
                _entry(
                    "tiny-llama_v1.2",
                    "tiny-llama",
                    H1,
                    2,
                    architecture="llama",
                    tasks=["causal-lm", "sequence-classification"],
                    licence="Licence: research use only, see LICENCE.txt",
                    price={
                        "currency": "CHF",
                        "per_1k_training_examples": 0,
                        "per_1k_inferences": 0,
                    },
                ),
            ],
        },
    ),
]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change setting the value at ``path`` (``a.b.0.c``; a missing value deletes)."""

    def change(document: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


_DELETE = object()

# (name, change, the key the error must name).
INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str | None]] = [
    ("another format", _set("format", "ark-model-catalog/2"), "format"),
    ("provider missing", _set("provider", _DELETE), "provider"),
    ("provider empty", _set("provider", ""), "provider"),
    ("an unknown top-level key", _set("comment", "hello"), "comment"),
    ("issued with Z", _set("issued", "2026-11-23T03:00:00Z"), "issued"),
    ("issued without offset", _set("issued", "2026-11-23T03:00:00"), "issued"),
    ("issued in another zone", _set("issued", "2026-11-23T04:00:00+01:00"), "issued"),
    ("issued not a time", _set("issued", 1764558000), "issued"),
    ("models not a list", _set("models", {"minilm-l6": {}}), "models"),
    ("models empty", _set("models", []), "models"),
    ("an entry not an object", _set("models.0", "minilm-l6"), "models[0]"),
    (
        "an entry without architecture",
        _set("models.0.architecture", _DELETE),
        "models[0].architecture",
    ),
    ("an entry with an unknown key", _set("models.0.url", "https://x"), "models[0].url"),
    ("model id with a space", _set("models.0.model_id", "minilm l6"), "models[0].model_id"),
    ("model id with =", _set("models.0.model_id", "a=b"), "models[0].model_id"),
    ("package ..", _set("models.0.package", ".."), "models[0].package"),
    ("package with /", _set("models.0.package", "a/b"), "models[0].package"),
    ("package absolute", _set("models.0.package", "/etc"), "models[0].package"),
    ("package hidden", _set("models.0.package", ".cache"), "models[0].package"),
    ("package empty", _set("models.0.package", ""), "models[0].package"),
    ("package with a backslash", _set("models.0.package", "a\\b"), "models[0].package"),
    (
        "digest upper-case",
        _set("models.0.manifest_sha256", H1.upper()),
        "models[0].manifest_sha256",
    ),
    ("digest short", _set("models.0.manifest_sha256", H1[:63]), "models[0].manifest_sha256"),
    ("architecture empty", _set("models.0.architecture", ""), "models[0].architecture"),
    ("layers as text", _set("models.0.layers", "6"), "models[0].layers"),
    ("layers a boolean", _set("models.0.layers", True), "models[0].layers"),
    ("layers zero", _set("models.0.layers", 0), "models[0].layers"),
    ("hidden size a fraction", _set("models.0.hidden_size", 1.5), "models[0].hidden_size"),
    ("parameters negative", _set("models.0.parameters", -1), "models[0].parameters"),
    ("tasks empty", _set("models.0.tasks", []), "models[0].tasks"),
    ("an unknown task", _set("models.0.tasks", ["translation"]), "models[0].tasks"),
    ("a task twice", _set("models.0.tasks", ["causal-lm", "causal-lm"]), "models[0].tasks"),
    ("licence empty", _set("models.0.licence", ""), "models[0].licence"),
    ("licence with a newline", _set("models.0.licence", "MIT\nor not"), "models[0].licence"),
    ("price not an object", _set("models.0.price", 6), "models[0].price"),
    ("currency lower-case", _set("models.0.price.currency", "eur"), "models[0].price.currency"),
    (
        "a negative price",
        _set("models.0.price.per_1k_inferences", -0.1),
        "models[0].price.per_1k_inferences",
    ),
    (
        "a price as text",
        _set("models.0.price.per_1k_training_examples", "6"),
        "models[0].price.per_1k_training_examples",
    ),
    (
        "a price missing",
        _set("models.0.price.per_1k_inferences", _DELETE),
        "models[0].price.per_1k_inferences",
    ),
    ("a price with an unknown key", _set("models.0.price.vat", 0.2), "models[0].price.vat"),
    ("a model id twice", _set("models.1.model_id", "minilm-l6"), "models[1].model_id"),
    ("a package twice", _set("models.1.package", "minilm-l6"), "models[1].package"),
]

# (name, catalog.json bytes as text) that no parse accepts, though validly signed.
NOT_PARSED: list[tuple[str, str]] = [
    ("not JSON", "{"),
    ("a duplicate key", '{"format":"ark-model-catalog/1","format":"ark-model-catalog/1"}'),
    ("not an object", "[]"),
]


def _key(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def _signed(body: bytes, seed: bytes = SEED, domain: bytes = DOMAIN) -> str:
    return _key(seed).sign(domain + body).hex()


def _case(name: str, body: bytes, **fields: Any) -> dict[str, Any]:
    return {"name": name, "catalog_json": body.decode("utf-8"), **fields}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    valid = [
        _case(name, rfc8785.dumps(document), signature=_signed(rfc8785.dumps(document)))
        for name, document in VALID
    ]
    invalid = []
    for name, change, key in INVALID:
        document = copy.deepcopy(VALID[0][1])
        change(document)
        body = rfc8785.dumps(document)
        invalid.append(_case(name, body, signature=_signed(body), error={"key": key}))
    pretty = json.dumps(VALID[0][1], indent=1).encode("utf-8")
    invalid.append(
        _case("signed but not canonical", pretty, signature=_signed(pretty), error={"key": None})
    )
    for name, text in NOT_PARSED:
        body = text.encode("utf-8")
        invalid.append(_case(name, body, signature=_signed(body), error={"key": None}))
    body = rfc8785.dumps(VALID[0][1])
    altered = body.replace(b'"layers":6', b'"layers":7')
    untrusted = [
        _case("signed by another provider's key", body, signature=_signed(body, OTHER_SEED)),
        _case("signed without the catalog domain", body, signature=_signed(body, domain=b"")),
        _case("altered after signing", altered, signature=_signed(body)),
        _case("a signature cut short", body, signature=_signed(body)[:-2]),
    ]
    public = (
        _key(SEED)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    document = {
        "about": "ark-model-catalog/1: catalog.json bytes and catalog.sig (hex) by the test "
        "key (private_seed, public_key); valid ones load and re-sign to the same bytes, "
        "invalid ones are validly signed and refused naming error.key (null: the file), "
        "untrusted ones fail their signature.",
        "private_seed": SEED.hex(),
        "public_key": public.hex(),
        "valid": valid,
        "invalid": invalid,
        "untrusted": untrusted,
    }
    path = HERE / "ark-model-catalog-1.json"
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
