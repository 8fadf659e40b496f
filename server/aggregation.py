"""Weighted LoRA aggregation that streams: one running sum, whatever the node count.

Aggregation stays a plain weighted sum so that secure aggregation and differential
privacy can wrap it later. In FFA mode only B (and saved modules) arrive; A is frozen
from the shared initial adapter, so mean(B)·A equals mean(B·A) exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sandbox.errors import AggregateInvalid, UpdateRejected

# The bounds that can clip an update's weight, as events name them.
CAP_BOUND = "max-examples-per-update"
HELD_BOUND = "first-accepted-count"
# Float64 rounding slack, relative to the magnitudes involved, when checking that the
# aggregate (a convex combination of updates each within the norm bound) is within it too.
ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one adapter tensor."""

    shape: tuple[int, ...]
    dtype: str


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """The exact names, shapes and dtypes that updates must match."""
    return {name: TensorSpec(tuple(a.shape), str(a.dtype)) for name, a in tensors.items()}


@dataclass(frozen=True)
class Weight:
    """An update's weight: the example count its node declared, the weight it got, and
    the bound that clipped it (None when it counted as declared)."""

    declared: float
    used: float
    bound: str | None = None


def bound_weight(declared: float, *, cap: float | None = None, held: float | None = None) -> Weight:
    """The weight of an update whose node declares ``declared`` examples: clipped to the
    run's ``cap`` and to ``held``, the weight first accepted from that node in the job.

    Clipped, not rejected, as DP-FedAvg caps client weights: an honest node with more data
    than the cap still takes part (at the cap), while a node that lies about its count
    never weighs more than the cap, so its share of a round is at most
    ``cap / (cap + the others' weight)`` and no sum of weights can overflow. Holding the
    first count stops a node from growing its weight once it has taken part. A count that
    is not a positive finite number is no count at all: UpdateRejected.
    """
    if not (declared > 0 and math.isfinite(declared)):
        raise UpdateRejected(f"example count must be positive, got {declared!r}")
    used, bound = float(declared), None
    for name, limit in ((CAP_BOUND, cap), (HELD_BOUND, held)):
        if limit is not None and used > limit:
            used, bound = float(limit), name
    return Weight(float(declared), used, bound)


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of ``arrays`` taken together, in float64."""
    return math.sqrt(sum(float(np.square(np.asarray(a, np.float64)).sum()) for a in arrays))


def _distance(
    tensors: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], names: Iterable[str]
) -> float:
    """L2 distance between ``tensors`` and ``reference`` over ``names``, in float64."""
    return l2_norm(np.asarray(tensors[n], np.float64) - reference[n] for n in names)


def validate_update(
    update: Mapping[str, np.ndarray],
    expected: Mapping[str, TensorSpec],
    *,
    reference: Mapping[str, np.ndarray] | None = None,
    max_norm: float | None = None,
) -> None:
    """Raise UpdateRejected unless ``update`` has exactly the expected tensors, all finite,
    and (given a reference and a bound) moves no further than ``max_norm`` from it in L2.
    """
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        # The expected names are the provider's own; the extra ones are the node's text,
        # which the provider never records (it could carry a private row): counted only.
        raise UpdateRejected(
            f"tensor names differ: missing {missing[:3]}, {len(extra)} not in the adapter"
        )
    for name, spec in expected.items():
        array = update[name]
        # The node's shape and dtype are not quoted: a shape of any length is bytes the
        # node chose, and the provider records rejection reasons.
        if tuple(array.shape) != spec.shape:
            raise UpdateRejected(f"{name}: shape differs from the expected {spec.shape}")
        if str(array.dtype) != spec.dtype:
            raise UpdateRejected(f"{name}: dtype differs from the expected {spec.dtype}")
        if not np.isfinite(array).all():
            raise UpdateRejected(f"{name}: contains NaN or Inf")
    if reference is not None and max_norm is not None:
        distance = _distance(update, reference, expected)
        if distance > max_norm:
            raise UpdateRejected(
                f"update moves {distance:.4g} from the global adapter (L2), "
                f"more than the bound {max_norm:g}"
            )


class Aggregate(Protocol):
    """What a round's commit reads: how many updates, their total weight, the mean."""

    count: int
    total_weight: float

    def result(self) -> dict[str, np.ndarray]: ...


class StreamingAggregator:
    """Weighted mean of updates, added one at a time into a single float64 running sum.

    ``max_weight`` caps each update's weight (see :func:`bound_weight`); ``reference`` and
    ``max_norm`` bound how far each update, and so the mean, may lie from the global adapter.
    """

    def __init__(
        self,
        expected: Mapping[str, TensorSpec],
        *,
        reference: Mapping[str, np.ndarray] | None = None,
        max_norm: float | None = None,
        max_weight: float | None = None,
    ):
        self.expected = dict(expected)
        self.reference = reference
        self.max_norm = max_norm
        self.max_weight = max_weight
        self._sum = {
            name: np.zeros(spec.shape, dtype=np.float64) for name, spec in self.expected.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(
        self, update: Mapping[str, np.ndarray], examples: float, *, held: float | None = None
    ) -> Weight:
        """Validate one update, bound the weight its ``examples`` give it (and ``held``,
        its node's first accepted weight), fold it into the running sum; return the weight."""
        weight = bound_weight(examples, cap=self.max_weight, held=held)
        validate_update(update, self.expected, reference=self.reference, max_norm=self.max_norm)
        for name, total in self._sum.items():
            total += np.asarray(update[name], dtype=np.float64) * weight.used
        self.total_weight += weight.used
        self.count += 1
        return weight

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean, in each tensor's original dtype.

        AggregateInvalid unless it is finite and (given a reference and a bound) within
        ``max_norm`` of the reference. Updates that each passed break this only if the
        arithmetic fails (an overflow without a weight cap, a fault); such an aggregate
        must never be committed.
        """
        if self.count == 0:
            raise RuntimeError("result() called before any update was added")
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            mean = {name: total / self.total_weight for name, total in self._sum.items()}
            result = {n: value.astype(self.expected[n].dtype) for n, value in mean.items()}
        broken = sorted(name for name, value in result.items() if not np.isfinite(value).all())
        if broken:
            raise AggregateInvalid(
                f"the aggregate of {self.count} updates is not finite in {broken[:3]}"
            )
        if self.reference is not None and self.max_norm is not None:
            # On the float64 mean, with slack for its rounding only (casting to the tensors'
            # dtype then moves each element by at most half an ulp).
            distance = _distance(mean, self.reference, self.expected)
            magnitude = self.max_norm + l2_norm(self.reference[n] for n in self.expected)
            if not distance <= self.max_norm + ROUNDING_SLACK * magnitude:
                raise AggregateInvalid(
                    f"the aggregate of {self.count} updates moves {distance:.4g} from the "
                    f"global adapter (L2), more than the bound {self.max_norm:g}"
                )
        return result
