"""Local LoRA training and evaluation on a node's private examples."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clients.data import Example
from sandbox.config import TASK_CLASSIFICATION, RunSpec
from sandbox.errors import ConfigError

IGNORE_INDEX = -100
# Opacus's hooks sit on frozen base layers too; torch warns of each such hook on every
# DP-SGD step, which would fill the node's log with nothing it can act on.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
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


@dataclass(frozen=True)
class Private:
    """Record-level DP-SGD settings of a training: each example's gradient clipped to
    ``clip`` (L2), Gaussian noise of ``noise_multiplier`` x clip on each step's sum, and
    batches drawn by Poisson sampling at ``sample_rate``."""

    clip: float
    noise_multiplier: float
    sample_rate: float


def _private_optimizer() -> type:
    """Opacus's DP optimizer, drawing its noise from a generator no one else can seed."""
    from opacus.optimizers import DPOptimizer

    class SecretNoise(DPOptimizer):  # type: ignore[misc]
        """Its noise comes from numpy's PCG64 seeded with fresh OS entropy (128 bits and
        more), never from torch's global generator, which the run's seed sets: whoever
        knows the seed must not know the noise."""

        rng: np.random.Generator

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                summed = p.summed_grad
                noise = self.rng.standard_normal(tuple(summed.shape), dtype=np.float32)
                p.grad = (summed + std * torch.from_numpy(noise)).view_as(p)

    return SecretNoise


def _train_private(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    spec: RunSpec,
    steps: int,
    private: Private,
) -> None:
    """``steps`` steps of DP-SGD (Opacus's per-example gradients, clipping and noise) on
    AdamW. Which rows each step draws is as secret as the noise (the privacy amplification
    by sampling counts on it)."""
    from opacus import GradSampleModule

    rng = np.random.default_rng()  # fresh OS entropy
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _private_optimizer()(
        torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0),
        noise_multiplier=private.noise_multiplier,
        max_grad_norm=private.clip,
        expected_batch_size=max(1, round(private.sample_rate * len(examples))),
    )
    optimizer.rng = rng
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        sampled.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            picked = np.flatnonzero(rng.random(len(examples)) < private.sample_rate)
            rows = [examples[int(i)] for i in picked]
            if rows:
                batch = encode(rows, tokenizer, spec)
                loss = _example_mean_loss(sampled, batch, spec)
                loss.backward()  # type: ignore[no-untyped-call]
            else:
                # An empty batch still takes its noisy step: skipping it would tell.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        sampled.cleanup()  # the hooks go: the model in memory trains on as it was
        model.eval()


def _token_losses(model: Any, batch: Batch, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's next-token cross-entropy over the batch's completion tokens (the
    prompt and padding are ignored), reduced by ``reduction``, and the shifted targets."""
    logits = model(**batch.inputs).logits[:, :-1, :]
    targets = batch.labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return loss, targets


def _example_mean_loss(model: Any, batch: Batch, spec: RunSpec) -> torch.Tensor:
    """The mean over the batch's rows of each row's own loss, so that one row's gradient
    does not depend on the other rows (DP-SGD's sensitivity counts on it). Classification's
    loss is that already; a causal LM's is the mean over every token of the batch, so each
    row's mean over its own completion tokens is taken first (a row whose completion was
    truncated away counts 0, and nothing is raised: that would depend on the data)."""
    if spec.task == TASK_CLASSIFICATION:
        loss: torch.Tensor = model(**batch.inputs, labels=batch.labels).loss
        return loss
    per_token, targets = _token_losses(model, batch, "none")
    per_token = per_token.view(targets.shape)
    counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counted).mean()


def train_local(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    spec: RunSpec,
    *,
    seed: int,
    steps: int | None = None,
    private: Private | None = None,
) -> float:
    """Run ``steps`` optimizer steps of AdamW on the trainable parameters; return the mean
    loss. With ``private``, DP-SGD, and the loss is NaN (none leaves)."""
    steps = spec.local_steps if steps is None else steps
    if private is not None:
        # No loss: one over the sampled rows carries no noise, and whether it exists would
        # say whether any row was drawn.
        _train_private(model, tokenizer, examples, spec, steps, private)
        return math.nan
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
        loss, targets = _token_losses(model, batch, "sum")
        total_loss += float(loss)
        total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise _truncated(spec)
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
