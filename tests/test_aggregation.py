"""Tests for streaming weighted aggregation (server.aggregation) and FFA's exactness."""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sandbox.config import (
    EXAMPLES_LIMIT,
    MODE_FEDAVG,
    MODE_FFA,
    TASK_CLASSIFICATION,
    LoraSpec,
    RunSpec,
)
from sandbox.errors import AggregateInvalid, ConfigError, UpdateRejected
from sandbox.lora import adapter_state, build_peft_model, is_trained
from sandbox.models import inspect_model_dir, load_pretrained
from server.aggregation import (
    CAP_BOUND,
    HELD_BOUND,
    StreamingAggregator,
    TensorSpec,
    Weight,
    bound_weight,
    spec_of,
    validate_update,
)
from tests.conftest import APP_DIR

Update = dict[str, np.ndarray]


def _updates(n: int, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [
        {
            "layer.lora_B.weight": rng.normal(size=(6, 3)).astype(np.float32),
            "classifier.bias": rng.normal(size=(3,)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _aggregate(updates: list[Update], weights: list[float]) -> dict[str, np.ndarray]:
    aggregator = StreamingAggregator(spec_of(updates[0]))
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    return aggregator.result()


def test_weighted_mean_matches_numpy_reference_and_keeps_dtype() -> None:
    updates = _updates(3)
    weights = [10.0, 30.0, 60.0]
    result = _aggregate(updates, weights)

    assert set(result) == set(updates[0])
    for name, got in result.items():
        # Hand-computed: sum(w_i * x_i) / sum(w_i), in float64.
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        expected = np.tensordot(np.array(weights), stacked, axes=1) / sum(weights)
        assert got.dtype == np.float32
        assert got.shape == updates[0][name].shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        # Weighting matters: the unweighted mean is a different answer.
        assert not np.allclose(got, stacked.mean(axis=0), rtol=1e-3)


def test_each_tensor_keeps_its_own_dtype() -> None:
    update: Update = {
        "a": np.array([1.0, 2.0], dtype=np.float32),
        "h": np.array([3.0, 5.0], dtype=np.float16),
    }
    other: Update = {
        "a": np.array([3.0, 4.0], dtype=np.float32),
        "h": np.array([1.0, 1.0], np.float16),
    }
    result = _aggregate([update, other], [1.0, 3.0])
    assert result["a"].dtype == np.float32
    assert result["h"].dtype == np.float16
    np.testing.assert_array_equal(result["a"], np.array([2.5, 3.5], dtype=np.float32))
    np.testing.assert_array_equal(result["h"], np.array([1.5, 2.0], dtype=np.float16))


def test_result_is_independent_of_arrival_order() -> None:
    updates = _updates(4, seed=1)
    weights = [1.0, 7.0, 3.0, 250.0]
    reference = _aggregate(updates, weights)
    for order in itertools.permutations(range(4)):
        result = _aggregate([updates[i] for i in order], [weights[i] for i in order])
        for name in reference:
            np.testing.assert_allclose(result[name], reference[name], rtol=0, atol=1e-6)


def test_single_update_is_returned_unchanged() -> None:
    (update,) = _updates(1, seed=2)
    result = _aggregate([update], [17.0])
    for name in update:
        np.testing.assert_array_equal(result[name], update[name])


def test_result_before_any_update_is_a_runtime_error() -> None:
    aggregator = StreamingAggregator(spec_of(_updates(1)[0]))
    with pytest.raises(RuntimeError, match="before any update"):
        aggregator.result()


def _missing(u: Update) -> Update:
    return {k: v for k, v in u.items() if k != "classifier.bias"}


def _extra(u: Update) -> Update:
    return {**u, "layer.lora_A.weight": np.zeros((3, 6), np.float32)}


def _wrong_shape(u: Update) -> Update:
    return {**u, "layer.lora_B.weight": np.zeros((3, 6), np.float32)}


def _wrong_dtype(u: Update) -> Update:
    return {**u, "layer.lora_B.weight": u["layer.lora_B.weight"].astype(np.float64)}


def _with(value: float) -> Callable[[Update], Update]:
    def poison(u: Update) -> Update:
        bad = u["layer.lora_B.weight"].copy()
        bad[2, 1] = value
        return {**u, "layer.lora_B.weight": bad}

    return poison


BAD_UPDATES = {
    "missing": (_missing, "missing \\['classifier.bias'\\]"),
    "extra": (_extra, "1 not in the adapter"),
    "shape": (_wrong_shape, "shape"),
    "dtype": (_wrong_dtype, "dtype differs from the expected float32"),
    "nan": (_with(float("nan")), "NaN or Inf"),
    "inf": (_with(float("inf")), "NaN or Inf"),
    "neg-inf": (_with(float("-inf")), "NaN or Inf"),
}


@pytest.mark.parametrize(("make_bad", "message"), BAD_UPDATES.values(), ids=BAD_UPDATES.keys())
def test_bad_update_is_rejected_and_leaves_the_sum_unchanged(
    make_bad: Callable[[Update], Update], message: str
) -> None:
    good = _updates(3, seed=3)
    expected = spec_of(good[0])
    bad = make_bad(_updates(1, seed=4)[0])
    with pytest.raises(UpdateRejected, match=message):
        validate_update(bad, expected)
    for update in good:
        validate_update(update, expected)

    aggregator = StreamingAggregator(expected)
    aggregator.add(good[0], 2.0)
    with pytest.raises(UpdateRejected, match=message):
        aggregator.add(bad, 5.0)
    assert (aggregator.count, aggregator.total_weight) == (1, 2.0)
    aggregator.add(good[1], 3.0)
    aggregator.add(good[2], 4.0)

    clean = _aggregate(good, [2.0, 3.0, 4.0])
    result = aggregator.result()
    for name in clean:
        np.testing.assert_array_equal(result[name], clean[name])


@pytest.mark.parametrize("weight", [0.0, -1.0, -0.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_weight_is_rejected(weight: float) -> None:
    good = _updates(2, seed=5)
    aggregator = StreamingAggregator(spec_of(good[0]))
    aggregator.add(good[0], 1.0)
    with pytest.raises(UpdateRejected, match="example count"):
        aggregator.add(good[1], weight)
    assert (aggregator.count, aggregator.total_weight) == (1, 1.0)
    for name, value in aggregator.result().items():
        np.testing.assert_array_equal(value, good[0][name])


def test_spec_of_records_shape_and_dtype() -> None:
    spec = spec_of({"x": np.zeros((2, 5), np.float16)})
    assert spec == {"x": TensorSpec(shape=(2, 5), dtype="float16")}


@pytest.fixture(scope="module")
def ffa_model(tiny_bert_dir: Path) -> Any:
    info = inspect_model_dir(tiny_bert_dir, TASK_CLASSIFICATION)
    base, _ = load_pretrained(info, num_labels=3)
    return build_peft_model(
        base, LoraSpec(r=4), task=TASK_CLASSIFICATION, model_type=info.model_type, mode=MODE_FFA
    )


def test_ffa_freezes_lora_a_and_trains_b_and_classifier(ffa_model: Any) -> None:
    params = dict(ffa_model.named_parameters())
    lora_a = [n for n in params if "lora_A" in n]
    lora_b = [n for n in params if "lora_B" in n]
    head = [n for n in params if "classifier.modules_to_save" in n]
    assert lora_a
    assert lora_b
    assert head
    assert not any(params[n].requires_grad for n in lora_a)
    assert all(params[n].requires_grad for n in lora_b + head)


def _mean_of_products(
    weights: list[float], bs: list[np.ndarray], as_: list[np.ndarray]
) -> np.ndarray:
    """Weighted mean of the per-node LoRA deltas B_i·A_i, in float64."""
    products = [
        w * (b.astype(np.float64) @ a.astype(np.float64))
        for w, b, a in zip(weights, bs, as_, strict=True)
    ]
    total: np.ndarray = np.sum(products, axis=0)
    return total / sum(weights)


def test_ffa_mean_of_b_times_shared_a_is_exact(ffa_model: Any) -> None:
    adapter = adapter_state(ffa_model)
    a_name = next(n for n in adapter if ".lora_A." in n)
    shared_a = adapter[a_name].astype(np.float64)  # the real frozen A, shape (r, in)
    assert np.abs(shared_a).max() > 0
    rank, width = shared_a.shape
    rng = np.random.default_rng(6)
    weights = [5.0, 1.0, 12.0, 2.0]
    bs = [rng.normal(size=(width, rank)).astype(np.float32) for _ in weights]

    mean_b = _aggregate([{"B": b} for b in bs], weights)["B"].astype(np.float64)
    exact = _mean_of_products(weights, bs, [shared_a] * len(bs))
    np.testing.assert_allclose(mean_b @ shared_a, exact, rtol=1e-5, atol=1e-6)

    # FedAvg averages A too; with a different A per node the product of means is not
    # the mean of products, which is the error FFA exists to remove.
    as_ = [rng.normal(size=(rank, width)).astype(np.float32) for _ in weights]
    means = _aggregate([{"A": a, "B": b} for a, b in zip(as_, bs, strict=True)], weights)
    fedavg = means["B"].astype(np.float64) @ means["A"].astype(np.float64)
    ideal = _mean_of_products(weights, bs, as_)
    assert not np.allclose(fedavg, ideal, rtol=1e-2, atol=1e-3)


def _saved_name(param_name: str) -> str:
    """Map a live parameter name to PEFT's saved-format name (no adapter name)."""
    return param_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


@pytest.mark.parametrize("mode", [MODE_FEDAVG, MODE_FFA])
def test_is_trained_agrees_with_the_frozen_parameters(tiny_bert_dir: Path, mode: str) -> None:
    info = inspect_model_dir(tiny_bert_dir, TASK_CLASSIFICATION)
    base, _ = load_pretrained(info, num_labels=3)
    model = build_peft_model(
        base, LoraSpec(r=2), task=TASK_CLASSIFICATION, model_type=info.model_type, mode=mode
    )
    adapter = adapter_state(model)
    trained = {n for n in adapter if is_trained(n, mode)}
    trainable = {_saved_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == trainable

    lora_a = {n for n in adapter if ".lora_A." in n}
    lora_b = {n for n in adapter if ".lora_B." in n}
    head = {n for n in adapter if ".classifier." in n}
    assert lora_a
    assert lora_b
    assert head
    assert lora_b | head <= trained
    if mode == MODE_FFA:
        assert trained == set(adapter) - lora_a
    else:
        assert trained == set(adapter)


def test_update_beyond_the_norm_bound_is_rejected_and_leaves_the_sum_unchanged() -> None:
    reference = {k: np.zeros_like(v) for k, v in _updates(1, seed=6)[0].items()}
    near, far = _updates(2, seed=7)
    far = {k: v * 100 for k, v in far.items()}
    distance = float(np.sqrt(sum(np.square(v.astype(np.float64)).sum() for v in near.values())))
    aggregator = StreamingAggregator(spec_of(near), reference=reference, max_norm=distance * 2)
    aggregator.add(near, 1.0)
    with pytest.raises(UpdateRejected, match="more than the bound"):
        aggregator.add(far, 1.0)
    assert aggregator.count == 1
    np.testing.assert_array_equal(aggregator.result()["classifier.bias"], near["classifier.bias"])
    # The bound is on the distance from the global adapter, not on the update's size.
    moved = StreamingAggregator(spec_of(near), reference=far, max_norm=distance * 2)
    moved.add({k: v + 0.0 for k, v in far.items()}, 1.0)


# -- one node cannot dominate or break the aggregate ---------------------------------------


def test_a_count_over_the_cap_or_the_held_count_is_clipped_and_names_the_bound() -> None:
    assert bound_weight(10.0, cap=60) == Weight(10.0, 10.0, None)
    assert bound_weight(60.0, cap=60, held=60.0) == Weight(60.0, 60.0, None)
    assert bound_weight(1e9, cap=60) == Weight(1e9, 60.0, CAP_BOUND)
    assert bound_weight(1.7e308, cap=60) == Weight(1.7e308, 60.0, CAP_BOUND)
    assert bound_weight(50.0, cap=60, held=40.0) == Weight(50.0, 40.0, HELD_BOUND)
    assert bound_weight(1e9, cap=60, held=40.0) == Weight(1e9, 40.0, HELD_BOUND)


def test_a_node_declaring_a_billion_examples_weighs_no_more_than_the_cap() -> None:
    honest = _updates(3, seed=8)
    liar = {name: value + 5 for name, value in _updates(1, seed=9)[0].items()}
    aggregator = StreamingAggregator(spec_of(liar), max_weight=60.0)
    for update, examples in zip(honest, [10.0, 30.0, 60.0], strict=True):
        assert aggregator.add(update, examples).bound is None
    assert aggregator.add(liar, 1e9) == Weight(1e9, 60.0, CAP_BOUND)
    assert aggregator.total_weight == 160.0

    result = aggregator.result()
    clipped = _aggregate([*honest, liar], [10.0, 30.0, 60.0, 60.0])
    unclipped = _aggregate([*honest, liar], [10.0, 30.0, 60.0, 1e9])
    for name, value in clipped.items():
        np.testing.assert_allclose(result[name], value, rtol=1e-6, atol=1e-6)
        # Negative control: weighted as declared, the aggregate is the liar's update.
        np.testing.assert_allclose(unclipped[name], liar[name], rtol=1e-6, atol=1e-6)


def test_counts_near_the_float_limit_stay_finite_under_the_cap_and_are_caught_without() -> None:
    updates = [{name: np.full_like(value, 2.0) for name, value in u.items()} for u in _updates(3)]
    capped = StreamingAggregator(spec_of(updates[0]), max_weight=1e4)
    for update, examples in zip(updates, [1.7e308, 1.7e308, 10.0], strict=True):
        capped.add(update, examples)
    for name, value in capped.result().items():
        np.testing.assert_array_equal(value, updates[0][name])

    # With no cap (the bench's aggregator) each update still passes, but the sum overflows:
    # the aggregate is refused rather than handed out as inf or NaN.
    uncapped = StreamingAggregator(spec_of(updates[0]))
    with np.errstate(over="ignore"):
        for update in updates[:2]:
            uncapped.add(update, 1.7e308)
    assert uncapped.count == 2
    with pytest.raises(AggregateInvalid, match="not finite"):
        uncapped.result()


def test_an_aggregate_of_updates_at_the_norm_bound_is_not_refused_for_rounding() -> None:
    """Identical updates exactly at the bound: their float64 mean lands a rounding error
    beyond it (the control below), which must not stop the job."""
    start = np.full(3, 0.1, np.float32)
    moved = start + np.array([3.0, 0.0, 0.0], np.float32)
    reference, update = {"classifier.bias": start}, {"classifier.bias": moved}
    bound = math.sqrt(float(np.square(moved.astype(np.float64) - start).sum()))
    weights = [63.73247256341329, 27.051692705010648, 4.193255041225849]
    total, mean = 0.0, np.zeros(3)
    for weight in weights:
        mean += moved.astype(np.float64) * weight
        total += weight
    assert math.sqrt(float(np.square(mean / total - start).sum())) > bound  # the control

    aggregator = StreamingAggregator(spec_of(update), reference=reference, max_norm=bound)
    for weight in weights:
        aggregator.add(update, weight)
    np.testing.assert_array_equal(aggregator.result()["classifier.bias"], moved)


def test_the_cap_has_one_default_shipped_in_the_run_config_and_a_limit() -> None:
    shipped = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    default = RunSpec.max_examples_per_update
    assert shipped["tool"]["flwr"]["app"]["config"]["max-examples-per-update"] == default
    values = {"model-path": "/models/tiny", "labels": '["a", "b"]'}
    assert RunSpec.from_run_config(values).max_examples_per_update == default
    spec = RunSpec.from_run_config({**values, "max-examples-per-update": EXAMPLES_LIMIT})
    assert RunSpec.from_run_config(spec.to_run_config()) == spec
    for bad in (0, EXAMPLES_LIMIT + 1, 1.5, "100"):
        with pytest.raises(ConfigError, match="max-examples-per-update"):
            RunSpec.from_run_config({**values, "max-examples-per-update": bad})
