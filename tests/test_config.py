"""The run and node configs: each key defined once, validated on construction, written
back exactly (issue 13, part 4)."""

from __future__ import annotations

import dataclasses
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from flwr.common.config import flatten_dict, get_project_config
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.config import (
    EXAMPLES_LIMIT,
    MODES,
    PROTECTIONS,
    RUN_CONFIG_DEFAULTS,
    TASK_CAUSAL_LM,
    TASK_CLASSIFICATION,
    TASKS,
    EgressPolicy,
    LoraSpec,
    NodeConfig,
    RunSpec,
    SandboxConfig,
)
from sandbox.errors import ConfigError
from tests.fuzzing import FUZZ_EXAMPLES, fuzz_settings

# Round trips of well-formed configs, not a parser of another party's bytes: a quarter of
# the fuzz suites' examples covers the rules' few branches.
round_trip_settings = settings(fuzz_settings, max_examples=max(1, FUZZ_EXAMPLES // 4))
ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"model-path": "/models/tiny", "labels": '["a", "b"]'}


def test_pyproject_ships_the_one_definition_of_every_run_config_key() -> None:
    """``[tool.flwr.app.config]``, as Flower reads it, holds exactly the defined keys with
    their defaults, type for type (``0`` is not ``0.0`` to Flower)."""
    shipped = flatten_dict(get_project_config(ROOT)["tool"]["flwr"]["app"]["config"])
    assert shipped == RUN_CONFIG_DEFAULTS
    assert {k: type(v) for k, v in shipped.items()} == {
        k: type(v) for k, v in RUN_CONFIG_DEFAULTS.items()
    }


def test_a_key_left_out_takes_the_same_default_as_the_dataclass() -> None:
    sparse = RunSpec.from_run_config(REQUIRED)
    assert sparse == RunSpec.from_run_config({**RUN_CONFIG_DEFAULTS, **REQUIRED})
    assert sparse == RunSpec(
        job_id=str(RUN_CONFIG_DEFAULTS["job-id"]),
        task=str(RUN_CONFIG_DEFAULTS["task"]),
        model_path=Path("/models/tiny"),
        labels=("a", "b"),
    )


@pytest.mark.parametrize("key", sorted(RUN_CONFIG_DEFAULTS))
def test_every_key_names_itself_when_its_value_has_the_wrong_type(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^run\.toml: key '{key}': .*True"):
        RunSpec.from_run_config({**REQUIRED, key: True}, source="run.toml")


def test_the_shipped_defaults_alone_name_the_missing_model() -> None:
    with pytest.raises(ConfigError, match=r"key 'model-path': is empty"):
        RunSpec.from_run_config(RUN_CONFIG_DEFAULTS)


def test_a_rule_across_keys_names_the_source_too() -> None:
    with pytest.raises(ConfigError, match=r"^run\.toml: key 'labels': classification needs"):
        RunSpec.from_run_config({**REQUIRED, "labels": '["a"]'}, source="run.toml")


def _spec(**changes: Any) -> RunSpec:
    return dataclasses.replace(RunSpec.from_run_config(REQUIRED), **changes)


def _sandbox(**changes: Any) -> SandboxConfig:
    values: dict[str, Any] = {
        "tee": "stub",
        "ueid": "alpine-1",
        "attestation_key": Path("/k.pem"),
        "attestation_chain": Path("/c.pem"),
        "key_broker": "localhost:1",
        "provider_ca": Path("/ca.crt"),
        "manifest_key": Path("/m.pub"),
        "result_key": Path("/r.pub"),
        "package": Path("/model.ark"),
    }
    return SandboxConfig(**{**values, **changes})


def _node(**changes: Any) -> NodeConfig:
    return NodeConfig(**{"name": "alpine", "data_path": Path("/d.jsonl"), **changes})


# A directly built config breaks the same rule, with the same message, as a read one.
INVALID: dict[str, tuple[Any, str]] = {
    "num-rounds": (lambda: _spec(num_rounds=0), r"key 'num-rounds': must be at least 1, got 0"),
    "mode": (lambda: _spec(mode="fedprox"), r"key 'mode': must be one of .*'fedprox'"),
    "job-id": (lambda: _spec(job_id="../x"), r"key 'job-id': must be a plain name"),
    "labels-dup": (lambda: _spec(labels=("a", "a")), r"key 'labels': must be distinct"),
    "labels-few": (lambda: _spec(labels=("a",)), r"key 'labels': classification needs"),
    "cap": (
        lambda: _spec(max_examples_per_update=EXAMPLES_LIMIT + 1),
        r"key 'max-examples-per-update': must be at most 2\*\*53",
    ),
    "timeout-nan": (lambda: _spec(round_timeout=float("nan")), r"key 'round-timeout'"),
    "lr-type": (lambda: _spec(learning_rate="fast"), r"key 'learning-rate': expected a number"),
    "model-type": (lambda: _spec(model_path="/m"), r"key 'model-path': expected a path"),
    "lora-r": (lambda: LoraSpec(r=0), r"key 'lora-r': must be at least 1"),
    # A hostile run config cannot make a node sandbox allocate or train without bound.
    "lora-r-huge": (lambda: LoraSpec(r=10**9), r"key 'lora-r': must be at most 1024"),
    "steps-huge": (lambda: _spec(local_steps=10**12), r"key 'local-steps': must be at most"),
    "length-huge": (lambda: _spec(max_length=10**8), r"key 'max-length': must be at most"),
    "batch-huge": (lambda: _spec(batch_size=10**6), r"key 'batch-size': must be at most 4096"),
    "lora-dropout": (lambda: LoraSpec(dropout=0.995), r"key 'lora-dropout': must be in"),
    "lora-targets": (lambda: LoraSpec(target_modules=("q,v",)), r"key 'lora-target-modules'"),
    "node-name": (lambda: _node(name=""), r"key 'node\.name': must not be empty"),
    "node-threads": (lambda: _node(threads=-1), r"key 'threads': must be at least 0"),
    "node-fraction": (lambda: _node(heldout_fraction=0.95), r"key 'heldout-fraction'"),
    "node-apps": (lambda: _node(approved_apps=("ab",)), r"key 'node\.approved-apps'"),
    "node-flag": (lambda: _node(unprotected=1), r"key 'node\.unprotected'"),
    "sandbox-tee": (lambda: _sandbox(tee=""), r"key 'node\.sandbox\.tee': must not be empty"),
    "sandbox-file": (lambda: _sandbox(package="x"), r"key 'node\.sandbox\.package'"),
    "egress-size": (
        lambda: EgressPolicy(max_update_bytes=0),
        r"key 'node\.egress\.max-update-bytes': must be at least 1",
    ),
    "egress-metrics": (
        lambda: EgressPolicy(metrics=frozenset({""})),
        r"key 'node\.egress\.metrics'",
    ),
}


@pytest.mark.parametrize(("build", "message"), INVALID.values(), ids=INVALID.keys())
def test_a_config_validates_on_construction(build: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


# -- round trips: what is written reads back as the same config ----------------------------

_names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
_text = st.text(max_size=20)
_paths = st.builds(Path, st.text(min_size=1, max_size=30))
_absolute = st.builds(lambda p: Path("/") / p, _names)


def _number(low: float, high: float | None = None) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=high is None)


@st.composite
def run_specs(draw: st.DrawFn) -> RunSpec:
    task = draw(st.sampled_from(TASKS))
    labels = st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=5)
    return RunSpec(
        job_id=draw(st.text(min_size=1, max_size=20).filter(lambda s: "/" not in s)).lstrip(".")
        or "job",
        task=task,
        model_path=draw(_paths),
        labels=tuple(
            draw(labels.filter(lambda ls: len(ls) >= 2) if task == TASK_CLASSIFICATION else labels)
        ),
        num_rounds=draw(st.integers(1, 100_000)),
        mode=draw(st.sampled_from(MODES)),
        min_nodes=draw(st.integers(1, 100)),
        expected_nodes=draw(st.integers(0, 100)),
        round_timeout=draw(_number(1.0)),
        update_norm_bound=draw(_number(1e-6)),
        max_examples_per_update=draw(st.integers(1, EXAMPLES_LIMIT)),
        local_steps=draw(st.integers(1, 1000)),
        batch_size=draw(st.integers(1, 1024)),
        learning_rate=draw(_number(1e-8, 1.0)),
        max_length=draw(st.integers(8, 4096)),
        lora=LoraSpec(
            r=draw(st.integers(1, 256)),
            alpha=draw(st.integers(1, 512)),
            dropout=draw(_number(0.0, 0.99)),
            target_modules=tuple(draw(st.lists(_names, max_size=4))),
        ),
        seed=draw(st.integers(0, 2**32)),
        output_dir=draw(st.none() | _paths),
        model_id=draw(_text),
        protection=draw(st.sampled_from(PROTECTIONS)),
        aggregator_dir=draw(st.none() | _paths),
        log_db=draw(st.none() | _paths),
    )


@round_trip_settings
@given(run_specs())
def test_a_run_config_written_as_toml_reads_back_as_the_same_spec(spec: RunSpec) -> None:
    written = tomllib.loads(tomli_w.dumps(spec.to_run_config()))
    assert RunSpec.from_run_config(written) == spec
    assert set(written) == set(RUN_CONFIG_DEFAULTS)


def test_causal_lm_needs_no_labels() -> None:
    spec = RunSpec.from_run_config({"task": TASK_CAUSAL_LM, "model-path": "/m"})
    assert spec.labels == ()


_digests = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def node_configs(draw: st.DrawFn) -> NodeConfig:
    sandbox = None
    if draw(st.booleans()):
        sandbox = _sandbox(
            tee=draw(_names),
            ueid=draw(_names),
            package=draw(_absolute),
            hpke_suite=draw(_names),
            aggregator_policy=draw(st.none() | _absolute),
            trusted_roots=draw(st.none() | _absolute),
        )
    return NodeConfig(
        name=draw(_names),
        data_path=draw(_absolute),
        heldout_fraction=draw(_number(0.01, 0.9)),
        split_seed=draw(st.integers(0, 2**32)),
        max_row_bytes=draw(st.integers(64, 2**30)),
        threads=draw(st.integers(0, 64)),
        journal_path=draw(st.none() | _absolute),
        sandbox=sandbox,
        egress=EgressPolicy(
            frozenset(draw(st.lists(_names, min_size=1, max_size=5))),
            draw(st.integers(1, 2**40)),
        ),
        approved_apps=tuple(sorted(set(draw(st.lists(_digests, max_size=3))))),
        unprotected=draw(st.booleans()),
    )


@round_trip_settings
@given(node=node_configs())
def test_a_node_config_written_as_toml_reads_back_as_the_same_config(
    node: NodeConfig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("node") / "node.toml"
    path.write_text(node.to_toml(), encoding="utf-8")
    assert NodeConfig.load(path) == dataclasses.replace(node, source=path)
