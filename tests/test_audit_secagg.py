"""The auditor's secure-aggregation rules: ``ark audit verify`` over the stages a secure
round logs, and ``ark audit crosscheck`` of the key shares and masked inputs the nodes'
journals say they revealed and sent. Logs are real signed SQLite logs of an honest run
(:func:`tests.loghistory.secure_run_events`, its node ids beyond 2**53 as the log spells
them), each attack one change to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import (
    JournalMismatch,
    PolicyViolation,
    SecAggInconsistent,
    UpdateFromUnattested,
)
from sandbox.events import (
    AggregateCommitted,
    Key,
    RunStarted,
    SecaggAdvertised,
    SecaggStage,
    SecaggUnmasked,
    UpdateAccepted,
)
from sandbox.events.node import SecaggRevealed
from sandbox.journal import read_journal
from sandbox.ops.translog.audit import check_policy, crosscheck
from sandbox.ops.translog.report import render_report
from sandbox.secagg import STAGE_CHECK, STAGE_MASK, STAGE_SHARE
from sandbox.translog.store import LogStore
from tests.loghistory import (
    JOB,
    SECURE_RUN,
    TIME,
    audit_cli,
    honest_history,
    log_violations,
    masked_input,
    secure_node,
    secure_node_journal,
    secure_run_events,
    write_journal,
)

Events = list[dict[str, Any]]
DROPPED = {1: 2}  # node-2 sends no masked input in round 1


def _history(nodes: int = 4) -> Events:
    return honest_history() + secure_run_events(nodes=nodes, dropped=DROPPED)


def _at(events: Events, kind: str, rnd: int = 1, **match: Any) -> int:
    """The index of the secure run's first ``kind`` event of round ``rnd`` matching."""
    return next(
        i
        for i, e in enumerate(events)
        if e[Key.KIND] == kind
        and e.get(Key.RUN) == SECURE_RUN
        and e.get(Key.ROUND) == rnd
        and all(e.get(k) == v for k, v in match.items())
    )


# -- ark audit verify ------------------------------------------------------------------------


def test_an_honest_secure_run_with_a_dropout_verifies(tmp_path: Path) -> None:
    events = _history()
    result = audit_cli(tmp_path, events, "verify")
    assert result.exit_code == 0, result.output
    assert "ok: Policy across events" in result.output
    # The node ids are beyond 2**53: the log holds them as text, the audit reads them so.
    store = LogStore(tmp_path / "provider" / "translog.db", readonly=True)
    try:
        entries = store.entries(0, store.size())
    finally:
        store.close()
    unmasked = next(e for e in entries if b'"kind":"secagg_unmasked"' in e)
    assert f'"dropped":["{secure_node(2)}"]'.encode() in unmasked


def _reveal_a_survivors_key(events: Events) -> None:
    """The attack secure aggregation exists to stop: the aggregator has node-3's masked
    input, then says node-3 dropped, so the others reveal its masking key."""
    at = _at(events, SecaggUnmasked.kind)
    dropped = [*events[at][Key.DROPPED], secure_node(3)]
    events[at] = {**events[at], Key.DROPPED: dropped}


def _swap_share_and_mask(events: Events) -> None:
    share = _at(events, SecaggStage.kind, stage=STAGE_SHARE)
    mask = _at(events, SecaggStage.kind, stage=STAGE_MASK)
    events[share], events[mask] = events[mask], events[share]


def _accept_an_update(events: Events) -> None:
    """The aggregator accepts node-1's update on its own in a secure round."""
    accepted = UpdateAccepted(
        time=TIME,
        run=SECURE_RUN,
        job=JOB,
        round=1,
        node=secure_node(1),
        envelope_sha256=masked_input(SECURE_RUN, 1, secure_node(1)),
        envelope_bytes=306244,
        examples=40.0,
    )
    events.insert(_at(events, SecaggUnmasked.kind), accepted.to_json())


def _mask_from_a_node_that_never_shared(events: Events) -> None:
    at = _at(events, SecaggStage.kind, stage=STAGE_SHARE)
    events[at] = {**events[at], Key.NODES: events[at][Key.NODES][:-1]}  # node-4 did not share


