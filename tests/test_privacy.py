"""Differential privacy (issue 18): the accountant and the ledger (``sandbox/privacy.py``),
DP-SGD in ``clients/training.py``, client-level noise at the aggregate
(``server/privacy.py``), and the attacks on a node's budget, staged in one process
against real attested node sandboxes, the real key broker over TLS on loopback and the
real ServerApp jobs (``tests/sandboxgrid.py``): a run that asks a looser budget, a budget
spent mid-run (and after a restart), and a node whose code would skip the noise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict
from safetensors.numpy import load_file

from clients.channels import RunIds
from clients.data import Example
from clients.egress import failure_reason
from clients.model import load_node_model
from clients.sandbox import NodeSandbox, load_split
from clients.training import Private, train_local
from sandbox import events
from sandbox.attestation.measure import NODE_PACKAGES, SANDBOX_CODE, code_measurement
from sandbox.attestation.result import (
    AFFIRMING,
    CONTRAINDICATED,
    PURPOSE_KEY_RELEASE,
    TIER_VALUE,
)
from sandbox.canonical import canonical_entry
from sandbox.config import (
    DP_BUDGET,
    DP_CLIP,
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_TOTAL,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    NodeConfig,
    PrivacyBudget,
    RunSpec,
)
from sandbox.errors import (
    ConfigError,
    JournalInvalid,
    KeyReleaseDenied,
    MeasurementRejected,
    PrivacyBudgetExhausted,
    PrivacyBudgetRefused,
    PrivacyLedgerMismatch,
    UpdateRejected,
)
from sandbox.events import (
    AttestationAppraised,
    JsonlEventSink,
    Key,
    KeyDenied,
    KeyReleased,
    MemoryEventSink,
)
from sandbox.events import node as node_events
from sandbox.journal import append_journal, read_journal
from sandbox.lora import adapter_state, is_trained
from sandbox.models import inspect_model_dir, load_pretrained
from sandbox.ops.provision import LoopbackDeployment
from sandbox.ops.translog.audit import check_policy, crosscheck, decode
from sandbox.privacy import (
    Ledger,
    Mechanism,
    Settings,
    Spent,
    check_ask,
    client_epsilon,
    epsilon_of,
    fit_noise,
    ledger_of,
    resolve,
)
from sandbox.protocol import METRICS_KEY, metric_record
from sandbox.reasons import NodeReason
from sandbox.secagg import STAGE_MASK, threshold
from server.aggregation import spec_of
from server.app import FederatedJob
from server.checkpoint import CheckpointStore
from server.privacy import CLIENT_DP_BOUND, ClientNoise, reported_spending
from server.secure_job import SecureJob
from tests.conftest import make_spec
from tests.sandboxgrid import (
    LABELS,
    World,
    events_of,
    listed,
    provisioned,
    serverapp_identity,
    start_job,
)

NAMES = ("north", "south", "west")
# Flower node ids are random unsigned 64-bit.
NODE_IDS = {"north": 2**63 + 5, "south": 9_000_000_000_000_001, "west": 17}
NORTH, SOUTH, WEST = (NODE_IDS[n] for n in NAMES)
DELTA = 1e-5
PLENTY = PrivacyBudget(epsilon=100.0, delta=DELTA, clip=1.0)
RUN_ID = 7_100
EXHAUSTED = NodeReason.PRIVACY_BUDGET_EXHAUSTED.label
REFUSED = NodeReason.PRIVACY_BUDGET_REFUSED.label


def _spec(model_dir: Path, **overrides: Any) -> RunSpec:
    """A run of three nodes on the tiny model, one round of two steps unless overridden."""
    values: dict[str, Any] = {
        "job_id": f"dp-{RUN_ID}",
        "labels": LABELS,
        "model_id": "tiny",
        "local_steps": 2,
        "num_rounds": 1,
        "mode": "fedavg",
        "min_nodes": 2,
        "expected_nodes": 3,
        "round_timeout": 60.0,
    }
    values.update(overrides)
    return make_spec(model_dir, **values)


# -- the accountant, the ask and the ledger ---------------------------------------------


@pytest.mark.parametrize(
    ("asked", "key"),
    [
        ({"dp_epsilon": 8.5}, "dp-epsilon"),
        ({"dp_epsilon": 2.0, "dp_delta": 1e-4}, "dp-delta"),
        ({"dp_epsilon": 2.0, "dp_clip": 1.5}, "dp-clip"),
    ],
)
def test_a_looser_ask_than_the_budget_is_refused_naming_the_key(
    tiny_bert_dir: Path, asked: dict[str, float], key: str
) -> None:
    budget = PrivacyBudget(epsilon=8.0, delta=DELTA, clip=1.0)
    spec = _spec(tiny_bert_dir, **asked)
    with pytest.raises(PrivacyBudgetRefused, match=f"asks {key} "):
        check_ask(spec, budget)
    with pytest.raises(PrivacyBudgetRefused, match=f"asks {key} "):
        resolve(spec, budget, 40)


def test_a_stricter_ask_is_trained_with_and_no_ask_means_no_dp(tiny_bert_dir: Path) -> None:
    budget = PrivacyBudget(epsilon=8.0, delta=DELTA, clip=1.0)
    strict = _spec(
        tiny_bert_dir,
        dp_epsilon=4.0,
        dp_delta=1e-6,
        dp_clip=0.5,
        dp_noise_multiplier=1.5,
        batch_size=4,
    )
    check_ask(strict, budget)
    settings = resolve(strict, budget, 40)
    assert settings == Settings(4.0, 8.0, 1e-6, 0.5, 1.5, 0.1)
    # The node's own budget, when the run asks none.
    own = resolve(_spec(tiny_bert_dir, dp_noise_multiplier=1.5), budget, 40)
    assert own == Settings(8.0, 8.0, DELTA, 1.0, 1.5, 0.1)
    # Neither asks: no DP at all.
    assert resolve(_spec(tiny_bert_dir), None, 40) is None


@pytest.mark.parametrize(("epsilon", "rate", "steps"), [(2.0, 0.1, 24), (8.0, 0.25, 6)])
def test_the_fitted_noise_spends_just_under_the_target(
    epsilon: float, rate: float, steps: int
) -> None:
    sigma = fit_noise(epsilon, DELTA, rate, steps)
    spent = epsilon_of([Mechanism(sigma, rate, steps)], DELTA)
    assert 0.99 * epsilon <= spent <= epsilon
    # Less noise would spend more than the target: the fit is not wastefully loose.
    assert epsilon_of([Mechanism(0.97 * sigma, rate, steps)], DELTA) > epsilon


def test_an_unreachable_epsilon_is_refused() -> None:
    with pytest.raises(PrivacyBudgetRefused):
        fit_noise(1e-3, 1e-12, 1.0, 10_000)


@functools.cache
def _composed(round_: Mechanism, k: int) -> float:
    """Epsilon of ``k`` rounds of ``round_``: one mechanism of k times its steps (RDP adds
    up over steps), not the ledger's k entries."""
    steps = round_.steps * k
    return epsilon_of([Mechanism(round_.noise_multiplier, round_.sample_rate, steps)], DELTA)


