"""What the in-process quality benches share: the demo's nodes and data, split as each
node splits its own, and the base model with a fresh LoRA adapter (provider side)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.data import Split, derive_labels, load_examples, split_examples
from sandbox.config import TASK_CLASSIFICATION, RunSpec
from sandbox.lora import build_peft_model, load_adapter_state
from sandbox.models import default_model_dir, inspect_model_dir, load_pretrained
from sandbox.ops.demo_data import write_demo_data


@dataclass
class Model:
    model: Any
    tokenizer: Any


def fresh_model(spec: RunSpec, initial: dict[str, np.ndarray] | None) -> Model:
    """The base model from its plaintext directory (provider-side experiment) plus LoRA."""
    torch.manual_seed(spec.seed)
    info = inspect_model_dir(spec.model_path, spec.task)
    base, tokenizer = load_pretrained(info, num_labels=len(spec.labels))
    model = build_peft_model(
        base, spec.lora, task=spec.task, model_type=info.model_type, mode=spec.lora_mode
    )
    if initial is not None:
        load_adapter_state(model, initial)
    return Model(model, tokenizer)


def demo_federation(
    folder: Path, nodes: int, *, rounds: int, local_steps: int
) -> tuple[RunSpec, dict[str, Split]]:
    """The demo's ``nodes`` nodes' data written into ``folder``, the run spec over its
    labels (the default model, ``rounds`` x ``local_steps``) and each node's split."""
    torch.set_num_threads(2)
    data = write_demo_data(folder, nodes)
    labels = tuple(derive_labels(list(data.values())))
    spec = RunSpec(
        job_id="bench",
        task=TASK_CLASSIFICATION,
        model_path=default_model_dir(),
        labels=labels,
        num_rounds=rounds,
        local_steps=local_steps,
    )
    splits = {
        name: split_examples(load_examples(path, spec.task, labels=labels), source=path)
        for name, path in data.items()
    }
    return spec, splits
