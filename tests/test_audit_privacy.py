"""The auditor's differential-privacy rules: ``ark audit verify`` recomputes every epsilon
a node or the provider logs with an accountant of its own (Google's dp-accounting, where
the node uses Opacus) and finds rounds missing from the ledger, ``ark audit report``
shows each node's spending, and ``ark audit crosscheck`` holds a node's privacy ledger
(its journal's ``dp_round`` entries) against the log. Logs are real signed SQLite logs of
honest DP runs (:func:`tests.loghistory.with_dp`, epsilons by the node's own accountant);
each attack is the provider logging wrong numbers, so the log itself stays sound (its
Merkle tree is valid) and only the policy fails, with exit 42."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sandbox.canonical import canonical_entry
from sandbox.errors import (
    EntryTampered,
    JournalMismatch,
    PrivacyLedgerMismatch,
)
from sandbox.events import (
    AggregateCommitted,
    DpAggregate,
    DpRound,
    DpSpent,
    Key,
    RoundStarted,
    RunStarted,
    UpdateAccepted,
)
from sandbox.ops.cli import app
from sandbox.ops.translog.audit import (
    EPSILON_RTOL,
    Composition,
    check_policy,
    crosscheck,
    privacy_spending,
)
from sandbox.ops.translog.report import render_report
from sandbox.privacy import Mechanism, epsilon_of
from tests.loghistory import (
    DP_BUDGET,
    DP_CLIENT_NOISE,
    DP_ROUND,
    SECURE_RUN,
    TIME,
    audit_cli,
    build_log,
    digest,
    dp_journal,
    dp_run_events,
    honest_history,
    log_violations,
    new_signer,
    run_events,
    secure_node,
    secure_run_events,
    ueid_of,
    with_dp,
    write_journal,
)

runner = CliRunner()
Events = list[dict[str, Any]]
RUN, LATER = 5, 6  # two DP runs of the same three nodes


def _history() -> Events:
    """Two DP runs of nodes 1-3 (the second's totals count the first's rounds), the
    first with client-level DP too."""
    first = dp_run_events(RUN, client_noise=DP_CLIENT_NOISE)
    earlier = {node: [DP_ROUND] * 3 for node in (1, 2, 3)}
    return honest_history() + first + dp_run_events(LATER, before=earlier)


def _secure_history() -> Events:
    """A secure run with record-level DP: node-2 drops in round 1, so three dp_spent."""
    return honest_history() + with_dp(secure_run_events(nodes=4, dropped={1: 2}))


def _at(events: Events, kind: str, run: int = RUN, **match: Any) -> int:
    """The index of the first ``kind`` event of ``run`` whose fields equal ``match``."""
    return next(
        i
        for i, e in enumerate(events)
        if e[Key.KIND] == kind
        and e.get(Key.RUN) == run
        and all(e[k] == v for k, v in match.items())
    )


# -- the accountants -------------------------------------------------------------------------


def test_the_audits_accountant_agrees_with_the_nodes_within_its_tolerance() -> None:
    """Over a grid of mechanisms the node's epsilon (Opacus) and the audit's (dp-accounting,
    another implementation) agree: both account over the same integer RDP orders, where
    each computes the subsampled Gaussian exactly, so what is left is float rounding, far
    inside the audit's 1% tolerance."""
    worst = 0.0
    for sigma, rate, steps in itertools.product(
        (0.5, 0.8, 1, 2, 4), (0.01, 0.1, 0.5, 1), (1, 12, 100)
    ):
        nodes = epsilon_of([Mechanism(sigma, rate, steps)], 1e-5)
        lower, upper = Composition([(sigma, rate, steps)]).epsilon(1e-5)
        assert lower == upper
        worst = max(worst, abs(lower - nodes) / nodes)
    assert worst < 1e-9 < EPSILON_RTOL


