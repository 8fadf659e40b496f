"""Lists that grow with the number of nodes stay out of any one log entry (issue 19).

A round's participants, its aggregate's updates, the secure-aggregation stages' nodes and
each node's final metrics are logged one ``list_member`` entry per member, and the event
commits to them (count and Merkle root). These tests log and audit rounds of 5,000
synthetic participants in a real SQLite log, and stage what a hostile provider could do
to the members and their commitments.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from sandbox.canonical import canonical_entry
from sandbox.errors import (
    EventInvalid,
    ListCommitmentMismatch,
    LogEntryTooLarge,
    SecAggInconsistent,
    UpdateFromUnattested,
)
from sandbox.events import (
    AggregateCommitted,
    Event,
    FanOutSink,
    JsonlEventSink,
    ListMember,
    MemoryEventSink,
    Participant,
    RoundStarted,
    RunFinished,
    SecaggStage,
    SecaggUnmasked,
)
from sandbox.events.members import (
    Streamed,
    expand,
    listed_count,
    members_root,
    per_member,
    streamed,
)
from sandbox.ops.cli.provider import JobProgress
from sandbox.ops.translog.audit import check_policy, crosscheck, verify_log
from sandbox.ops.translog.report import render_report
from sandbox.secagg import STAGE_MASK
from sandbox.translog.store import MAX_ENTRY_BYTES, LogSink, LogStore
from tests.loghistory import (
    SECURE_RUN,
    TIME,
    digest,
    honest_history,
    new_signer,
    node_journal,
    per_member_form,
    secure_node,
    secure_node_journal,
    secure_run_events,
)

NODES = 5_000
JOB = {"time": TIME, "run": 7, "job": "demo"}


def _log(path: Path, events: list[dict[str, Any]]) -> tuple[LogStore, Any]:
    """``events`` logged the way the ServerApp logs them: through a LogSink over a real
    SQLite store, each growing list one entry per member; and a signed checkpoint."""
    signer = new_signer()
    store = LogStore(path, durable=False)
    sink = LogSink(store)
    for event in events:
        sink.emit_many(per_member(Event.from_json(event)))
    store.sign_checkpoint(signer)
    return store, signer.verifier


def _kinds(violations: list[Any]) -> set[type]:
    return {type(v) for v in violations}


def test_a_round_of_5000_participants_is_logged_per_member_and_audits_clean(
    tmp_path: Path,
) -> None:
    events = honest_history(1, rounds=1, nodes=NODES)
    inline = next(e for e in events if e["kind"] == RoundStarted.kind)
    # Inline, the round's participants alone would pass the entry limit several times.
    assert len(canonical_entry(inline)) > 5 * MAX_ENTRY_BYTES
    store, verifier = _log(tmp_path / "log.db", events)
    entries = store.entries(0, store.size())
    assert max(map(len, entries)) < 1024  # every entry small, whatever the number of nodes
    audit = verify_log(store, verifier)
    assert audit.violations == []
    members = [r for r in audit.records if r["kind"] == ListMember.kind]
    # participants, updates and final metrics: one member per node each.
    assert len(members) == 3 * NODES
    started = next(r for r in audit.records if r["kind"] == RoundStarted.kind)
    assert len(started["participants"]) == NODES  # the rules read the list inline again
    assert started["committed"]["participants"]["count"] == NODES
    finished = next(r for r in audit.records if r["kind"] == RunFinished.kind)
    assert len(finished["metrics"]["final"]) == NODES
    # One node's journal still crosschecks against the per-member log.
    assert crosscheck(audit.records, node_journal(1, 4321, rounds=1), "node-4321") == []
    page = render_report(
        audit.records,
        origin="test",
        size=store.size(),
        root_hex=store.root().hex(),
        checks=[],
        problems=[],
        generated_at="now",
    )
    assert f"{NODES} members of <strong>round_started.participants</strong>" in page
    assert f"{NODES} nodes" in page  # counted, not listed
    store.close()


def test_a_secure_round_of_5000_nodes_with_one_dropped_audits_clean(tmp_path: Path) -> None:
    events = secure_run_events(rounds=1, nodes=NODES, dropped={1: 17})
    store, verifier = _log(tmp_path / "log.db", events)
    assert max(map(len, store.entries(0, store.size()))) < 1024
    audit = verify_log(store, verifier)
    assert audit.violations == []
    unmasked = next(r for r in audit.records if r["kind"] == SecaggUnmasked.kind)
    assert len(unmasked["survivors"]) == NODES - 1
    assert [str(n) for n in unmasked["dropped"]] == [str(secure_node(17))]
    journal = secure_node_journal(3, rounds=1, nodes=NODES, dropped={1: 17})
    assert crosscheck(audit.records, journal, "node-3") == []
    store.close()


def test_every_growing_list_round_trips_through_its_members() -> None:
    """Committed and expanded again, each kind's lists are what the emitter built; and
    expanding an expanded log changes nothing (the audit expands more than once)."""
    events = per_member_form(secure_run_events(rounds=1, nodes=5, dropped={1: 2}))
    events += per_member_form(honest_history(1, rounds=1, nodes=5))
    inline = secure_run_events(rounds=1, nodes=5, dropped={1: 2}) + honest_history(
        1, rounds=1, nodes=5
    )
    expanded = expand(events)
    assert expanded.problems == []
    again = expand(expanded.records)
    assert again.problems == []
    assert again.records == expanded.records
    summaries = [r for r in expanded.records if r["kind"] != ListMember.kind]
    wanted = [Event.from_json(e).to_json() for e in inline]
    for got, want in zip(summaries, wanted, strict=True):
        assert _as_logged({k: v for k, v in got.items() if k != "committed"}) == _as_logged(want)
    assert check_policy(events) == []


def _as_logged(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as the log reads it back (big ids as text)."""
    from sandbox import strictjson

    parsed: dict[str, Any] = strictjson.loads(canonical_entry(record))
    return parsed