def test_the_ledger_counts_every_run_against_one_budget() -> None:
    round_ = Mechanism(1.0, 0.2, 2)
    one, two, three = (_composed(round_, k) for k in (1, 2, 3))
    # The node's budget allows two rounds in all; a run may spend two rounds' worth.
    settings = Settings(two, (two + three) / 2, DELTA, 1.0, 1.0, 0.2)
    ledger = Ledger()
    assert ledger.cost(1, 1, settings, 2) == pytest.approx((one, one))
    ledger.add(Spent(1, 1, round_, DELTA))
    # A second run: its own epsilon starts afresh, the node's total does not.
    assert ledger.cost(2, 1, settings, 2) == pytest.approx((one, two))
    ledger.add(Spent(2, 1, round_, DELTA))
    with pytest.raises(PrivacyBudgetExhausted, match="this node's epsilon"):
        ledger.cost(2, 2, settings, 2)
    with pytest.raises(PrivacyBudgetExhausted, match="this node's epsilon"):
        ledger.cost(3, 1, settings, 2)
    assert len(ledger.rounds) == 2  # a declined round is not recorded


def test_a_round_trained_again_counts_again() -> None:
    """Both updates of a round instructed twice left the node: both are spent."""
    round_ = Mechanism(1.0, 0.2, 2)
    two = _composed(round_, 2)
    ledger = Ledger([Spent(1, 1, round_, DELTA)])
    settings = Settings(100.0, 100.0, DELTA, 1.0, 1.0, 0.2)
    assert ledger.cost(1, 1, settings, 2) == pytest.approx((two, two))


def test_a_round_past_the_runs_own_ask_is_declined() -> None:
    round_ = Mechanism(1.0, 0.2, 2)
    two, three = (_composed(round_, k) for k in (2, 3))
    settings = Settings((two + three) / 2, 100.0, DELTA, 1.0, 1.0, 0.2)
    ledger = Ledger()
    for rnd in (1, 2):
        run_epsilon, _ = ledger.cost(5, rnd, settings, 2)
        ledger.add(Spent(5, rnd, round_, DELTA))
    assert run_epsilon == pytest.approx(two)
    with pytest.raises(PrivacyBudgetExhausted, match="the run's epsilon"):
        ledger.cost(5, 3, settings, 2)


def test_the_ledger_is_read_from_the_nodes_signed_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    node = NodeConfig("north", tmp_path / "data.jsonl", journal_path=journal, privacy=PLENTY)
    assert ledger_of(node).rounds == []  # no journal yet
    written = [(7, 1, 0.9, 0.125, 12), (7, 2, 0.9, 0.125, 12), (2**63 + 1, 1, 2.0, 1.0, 3)]
    for run, rnd, sigma, rate, steps in written:
        append_journal(
            node,
            node_events.DpRound(
                run_id=run, node_id=3, round=rnd, noise_multiplier=sigma, sample_rate=rate,
                steps=steps, clip=1.0, delta=DELTA, epsilon=1.0, epsilon_total=2.0, budget=8.0,
            ),
        )  # fmt: skip
        append_journal(
            node, node_events.ClientappFailed(run_id=run, node_id=3, code="x", reason="not DP")
        )
    assert ledger_of(node).rounds == [
        Spent(run, rnd, Mechanism(sigma, rate, steps), DELTA)
        for run, rnd, sigma, rate, steps in written
    ]
    # A spent round taken out of the journal (to spend it again) breaks its chain.
    lines = journal.read_bytes().splitlines(keepends=True)
    assert b'"kind":"dp_round"' in lines[3]
    journal.write_bytes(b"".join(lines[:3] + lines[4:]))
    with pytest.raises(JournalInvalid, match="breaks the chain"):
        ledger_of(node)


