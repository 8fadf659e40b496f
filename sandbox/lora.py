"""LoRA adapters with PEFT: building, freezing for FFA, and moving adapter state.

Adapter state uses PEFT's saved-format names (``get_peft_model_state_dict``), so the
tensors that travel between nodes and the aggregator are exactly the tensors of a
stock ``adapter_model.safetensors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sandbox.config import MODE_FFA, TASK_CLASSIFICATION, LoraSpec
from sandbox.errors import AdapterMismatch, ConfigError

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}

Adapter = dict[str, np.ndarray]


def target_modules(spec: LoraSpec, model_type: str) -> tuple[str, ...]:
    """The configured target modules, or the default for this architecture."""
    if spec.target_modules:
        return spec.target_modules
    try:
        return DEFAULT_TARGETS[model_type]
    except KeyError:
        raise ConfigError(
            f"no default LoRA targets for model type {model_type!r}; set them explicitly",
            key="lora-target-modules",
        ) from None


def build_peft_model(base: Any, spec: LoraSpec, *, task: str, model_type: str, mode: str) -> Any:
    """Wrap ``base`` in a PEFT LoRA model; in FFA mode every ``lora_A`` is frozen."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == TASK_CLASSIFICATION else TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(target_modules(spec, model_type)),
    )
    targets = target_modules(spec, model_type)
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(
            f"LoRA targets {list(targets)} do not fit this {model_type} model: {exc}",
            key="lora-target-modules",
        ) from exc
    if mode == MODE_FFA:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def is_trained(name: str, mode: str) -> bool:
    """Whether a tensor of the adapter is trained (and so sent) in this mode."""
    return not (mode == MODE_FFA and ".lora_A." in name)


def adapter_state(model: Any) -> Adapter:
    """The full adapter (LoRA A and B plus saved modules) as float32 numpy arrays."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {name: t.detach().cpu().float().numpy().copy() for name, t in state.items()}


def load_adapter_state(model: Any, adapter: Mapping[str, np.ndarray]) -> None:
    """Load a full adapter into ``model``; every adapter tensor must be present."""
    from peft import set_peft_model_state_dict

    expected = adapter_state(model)
    missing = sorted(set(expected) - set(adapter))
    extra = sorted(set(adapter) - set(expected))
    if missing or extra:
        raise AdapterMismatch(f"adapter does not fit the model: missing {missing}, extra {extra}")
    misshapen = [n for n, a in adapter.items() if tuple(a.shape) != expected[n].shape]
    if misshapen:
        raise AdapterMismatch(f"adapter tensors have the wrong shape: {misshapen[:3]}")
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in adapter.items()}
    set_peft_model_state_dict(model, tensors)


def export_peft_adapter(model: Any, adapter: Mapping[str, np.ndarray], out_dir: Path) -> Path:
    """Write ``adapter`` in stock PEFT format (config + safetensors) to ``out_dir``."""
    load_adapter_state(model, adapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