def _honest(nodes: int = 4) -> list[dict[str, Any]]:
    return per_member_form(honest_history(1, rounds=1, nodes=nodes))


def _member_at(events: list[dict[str, Any]], name: str, index: int) -> int:
    return next(
        n
        for n, e in enumerate(events)
        if e["kind"] == ListMember.kind and e["list"] == name and e["index"] == index
    )


PARTICIPANTS = "round_started.participants"


def test_a_deleted_member_fails_the_commitment_and_the_rules_that_need_the_list() -> None:
    events = _honest()
    del events[_member_at(events, PARTICIPANTS, 2)]
    violations = check_policy(events)
    assert ListCommitmentMismatch in _kinds(violations)
    assert "commits 4 members but 3 are logged" in str(violations[0])
    # The list is left out, so no update counts as sent its instruction: fail closed.
    assert UpdateFromUnattested in _kinds(violations)


def test_an_added_changed_reordered_or_doubled_member_fails_the_commitment() -> None:
    honest = _honest()
    at = _member_at(honest, PARTICIPANTS, 1)
    added = [*honest[: at + 1], {**honest[at], "index": 4}, *honest[at + 1 :]]
    changed = list(honest)
    changed[at] = {**honest[at], "item": {"node": 99, "instruction_sha256": digest("x")}}
    swapped = list(honest)
    swapped[at], swapped[at + 1] = (
        {**honest[at + 1], "index": 1},
        {**honest[at], "index": 2},
    )
    doubled = [*honest[: at + 1], honest[at], *honest[at + 1 :]]
    for name, events, why in (
        ("added", added, "commits 4 members but 5"),
        ("changed", changed, "do not hash to the committed root"),
        ("reordered", swapped, "do not hash to the committed root"),
        ("doubled", doubled, "member 1 of round_started.participants of run 1 round 1 train"),
    ):
        violations = check_policy(events)
        assert ListCommitmentMismatch in _kinds(violations), name
        assert any(why in str(v) for v in violations), (name, violations)


def test_a_consistent_forged_list_is_still_held_to_the_rules() -> None:
    """The provider writes the log: it can forge members and a matching root. Then the
    list is read, and the rules catch what it claims: here an aggregate counting an
    update the log never accepted."""
    events = _honest()
    committed = next(
        n
        for n, e in enumerate(events)
        if e["kind"] == AggregateCommitted.kind and e.get("committed")
    )
    forged = digest("forged")
    first = _member_at(events, "aggregate_committed.updates", 0)
    events[first] = {**events[first], "item": forged}
    items = [e["item"] for e in events[first:committed] if e["kind"] == ListMember.kind]
    root = members_root(items)
    events[committed] = {
        **events[committed],
        "committed": {"updates": {"count": len(items), "root": root}},
    }
    violations = check_policy(events)
    assert ListCommitmentMismatch not in _kinds(violations)
    assert any(forged[:12] in str(v) or "not accepted" in str(v) for v in violations), violations