# -- DP-SGD --------------------------------------------------------------------------


def _model(spec: RunSpec) -> tuple[Any, Any]:
    """The tiny model with a fresh adapter of the run's shape, as a node builds it."""
    info = inspect_model_dir(spec.model_path, spec.task)
    base, tokenizer = load_pretrained(info, num_labels=len(spec.labels))
    built = load_node_model(spec, (base, tokenizer, info, None))
    return built.model, built.tokenizer


def _examples() -> list[Example]:
    words = {"a": "refund billing invoice", "b": "login password reset"}
    return [Example(f"row {i} {words[LABELS[i % 2]]}", LABELS[i % 2]) for i in range(8)]


def _trained(spec: RunSpec, private: Private | None) -> dict[str, np.ndarray]:
    """The trained tensors' change after training from the same torch seed."""
    torch.manual_seed(0)
    model, tokenizer = _model(spec)
    before = adapter_state(model)
    train_local(model, tokenizer, _examples(), spec, seed=3, private=private)
    after = adapter_state(model)
    return {n: after[n] - before[n] for n in after if is_trained(n, spec.lora_mode)}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(a[n] - b[n]).sum()) for n in a))


def _norm(a: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v).sum()) for v in a.values()))


def test_dp_sgd_noise_is_secret_from_whoever_knows_the_seed(tiny_bert_dir: Path) -> None:
    """Plain training is reproducible from the run's seed and torch's; DP-SGD with every
    row in every step (nothing random but the noise) is not, while without noise it is
    (up to float summation order): the difference is the noise, and the seed does not
    fix it."""
    spec = make_spec(tiny_bert_dir, labels=LABELS, local_steps=3, batch_size=8)
    plain = [_trained(spec, None) for _ in range(2)]
    assert _distance(*plain) == 0.0
    noiseless = [_trained(spec, Private(1.0, 0.0, 1.0)) for _ in range(2)]
    noisy = [_trained(spec, Private(1.0, 1.0, 1.0)) for _ in range(2)]
    moved = _norm(noisy[0])
    assert moved > 0
    assert _distance(*noiseless) < 1e-3 * moved
    assert _distance(*noisy) > 0.1 * moved


def test_a_round_whose_poisson_batches_are_all_empty_still_trains(tiny_bert_dir: Path) -> None:
    """Poisson sampling may draw no row in any of a round's steps (each step is empty with
    chance about e^-batch-size): the steps are still taken, noise only, and the round
    trains (its loss is NaN: there was none), rather than being read as every completion
    truncated away (ConfigError, max-length)."""
    spec = make_spec(tiny_bert_dir, labels=LABELS, local_steps=2, batch_size=8)
    assert _norm(_trained(spec, Private(1.0, 1.0, 1e-12))) > 0


def test_dp_sgd_clips_each_examples_gradient(tiny_bert_dir: Path) -> None:
    """A clip of 1e-12 leaves AdamW almost nothing to step on (its epsilon, 1e-8, is far
    above the clipped gradient), so the adapter barely moves; plain training, and DP-SGD
    with a clip that does not bind, move it by steps of the learning rate."""
    spec = make_spec(tiny_bert_dir, labels=LABELS, local_steps=3, batch_size=8)
    plain = _norm(_trained(spec, None))
    loose = _norm(_trained(spec, Private(1e6, 0.0, 1.0)))
    clipped = _norm(_trained(spec, Private(1e-12, 1.0, 1.0)))
    assert plain > 0
    assert loose > 0.5 * plain
    assert clipped < 0.01 * plain


# -- client-level DP at the aggregate (fedavg) ----------------------------------------


def _reference() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 5), np.float32), "b": np.zeros(3, np.float32)}


