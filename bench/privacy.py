"""Differential privacy: held-out quality and membership leakage at several epsilons.

Every setting trains the same federation in one process, with the training, evaluation
and aggregation code the Flower apps use (``clients.training``, ``server.aggregation``):
the demo's 3 nodes (their synthetic data, each split into train and held-out rows as a
node splits it), FedAvg over ``rounds`` rounds of ``local_steps`` steps from one initial
adapter, the run's default batch size and learning rate. Settings:

* **record-level DP-SGD** at epsilon 1, 3 and 8 (delta 1e-5, per-example clip 1.0):
  each node fits the noise multiplier that spends epsilon over its ``rounds x
  local_steps`` Poisson-sampled steps (``sandbox.privacy.fit_noise``, Opacus's RDP
  accountant) and trains with Opacus (``train_local(..., private=...)``);
* **epsilon infinity**: plain training, no Opacus (shuffled batches, the seed's order);
* **client-level DP** with no record-level noise: each node's update (trained minus
  global) clipped to L2 <= C, every node weighing 1, the sum plus Gaussian noise of
  sigma_c x C per coordinate, divided by the node count; its epsilon is the provider's
  client-level accountant's (``client_epsilon``), a bound per node's whole data, not per
  record. With 3 nodes the noise on the mean is sigma_c x C / 3 per coordinate, far above
  any clipped update's share of it, so this setting is expected to learn nothing.

**Quality**: accuracy and macro-F1 of the final global adapter on each node's held-out
rows (``clients.training.evaluate``), averaged over nodes.

**Leakage**: a loss-threshold membership-inference attack (Yeom et al., 2018) on the
final adapter. For each node the per-example cross-entropy of its training rows
(members) and its held-out rows (non-members); a row is called a member when its loss is
at most a threshold, and the attack's advantage is the largest TPR - FPR over every
threshold (the *balanced* advantage: it does not depend on members outnumbering
non-members, 4 to 1 here). It is averaged over nodes. Even with no leakage the largest
TPR - FPR of finite samples is above 0; its median under random member labels (the same
sample sizes, label permutations) is reported as the chance level, with its 95th
percentile: one node's advantage below it is no evidence of leakage (the mean over
nodes spreads less).

**Time per step**: one node's local training with and without DP-SGD at the same
(expected) batch size, each step timed from one forward pass to the next; the median
over the steps after the first (the warm-up).

DP-SGD's noise and its sampling come from fresh OS entropy (``clients/training.py``), and
so does the client-level noise (the ServerApp's own ``server.privacy.ClientNoise``): the
DP settings differ between repeats, and medians
over repeats are reported. Plain training is seeded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.demo_federation import demo_federation, fresh_model
from clients.data import Example, Split
from clients.training import EVAL_BATCH, Private, encode, evaluate, train_local
from sandbox.config import RunSpec
from sandbox.lora import adapter_state, is_trained
from sandbox.privacy import client_epsilon, fit_noise, sample_rate
from server.aggregation import StreamingAggregator, l2_norm, spec_of
from server.privacy import ClientNoise

Adapter = dict[str, np.ndarray]
Log = Callable[[str], Any]

NODES = 3
DELTA = 1e-5
CLIP = 1.0
EPSILONS = (1.0, 3.0, 8.0, math.inf)
# Client-level DP: noise multiplier and clip (the config's default clip). The updates'
# unclipped norms are reported beside it.
CLIENT_NOISE = 1.0
CLIENT_CLIP = 1.0
REPEATS = 1
PERMUTATIONS = 500
FIGURE = "privacy.png"


@dataclass(frozen=True)
class Setting:
    """One way to train: record-level DP-SGD at ``epsilon`` (infinity: none), or
    client-level noise ``client_noise`` x ``CLIENT_CLIP`` at the aggregate (0: none)."""

    name: str
    epsilon: float = math.inf
    client_noise: float = 0.0

    @property
    def level(self) -> str:
        if self.client_noise > 0:
            return "client"
        return "none" if math.isinf(self.epsilon) else "record"


def membership_advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Balanced advantage of the loss-threshold attack: max over thresholds t of
    TPR - FPR, calling a row a member when its loss is <= t (0 when no t separates)."""
    thresholds = np.sort(np.concatenate([members, nonmembers]))
    tpr = np.searchsorted(np.sort(members), thresholds, side="right") / len(members)
    fpr = np.searchsorted(np.sort(nonmembers), thresholds, side="right") / len(nonmembers)
    return float(max(0.0, np.max(tpr - fpr)))