def test_members_no_event_commits_and_members_after_their_event_are_caught() -> None:
    honest = _honest()
    started = next(n for n, e in enumerate(honest) if e["kind"] == RoundStarted.kind)
    members = [e for e in honest[:started] if e.get("list") == PARTICIPANTS]
    orphaned = [*honest[:started], *honest[started + 1 :]]  # the event itself removed
    late = [e for e in honest if e.get("list") != PARTICIPANTS]
    late[started - len(members) + 1 : started - len(members) + 1] = members  # just after
    for events, why in (
        (orphaned, "4 members of round_started.participants of run 1 round 1 train are "),
        (late, "commits 4 members but 0 are logged before it"),
    ):
        violations = check_policy(events)
        assert any(why in str(v) for v in violations), violations
        assert ListCommitmentMismatch in _kinds(violations)


def test_a_member_of_another_round_cannot_stand_in() -> None:
    events = per_member_form(honest_history(1, rounds=2, nodes=3))
    at = _member_at(events, PARTICIPANTS, 0)  # round 1's first participant
    events[at] = {**events[at], "round": 2}
    violations = check_policy(events)
    assert ListCommitmentMismatch in _kinds(violations)


def test_a_list_inline_and_committed_differently_is_refused() -> None:
    events = _honest()
    started = next(n for n, e in enumerate(events) if e["kind"] == RoundStarted.kind)
    events[started] = {
        **events[started],
        "participants": [{"node": 99, "instruction_sha256": digest("x")}],
    }
    assert "inline unlike its members" in str(check_policy(events))
    with pytest.raises(EventInvalid, match="both inline and committed"):
        Event.from_json(events[started])


def test_a_secure_stage_with_a_member_removed_fails_closed() -> None:
    events = per_member_form(secure_run_events(rounds=1, nodes=5))
    del events[_member_at(events, "secagg_stage.nodes", 0)]
    kinds = _kinds(check_policy(events))
    assert ListCommitmentMismatch in kinds
    assert SecAggInconsistent in kinds  # a stage without its nodes breaks the protocol


def test_an_event_over_the_entry_limit_is_refused_typed_and_appends_nothing(
    tmp_path: Path,
) -> None:
    store = LogStore(tmp_path / "log.db", durable=False)
    sink = LogSink(store)
    now = dt.datetime.now(dt.UTC)
    big = RoundStarted(
        time=now,
        run=7,
        job="demo",
        round=1,
        stage="train",
        participants=[Participant(node=n, instruction_sha256=digest(n)) for n in range(1000)],
    )
    small = AggregateCommitted(
        time=now,
        run=7,
        job="demo",
        round=1,
        adapter_sha256=digest(1),
        updates=[],
        examples=0.0,
        metrics={},
    )
    with pytest.raises(LogEntryTooLarge, match=r"round_started event of \d+ bytes is over"):
        sink.emit_many([small, big])
    assert store.size() == 0  # the batch is one transaction: nothing of it was kept
    sink.emit_many(per_member(big))  # what the ServerApp does
    assert store.size() == 1001
    store.close()


def test_a_commitment_names_only_lists_the_event_has() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(EventInvalid, match=r"'secret'.*is not a list of this event"):
        SecaggStage.from_json(
            {
                "kind": SecaggStage.kind,
                "time": now.isoformat(),
                "run": 7,
                "job": "demo",
                "round": 1,
                "stage": STAGE_MASK,
                "committed": {"secret": {"count": 0, "root": members_root([])}},
            }
        )
    with pytest.raises(EventInvalid, match=r"'participants'.*is missing"):
        RoundStarted(time=now, run=7, job="demo", round=1, stage="train")


def test_progress_counts_a_committed_list(capsys: pytest.CaptureFixture[str]) -> None:
    events = _honest(nodes=6)
    started = next(e for e in events if e["kind"] == RoundStarted.kind)
    assert listed_count(started, "participants") == 6
    JobProgress(1, {}).show([started])
    assert "round 1 train: 6 nodes" in capsys.readouterr().out


def test_the_secure_run_id_is_kept_in_the_members() -> None:
    """A Flower-sized run id (beyond 2**53) matches between members and their event."""
    events = per_member_form(secure_run_events(rounds=1, nodes=3))
    member = next(e for e in events if e["kind"] == ListMember.kind)
    assert str(member["run"]) == str(SECURE_RUN)
    assert check_policy(events) == []


def test_a_huge_claimed_count_costs_the_auditor_only_the_members_logged() -> None:
    events = _honest()
    started = next(n for n, e in enumerate(events) if e["kind"] == RoundStarted.kind)
    claim = {"participants": {"count": 10**15, "root": members_root([])}}
    events[started] = {**events[started], "committed": claim}
    violations = check_policy(events)
    assert "commits 1000000000000000 members but 4 are logged" in str(violations[0])