def _change(norm: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = {n: rng.normal(size=v.shape) for n, v in _reference().items()}
    scale = norm / _norm(raw)
    return {n: (v * scale).astype(np.float32) for n, v in raw.items()}


def _client_noise(noise: float, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    reference = _reference()
    aggregator = ClientNoise(
        spec_of(reference), reference=reference, max_norm=100.0, noise_multiplier=noise, clip=1.0
    )
    for examples, update in zip((5.0, 500.0, 50.0), updates, strict=False):
        weight = aggregator.add(update, examples)
        assert (weight.used, weight.bound) == (1.0, CLIENT_DP_BOUND)
    assert aggregator.total_weight == aggregator.count == len(updates)
    return aggregator.result()


def test_client_noise_averages_the_clipped_changes_every_node_weighing_one() -> None:
    updates = [_change(10.0, 1), _change(0.5, 2)]  # the first clipped to 1, the second not
    noiseless = _client_noise(1e-12, updates)
    expected = {n: (updates[0][n] / 10.0 + updates[1][n]) / 2 for n in noiseless}
    for name, value in expected.items():
        np.testing.assert_allclose(noiseless[name], value, atol=1e-6)
    first, second = _client_noise(1.0, updates), _client_noise(1.0, updates)
    assert _distance(first, second) > 0.1
    # Noise of std 1 (noise x clip) on the sum of two: about 0.5 per element of the mean.
    spread = np.concatenate([(first[n] - expected[n]).ravel() for n in first])
    assert 0.2 < float(spread.std()) < 1.0


# -- the staged federation -------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> Iterator[LoopbackDeployment]:
    """A provisioned provider with its key broker on loopback, and three nodes."""
    with provisioned(tmp_path_factory.mktemp("privacy"), tiny_bert_dir, NAMES) as deployment:
        yield deployment


def _new_run(monkeypatch: pytest.MonkeyPatch) -> int:
    global RUN_ID
    RUN_ID += 1
    serverapp_identity(monkeypatch, RUN_ID)
    return RUN_ID


@pytest.fixture
def run_id(monkeypatch: pytest.MonkeyPatch) -> int:
    """Each test is its own run (the sandboxes keep per-run channels and rounds)."""
    return _new_run(monkeypatch)


def _node_config(
    deployment: LoopbackDeployment, name: str, folder: Path, budget: PrivacyBudget | None
) -> Path:
    """The provisioned node ``name``, its config written anew in ``folder`` with
    ``budget`` as ``[node.privacy]`` and a journal of its own (a fresh ledger)."""
    provisioned_node = NodeConfig.load(deployment.node_configs[name])
    path = folder / name / "node.toml"
    path.parent.mkdir(parents=True)
    node = dataclasses.replace(
        provisioned_node, privacy=budget, journal_path=path.parent / "journal.jsonl"
    )
    path.write_text(node.to_toml(), encoding="utf-8")
    return path


def _started(path: Path) -> NodeSandbox:
    sandbox = NodeSandbox(NodeConfig.load(path))
    sandbox.start()
    return sandbox


def _world(
    deployment: LoopbackDeployment,
    model_dir: Path,
    folder: Path,
    budgets: dict[str, PrivacyBudget | None],
) -> World[NodeSandbox]:
    sandboxes = {
        NODE_IDS[name]: _started(_node_config(deployment, name, folder, budget))
        for name, budget in budgets.items()
    }
    return World(deployment, model_dir, folder, sandboxes)


def _round(spec: RunSpec, node: NodeConfig) -> Mechanism:
    """One round of ``spec``'s DP-SGD on ``node``'s training rows (noise fixed by the run)."""
    rate = min(1.0, spec.batch_size / len(load_split(spec, node).train))
    return Mechanism(spec.dp_noise_multiplier, rate, spec.local_steps)


def _journal(world: World[NodeSandbox], node_id: int, kind: str) -> list[dict[str, Any]]:
    path = world.sandboxes[node_id].node.journal_path
    assert path is not None
    return [e for e in read_journal(path) if e["kind"] == kind]


def _dp_rounds(world: World[NodeSandbox], node_id: int, run: int) -> dict[int, dict[str, Any]]:
    """The node's journaled DP rounds of ``run``, by round."""
    entries = _journal(world, node_id, node_events.DpRound.kind)
    return {e["round"]: e for e in entries if e["run_id"] == run}


def _audited(world: World[NodeSandbox], sink: MemoryEventSink) -> list[dict[str, Any]]:
    """The key broker's events and the run's, in time order, as the auditor decodes the
    transparency log's entries."""
    records = [
        *JsonlEventSink(world.deployment.provider.events).read(),
        *(e.to_json() for e in sink.events),
    ]
    records.sort(key=lambda r: dt.datetime.fromisoformat(r["time"]))
    return decode([canonical_entry(r) for r in records])


def test_a_run_asking_a_looser_budget_is_refused_at_hello(
    deployment: LoopbackDeployment, tiny_bert_dir: Path, tmp_path: Path, run_id: int
) -> None:
    """North allows epsilon 2; the run asks 5 of every node: north refuses at the
    handshake with the fixed code privacy-budget-refused and is not admitted; the two
    others train with noise fitted to the run's ask and the round commits without it."""
    tight = PrivacyBudget(epsilon=2.0, delta=DELTA, clip=1.0)
    world = _world(
        deployment, tiny_bert_dir, tmp_path, {"north": tight, "south": PLENTY, "west": None}
    )
    spec = _spec(tiny_bert_dir, dp_epsilon=5.0, output_dir=tmp_path / "job")
    with pytest.raises(PrivacyBudgetRefused, match="dp-epsilon 5") as refused:
        world.sandboxes[NORTH].hello(RunIds(run_id, NORTH), 1, spec)
    assert failure_reason(refused.value).label == REFUSED
    job, _, sink = start_job(world, spec, run_id, FederatedJob)
    job.run()
    # Refused at each handshake: round 1's, then the final evaluation's.
    refusals = [(e.node, e.reason) for e in events_of(sink, events.NodeRefused)]
    assert refusals == [(NORTH, REFUSED)] * 2
    assert sorted(e.node for e in events_of(sink, events.NodeAdmitted)) == sorted((SOUTH, WEST))
    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1]
    accepted = {e.node for e in events_of(sink, events.UpdateAccepted)}
    assert accepted == {SOUTH, WEST}
    (started,) = events_of(sink, events.RunStarted)
    assert started.dp_epsilon == 5.0
    for spent in events_of(sink, events.DpSpent):
        # One round of two steps was planned: its noise spends the run's whole ask.
        assert 0.99 * 5.0 <= spent.epsilon <= 5.0
        assert spent.delta == DELTA
        assert spent.clip == 1.0
    assert {e.node for e in events_of(sink, events.DpSpent)} == accepted
    failed = _journal(world, NORTH, node_events.ClientappFailed.kind)
    assert [e["code"] for e in failed] == [REFUSED] * 2
    assert not _journal(world, NORTH, node_events.DpRound.kind)
    assert [e["code"] for e in _journal(world, SOUTH, node_events.ClientappFailed.kind)] == []


def test_a_budget_spent_mid_run_declines_the_later_rounds_even_after_a_restart(
    deployment: LoopbackDeployment,
    tiny_bert_dir: Path,
    tmp_path: Path,
    run_id: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """North's budget allows one round of the run's mechanism (noise 1.0, two steps):
    it trains round 1, declines rounds 2 and 3 with privacy-budget-exhausted, and the run
    commits every round with the two others. Every accepted update's dp_spent is what the
    node journaled, each run epsilon the accountant's over the rounds so far, and the
    auditor finds no violation. North restarted (a new sandbox on the same config) reads
    its ledger from the journal and declines a new run's round."""
    spec = _spec(
        tiny_bert_dir,
        num_rounds=3,
        dp_noise_multiplier=1.0,
        output_dir=tmp_path / "job",
    )
    rounds = {
        NODE_IDS[name]: _round(spec, NodeConfig.load(deployment.node_configs[name]))
        for name in NAMES
    }
    spent = {
        (k, node_id): _composed(round_, k)
        for node_id, round_ in rounds.items()
        for k in (1, 2, 3, 4)
    }
    one_round = PrivacyBudget(epsilon=(spent[1, NORTH] + spent[2, NORTH]) / 2, delta=DELTA)
    world = _world(
        deployment, tiny_bert_dir, tmp_path, {"north": one_round, "south": PLENTY, "west": PLENTY}
    )
    job, _, sink = start_job(world, spec, run_id, FederatedJob)
    job.run()

    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1, 2, 3]
    declined = [(e.round, e.node, e.reason) for e in events_of(sink, events.NodeDeclined)]
    assert declined == [(2, NORTH, EXHAUSTED), (3, NORTH, EXHAUSTED)]
    accepted = sorted((e.round, e.node) for e in events_of(sink, events.UpdateAccepted))
    assert accepted == sorted([(1, NORTH)] + [(r, n) for r in (1, 2, 3) for n in (SOUTH, WEST)])
    dp_spent = {(e.round, e.node): e for e in events_of(sink, events.DpSpent)}
    assert sorted(dp_spent) == accepted
    for (rnd, node_id), event in dp_spent.items():
        journaled = _dp_rounds(world, node_id, run_id)[rnd]
        assert event.epsilon == journaled["epsilon"]
        assert event.epsilon_total == journaled["epsilon_total"]
        assert Mechanism(event.noise_multiplier, event.sample_rate, event.steps) == rounds[node_id]
        assert event.epsilon == pytest.approx(spent[rnd, node_id], rel=1e-9)
    assert sorted(_dp_rounds(world, NORTH, run_id)) == [1]
    failed = _journal(world, NORTH, node_events.ClientappFailed.kind)
    assert [e["code"] for e in failed] == [EXHAUSTED, EXHAUSTED]
    assert "round 2 would bring" in failed[0]["reason"]
    assert "round 3 would bring" in failed[1]["reason"]
    # The auditor recomputes every logged epsilon with its own accountant and holds each
    # node's journal against the log; one dp_spent with its epsilon halved is caught.
    records = _audited(world, sink)
    assert check_policy(records) == []
    for sandbox in world.sandboxes.values():
        assert sandbox.node.journal_path is not None
        assert crosscheck(records, read_journal(sandbox.node.journal_path), sandbox.node.name) == []
    at = next(i for i, r in enumerate(records) if r[Key.KIND] == events.DpSpent.kind)
    forged = [*records]
    forged[at] = {**records[at], Key.EPSILON: records[at][Key.EPSILON] / 2}
    assert [type(v) for v in check_policy(forged)] == [PrivacyLedgerMismatch]

    config = world.sandboxes[NORTH].node.source
    assert config is not None
    restarted = _started(config)
    assert [s.round for s in ledger_of(restarted.node).rounds] == [1]
    world.sandboxes[NORTH] = restarted
    again_id = _new_run(monkeypatch)
    again = dataclasses.replace(spec, job_id=f"dp-{again_id}", num_rounds=1,
                                output_dir=tmp_path / "again")  # fmt: skip
    job, _, sink = start_job(world, again, again_id, FederatedJob)
    job.run()
    declined = [(e.round, e.node, e.reason) for e in events_of(sink, events.NodeDeclined)]
    assert declined == [(1, NORTH, EXHAUSTED)]
    failed = _journal(world, NORTH, node_events.ClientappFailed.kind)
    assert failed[-1]["code"] == EXHAUSTED
    assert "would bring this node's epsilon" in failed[-1]["reason"]
    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1]
    assert not _dp_rounds(world, NORTH, again_id)
    # South's second run: its own epsilon starts afresh, its node total counts both.
    (south,) = [e for e in events_of(sink, events.DpSpent) if e.node == SOUTH]
    assert south.epsilon == pytest.approx(spent[1, SOUTH], rel=1e-9)
    assert south.epsilon_total == pytest.approx(spent[4, SOUTH], rel=1e-9)


