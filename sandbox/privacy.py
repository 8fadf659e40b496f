"""Differential privacy: what a node's records may be spent on, and what each round costs.

Record-level DP-SGD (``clients/training.py``) clips each example's gradient to ``clip``
and adds Gaussian noise of ``noise_multiplier`` x clip to each step's sum, on batches
drawn by Poisson sampling at ``sample_rate``. Its cost is counted by Opacus's RDP
accountant over every round the node has trained (its ledger, kept in the node's
journal), so the budget in ``[node.privacy]`` covers all runs on the node's records.

:func:`resolve` turns a run's ask and the node's budget into the settings a run trains
with, refusing a looser ask; :class:`Ledger` says what a further round would cost and
refuses one that would pass the budget. The provider's client-level accountant
(:func:`client_epsilon`) is the same accountant with every node taking part each round.

The auditor recomputes every logged epsilon with another implementation (Google's
``dp-accounting``, ``sandbox/ops/translog/audit.py``), so these numbers are checked,
not trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sandbox.config import (
    NodeConfig,
    PrivacyBudget,
    RunSpec,
)
from sandbox.errors import PrivacyBudgetExhausted, PrivacyBudgetRefused

# The RDP orders every accountant here minimises over: integers only, where Opacus's RDP
# and the auditor's (Google's dp-accounting) are computed exactly, so the two agree; at
# fractional orders each approximates its own way (dp-accounting's series may give up).
RDP_ORDERS = (*range(2, 65), 80, 96, 128, 160, 192, 256)
# Relative slack for float rounding when comparing an epsilon with a budget.
SLACK = 1e-9
# The largest noise multiplier fitted: beyond it training is noise alone.
MAX_NOISE = 1e4


@dataclass(frozen=True)
class Mechanism:
    """One round's DP-SGD: ``steps`` Poisson-sampled steps at ``sample_rate``, Gaussian
    noise of ``noise_multiplier`` x the clip."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_of(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Epsilon (at ``delta``) of the mechanisms composed, by Opacus's RDP accountant over
    :data:`RDP_ORDERS`."""
    from opacus.accountants import RDPAccountant

    steps: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        if m.steps > 0:  # rounds of one mechanism compose as their steps added up
            key = (m.noise_multiplier, m.sample_rate)
            steps[key] = steps.get(key, 0) + m.steps
    if not steps:
        return 0.0
    if any(sigma <= 0 for sigma, _ in steps):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, n) for (sigma, rate), n in steps.items()]
    return float(accountant.get_epsilon(delta, alphas=list(RDP_ORDERS)))


def fit_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` steps at ``sample_rate`` spend at most
    ``epsilon`` (Opacus's search, with its RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=min(0.01, epsilon / 100),
            alphas=list(RDP_ORDERS),
        )
    except ValueError as exc:  # Opacus: the target cannot be reached below its ceiling
        raise PrivacyBudgetRefused(
            f"no noise multiplier spends at most epsilon {epsilon:g} (delta {delta:g}) over "
            f"{steps} steps at sampling rate {sample_rate:.4g}: {exc}"
        ) from exc
    if not 0 < sigma <= MAX_NOISE:
        raise PrivacyBudgetRefused(
            f"epsilon {epsilon:g} over {steps} steps needs noise multiplier {sigma:g}, "
            f"beyond {MAX_NOISE:g}: the training would be noise alone"
        )
    return float(sigma)


def sample_rate(batch_size: int, examples: int) -> float:
    """Poisson sampling rate that gives batches of ``batch_size`` on average."""
    if examples <= 0:
        raise PrivacyBudgetRefused("no training examples: nothing to train privately")
    return min(1.0, batch_size / examples)


@dataclass(frozen=True)
class Settings:
    """What a run trains with on this node: its epsilon (``run_epsilon``, the run's ask or
    the node's budget), the node's total ``budget`` (infinite when it declares none: its
    total is still counted and reported), delta and the per-example clip, and
    the noise multiplier (fixed by the run, or fitted to spend ``run_epsilon`` over the
    run's planned steps)."""

    run_epsilon: float
    budget: float  # inf: the node declares none (only the run's ask bounds the run)
    delta: float
    clip: float
    noise_multiplier: float
    sample_rate: float

    def mechanism(self, steps: int) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, steps)

    @property
    def declared(self) -> float | None:
        """The node's declared budget; None when it declares none."""
        return self.budget if math.isfinite(self.budget) else None


def _looser(what: str, asked: float, allowed: float, key: str) -> PrivacyBudgetRefused:
    return PrivacyBudgetRefused(
        f"the run asks {key} {asked:g}, looser than this node's budget ({what} {allowed:g} "
        "in [node.privacy]); the node takes no part in it"
    )


def check_ask(spec: RunSpec, budget: PrivacyBudget | None) -> None:
    """A run may be stricter than the node's budget, never looser: a larger
    ``dp-epsilon``, ``dp-delta`` or ``dp-clip`` is refused (PrivacyBudgetRefused)."""
    if budget is None or spec.dp_epsilon <= 0:
        return
    if spec.dp_epsilon > budget.epsilon:
        raise _looser("epsilon", spec.dp_epsilon, budget.epsilon, "dp-epsilon")
    if spec.dp_delta > budget.delta:
        raise _looser("delta", spec.dp_delta, budget.delta, "dp-delta")
    if spec.dp_clip > budget.clip:
        raise _looser("clip", spec.dp_clip, budget.clip, "dp-clip")


def resolve(spec: RunSpec, budget: PrivacyBudget | None, examples: int) -> Settings | None:
    """The record-level DP settings of ``spec`` on a node with ``budget`` and ``examples``
    training rows; None when neither the run nor the node asks for DP. A looser ask than
    the budget is refused (:func:`check_ask`)."""
    asked = spec.dp_epsilon > 0
    if budget is None and not asked:
        return None
    check_ask(spec, budget)
    if budget is None:
        run_epsilon, total = spec.dp_epsilon, math.inf
        delta, clip = spec.dp_delta, spec.dp_clip
    elif asked:
        run_epsilon, total = spec.dp_epsilon, budget.epsilon
        delta, clip = spec.dp_delta, spec.dp_clip
    else:
        run_epsilon = total = budget.epsilon
        delta, clip = budget.delta, budget.clip
    rate = sample_rate(spec.batch_size, examples)
    sigma = spec.dp_noise_multiplier or fit_noise(
        run_epsilon, delta, rate, spec.num_rounds * spec.local_steps
    )
    return Settings(run_epsilon, total, delta, clip, sigma, rate)


@dataclass(frozen=True)
class Spent:
    """A round the node trained with DP: whose run, which round, and its mechanism."""

    run: int
    round: int
    mechanism: Mechanism
    delta: float


@dataclass
class Ledger:
    """Every DP round this node trained (from its journal's ``dp_round`` entries), and
    what another would cost."""

    rounds: list[Spent] = field(default_factory=list)

    def cost(self, run: int, rnd: int, settings: Settings, steps: int) -> tuple[float, float]:
        """Epsilon of run ``run`` and of everything, with round ``rnd`` (``steps`` steps)
        added; PrivacyBudgetExhausted when either passes its bound. A round trained again
        (its instruction sent twice) counts again: both updates left the node, and the
        mean of two noisy updates of one round has less noise than either."""
        added = settings.mechanism(steps)
        mine = [s.mechanism for s in self.rounds if s.run == run]
        every = [s.mechanism for s in self.rounds]
        run_epsilon = epsilon_of([*mine, added], settings.delta)
        # Only this run's rounds in the ledger: the total is the run's epsilon.
        total = (
            run_epsilon if len(mine) == len(every) else epsilon_of([*every, added], settings.delta)
        )
        if run_epsilon > settings.run_epsilon * (1 + SLACK):
            raise PrivacyBudgetExhausted(
                f"run {run} round {rnd} would bring the run's epsilon to {run_epsilon:.4g}, "
                f"more than the {settings.run_epsilon:g} it may spend; the round is declined"
            )
        if total > settings.budget * (1 + SLACK):
            raise PrivacyBudgetExhausted(
                f"run {run} round {rnd} would bring this node's epsilon to {total:.4g}, more "
                f"than its budget {settings.budget:g}; the round is declined"
            )
        return run_epsilon, total

    def add(self, spent: Spent) -> None:
        """Record a trained round."""
        self.rounds.append(spent)


def ledger_of(node: NodeConfig) -> Ledger:
    """The node's ledger, read from its journal (its signatures checked)."""
    from sandbox.events import DpRound, Key
    from sandbox.journal import read_journal

    ledger = Ledger()
    path = node.journal_path
    if path is None or not path.exists():
        return ledger
    for entry in read_journal(path):
        if entry.get(Key.KIND) != DpRound.kind:
            continue
        ledger.add(
            Spent(
                run=int(entry[Key.RUN_ID]),
                round=int(entry[Key.ROUND]),
                mechanism=Mechanism(
                    float(entry[Key.NOISE_MULTIPLIER]),
                    float(entry[Key.SAMPLE_RATE]),
                    int(entry[Key.STEPS]),
                ),
                delta=float(entry[Key.DELTA]),
            )
        )
    return ledger


def client_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Client-level epsilon of ``rounds`` aggregates, each the sum of clipped updates of
    every node plus Gaussian noise of ``noise_multiplier`` x the clip (no sampling of
    nodes is counted on: every admitted node takes part in every round)."""
    return epsilon_of([Mechanism(noise_multiplier, 1.0, rounds)], delta)


def noise_share_std(noise_multiplier: float, clip: float, threshold: int) -> float:
    """The standard deviation of one node's share of the aggregate's client-level noise
    under secure aggregation: ``threshold`` shares sum to the whole noise (variance
    (noise_multiplier x clip)^2), so any round the aggregator can unmask carries at
    least all of it."""
    return noise_multiplier * clip / math.sqrt(threshold)


def client_noise_share(delta: np.ndarray, clip: float, std: float, value_clip: float) -> np.ndarray:
    """``delta`` clipped to ``clip`` (L2) plus Gaussian noise of ``std`` per element
    (fresh OS entropy), each element then kept within ``value_clip`` (the fixed-point
    range of secure aggregation: a rare noise value beyond it is cut, not refused)."""
    values = np.asarray(delta, np.float64)
    norm = float(np.linalg.norm(values))
    if norm > clip:
        values = values * (clip / norm)
    noisy = values + np.random.default_rng().normal(0.0, std, values.shape)
    return np.clip(noisy, -value_clip, value_clip)
