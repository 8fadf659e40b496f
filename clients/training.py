"""Local LoRA training and evaluation on a node's private examples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clients.data import Example
from sandbox.config import TASK_CLASSIFICATION, RunSpec
from sandbox.errors import ConfigError

IGNORE_INDEX = -100
EVAL_BATCH = 64


def _truncated(spec: RunSpec) -> ConfigError:
    return ConfigError(
        f"max-length {spec.max_length} truncates every completion away; raise it",
        key="max-length",
    )


@dataclass(frozen=True)
class Batch:
    """Tensors of one batch, ready for the model's forward pass."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor


def encode(examples: Sequence[Example], tokenizer: Any, spec: RunSpec) -> Batch:
    """Tokenize examples for the run's task.

    Classification labels are indices into ``spec.labels``. Causal LM trains on
    ``prompt + completion`` with the prompt and padding masked out of the loss.
    """
    if spec.task == TASK_CLASSIFICATION:
        index = {label: i for i, label in enumerate(spec.labels)}
        enc = tokenizer(
            [e.text for e in examples],
            truncation=True,
            max_length=spec.max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([index[e.target] for e in examples], dtype=torch.long)
        return Batch(inputs=dict(enc), labels=labels)

    rows: list[list[int]] = []
    masks: list[list[int]] = []
    for example in examples:
        prompt = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        completion = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = (prompt + completion + end)[: spec.max_length]
        keep = ([0] * len(prompt) + [1] * (len(completion) + len(end)))[: spec.max_length]
        rows.append(ids)
        masks.append(keep)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, keep) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(
            [tok if k else IGNORE_INDEX for tok, k in zip(ids, keep, strict=True)]
        )
    return Batch(inputs={"input_ids": input_ids, "attention_mask": attention}, labels=labels)


def train_local(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    spec: RunSpec,
    *,
    seed: int,
    steps: int | None = None,
) -> float:
    """Run ``steps`` optimizer steps of AdamW on the trainable parameters; return mean loss."""
    steps = spec.local_steps if steps is None else steps
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    model.train()
    order: list[int] = []
    losses: list[float] = []
    for _ in range(steps):
        if len(order) < spec.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        picked, order = order[: spec.batch_size], order[spec.batch_size :]
        batch = encode([examples[i] for i in picked], tokenizer, spec)
        if not (batch.labels != IGNORE_INDEX).any():
            continue  # every completion in this batch was truncated away: nothing to learn
        out = model(**batch.inputs, labels=batch.labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    if not losses:
        raise _truncated(spec)
    return sum(losses) / len(losses)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-label F1 over labels present in truth or prediction."""
    scores = []
    for label in range(num_labels):
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == label and p == label)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != label and p == label)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == label and p != label)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def evaluate(
    model: Any, tokenizer: Any, examples: Sequence[Example], spec: RunSpec
) -> dict[str, float]:
    """Held-out metrics: accuracy and macro-F1 (classification) or loss and perplexity."""
    model.eval()
    if spec.task == TASK_CLASSIFICATION:
        truth: list[int] = []
        preds: list[int] = []
        for start in range(0, len(examples), EVAL_BATCH):
            batch = encode(examples[start : start + EVAL_BATCH], tokenizer, spec)
            logits = model(**batch.inputs).logits
            preds += logits.argmax(dim=-1).tolist()
            truth += batch.labels.tolist()
        correct = sum(1 for t, p in zip(truth, preds, strict=True) if t == p)
        return {
            "accuracy": correct / len(truth),
            "macro_f1": macro_f1(truth, preds, len(spec.labels)),
        }
    total_loss = 0.0
    total_tokens = 0
    for start in range(0, len(examples), EVAL_BATCH):
        batch = encode(examples[start : start + EVAL_BATCH], tokenizer, spec)
        logits = model(**batch.inputs).logits[:, :-1, :]
        targets = batch.labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total_loss += float(loss)
        total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise _truncated(spec)
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