# The training noise skipped: each step's clipped sum leaves as it is.
NOISE_LINE = "p.grad = (summed + std * torch.from_numpy(noise)).view_as(p)"
NO_NOISE_LINE = "p.grad = summed.view_as(p)"
PROBE = """
import json, sys
from pathlib import Path
import clients
from clients.sandbox import NodeSandbox
from sandbox.attestation.measure import code_measurement
from sandbox.config import NodeConfig
print(json.dumps({"clients": clients.__file__, "code": code_measurement()}), flush=True)
try:
    NodeSandbox(NodeConfig.load(Path(sys.argv[1]))).start()
except Exception as exc:
    print(json.dumps({"outcome": type(exc).__name__}))
else:
    print(json.dumps({"outcome": "started"}))
"""


def _sandbox_code(root: Path, *, skip_noise: bool) -> Path:
    """A copy of the measured sandbox code (every package in its scope), with the DP-SGD
    noise skipped or as it is."""
    packages = sorted({p.split("/", 1)[0] for p in SANDBOX_CODE.include} | set(NODE_PACKAGES))
    for package in packages:
        (source,) = (Path(p) for p in importlib.import_module(package).__path__)
        shutil.copytree(source, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    if skip_noise:
        training = root / "clients" / "training.py"
        text = training.read_text(encoding="utf-8")
        assert text.count(NOISE_LINE) == 1
        training.write_text(text.replace(NOISE_LINE, NO_NOISE_LINE), encoding="utf-8")
    return root


def test_a_node_whose_code_skips_the_noise_gets_no_key(
    deployment: LoopbackDeployment, tmp_path: Path
) -> None:
    """The sandbox code with DP-SGD's noise taken out measures differently, so the key
    broker's appraisal of its evidence does not affirm and releases no key: the node
    cannot start. The unmodified copy, run the same way, starts."""
    config = deployment.node_configs["west"]
    broker_log = JsonlEventSink(deployment.provider.events)
    logged_before = len(broker_log.read())
    probes = {}
    for skip in (True, False):
        code = _sandbox_code(tmp_path / ("skipping" if skip else "honest"), skip_noise=skip)
        probes[skip] = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(config)],
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    answers = {}
    for skip, probe in probes.items():
        out, err = probe.communicate(timeout=120)
        assert probe.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        answers[skip] = {k: v for line in lines for k, v in line.items()}
        assert Path(answers[skip]["clients"]).is_relative_to(tmp_path)
    real = code_measurement()
    assert answers[True]["code"] != real
    assert answers[False]["code"] == real
    assert answers[True]["outcome"] == KeyReleaseDenied.__name__
    assert answers[False]["outcome"] == "started"
    # The key broker's log of the two attempts: the honest copy's appraisal affirmed its
    # code for the node and a key was released on it; the other's was contraindicated on
    # its executables (the code measurement is no reference value) and no key left.
    logged = broker_log.read()[logged_before:]
    appraised = {
        e["status"]: e
        for e in logged
        if e["kind"] == AttestationAppraised.kind and e["purpose"] == PURPOSE_KEY_RELEASE
    }
    assert sorted(appraised) == [AFFIRMING, CONTRAINDICATED]
    honest, skipping = appraised[AFFIRMING], appraised[CONTRAINDICATED]
    assert honest["measurements"]["code"] == real
    assert honest["ueid"] == NodeConfig.load(config).require_sandbox().ueid
    assert skipping["failure"] == MeasurementRejected.__name__
    assert skipping["trustworthiness"]["executables"] == TIER_VALUE[CONTRAINDICATED]
    released = [e["ear_sha256"] for e in logged if e["kind"] == KeyReleased.kind]
    denied = [e["ear_sha256"] for e in logged if e["kind"] == KeyDenied.kind]
    assert released == [honest["ear_sha256"]]
    assert denied == [skipping["ear_sha256"]]


