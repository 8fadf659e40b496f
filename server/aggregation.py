"""Weighted LoRA aggregation that streams: one running sum, whatever the node count.

Aggregation stays a plain weighted sum so that secure aggregation and differential
privacy can wrap it later. In FFA mode only B (and saved modules) arrive; A is frozen
from the shared initial adapter, so mean(B)·A equals mean(B·A) exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sandbox.errors import UpdateRejected


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one adapter tensor."""

    shape: tuple[int, ...]
    dtype: str


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """The exact names, shapes and dtypes that updates must match."""
    return {name: TensorSpec(tuple(a.shape), str(a.dtype)) for name, a in tensors.items()}


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
        raise UpdateRejected(f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}")
    for name, spec in expected.items():
        array = update[name]
        if tuple(array.shape) != spec.shape:
            raise UpdateRejected(f"{name}: shape {tuple(array.shape)} != expected {spec.shape}")
        if str(array.dtype) != spec.dtype:
            raise UpdateRejected(f"{name}: dtype {array.dtype} != expected {spec.dtype}")
        if not np.isfinite(array).all():
            raise UpdateRejected(f"{name}: contains NaN or Inf")
    if reference is not None and max_norm is not None:
        squared = sum(
            float(np.square(np.asarray(update[n], np.float64) - reference[n]).sum())
            for n in expected
        )
        if squared > max_norm**2:
            raise UpdateRejected(
                f"update moves {squared**0.5:.4g} from the global adapter (L2), "
                f"more than the bound {max_norm:g}"
            )


class StreamingAggregator:
    """Weighted mean of updates, added one at a time into a single float64 running sum."""

    def __init__(
        self,
        expected: Mapping[str, TensorSpec],
        *,
        reference: Mapping[str, np.ndarray] | None = None,
        max_norm: float | None = None,
    ):
        self.expected = dict(expected)
        self.reference = reference
        self.max_norm = max_norm
        self._sum = {
            name: np.zeros(spec.shape, dtype=np.float64) for name, spec in self.expected.items()
        }
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Validate one update and fold it into the running sum."""
        if not (weight > 0 and np.isfinite(weight)):
            raise UpdateRejected(f"example count must be positive, got {weight!r}")
        validate_update(update, self.expected, reference=self.reference, max_norm=self.max_norm)
        for name, total in self._sum.items():
            total += np.asarray(update[name], dtype=np.float64) * weight
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean, in each tensor's original dtype."""
        if self.count == 0:
            raise RuntimeError("result() called before any update was added")
        return {
            name: (total / self.total_weight).astype(self.expected[name].dtype)
            for name, total in self._sum.items()
        }