def test_a_composition_adds_rounds_of_different_mechanisms() -> None:
    """A node's rounds may differ (another noise, another sampling rate): the audit
    composes each with its own, as the node's accountant does."""
    rounds = [Mechanism(1.1, 0.05, 10), Mechanism(2.0, 0.1, 5), Mechanism(1.1, 0.05, 10)]
    lower, upper = Composition(
        (m.noise_multiplier, m.sample_rate, m.steps) for m in rounds
    ).epsilon(1e-5)
    assert lower == pytest.approx(epsilon_of(rounds, 1e-5), rel=1e-3)
    assert upper == lower


# -- ark audit verify ------------------------------------------------------------------------


def test_an_honest_dp_history_verifies(tmp_path: Path) -> None:
    events = _history()
    result = audit_cli(tmp_path, events, "verify")
    assert result.exit_code == 0, result.output
    assert "ok: Policy across events" in result.output
    assert sum(e[Key.KIND] == DpSpent.kind for e in events) == 18
    assert sum(e[Key.KIND] == DpAggregate.kind for e in events) == 3


def test_an_honest_secure_dp_run_verifies(tmp_path: Path) -> None:
    assert log_violations(tmp_path, _secure_history()) == []


def _lower_epsilon(events: Events) -> None:
    """The provider logs node-2's round 2 as costing 30% less than the node reported."""
    at = _at(events, DpSpent.kind, round=2, node=2)
    events[at] = {**events[at], Key.EPSILON: events[at][Key.EPSILON] * 0.7}


def _delete_a_round(events: Events) -> None:
    """Node-2's last round leaves no trace in the ledger: its update is still accepted."""
    del events[_at(events, DpSpent.kind, round=3, node=2)]


def _over_budget(events: Events) -> None:
    """Node-1 declares a budget of 1: the run spends more of its records."""
    for at, event in enumerate(events):
        if event[Key.KIND] == DpSpent.kind and event[Key.NODE] == 1:
            events[at] = {**event, Key.BUDGET: 1.0}


def _total_below_the_run(events: Events) -> None:
    at = _at(events, DpSpent.kind, round=2, node=2)
    events[at] = {**events[at], Key.EPSILON_TOTAL: events[at][Key.EPSILON] / 2}


def _total_over_budget(events: Events) -> None:
    """Node-3's budget covers each run's epsilon but not both runs': its later total
    passes it."""
    last = events[_at(events, DpSpent.kind, run=LATER, round=3, node=3)]
    budget = (last[Key.EPSILON] + last[Key.EPSILON_TOTAL]) / 2
    for at, event in enumerate(events):
        if event[Key.KIND] == DpSpent.kind and (event[Key.RUN], event[Key.NODE]) == (LATER, 3):
            events[at] = {**event, Key.BUDGET: budget}


def _over_the_runs_ask(events: Events) -> None:
    """The run asks epsilon 1.5 of each node; the nodes spend more."""
    at = _at(events, RunStarted.kind)
    events[at] = {**events[at], Key.DP_EPSILON: 1.5}


def _total_leaves_out_a_run(events: Events) -> None:
    """In the second run the nodes' totals count that run only: the log shows the first."""
    later = _at(events, RunStarted.kind, run=LATER)
    events[later:] = dp_run_events(LATER)


def _duplicate_a_round(events: Events) -> None:
    at = _at(events, DpSpent.kind, round=2, node=1)
    events.insert(at + 1, events[at])


def _swap_two_rounds(events: Events) -> None:
    first, second = (_at(events, DpSpent.kind, round=r, node=3) for r in (1, 2))
    events[first], events[second] = events[second], events[first]


def _lower_client_epsilon(events: Events) -> None:
    at = _at(events, DpAggregate.kind, round=2)
    events[at] = {**events[at], Key.EPSILON: events[at][Key.EPSILON] * 0.7}


def _delete_a_noisy_aggregate(events: Events) -> None:
    del events[_at(events, DpAggregate.kind, round=3)]