def test_secure_aggregation_logs_each_masked_inputs_dp_round(
    deployment: LoopbackDeployment, tiny_bert_dir: Path, tmp_path: Path, run_id: int
) -> None:
    """Record-level DP under secure aggregation: every node whose masked input the round
    sums has a dp_spent event, the round its journal records."""
    world = _world(deployment, tiny_bert_dir, tmp_path, dict.fromkeys(NAMES, PLENTY))
    spec = _spec(
        tiny_bert_dir, mode="secagg", dp_noise_multiplier=1.0,
        output_dir=tmp_path / "job",
    )  # fmt: skip
    job, _, sink = start_job(world, spec, run_id, SecureJob)
    job.run()
    (mask,) = [e for e in events_of(sink, events.SecaggStage) if e.stage == STAGE_MASK]
    assert sorted(listed(mask.nodes)) == sorted(NODE_IDS.values())
    dp_spent = {e.node: e for e in events_of(sink, events.DpSpent)}
    assert sorted(dp_spent) == sorted(listed(mask.nodes))
    for node_id, event in dp_spent.items():
        assert event.round == 1
        assert event.epsilon == _dp_rounds(world, node_id, run_id)[1]["epsilon"]
    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1]
    assert not events_of(sink, events.DpAggregate)


def test_client_level_dp_under_secure_aggregation(
    deployment: LoopbackDeployment, tiny_bert_dir: Path, tmp_path: Path, run_id: int
) -> None:
    """Client-level DP under secure aggregation: each node adds its share of the noise
    (std noise x clip / sqrt(threshold)) before masking, the round commits an aggregate
    that carries the noise, and the provider logs its epsilon."""
    world = _world(deployment, tiny_bert_dir, tmp_path, dict.fromkeys(NAMES))
    sigma, clip = 1.0, 0.5
    spec = _spec(
        tiny_bert_dir, mode="secagg", dp_client_noise=sigma, dp_client_clip=clip,
        output_dir=tmp_path / "job",
    )  # fmt: skip
    job, _, sink = start_job(world, spec, run_id, SecureJob)
    job.run()
    (advertised,) = events_of(sink, events.SecaggAdvertised)
    t = threshold(len(listed(advertised.nodes)), spec.secagg_threshold)
    for node_id in world.sandboxes:
        (added,) = [
            e
            for e in _journal(world, node_id, node_events.ClientNoiseAdded.kind)
            if e["run_id"] == run_id
        ]
        assert added["client_noise_std"] == pytest.approx(sigma * clip / math.sqrt(t))
        assert (added["noise_multiplier"], added["clip"], added["round"]) == (sigma, clip, 1)
    (aggregate,) = events_of(sink, events.DpAggregate)
    assert aggregate.epsilon == client_epsilon(sigma, 1, spec.dp_delta)
    assert (aggregate.round, aggregate.nodes) == (1, 3)
    assert [e.round for e in events_of(sink, events.AggregateCommitted)] == [1]
    assert not events_of(sink, events.DpSpent)
    # The committed mean moved by the noise: three shares of std sigma x clip / sqrt(t)
    # over three nodes, far beyond the clipped updates' share of it.
    store = CheckpointStore(tmp_path / "job" / "checkpoints")
    before, after = (load_file(store.adapter_path(r)) for r in (0, 1))
    moved = np.concatenate(
        [(after[n] - before[n]).ravel() for n in after if is_trained(n, spec.lora_mode)]
    )
    expected = sigma * clip * math.sqrt(3 / t) / 3
    assert 0.8 * expected < float(moved.std()) < 1.2 * expected