def _unmask_twice(events: Events) -> None:
    at = _at(events, SecaggUnmasked.kind)
    events.insert(at + 1, events[at])


def _commit_before_unmasking(events: Events) -> None:
    at = _at(events, SecaggUnmasked.kind)
    events.insert(at + 1, events.pop(at))  # after the aggregate_committed


def _a_survivor_left_out(events: Events) -> None:
    at = _at(events, SecaggUnmasked.kind)
    survivors = events[at][Key.SURVIVORS]
    events[at] = {**events[at], Key.SURVIVORS: survivors[1:], Key.REVEALED_BY: survivors[1:]}


def _revealed_by_a_dropped_node(events: Events) -> None:
    at = _at(events, SecaggUnmasked.kind)
    events[at] = {**events[at], Key.REVEALED_BY: [*events[at][Key.REVEALED_BY], secure_node(2)]}


def _a_node_listed_twice(events: Events) -> None:
    at = _at(events, SecaggStage.kind, stage=STAGE_MASK)
    events[at] = {**events[at], Key.NODES: [*events[at][Key.NODES], secure_node(1)]}


def _rerun(after: int) -> Callable[[Events], None]:
    """The ServerApp restarts in the same run and runs round 1 again after its unmasking
    (``after`` 0) or its aggregate (1): two sums of one round's inputs."""

    def change(events: Events) -> None:
        start = _at(events, SecaggAdvertised.kind)
        end = _at(events, SecaggUnmasked.kind) + 1
        restart = events[_first_run_started(events)]
        events[end + after : end + after] = [restart, *events[start:end]]

    return change


def _first_run_started(events: Events) -> int:
    return next(
        i
        for i, e in enumerate(events)
        if e[Key.KIND] == RunStarted.kind and e[Key.RUN] == SECURE_RUN
    )