def test_a_list_in_neither_form_is_caught_even_where_no_other_rule_needs_it() -> None:
    """The mask stage's envelopes and the final metrics: dropped from both forms, the
    audit says so (no other rule would)."""
    for kind, path in ((SecaggStage.kind, "envelopes"), (RunFinished.kind, "metrics.final")):
        events = per_member_form(secure_run_events(rounds=1, nodes=4))
        at = next(
            n
            for n, e in enumerate(events)
            if e["kind"] == kind and path in e.get("committed", {}) and e.get("stage") != "share"
        )
        events[at] = {
            **events[at],
            "committed": {k: v for k, v in events[at]["committed"].items() if k != path},
        }
        members = kind + "." + path
        events = [e for e in events if e.get("list") != members]
        violations = check_policy(events)
        assert f"{kind} has no {path}, inline or committed" in str(violations), violations
        assert ListCommitmentMismatch in _kinds(violations)


def _held(count: int, now: dt.datetime) -> RoundStarted:
    listed = [Participant(node=n, instruction_sha256=digest(n)) for n in range(count)]
    return RoundStarted(time=now, run=7, job="demo", round=1, stage="train", participants=listed)


def _participants(count: int) -> Streamed:
    return Streamed(
        count,
        lambda: (Participant(node=n, instruction_sha256=digest(n)).to_json() for n in range(count)),
    )


def test_a_streamed_list_logs_the_same_entries_as_the_list_held(tmp_path: Path) -> None:
    """What the ServerApp streams from disk (participants, updates) is byte for byte what
    it would log holding the list: the same members, the same commitment; and each sink
    (the job's file, the log) reads the stream anew."""
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    fields: dict[str, Any] = {"time": now, "run": 7, "job": "demo", "round": 3, "stage": "train"}
    held = dataclasses.replace(_held(700, now), round=3)
    entries = streamed(RoundStarted, {"participants": _participants(700)}, **fields)
    assert len(entries) == 701
    expected = [e.canonical() for e in per_member(held)]
    assert [e.canonical() for e in entries] == expected
    assert [e.canonical() for e in entries] == expected, "iterated again, the same"
    store = LogStore(tmp_path / "log.sqlite", durable=False)
    memory = MemoryEventSink()
    FanOutSink([memory, LogSink(store)]).emit_many(entries)
    assert [e.canonical() for e in memory.events] == expected
    assert store.entries(0, store.size()) == expected
    store.close()


def test_a_streamed_list_that_changes_while_logged_appends_nothing(tmp_path: Path) -> None:
    """A list whose count is not what it said (it changed under the stream) fails before
    its event is made, and the log's transaction keeps none of its members."""
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    fields: dict[str, Any] = {"time": now, "run": 7, "job": "demo", "round": 1, "stage": "train"}
    short = Streamed(5, _participants(4).items)
    store = LogStore(tmp_path / "log.sqlite", durable=False)
    with pytest.raises(RuntimeError, match=r"round_started\.participants changed"):
        LogSink(store).emit_many(streamed(RoundStarted, {"participants": short}, **fields))
    assert store.size() == 0
    store.close()
    # Nor the job's own events file: its lines are made before any is appended.
    jsonl = JsonlEventSink(tmp_path / "events.jsonl")
    jsonl.emit(_held(1, now))
    before = jsonl.path.read_bytes()
    with pytest.raises(RuntimeError, match="changed while"):
        jsonl.emit_many(streamed(RoundStarted, {"participants": short}, **fields))
    assert jsonl.path.read_bytes() == before


def test_logging_a_streamed_list_holds_one_member_at_a_time(tmp_path: Path) -> None:
    """Logging 5,000 members streamed costs the process what 500 do: the members are made,
    hashed into the commitment and appended one by one (tracemalloc, peak over the call)."""
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

    def peak(count: int) -> int:
        store = LogStore(tmp_path / f"log-{count}.sqlite", durable=False)
        sink = LogSink(store)
        fields = {"time": now, "run": 7, "job": "demo", "round": 1, "stage": "train"}
        entries = streamed(RoundStarted, {"participants": _participants(count)}, **fields)
        tracemalloc.start()
        try:
            sink.emit_many(entries)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert store.size() == count + 1
            store.close()

    small, large = peak(500), peak(5_000)
    # Holding the 4,500 more members' entries would take at least their canonical bytes.
    more = sum(len(e.canonical()) for e in per_member(_held(5_000, now))[500:5_000])
    assert large - small < more // 20, (small, large, more)