def test_a_causal_lm_rows_loss_does_not_depend_on_the_other_rows(tiny_llama_dir: Path) -> None:
    """DP-SGD's sensitivity counts on each row's gradient being its own: the batch loss it
    differentiates is the mean of each row's own mean token loss, so a batch's loss is the
    mean of its rows' losses alone. Hugging Face's loss (the mean over every token of the
    batch) is not: a long row would weigh the others down (the negative control)."""
    from clients.training import _example_mean_loss, encode

    spec = make_spec(tiny_llama_dir, task="causal-lm", labels=(), max_length=48)
    torch.manual_seed(0)
    model, tokenizer = _model(spec)
    short = Example("Summarise:", "ok")
    long = Example("Write out:", "a much longer completion with many more tokens in it")
    with torch.no_grad():
        alone = [
            float(_example_mean_loss(model, encode([e], tokenizer, spec), spec))
            for e in (short, long)
        ]
        batch = encode([short, long], tokenizer, spec)
        together = float(_example_mean_loss(model, batch, spec))
        pooled = float(model(**batch.inputs, labels=batch.labels).loss)
    counts = (batch.labels[:, 1:] != -100).sum(dim=1).tolist()
    assert together == pytest.approx(sum(alone) / 2, rel=1e-4)
    # Hugging Face's: each row weighed by its token count, so by the other rows' lengths.
    assert counts[1] >= 3 * counts[0]
    weighted = (counts[0] * alone[0] + counts[1] * alone[1]) / sum(counts)
    assert pooled == pytest.approx(weighted, rel=1e-4)
    assert abs(pooled - together) > 10 * abs(together - sum(alone) / 2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dp_noise_multiplier": 1e-300}, "dp-noise-multiplier"),
        ({"dp_client_noise": 0.05}, "dp-client-noise"),
        ({"mode": "secagg", "dp_client_noise": 1.0, "secagg_clip": 4.0}, "secagg-clip"),
    ],
)
def test_noise_too_small_to_protect_or_cut_by_secagg_is_refused(
    tiny_bert_dir: Path, overrides: dict[str, Any], key: str
) -> None:
    """A noise multiplier of almost nothing protects nothing (and overflows the
    accountants); a client-level noise share wider than secure aggregation's value range
    would be cut, so the noise would not be what the accountant counts."""
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        make_spec(tiny_bert_dir, labels=LABELS, **overrides)
    make_spec(tiny_bert_dir, labels=LABELS, mode="secagg", dp_client_noise=1.0, secagg_clip=8.0)


