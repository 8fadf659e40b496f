"""The demo's default catalog: three encoders of different depth, built offline from the
pretrained all-MiniLM-L6-v2 that ships installed (:func:`sandbox.models.default_model_dir`).

- ``minilm-l6``: all-MiniLM-L6-v2 as published (6 encoder layers, 384 wide, about 22.7M
  parameters), its weights byte for byte.
- ``minilm-l3``: its embeddings, its first 3 encoder layers and its pooler, with
  ``num_hidden_layers = 3``: the same kind of model, cheaper and (expectedly) worse.
- ``minilm-l1``: the same with its first encoder layer only: a size that must show to
  differ in the comparison.

Nothing is trained or downloaded: the smaller two are truncations of the pretrained
weights (read with safetensors, written with safetensors). MiniLM-L6-v2 is Apache-2.0,
and so are the truncations. The prices are the demo provider's, falling with size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sandbox.catalog import Price
from sandbox.config import TASK_CLASSIFICATION
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import ModelError
from sandbox.events import EventSink
from sandbox.files import write_atomic
from sandbox.models import default_model_dir
from sandbox.ops.provision import ProviderWorkspace, describe_package, publish_catalog, seal_model
from sandbox.seal.package import ships_plain

WEIGHTS = "model.safetensors"
LICENCE = "Apache-2.0"
CURRENCY = "EUR"
# An encoder layer's tensors, by index: BERT's ``encoder.layer.<i>.``, with or without
# a prefix such as ``bert.``.
_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


@dataclass(frozen=True)
class DefaultModel:
    """One model of the default catalog: how many of MiniLM's encoder layers it keeps,
    what it is (for the README and the report), and its catalog metadata."""

    layers: int
    description: str
    price: Price
    licence: str = LICENCE
    tasks: tuple[str, ...] = (TASK_CLASSIFICATION,)


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "minilm-l6": DefaultModel(
        6,
        "all-MiniLM-L6-v2 as published: 6 encoder layers, hidden size 384",
        Price(CURRENCY, 6.0, 0.6),
    ),
    "minilm-l3": DefaultModel(
        3,
        "all-MiniLM-L6-v2's embeddings, first 3 encoder layers and pooler",
        Price(CURRENCY, 3.0, 0.3),
    ),
    "minilm-l1": DefaultModel(
        1,
        "all-MiniLM-L6-v2's embeddings, first encoder layer and pooler",
        Price(CURRENCY, 1.5, 0.15),
    ),
}


def build_default_models(out: Path, *, source: Path | None = None) -> dict[str, Path]:
    """Write the :data:`DEFAULT_MODELS` as Hugging Face model folders ``out/<model id>``
    from ``source`` (default: the installed all-MiniLM-L6-v2); return them by id.

    Idempotent: a file already holding what it would be written with is left alone
    (modification time included), so a second call costs reading, not writing.
    """
    source = default_model_dir() if source is None else source
    config = _read_config(source)
    depth = config.get("num_hidden_layers")
    built: dict[str, Path] = {}
    for model_id, model in DEFAULT_MODELS.items():
        if not isinstance(depth, int) or model.layers > depth:
            raise ModelError(source, f"{model_id} keeps {model.layers} layers of {depth!r}")
        folder = out / model_id
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and ships_plain(path.name) and path.name != "config.json":
                _copy_if_changed(path, folder / path.name)
        if model.layers == depth:
            _copy_if_changed(source / "config.json", folder / "config.json")
            _copy_if_changed(source / WEIGHTS, folder / WEIGHTS)
        else:
            shallow = {**config, "num_hidden_layers": model.layers}
            text = json.dumps(shallow, indent=2, sort_keys=True) + "\n"
            _write_if_changed(folder / "config.json", text.encode("utf-8"))
            _write_if_changed(folder / WEIGHTS, _first_layers(source / WEIGHTS, model.layers))
        built[model_id] = folder
    return built


def _read_config(source: Path) -> dict[str, object]:
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(source, f"unreadable config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(source, "config.json is not an object")
    return config


def _first_layers(weights: Path, layers: int) -> bytes:
    """The safetensors bytes of ``weights`` without the encoder layers from ``layers`` on
    (embeddings, pooler and any other tensor kept), its metadata kept."""
    from safetensors import safe_open
    from safetensors.numpy import save

    kept: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(weights), "numpy") as full:
            metadata = full.metadata()
            for name in full.keys():  # noqa: SIM118 (safe_open is no mapping)
                layer = _LAYER.search(name)
                if layer is None or int(layer.group(1)) < layers:
                    kept[name] = full.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(weights, f"not a readable safetensors file: {exc}") from exc
    return save(kept, metadata=metadata)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and sha256_file(path) == (sha256_hex(data), len(data)):
        return
    write_atomic(path, data)


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.is_file() and sha256_file(dst) == sha256_file(src):
        return
    staging = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, staging)
    staging.replace(dst)


def publish_default_catalog(
    ws: ProviderWorkspace,
    folder: Path,
    models_dir: Path,
    *,
    provider: str = "ark-demo-provider",
    events: EventSink | None = None,
    build: Callable[[Path], dict[str, Path]] = build_default_models,
) -> Path:
    """Build the default models under ``models_dir``, seal each into ``folder/<id>``
    under a fresh content key of ``ws``, and sign the catalog of the three into
    ``folder``; return its ``catalog.json``. ``build`` makes the model folders (the
    real MiniLM by default). Each call seals again, under fresh content keys, and signs
    a new catalog: nodes holding the older one see its digests no longer match."""
    models = build(models_dir)
    entries = []
    for model_id, model_dir in models.items():
        seal_model(ws, model_dir, folder / model_id, model_id=model_id, events=events)
        model = DEFAULT_MODELS[model_id]
        entries.append(
            describe_package(
                ws, folder, model_id, licence=model.licence, price=model.price, tasks=model.tasks
            )
        )
    return publish_catalog(ws, folder, entries, provider=provider, events=events)