def _a_masked_input_without_its_round(events: Events) -> None:
    """A secure round: node-3's masked input is summed, its dp_spent left out."""
    del events[_at(events, DpSpent.kind, run=SECURE_RUN, round=1, node=secure_node(3))]


ATTACKS: dict[str, tuple[Callable[[], Events], Callable[[Events], None], str]] = {
    "an epsilon lowered by 30%": (
        _history,
        _lower_epsilon,
        f"run {RUN} round 2 node 2's dp_spent logs epsilon",
    ),
    "a round's dp_spent deleted": (
        _history,
        _delete_a_round,
        f"run {RUN} round 3: an update accepted from node 2, with no dp_spent",
    ),
    "an epsilon over the node's budget": (_history, _over_budget, "over the node's budget 1"),
    "a total below the run's epsilon": (
        _history,
        _total_below_the_run,
        f"run {RUN} round 2 node 2's dp_spent logs a total epsilon",
    ),
    "a total over the node's budget": (
        _history,
        _total_over_budget,
        f"run {LATER} round 3 node 3's dp_spent logs a total epsilon",
    ),
    "an epsilon over the run's ask": (_history, _over_the_runs_ask, "over the 1.5 the run asks"),
    "a total that leaves out an earlier run": (
        _history,
        _total_leaves_out_a_run,
        "its total leaves out spending the log itself shows",
    ),
    "a round logged twice": (_history, _duplicate_a_round, "node 1's dp_spent logged twice"),
    "rounds out of order": (_history, _swap_two_rounds, "node 3's dp_spent logged after round 2"),
    "a client-level epsilon lowered": (
        _history,
        _lower_client_epsilon,
        f"run {RUN} round 2's dp_aggregate logs client-level epsilon",
    ),
    "a noisy aggregate not logged": (
        _history,
        _delete_a_noisy_aggregate,
        f"run {RUN} round 3: the run asks client-level DP (dp_client_noise), and the aggregate "
        "has no dp_aggregate",
    ),
    "a secure round's masked input without its dp_spent": (
        _secure_history,
        _a_masked_input_without_its_round,
        f"run {SECURE_RUN} round 1: a masked input taken from node {secure_node(3)}, with no "
        "dp_spent",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_ledger_that_does_not_hold_up_fails_the_audit_with_exit_42(
    tmp_path: Path, attack: str
) -> None:
    history, change, message = ATTACKS[attack]
    events = history()
    change(events)
    violations = log_violations(tmp_path / "log", events)
    assert violations
    assert {type(v) for v in violations} == {PrivacyLedgerMismatch}, violations
    assert any(message in str(v) for v in violations), violations
    result = audit_cli(tmp_path, events, "verify")
    assert result.exit_code == PrivacyLedgerMismatch.exit_code == 42, result.output
    assert message in " ".join(result.output.split())


def test_an_epsilon_over_the_budget_names_it_and_the_total() -> None:
    events = _history()
    _over_budget(events)
    last = events[_at(events, DpSpent.kind, round=3, node=1)]
    found = {str(v) for v in check_policy(events)}
    where = f"run {RUN} round 3 node 1's dp_spent logs"
    assert any(
        f"{where} epsilon {last[Key.EPSILON]:.4g}, over the node's budget 1" in v for v in found
    )
    total = f"{where} a total epsilon {last[Key.EPSILON_TOTAL]:.4g}, over the node's budget 1"
    assert any(total in v for v in found), found


def test_an_edited_stored_dp_spent_is_tampering(tmp_path: Path) -> None:
    """Editing a dp_spent in the database, not through the provider, breaks the signed
    tree: exit 23, before any policy is read."""
    events = _history()
    at = _at(events, DpSpent.kind, round=2, node=2)
    signer = new_signer()
    db = tmp_path / "translog.db"
    build_log(db, events, signer).close()
    edited = canonical_entry({**events[at], Key.EPSILON: events[at][Key.EPSILON] * 0.7})
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE entries SET entry = ? WHERE idx = ?", (edited, at))
    vkey = tmp_path / "log.vkey"
    vkey.write_text(signer.verifier.vkey() + "\n", encoding="utf-8")
    result = runner.invoke(app, ["audit", "verify", "--log", str(db), "--key", str(vkey)])
    assert result.exit_code == EntryTampered.exit_code == 23, result.output
    assert f"EntryTampered: entry {at} " in result.output


def test_a_restarted_serverapp_may_log_a_round_again(tmp_path: Path) -> None:
    """Round 2's updates and dp_spent were logged, then the ServerApp restarted (resuming
    after round 1) and ran round 2 again: both trainings left the node, so its ledger
    counts both (the re-run round's epsilon composes three rounds), and so does the audit.
    Without the restart the same entries log round 2 twice."""
    events = run_events(RUN)
    start = _at(events, RoundStarted.kind, round=2)
    end = _at(events, AggregateCommitted.kind, round=2)
    again = [
        {**e, Key.ENVELOPE_SHA256: digest("again", e[Key.ROUND], e[Key.NODE])}
        if e[Key.KIND] == UpdateAccepted.kind
        else e
        for e in events[start:end]
    ]
    committed = events[end]
    envelopes = [e[Key.ENVELOPE_SHA256] for e in again if e[Key.KIND] == UpdateAccepted.kind]
    restart = {**events[_at(events, RunStarted.kind)], Key.RESUMED_AFTER_ROUND: 1}
    events[end : end + 1] = [restart, *again, {**committed, Key.UPDATES: envelopes}]
    events = with_dp(events)
    assert check_policy(events) == []
    restarted = [i for i, e in enumerate(events) if e[Key.KIND] == RunStarted.kind][1]
    del events[restarted]
    violations = check_policy(events)
    assert violations
    assert {type(v) for v in violations} == {PrivacyLedgerMismatch}, violations
    assert all("logged twice" in str(v) for v in violations), violations


@pytest.mark.parametrize(
    "odd",
    [
        {Key.EPSILON: "2.2"},
        {Key.NOISE_MULTIPLIER: 0},
        {Key.SAMPLE_RATE: 1.5},
        {Key.STEPS: True},
        {Key.ROUND: None},
        {Key.DELTA: [1e-5]},
        {Key.NOISE_MULTIPLIER: 1e-300},
        {Key.NOISE_MULTIPLIER: 1e300},
        {Key.STEPS: 10**400},
        {Key.STEPS: 0},
    ],
)
def test_an_odd_dp_spent_is_a_violation_not_a_crash(odd: dict[str, Any]) -> None:
    """A log is untrusted: a dp_spent whose numbers are missing, odd-typed or no
    mechanism is reported, and the report and the cross-check read it without failing."""
    events = _history()
    journal = dp_journal(events, 1)
    at = _at(events, DpSpent.kind, round=3, node=1)
    events[at] = {**events[at], **odd}
    violations = check_policy(events)
    assert violations
    assert {type(v) for v in violations} == {PrivacyLedgerMismatch}, violations
    assert privacy_spending(events)
    assert crosscheck(events, journal, "j")


# -- ark audit report ------------------------------------------------------------------------


def _page(events: Events) -> str:
    return render_report(
        events,
        origin="ark-sandbox.local/log",
        size=len(events),
        root_hex="",
        checks=[],
        problems=[],
        generated_at=TIME.isoformat(),
    )


def test_the_report_shows_each_nodes_epsilon() -> None:
    events = _history()
    page = _page(events)
    assert '<section id="privacy"><h2>Differential privacy</h2>' in page
    spent = {(e[Key.RUN], e[Key.NODE]): e for e in events if e[Key.KIND] == DpSpent.kind}
    for (run, node), last in spent.items():
        ueid = ueid_of(f"node-{node}")
        row = (
            f'<tr><td>{run}</td><td>{node}</td><td><code title="{ueid}">{ueid[:12]}…</code>'
            f"</td><td>3</td><td>1.100</td><td>0.0500</td><td>10</td><td>1</td><td>1e-05</td>"
            f"<td>{last[Key.EPSILON]:.3f}</td><td>{last[Key.EPSILON]:.3f}</td>"
            f"<td>{last[Key.EPSILON_TOTAL]:.3f}</td><td>{DP_BUDGET:g}</td></tr>"
        )
        assert row in page, row
    (client,) = [e for e in events if e[Key.KIND] == DpAggregate.kind and e[Key.ROUND] == 3]
    assert f"<tr><td>{RUN}</td><td>3</td><td>1.500</td><td>1</td><td>1e-05</td>" in page
    assert f"<td>{client[Key.EPSILON]:.3f}</td>" in page
    assert "differs" not in page


def test_the_report_marks_an_epsilon_the_audit_does_not_reproduce() -> None:
    events = _history()
    _lower_epsilon(events)
    page = _page(events)
    assert page.count("differs") == 1


def test_the_report_without_dp_says_so() -> None:
    page = _page(honest_history())
    assert "The log records no differential-privacy spending." in page


# -- ark audit crosscheck --------------------------------------------------------------------


def _crosscheck(tmp_path: Path, entries: Events, events: Events) -> Any:
    journal = write_journal(tmp_path / "node", entries)
    return audit_cli(tmp_path, events, "crosscheck", "--journal", journal)


@pytest.mark.parametrize("node", [1, 2, 3])
def test_honest_privacy_ledgers_crosscheck(tmp_path: Path, node: int) -> None:
    events = _history()
    entries = dp_journal(events, node)
    assert sum(e[Key.KIND] == DpRound.kind for e in entries) == 6
    result = _crosscheck(tmp_path, entries, events)
    assert result.exit_code == 0, result.output


def test_a_journal_whose_dp_round_the_log_states_otherwise_fails_the_crosscheck(
    tmp_path: Path,
) -> None:
    """Node-2 journaled round 2 at a higher epsilon than the provider logged (the log
    alone could agree with itself): exit 34, naming the numbers."""
    events = _history()
    entries = dp_journal(events, 2)
    at = next(
        i
        for i, e in enumerate(entries)
        if e[Key.KIND] == DpRound.kind and (e[Key.RUN_ID], e[Key.ROUND]) == (RUN, 2)
    )
    entries[at] = {**entries[at], Key.EPSILON: entries[at][Key.EPSILON] * 1.3}
    result = _crosscheck(tmp_path, entries, events)
    assert result.exit_code == JournalMismatch.exit_code == 34, result.output
    flat = " ".join(result.output.split())
    assert f"(dp_round, run {RUN}, round 2): the provider's log records node 2's DP round" in flat
    assert "epsilon" in flat


def test_a_dp_round_missing_from_the_log_fails_the_crosscheck(tmp_path: Path) -> None:
    events = _history()
    entries = dp_journal(events, 2)
    _delete_a_round(events)
    found = crosscheck(events, entries, "j")
    assert [type(m) for m in found] == [JournalMismatch], found
    assert f"(dp_round, run {RUN}, round 3): node 2 trained this round with DP" in str(found[0])
    assert _crosscheck(tmp_path, entries, events).exit_code == 34


def test_a_dp_spent_the_journal_never_recorded_fails_the_crosscheck() -> None:
    events = _history()
    entries = dp_journal(events, 2)
    at = next(
        i
        for i, e in enumerate(entries)
        if e[Key.KIND] == DpRound.kind and (e[Key.RUN_ID], e[Key.ROUND]) == (LATER, 1)
    )
    del entries[at]
    found = crosscheck(events, entries, "j")
    assert [type(m) for m in found] == [JournalMismatch], found
    assert f"a dp_spent from node 2 in run {LATER} round 1 that the node's journal" in str(found[0])
