"""Differential privacy on the provider's side: what a node reports it spent, and
client-level noise at the aggregate.

Record-level DP-SGD runs in each node's sandbox (``sandbox/privacy.py``); the ServerApp
only reads the mechanism and epsilon a node reports beside its update, refuses an update
that does not honour the run's ask, and logs the rest (``dp_spent``) for the auditor, who
recomputes it. Client-level DP (DP-FedAvg) is the provider's own: every update's change
clipped, every node weighing the same, Gaussian noise on the sum (:class:`ClientNoise`);
its epsilon is logged per round (``dp_aggregate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from sandbox.config import (
    DP_BUDGET,
    DP_CLIP,
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_TOTAL,
    DP_METRICS,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    RunSpec,
)
from sandbox.errors import UpdateRejected
from sandbox.events import Key
from sandbox.privacy import SLACK
from sandbox.protocol import METRICS_KEY
from server.aggregation import TensorSpec, Weight, l2_norm, validate_update

# The weight bound an update gets under client-level DP: every node weighs the same.
CLIENT_DP_BOUND = "dp-client-clip"


def reported_spending(reply: Message, spec: RunSpec) -> dict[Key, Any] | None:
    """The DP round a node reports beside its update, as ``dp_spent`` fields; None when it
    trained without DP (allowed only when the run asks none).

    UpdateRejected when the run asks record-level DP and the node reports none, part of
    it, a mechanism outside the run's ask (a larger epsilon, delta or clip, other steps),
    or numbers that are not a mechanism at all."""
    record = reply.content.metric_records[METRICS_KEY]
    present = [name for name in DP_METRICS if name in record]
    if not present:
        if spec.dp_epsilon > 0:
            raise UpdateRejected(
                f"the run asks record-level DP (dp-epsilon {spec.dp_epsilon:g}) and the node "
                "reports no DP round"
            )
        return None
    if len(present) != len(DP_METRICS):
        raise UpdateRejected(f"a DP report without {sorted(set(DP_METRICS) - set(present))}")
    value = {name: float(record[name]) for name in DP_METRICS}  # type: ignore[arg-type]
    if not all(math.isfinite(v) for v in value.values()):
        raise UpdateRejected("a DP report with a value that is not finite")
    steps = value[DP_STEPS]
    if steps != spec.local_steps:
        raise UpdateRejected(f"a DP report of {steps:g} steps; the run trains {spec.local_steps}")
    if not (
        value[DP_NOISE_MULTIPLIER] > 0
        and 0 < value[DP_SAMPLE_RATE] <= 1
        and value[DP_CLIP] > 0
        and 0 < value[DP_DELTA] < 1
        and 0 <= value[DP_EPSILON] <= value[DP_EPSILON_TOTAL] * (1 + SLACK)
        and value[DP_BUDGET] >= 0
        and (value[DP_BUDGET] == 0 or value[DP_EPSILON_TOTAL] <= value[DP_BUDGET] * (1 + SLACK))
    ):
        raise UpdateRejected("a DP report whose numbers are not a mechanism within its budget")
    if spec.dp_epsilon > 0 and (
        value[DP_EPSILON] > spec.dp_epsilon * (1 + SLACK)
        or value[DP_DELTA] > spec.dp_delta
        or value[DP_CLIP] > spec.dp_clip
    ):
        raise UpdateRejected(
            f"a DP report (epsilon {value[DP_EPSILON]:.4g}, delta {value[DP_DELTA]:g}, clip "
            f"{value[DP_CLIP]:g}) looser than the run's ask"
        )
    return {
        Key.NOISE_MULTIPLIER: value[DP_NOISE_MULTIPLIER],
        Key.SAMPLE_RATE: value[DP_SAMPLE_RATE],
        Key.STEPS: int(steps),
        Key.CLIP: value[DP_CLIP],
        Key.DELTA: value[DP_DELTA],
        Key.EPSILON: value[DP_EPSILON],
        Key.EPSILON_TOTAL: value[DP_EPSILON_TOTAL],
        Key.BUDGET: value[DP_BUDGET] or None,  # 0: the node declares no budget
    }


class ClientNoise:
    """Client-level DP at the aggregate (DP-FedAvg): each update's change from the global
    adapter clipped to ``clip`` (L2, over all its tensors), every node weighing one, and
    Gaussian noise of ``noise_multiplier`` x clip on each element of the sum; the mean is
    the noisy sum over the count. The noise comes from fresh OS entropy.

    Updates are validated as the plain aggregator validates them; the noisy mean is not
    held to ``update-norm-bound`` (the noise is this aggregator's own, by design)."""

    def __init__(
        self,
        expected: Mapping[str, TensorSpec],
        *,
        reference: Mapping[str, np.ndarray],
        max_norm: float,
        noise_multiplier: float,
        clip: float,
    ):
        self.expected = dict(expected)
        self.reference = reference
        self.max_norm = max_norm
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self._sum = {n: np.zeros(s.shape, np.float64) for n, s in self.expected.items()}
        self.count = 0
        self.total_weight = 0.0

    def add(
        self, update: Mapping[str, np.ndarray], examples: float, *, held: float | None = None
    ) -> Weight:
        """Validate one update, clip its change, fold it in with weight one."""
        del held  # every node weighs one: no count to hold
        validate_update(update, self.expected, reference=self.reference, max_norm=self.max_norm)
        change = {
            n: np.asarray(update[n], np.float64) - np.asarray(self.reference[n], np.float64)
            for n in self.expected
        }
        norm = l2_norm(change.values())
        factor = min(1.0, self.clip / norm) if norm > 0 else 1.0
        for name, total in self._sum.items():
            total += change[name] * factor
        self.count += 1
        self.total_weight += 1.0
        return Weight(float(examples), 1.0, CLIENT_DP_BOUND)

    def result(self) -> dict[str, np.ndarray]:
        """The global adapter moved by the noisy mean of the clipped changes."""
        if self.count == 0:
            raise RuntimeError("result() called before any update was added")
        rng = np.random.default_rng()  # fresh OS entropy
        std = self.noise_multiplier * self.clip
        out = {}
        for name, total in self._sum.items():
            noisy = (total + rng.normal(0.0, std, total.shape)) / self.count
            base = np.asarray(self.reference[name], np.float64)
            out[name] = (base + noisy).astype(self.expected[name].dtype)
        return out