ATTACKS: dict[str, tuple[Callable[[Events], None], type[PolicyViolation], str]] = {
    "a survivor's masking key revealed": (
        _reveal_a_survivors_key,
        SecAggInconsistent,
        f"the masking keys of node {secure_node(3)} were rebuilt",
    ),
    "stages out of order": (
        _swap_share_and_mask,
        SecAggInconsistent,
        "secagg_stage mask after secagg_advertised",
    ),
    "an update accepted on its own": (
        _accept_an_update,
        SecAggInconsistent,
        f"an individual update from node {secure_node(1)} accepted",
    ),
    "a mask stage node that never shared": (
        _mask_from_a_node_that_never_shared,
        SecAggInconsistent,
        f"the mask stage names node {secure_node(4)}, not in the secagg_stage share",
    ),
    "two unmaskings": (_unmask_twice, SecAggInconsistent, "secagg_unmasked after secagg_unmasked"),
    "committed before unmasking": (
        _commit_before_unmasking,
        SecAggInconsistent,
        "aggregate_committed after secagg_stage check",
    ),
    "a survivor left out": (
        _a_survivor_left_out,
        SecAggInconsistent,
        f"the survivors leave out node {secure_node(1)}, which sent a masked input",
    ),
    "revealed by a dropped node": (
        _revealed_by_a_dropped_node,
        SecAggInconsistent,
        f"revealed_by includes node {secure_node(2)}, which did not survive",
    ),
    "a node listed twice": (
        _a_node_listed_twice,
        SecAggInconsistent,
        f"lists node {secure_node(1)} more than once in nodes",
    ),
    "a round run again after its unmasking": (
        _rerun(0),
        SecAggInconsistent,
        "secagg_advertised after secagg_unmasked",
    ),
    "a round run again after its aggregate": (
        _rerun(1),
        SecAggInconsistent,
        "secagg_advertised after aggregate_committed",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_secure_round_that_breaks_the_protocol_fails_the_audit(
    tmp_path: Path, attack: str
) -> None:
    change, expected, message = ATTACKS[attack]
    events = _history()
    change(events)
    violations = log_violations(tmp_path, events)
    assert {type(v) for v in violations} == {expected}, violations
    assert any(message in str(v) for v in violations), violations
    assert all(f"run {SECURE_RUN} round 1" in str(v) for v in violations), violations


@pytest.mark.parametrize(
    "attack",
    ["a survivor's masking key revealed", "stages out of order", "an update accepted on its own"],
)
def test_ark_audit_verify_exits_41_naming_run_round_and_node(tmp_path: Path, attack: str) -> None:
    change, _, message = ATTACKS[attack]
    events = _history()
    change(events)
    result = audit_cli(tmp_path, events, "verify")
    assert result.exit_code == SecAggInconsistent.exit_code == 41, result.output
    flat = " ".join(result.output.split())
    assert f"run {SECURE_RUN} round 1" in flat
    assert message in flat


def test_a_restarted_serverapp_may_run_a_round_again_before_its_unmasking(tmp_path: Path) -> None:
    events = _history()
    start = _at(events, SecaggAdvertised.kind)
    first = events[start : _at(events, SecaggUnmasked.kind)]
    restart = events[_first_run_started(events)]
    # A first attempt got as far as the mask stage; the restarted ServerApp runs it anew.
    events[start:start] = [*first, restart]
    assert log_violations(tmp_path / "restarted", events) == []
    # Without the restart the same events are a round whose stages repeat.
    del events[start + len(first)]
    assert {type(v) for v in log_violations(tmp_path, events)} == {SecAggInconsistent}


def test_a_masked_input_from_a_node_never_admitted_is_an_unattested_update(
    tmp_path: Path,
) -> None:
    events = _history()
    stray = secure_node(99)
    for stage in (STAGE_SHARE, STAGE_MASK, STAGE_CHECK):
        at = _at(events, SecaggStage.kind, stage=stage)
        events[at] = {**events[at], Key.NODES: [*events[at][Key.NODES], stray]}
    at = _at(events, SecaggStage.kind, stage=STAGE_MASK)
    envelopes = [*events[at][Key.ENVELOPES], masked_input(SECURE_RUN, 1, stray)]
    events[at] = {**events[at], Key.ENVELOPES: envelopes}
    at = _at(events, SecaggAdvertised.kind)
    advert = {Key.NODE: stray, Key.UEID: "x" * 32, Key.SIGNER_SHA256: "0" * 64}
    events[at] = {**events[at], Key.NODES: [*events[at][Key.NODES], advert]}
    at = _at(events, SecaggUnmasked.kind)
    survivors = [*events[at][Key.SURVIVORS], stray]
    events[at] = {**events[at], Key.SURVIVORS: survivors, Key.REVEALED_BY: survivors}
    at = _at(events, AggregateCommitted.kind)
    updates = [*events[at][Key.UPDATES], masked_input(SECURE_RUN, 1, stray)]
    events[at] = {**events[at], Key.UPDATES: updates}
    violations = log_violations(tmp_path, events)
    assert [type(v) for v in violations] == [UpdateFromUnattested], violations
    assert f"took a masked input from node {stray}" in str(violations[0])


def test_the_aggregate_counts_one_masked_input_per_survivor(tmp_path: Path) -> None:
    events = _history()
    at = _at(events, AggregateCommitted.kind)
    events[at] = {**events[at], Key.UPDATES: events[at][Key.UPDATES][:-1]}
    violations = log_violations(tmp_path, events)
    assert {type(v) for v in violations} == {SecAggInconsistent}
    assert "counts 2 masked inputs, but 3 nodes survived" in str(violations[0])
    assert "not the masked inputs its mask stage took" in str(violations[-1])


def test_the_aggregate_lists_the_masked_inputs_its_mask_stage_took(tmp_path: Path) -> None:
    events = _history()
    at = _at(events, AggregateCommitted.kind)
    updates = [*events[at][Key.UPDATES][:-1], "f" * 64]
    events[at] = {**events[at], Key.UPDATES: updates}
    violations = log_violations(tmp_path, events)
    assert [type(v) for v in violations] == [SecAggInconsistent], violations
    assert "not the masked inputs its mask stage took" in str(violations[0])


def test_a_reveal_from_a_node_that_did_not_sign_the_split_fails_the_audit(
    tmp_path: Path,
) -> None:
    events = _history(nodes=5)  # four survivors: one signer fewer is still a majority
    at = _at(events, SecaggStage.kind, stage=STAGE_CHECK)
    signers = events[at][Key.NODES][1:]
    events[at] = {**events[at], Key.NODES: signers}
    violations = log_violations(tmp_path, events)
    assert [type(v) for v in violations] == [SecAggInconsistent], violations
    assert "which did not sign the round's split" in str(violations[0])


# -- ark audit crosscheck --------------------------------------------------------------------


def _crosscheck(tmp_path: Path, entries: Events, events: Events | None = None) -> Any:
    journal = write_journal(tmp_path / "node", entries)
    return audit_cli(
        tmp_path, _history() if events is None else events, "crosscheck", "--journal", journal
    )


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_honest_journals_of_a_secure_run_crosscheck(tmp_path: Path, number: int) -> None:
    result = _crosscheck(tmp_path, secure_node_journal(number, dropped=DROPPED))
    assert result.exit_code == 0, result.output


def _revealed(entries: Events, rnd: int = 1) -> int:
    return next(
        i
        for i, e in enumerate(entries)
        if e[Key.KIND] == SecaggRevealed.kind and e[Key.ROUND] == rnd
    )


def test_a_journal_revealing_a_survivors_masking_key_fails_the_crosscheck(tmp_path: Path) -> None:
    """The aggregator told node-1 that node-3 dropped, while logging node-3 as a
    survivor: node-1 revealed its share of node-3's masking key."""
    entries = secure_node_journal(1, dropped=DROPPED)
    at = _revealed(entries)
    entries[at] = {**entries[at], Key.KEYS_OF: [secure_node(2), secure_node(3)]}
    result = _crosscheck(tmp_path, entries)
    assert result.exit_code == JournalMismatch.exit_code == 34, result.output
    flat = " ".join(result.output.split())
    assert f"masking keys of node {secure_node(3)}, which the provider's log does not" in flat
    assert f"run {SECURE_RUN}, round 1" in flat


def test_a_node_whose_masked_input_the_log_calls_dropped_finds_it_in_the_crosscheck(
    tmp_path: Path,
) -> None:
    """Node-3's journal says it sent its masked input; the log lists it as dropped (and,
    to pass ``verify``, leaves it out of the mask stage)."""
    events = _history(nodes=5)  # two dropped of five: three survivors, a majority
    at = _at(events, SecaggStage.kind, stage=STAGE_MASK)
    masked = [n for n in events[at][Key.NODES] if n != secure_node(3)]
    keep = [masked_input(SECURE_RUN, 1, node) for node in masked]
    events[at] = {**events[at], Key.NODES: masked, Key.ENVELOPES: keep}
    at = _at(events, SecaggStage.kind, stage=STAGE_CHECK)
    events[at] = {**events[at], Key.NODES: masked}
    at = _at(events, SecaggUnmasked.kind)
    dropped = [*events[at][Key.DROPPED], secure_node(3)]
    events[at] = {
        **events[at],
        Key.SURVIVORS: masked,
        Key.REVEALED_BY: masked,
        Key.DROPPED: dropped,
    }
    at = _at(events, AggregateCommitted.kind)
    events[at] = {**events[at], Key.UPDATES: keep}
    assert log_violations(tmp_path, events) == []
    found = crosscheck(events, secure_node_journal(3, nodes=5, dropped=DROPPED), "j")
    assert found
    assert all(isinstance(m, JournalMismatch) for m in found), found
    assert any(f"lists node {secure_node(3)} as dropped" in str(m) for m in found), found


def test_the_log_naming_a_node_that_never_revealed_fails_the_crosscheck(tmp_path: Path) -> None:
    entries = secure_node_journal(1, dropped=DROPPED)
    del entries[_revealed(entries, 2)]
    journal = write_journal(tmp_path, entries)
    found = crosscheck(_history(), read_journal(journal), "j")
    assert [type(m) for m in found] == [JournalMismatch], found
    assert f"node {secure_node(1)} revealed its key shares in run {SECURE_RUN} round 2" in str(
        found[0]
    )


def test_a_node_may_reveal_without_the_log_listing_it() -> None:
    """The aggregator needs only enough shares: one it did not use is no mismatch."""
    events = _history()
    at = _at(events, SecaggUnmasked.kind)
    events[at] = {**events[at], Key.REVEALED_BY: events[at][Key.REVEALED_BY][1:]}
    assert crosscheck(events, secure_node_journal(1, dropped=DROPPED), "j") == []


# -- the report ------------------------------------------------------------------------------


def test_the_report_shows_each_secure_rounds_survivors_and_dropouts() -> None:
    page = render_report(
        _history(),
        origin="ark-sandbox.local/log",
        size=0,
        root_hex="",
        checks=[],
        problems=[],
        generated_at=TIME.isoformat(),
    )
    assert '<td>3 masked inputs, 1 dropped<span class="sub">secure aggregation</span></td>' in page
    assert '<td>4 masked inputs, 0 dropped<span class="sub">secure aggregation</span></td>' in page
    assert "Secure aggregation: sum unmasked" in page


@pytest.mark.parametrize(
    ("kind", "odd"),
    [
        (SecaggStage.kind, {Key.STAGE: [STAGE_MASK]}),
        (SecaggStage.kind, {Key.NODES: {"1": 2}}),
        (SecaggAdvertised.kind, {Key.NODES: [[1], {"node": [2]}, None, True]}),
        (SecaggUnmasked.kind, {Key.SURVIVORS: "1", Key.DROPPED: None}),
        (SecaggUnmasked.kind, {Key.RUN: None, Key.ROUND: [1]}),
    ],
)
def test_odd_secure_records_are_violations_not_crashes(kind: str, odd: dict[str, Any]) -> None:
    """A log is untrusted: odd-typed fields in a secure-aggregation event are reported,
    and read by the cross-check, without crashing either."""
    events = _history()
    at = _at(events, kind)
    events[at] = {**events[at], **odd}
    assert {type(v) for v in check_policy(events)} == {SecAggInconsistent}
    crosscheck(events, secure_node_journal(1, dropped=DROPPED), "j")


def test_a_round_with_a_node_dropped_must_have_its_split_signed(tmp_path: Path) -> None:
    """Masking-key shares are revealed only for a split the survivors signed: a round
    that names a dropped node without a check stage fails (exit 41); a round where
    nobody dropped needs none (the honest history's round 2)."""
    events = _history()
    assert not [
        e
        for e in events
        if e[Key.KIND] == SecaggStage.kind and e[Key.STAGE] == STAGE_CHECK and e[Key.ROUND] == 2
    ]
    at = _at(events, SecaggStage.kind, stage=STAGE_CHECK)
    assert events[at][Key.ROUND] == 1
    del events[at]
    violations = log_violations(tmp_path, events)
    assert [type(v) for v in violations] == [SecAggInconsistent], violations
    assert "secagg_unmasked after secagg_stage mask" in str(violations[0])


def test_a_secure_round_summing_fewer_than_a_strict_majority_fails_the_audit(
    tmp_path: Path,
) -> None:
    """A logged round whose sum covers one node (the others all listed as dropped) is
    one node's update, however consistent its sets: exit 41."""
    events = _history()
    at = _at(events, SecaggStage.kind, stage=STAGE_MASK)
    alone = events[at][Key.NODES][:1]
    envelope = events[at][Key.ENVELOPES][:1]
    events[at] = {**events[at], Key.NODES: alone, Key.ENVELOPES: envelope}
    at = _at(events, SecaggStage.kind, stage=STAGE_CHECK)
    events[at] = {**events[at], Key.NODES: alone}
    at = _at(events, SecaggUnmasked.kind)
    shared = _at(events, SecaggStage.kind, stage=STAGE_SHARE)
    dropped = [n for n in events[shared][Key.NODES] if n not in alone]
    events[at] = {**events[at], Key.SURVIVORS: alone, Key.REVEALED_BY: alone, Key.DROPPED: dropped}
    at = _at(events, AggregateCommitted.kind)
    events[at] = {**events[at], Key.UPDATES: envelope}
    violations = log_violations(tmp_path, events)
    assert violations
    assert {type(v) for v in violations} == {SecAggInconsistent}, violations
    assert any("fewer than a strict majority" in str(v) for v in violations), violations