def chance_advantage(
    members: int, nonmembers: int, rng: np.random.Generator, quantile: float = 0.5
) -> float:
    """A ``quantile`` of the attack's advantage when membership is unrelated to the loss:
    random labels on ``members + nonmembers`` distinct losses (distribution-free, so any
    continuous losses do)."""
    losses = rng.random(members + nonmembers)
    found = []
    for _ in range(PERMUTATIONS):
        order = rng.permutation(losses)
        found.append(membership_advantage(order[:members], order[members:]))
    return float(np.quantile(found, quantile))


@torch.no_grad()
def example_losses(
    model: Any, tokenizer: Any, examples: Sequence[Example], spec: RunSpec
) -> np.ndarray:
    """Cross-entropy of each classification example under ``model``."""
    model.eval()
    losses: list[np.ndarray] = []
    for start in range(0, len(examples), EVAL_BATCH):
        batch = encode(examples[start : start + EVAL_BATCH], tokenizer, spec)
        logits = model(**batch.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")
        losses.append(loss.numpy())
    return np.concatenate(losses)


def _private(setting: Setting, spec: RunSpec, examples: int) -> Private | None:
    if setting.level != "record":
        return None
    rate = sample_rate(spec.batch_size, examples)
    sigma = fit_noise(setting.epsilon, DELTA, rate, spec.num_rounds * spec.local_steps)
    return Private(clip=CLIP, noise_multiplier=sigma, sample_rate=rate)


def _federate(
    setting: Setting,
    spec: RunSpec,
    splits: Mapping[str, Split],
    initial: Adapter,
) -> tuple[Adapter, list[float]]:
    """The final global adapter of FedAvg under ``setting``, and every unclipped update
    norm (trained minus global) the nodes sent."""

    adapter = dict(initial)
    names = [k for k in adapter if is_trained(k, spec.lora_mode)]
    norms: list[float] = []
    for rnd in range(1, spec.num_rounds + 1):
        reference = {k: adapter[k] for k in names}
        aggregator: StreamingAggregator | ClientNoise = StreamingAggregator(spec_of(reference))
        if setting.level == "client":  # the ServerApp's own client-level DP aggregator
            aggregator = ClientNoise(
                spec_of(reference),
                reference=reference,
                max_norm=spec.update_norm_bound,
                noise_multiplier=setting.client_noise,
                clip=CLIENT_CLIP,
            )
        for split in splits.values():
            node = fresh_model(spec, adapter)
            private = _private(setting, spec, len(split.train))
            train_local(
                node.model,
                node.tokenizer,
                split.train,
                spec,
                seed=spec.seed * 1000 + rnd,
                private=private,
            )
            state = adapter_state(node.model)
            delta = {k: state[k] - adapter[k] for k in names}
            norms.append(l2_norm(delta.values()))
            aggregator.add({k: state[k] for k in names}, float(len(split.train)))
        adapter = {**adapter, **aggregator.result()}
    return adapter, norms


def _assess(
    setting: Setting,
    spec: RunSpec,
    splits: Mapping[str, Split],
    initial: Adapter,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Train under ``setting``; quality and attack advantage of its final adapter per node."""

    started = time.perf_counter()
    adapter, norms = _federate(setting, spec, splits, initial)
    final = fresh_model(spec, adapter)
    nodes: dict[str, dict[str, float]] = {}
    for name, split in splits.items():
        metrics = evaluate(final.model, final.tokenizer, split.heldout, spec)
        members = example_losses(final.model, final.tokenizer, split.train, spec)
        nonmembers = example_losses(final.model, final.tokenizer, split.heldout, spec)
        nodes[name] = {
            **metrics,
            "mia_advantage": membership_advantage(members, nonmembers),
            "member_loss_median": float(np.median(members)),
            "nonmember_loss_median": float(np.median(nonmembers)),
        }
    return {
        "accuracy": statistics.fmean(n["accuracy"] for n in nodes.values()),
        "macro_f1": statistics.fmean(n["macro_f1"] for n in nodes.values()),
        "mia_advantage": statistics.fmean(n["mia_advantage"] for n in nodes.values()),
        "nodes": nodes,
        "update_norm_median": statistics.median(norms),
        "seconds": time.perf_counter() - started,
    }


def _step_seconds(
    spec: RunSpec, split: Split, initial: Adapter, private: Private | None
) -> list[float]:
    """Seconds of each of ``local_steps`` steps of one node's training after the first,
    each from one forward pass's start to the next (the last step is not timed)."""

    node = fresh_model(spec, initial)
    starts: list[float] = []
    hook = node.model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    try:
        train_local(node.model, node.tokenizer, split.train, spec, seed=spec.seed, private=private)
    finally:
        hook.remove()
    return [b - a for a, b in pairwise(starts)][1:]


def _median_of(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def privacy_bench(
    results_dir: Path,
    rounds: int = RunSpec.num_rounds,
    local_steps: int = RunSpec.local_steps,
    repeats: int = REPEATS,
    *,
    rng: np.random.Generator | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Quality and membership leakage of record-level DP at each of ``EPSILONS`` and of
    client-level DP, medians of ``repeats``; the figure goes to ``results_dir``."""

    rng = np.random.default_rng() if rng is None else rng
    spec, splits = demo_federation(
        results_dir / ".data", NODES, rounds=rounds, local_steps=local_steps
    )
    initial = adapter_state(fresh_model(spec, None).model)
    settings = [
        *(Setting("no DP" if math.isinf(e) else "record-level DP-SGD", e) for e in EPSILONS),
        Setting("client-level DP", client_noise=CLIENT_NOISE),
    ]
    runs: dict[Setting, list[dict[str, Any]]] = {s: [] for s in settings}
    for repeat in range(repeats):
        for setting in settings:
            run = _assess(setting, spec, splits, initial, rng)
            runs[setting].append(run)
            log(
                f"privacy {repeat + 1}/{repeats} {setting.name}"
                f"{'' if setting.level == 'client' else f' epsilon {setting.epsilon:g}'}: "
                f"accuracy {run['accuracy']:.3f}, macro-F1 {run['macro_f1']:.3f}, "
                f"MIA advantage {run['mia_advantage']:.3f} ({run['seconds']:.0f}s)"
            )
    first = next(iter(splits.values()))
    dp = _private(Setting("timed", EPSILONS[0]), spec, len(first.train))
    plain_steps = _step_seconds(spec, first, initial, None)
    dp_steps = _step_seconds(spec, first, initial, dp)
    plain_seconds, dp_seconds = statistics.median(plain_steps), statistics.median(dp_steps)
    step = {
        "plain_seconds": plain_seconds,
        "dp_seconds": dp_seconds,
        "dp_over_plain": dp_seconds / plain_seconds,
        "steps_timed": {"plain": len(plain_steps), "dp": len(dp_steps)},
    }
    log(f"privacy: time per step {step}")
    heldout = [e.target for s in splits.values() for e in s.heldout]
    rows = []
    for setting, found in runs.items():
        sigma: float | None
        if setting.level == "client":
            epsilon: float | None = client_epsilon(setting.client_noise, rounds, DELTA)
            sigma = setting.client_noise
        elif setting.level == "record":
            epsilon = setting.epsilon
            private = _private(setting, spec, len(first.train))
            sigma = private.noise_multiplier if private else None
        else:
            epsilon, sigma = None, None
        rows.append(
            {
                "setting": setting.name,
                "level": setting.level,
                "epsilon": epsilon,
                "noise_multiplier": sigma,
                "clip": CLIENT_CLIP if setting.level == "client" else CLIP,
                "accuracy": _median_of(found, "accuracy"),
                "macro_f1": _median_of(found, "macro_f1"),
                "mia_advantage": _median_of(found, "mia_advantage"),
                "mia_advantage_per_node": {
                    name: float(statistics.median(r["nodes"][name]["mia_advantage"] for r in found))
                    for name in splits
                },
                "update_norm_median": _median_of(found, "update_norm_median"),
                "seconds": _median_of(found, "seconds"),
                "runs": found,
            }
        )
    figures: dict[str, Any] = {
        "setup": {
            "nodes": list(splits),
            "rounds": rounds,
            "local_steps": local_steps,
            "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate,
            "mode": spec.mode,
            "train_per_node": {n: len(s.train) for n, s in splits.items()},
            "heldout_per_node": {n: len(s.heldout) for n, s in splits.items()},
            "delta": DELTA,
            "record_clip": CLIP,
            "sample_rate": sample_rate(spec.batch_size, len(first.train)),
            "client_noise": CLIENT_NOISE,
            "client_clip": CLIENT_CLIP,
            "epsilon": "null: no DP (infinity); client-level rows: the client-level epsilon",
        },
        "repeats": repeats,
        "rows": rows,
        "majority_accuracy": max(heldout.count(t) for t in set(heldout)) / len(heldout),
        "mia_chance": statistics.fmean(
            chance_advantage(len(s.train), len(s.heldout), rng) for s in splits.values()
        ),
        "mia_chance_p95": statistics.fmean(
            chance_advantage(len(s.train), len(s.heldout), rng, 0.95) for s in splits.values()
        ),
        "step": step,
        "figure": FIGURE,
    }
    plot(figures, results_dir / FIGURE)
    return figures


def plot(figures: Mapping[str, Any], path: Path) -> None:
    """Accuracy and attack advantage against epsilon (log axis, no DP at the right end,
    client-level DP as its own marker), written as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    record = [r for r in figures["rows"] if r["level"] != "client"]
    client = [r for r in figures["rows"] if r["level"] == "client"]
    finite = [r["epsilon"] for r in record if r["epsilon"] is not None]
    top = max([*finite, *(r["epsilon"] for r in client)])
    no_dp = 10 ** (math.log10(top) + 0.5)  # where infinity sits on the axis
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("accuracy", "held-out accuracy (mean over nodes)", figures["majority_accuracy"]),
        ("mia_advantage", "loss-threshold MIA advantage (TPR - FPR)", figures["mia_chance"]),
    )
    for ax, (key, title, chance) in zip(fig.subplots(1, 2), panels, strict=True):
        noisy = [r for r in record if r["epsilon"] is not None]
        ax.plot(finite, [r[key] for r in noisy], "o-", label="record-level DP-SGD")
        for r in record:
            x = no_dp if r["epsilon"] is None else r["epsilon"]
            if len(r["runs"]) > 1:
                ax.plot([x] * len(r["runs"]), [run[key] for run in r["runs"]], ".", alpha=0.3)
        plain = [r[key] for r in record if r["epsilon"] is None]
        if plain and noisy:
            ax.plot([finite[-1], no_dp], [noisy[-1][key], plain[0]], "--", color="tab:blue")
        ax.plot([no_dp] * len(plain), plain, "o", color="tab:green", label="no DP")
        for r in client:
            ax.plot(
                r["epsilon"],
                r[key],
                "s",
                color="tab:red",
                label=f"client-level DP (sigma_c {r['noise_multiplier']:g}, C {r['clip']:g})",
            )
            ax.annotate(
                f"client-level eps {r['epsilon']:.3g}",
                (r["epsilon"], r[key]),
                textcoords="offset points",
                xytext=(-6, 6),
                horizontalalignment="right",
                fontsize="small",
                color="tab:red",
            )
        ax.axhline(
            chance,
            linestyle=":",
            color="grey",
            label="majority class" if key == "accuracy" else "chance (random labels)",
        )
        if key == "mia_advantage":
            ax.axhline(
                figures["mia_chance_p95"],
                linestyle="-.",
                color="grey",
                label="chance, 95th percentile (one node)",
            )
        ax.set_xscale("log")
        ax.set_xticks([*finite, no_dp], [*(f"{t:g}" for t in finite), "∞\n(no DP)"])
        ax.minorticks_off()
        ax.set_xlabel(f"epsilon (delta {figures['setup']['delta']:g})")
        ax.set_ylim(0, 1.02 if key == "accuracy" else None)
        ax.set_title(title)
        ax.legend(fontsize="small")
    setup = figures["setup"]
    fig.suptitle(
        f"{len(setup['nodes'])} nodes, FedAvg, {setup['rounds']} rounds x "
        f"{setup['local_steps']} local steps, median of {figures['repeats']} repeat(s)"
    )
    fig.savefig(path, dpi=120)
