"""The event schema against its vectors, and the one JCS encoder at its limits."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import canonical, strictjson
from sandbox.canonical import canonical_entry
from sandbox.config import NodeConfig
from sandbox.errors import CanonicalJSONError, EventInvalid
from sandbox.events import (
    AppApproved,
    EgressBlocked,
    Event,
    Hello,
    JournalEntry,
    JournalOpened,
    Key,
    NodeEvent,
    NodeRefused,
    Record,
    RunEvent,
    SecaggUnmasked,
    parse_journal_entry,
)
from sandbox.events.node import SecaggRevealed
from sandbox.journal import append_journal, read_journal
from tests.vectorload import load_vectors, vector_cases

FILES: list[dict[str, Any]] = load_vectors("events")
PARSERS: dict[str, Callable[[Any], Record | JournalEntry]] = {
    "provider": Event.from_json,
    "journal": parse_journal_entry,
}


def _valid() -> list[Any]:
    return vector_cases(
        [(f["family"], case) for f in FILES for case in f["valid"]],
        lambda v: f"{v[1]['record']['kind']}: {v[1]['name']}",
    )


def _invalid() -> list[Any]:
    found = []
    for document in FILES:
        for case in document["invalid"]:
            families = [case["family"]] if "family" in case else [document["family"]]
            for family in PARSERS if families == ["any"] else families:
                found.append((family, case))
    return vector_cases(found, lambda v: f"{v[0]}: {v[1]['error']['kind']}: {v[1]['name']}")


@pytest.mark.parametrize("vector", _valid())
def test_a_valid_event_parses_and_writes_the_same_bytes(vector: tuple[str, Any]) -> None:
    family, case = vector
    written = canonical_entry(case["record"])  # the log's entry, or the journal line's entry
    parsed = PARSERS[family](strictjson.loads(written))
    assert canonical_entry(parsed.to_json()) == written
    # The events.jsonl form (json.dumps) reads back to the same event.
    line = json.dumps(parsed.to_json(), sort_keys=True)
    assert canonical_entry(PARSERS[family](json.loads(line)).to_json()) == written


@pytest.mark.parametrize("vector", _invalid())
def test_an_invalid_event_names_its_kind_and_key(vector: tuple[str, Any]) -> None:
    family, case = vector
    with pytest.raises(EventInvalid) as caught:
        PARSERS[family](case["record"])
    assert (caught.value.kind, caught.value.key) == (case["error"]["kind"], case["error"]["key"])
    for named in (case["error"]["kind"], case["error"]["key"]):
        assert named is None or repr(named) in str(caught.value)


def test_every_kind_has_vectors_and_every_vector_a_kind() -> None:
    kinds = set(Event.registry) | set(NodeEvent.registry)
    covered = {f["kind"] for f in FILES if f["kind"] is not None}
    assert covered == kinds
    for document in FILES:
        if document["kind"] is not None:
            assert document["valid"], document["kind"]
            assert document["invalid"], document["kind"]


def test_the_families_are_the_provider_events_and_the_journal() -> None:
    assert {k for k, cls in Event.registry.items() if issubclass(cls, RunEvent)} == {
        "run_started",
        "node_admitted",
        "node_refused",
        "node_declined",
        "round_started",
        "update_accepted",
        "update_rejected",
        "aggregate_committed",
        "run_finished",
        "heldout_committed",
        "scorecard_logged",
        "secagg_advertised",
        "secagg_stage",
        "secagg_unmasked",
        "dp_spent",
        "dp_aggregate",
        "list_member",
    }
    assert not set(Event.registry) & set(NodeEvent.registry)
    assert JournalOpened.kind in NodeEvent.registry


def test_an_event_is_checked_when_it_is_built() -> None:
    """An emitter cannot build an event the parser would refuse."""
    now = dt.datetime(2026, 11, 23, 3, tzinfo=dt.UTC)
    fields: dict[str, Any] = {"run": 7, "job": "demo", "node": 3, "reason": "x"}
    event = NodeRefused(time=now, **fields)
    assert event.fields == fields
    with pytest.raises(EventInvalid, match="'node_refused', key 'node'"):
        NodeRefused(time=now, **{**fields, Key.NODE: "3"})
    with pytest.raises(EventInvalid, match="key 'time'"):
        NodeRefused(time=now.replace(tzinfo=None), **fields)


def test_jcs_refuses_what_it_cannot_hold_and_names_where() -> None:
    assert canonical.dumps({"b": 1.0, "a": [2**53 - 1]}) == b'{"a":[9007199254740991],"b":1}'
    for value, where in [
        ({"run": {"id": 2**53}}, r"\$\.run\.id"),
        ([0, math.nan], r"\$\[1\]"),
        ({"x": b"bytes"}, r"\$\.x"),
        ({1: "one"}, r"\$ \(a key"),
    ]:
        with pytest.raises(CanonicalJSONError, match=where):
            canonical.dumps(value)


def test_the_log_spells_what_jcs_cannot_hold_as_text() -> None:
    record = {"run": 2**64 - 1, "loss": -math.inf, "n": [2**53]}
    assert canonical_entry(record) == (
        b'{"loss":"-inf","n":["9007199254740992"],"run":"18446744073709551615"}'
    )


def test_lists_of_flower_ids_are_logged_as_text_and_read_back_as_ints() -> None:
    """Secure aggregation's node lists hold random unsigned 64-bit ids: each one beyond
    2**53 is written as its decimal text and parsed back to the same int."""
    top, big = 2**64 - 1, 2**63 - 5
    now = dt.datetime(2026, 11, 23, 3, tzinfo=dt.UTC)
    event = SecaggUnmasked(
        time=now, run=top, job="demo", round=1, survivors=[3, top], dropped=[big], revealed_by=[]
    )
    written = event.canonical()
    assert b'"dropped":["9223372036854775803"]' in written
    assert b'"survivors":[3,"18446744073709551615"]' in written
    assert Event.from_json(strictjson.loads(written)) == event
    assert Event.from_json(json.loads(json.dumps(event.to_json()))) == event


def test_journal_entries_read_back_as_the_events_the_node_wrote(tmp_path: Path) -> None:
    journal = tmp_path / "alpine.jsonl"
    node = NodeConfig(name="alpine", data_path=tmp_path / "d.jsonl", journal_path=journal)
    flower_run = 16401725734191279427
    written = [
        AppApproved(app_sha256="ab" * 32, run_id=flower_run),
        Hello(run_id=flower_run, node_id=2**63 - 5, round=1, suite="x25519-hkdf-sha256"),
        EgressBlocked(run_id=flower_run, node_id=3, code="egress-blocked", reason="a metric"),
        SecaggRevealed(
            run_id=flower_run, node_id=2**64 - 1, round=1, seeds_of=[3, 2**64 - 1], keys_of=[2**60]
        ),
    ]
    for event in written:
        append_journal(node, event)
    entries = [parse_journal_entry(entry) for entry in read_journal(journal)]
    assert all(isinstance(entry, JournalEntry) and entry.node == "alpine" for entry in entries)
    assert [entry.event for entry in entries if isinstance(entry, JournalEntry)] == written
