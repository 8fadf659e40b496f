"""How a node gets its model: the one seam that sealed-model loading replaces.

Today the base model comes from a local directory named in the run config. The
attestation issue turns :func:`load_base_model` into attest → key release → unseal
in memory, without changing its callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandbox.config import RunSpec
from sandbox.lora import build_peft_model
from sandbox.models import ModelInfo, inspect_model_dir, load_pretrained


@dataclass
class NodeModel:
    """A base model wrapped with the run's LoRA adapter, and its tokenizer."""

    model: Any
    tokenizer: Any
    info: ModelInfo


def load_base_model(spec: RunSpec) -> tuple[Any, Any, ModelInfo]:
    """Load the run's base model and tokenizer; the only way ClientApp code gets weights."""
    info = inspect_model_dir(spec.model_path, spec.task)
    model, tokenizer = load_pretrained(info, num_labels=len(spec.labels))
    return model, tokenizer, info


def load_node_model(spec: RunSpec) -> NodeModel:
    """Base model plus a fresh LoRA adapter of the run's shape (weights come from the server)."""
    base, tokenizer, info = load_base_model(spec)
    model = build_peft_model(
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.mode
    )
    return NodeModel(model=model, tokenizer=tokenizer, info=info)