# -- hostile DP reports (a node to the provider) and budgets (the operator's file) ------


@pytest.fixture(name="as_serverapp")
def as_serverapp_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages only inside a ServerApp's process identity."""
    serverapp_identity(monkeypatch, 1)


def _reply(metrics: dict[str, float]) -> Message:
    """A reply as a hostile node may shape it: only its metrics matter here."""
    return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), 7, MessageType.TRAIN)


def _honest_report(spec: RunSpec) -> dict[str, float]:
    return {
        DP_NOISE_MULTIPLIER: 1.0,
        DP_SAMPLE_RATE: 0.1,
        DP_STEPS: float(spec.local_steps),
        DP_CLIP: spec.dp_clip,
        DP_DELTA: spec.dp_delta,
        DP_EPSILON: 2.0,
        DP_EPSILON_TOTAL: 3.0,
        DP_BUDGET: 8.0,
    }


@pytest.mark.parametrize(
    "hostile",
    [
        {DP_EPSILON: math.nan},
        {DP_EPSILON: math.inf},
        {DP_NOISE_MULTIPLIER: 0.0},
        {DP_NOISE_MULTIPLIER: -1.0},
        {DP_SAMPLE_RATE: 1.5},
        {DP_STEPS: 1.0},  # not the run's local steps
        {DP_EPSILON: 4.0},  # above its own total
        {DP_EPSILON_TOTAL: 9.0},  # above its own budget
        {DP_EPSILON: 6.0, DP_EPSILON_TOTAL: 6.0},  # above the run's ask (5)
        {DP_DELTA: 1e-3},  # looser than the run's delta
        {DP_CLIP: 10.0},  # looser than the run's clip
        {DP_BUDGET: -1.0},
    ],
)
@pytest.mark.usefixtures("as_serverapp")
def test_a_hostile_dp_report_is_rejected_never_logged(
    tiny_bert_dir: Path, hostile: dict[str, float]
) -> None:
    """What a node reports of its DP round is another party's numbers: anything that is
    not a mechanism within its own budget and the run's ask rejects the update."""
    spec = make_spec(tiny_bert_dir, labels=LABELS, dp_epsilon=5.0)
    assert reported_spending(_reply(_honest_report(spec)), spec) is not None
    with pytest.raises(UpdateRejected):
        reported_spending(_reply({**_honest_report(spec), **hostile}), spec)


@pytest.mark.usefixtures("as_serverapp")
def test_a_dp_run_rejects_an_update_without_its_report_or_with_half_of_it(
    tiny_bert_dir: Path,
) -> None:
    spec = make_spec(tiny_bert_dir, labels=LABELS, dp_epsilon=5.0)
    with pytest.raises(UpdateRejected, match="reports no DP round"):
        reported_spending(_reply({"num-examples": 10.0}), spec)
    partial = {k: v for k, v in _honest_report(spec).items() if k != DP_BUDGET}
    with pytest.raises(UpdateRejected, match="without"):
        reported_spending(_reply(partial), spec)
    plain = make_spec(tiny_bert_dir, labels=LABELS)
    assert reported_spending(_reply({"num-examples": 10.0}), plain) is None


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("privacy = 3", "node.privacy"),
        ("[node.privacy]\ndelta = 1e-5", "node.privacy.epsilon"),
        ("[node.privacy]\nepsilon = -1.0", "node.privacy.epsilon"),
        ("[node.privacy]\nepsilon = nan", "node.privacy.epsilon"),
        ("[node.privacy]\nepsilon = 8.0\nbudget = 9", "node.privacy.budget"),
    ],
)
def test_a_bad_privacy_table_names_its_key(tmp_path: Path, table: str, key: str) -> None:
    path = tmp_path / "node.toml"
    head = '[node]\nname = "n"\ndata-path = "d.jsonl"\njournal = "j.jsonl"\n'
    if not table.startswith("["):
        head += table + "\n"
        table = ""
    path.write_text(head + table + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}'")):
        NodeConfig.load(path)


def test_a_budget_without_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nname = "n"\ndata-path = "d.jsonl"\n\n[node.privacy]\nepsilon = 8.0\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"key 'node\.journal'"):
        NodeConfig.load(path)
