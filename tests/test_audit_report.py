"""The auditor's HTML report: verdict, counts, timeline, chart, escaping and odd records."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from sandbox.attestation.result import AFFIRMING, PURPOSE_CHANNEL, PURPOSE_KEY_RELEASE
from sandbox.channel import STAGE_TRAIN
from sandbox.config import PROTECTION_SEALED
from sandbox.events import (
    AggregateCommitted,
    AttestationAppraised,
    ChannelCertified,
    FileDigest,
    Key,
    KeyDenied,
    KeyReleased,
    ModelPublished,
    NodeAdmitted,
    NodeRefused,
    Participant,
    RoundStarted,
    RunFinished,
    RunStarted,
    UpdateAccepted,
    UpdateRejected,
)
from sandbox.ops.translog.report import render_report
from tests.loghistory import denials_rate_limited

ORIGIN = "ark-sandbox.local/log"
ROOT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
OK_CHECKS = [
    ("Checkpoint signature", True, "signed by ark-sandbox.local/log/ab12cd34"),
    ("Consistent with the last checkpoint seen", True, "size 20 → 28"),
    ("Every entry included", True, "28 entries hash to the signed root"),
    ("Policy across events", True, "no violation"),
]
MEASUREMENTS = {"firmware": "aa" * 32, "kernel": "bb" * 32, "app": "cc" * 32}
VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr", "source", "area", "base"}


def _h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _t(minute: int) -> dt.datetime:
    return dt.datetime(2025, 3, 4, 10, minute, tzinfo=dt.UTC)


def _appraisal(minute: int, ueid: str, purpose: str, status: str = AFFIRMING) -> dict[str, Any]:
    return AttestationAppraised(
        time=_t(minute),
        session=f"s-{ueid}",
        key_id="model-key-1",
        tee="sev-snp",
        purpose=purpose,
        status=status,
        ear_sha256=_h(f"ear-{ueid}-{minute}"),
        stub=True,
        policy_id="ark-default",
        ueid=_h(ueid),
        measurements=MEASUREMENTS,
        trustworthiness={"executables": 2, "hardware": 2},
        failure=None if status == AFFIRMING else "measurement mismatch: kernel",
        tee_pubkey_sha256=_h(f"pub-{ueid}"),
    ).to_json()


def _key_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        ModelPublished(
            time=_t(0),
            model_id=_h("model"),
            key_id="model-key-1",
            files=[FileDigest(name="model.safetensors", sha256=_h("weights"))],
        ).to_json(),
        _appraisal(1, "aggregator", PURPOSE_CHANNEL),
        ChannelCertified(
            time=_t(1),
            session="s-aggregator",
            key_id="model-key-1",
            tee="sev-snp",
            purpose=PURPOSE_CHANNEL,
            ueid=_h("aggregator"),
            ear_sha256=_h("ear-aggregator-1"),
            tee_pubkey_sha256=_h("pub-aggregator"),
        ).to_json(),
    ]
    for node in (1, 2, 3):
        events.append(_appraisal(2, f"node-{node}", PURPOSE_KEY_RELEASE))
        events.append(
            KeyReleased(
                time=_t(2),
                session=f"s-node-{node}",
                key_id="model-key-1",
                model_id=_h("model"),
                ueid=_h(f"node-{node}"),
                ear_sha256=_h(f"ear-node-{node}-2"),
                tee_pubkey_sha256=_h(f"pub-node-{node}"),
            ).to_json()
        )
    events.append(_appraisal(3, "intruder", PURPOSE_KEY_RELEASE, status="contraindicated"))
    events.append(
        KeyDenied(
            time=_t(3),
            session="s-intruder",
            key_id="model-key-1",
            request={},
            client=_h("intruder-client")[:32],
            code="NODE_NOT_ALLOWED",
            cause="this sandbox is not on the provider's allow list",
            ear_sha256=_h("ear-intruder-3"),
        ).to_json()
    )
    return events


def _run_events(reason: str = "update norm 412.0 exceeds the bound 100.0") -> list[dict[str, Any]]:
    run: dict[Key, Any] = {Key.RUN: 7, Key.JOB: "ark-demo"}
    events: list[dict[str, Any]] = [
        RunStarted(
            **run,
            time=_t(4),
            rounds=2,
            resumed_after_round=0,
            protection=PROTECTION_SEALED,
            model_id=_h("model"),
            min_nodes=2,
        ).to_json(),
    ]
    for node in (1, 2, 3):
        events.append(
            NodeAdmitted(
                **run,
                time=_t(4),
                node=node,
                ear_sha256=_h(f"ear-node-{node}-2"),
                ueid=_h(f"node-{node}"),
                tee_pubkey_sha256=_h(f"pub-node-{node}"),
            ).to_json()
        )
    metrics = {1: (0.62, 0.91), 2: (0.81, 0.44)}
    for rnd in (1, 2):
        events.append(
            RoundStarted(
                **run,
                time=_t(5 * rnd),
                round=rnd,
                stage=STAGE_TRAIN,
                participants=[
                    Participant(node=n, instruction_sha256=_h(f"ins-{rnd}-{n}")) for n in (1, 2, 3)
                ],
            ).to_json()
        )
        accepted = (1, 2, 3) if rnd == 1 else (1, 2)
        for node in accepted:
            events.append(
                UpdateAccepted(
                    **run,
                    time=_t(5 * rnd + 1),
                    round=rnd,
                    node=node,
                    envelope_sha256=_h(f"env-{rnd}-{node}"),
                    envelope_bytes=81234,
                    examples=64,
                ).to_json()
            )
        if rnd == 2:
            events.append(
                UpdateRejected(
                    **run,
                    time=_t(11),
                    round=2,
                    node=3,
                    envelope_sha256=_h("env-2-3"),
                    reason=reason,
                ).to_json()
            )
        accuracy, loss = metrics[rnd]
        events.append(
            AggregateCommitted(
                **run,
                time=_t(5 * rnd + 2),
                round=rnd,
                adapter_sha256=_h(f"adapter-{rnd}"),
                updates=[_h(f"env-{rnd}-{n}") for n in accepted],
                examples=64 * len(accepted),
                metrics={
                    "updates": float(len(accepted)),
                    "local_accuracy": accuracy,
                    "train_loss": loss,
                },
            ).to_json()
        )
    events.append(
        RunFinished(
            **run,
            time=_t(15),
            rounds=2,
            adapter_sha256=_h("adapter-2"),
            metrics={
                Key.FINAL: {
                    str(n): {"accuracy": 0.8 + n / 100, "macro_f1": 0.75} for n in (1, 2, 3)
                }
            },
        ).to_json()
    )
    return events


def _records(**run_kwargs: str) -> list[dict[str, Any]]:
    return _key_events() + _run_events(**run_kwargs)


def _render(records: list[Any], **overrides: Any) -> str:
    args: dict[str, Any] = {
        "origin": ORIGIN,
        "size": len(records),
        "root_hex": ROOT,
        "checks": OK_CHECKS,
        "problems": [],
        "generated_at": "2025-03-04T11:00:00+00:00",
    }
    args.update(overrides)
    return render_report(records, **args)


def _section(page: str, ident: str) -> str:
    match = re.search(rf'<section[^>]*id="{ident}"[^>]*>(.*?)</section>', page, re.DOTALL)
    assert match, f"no section {ident}"
    return match.group(1)


def _stat(page: str, ident: str) -> int:
    match = re.search(rf'id="stat-{ident}"><span class="num">(\d+)</span>', page)
    assert match, f"no stat {ident}"
    return int(match.group(1))


def _polylines(page: str) -> list[list[tuple[float, float]]]:
    lines = re.findall(r'<polyline points="([^"]*)"', _section(page, "metrics"))
    points = [[p.split(",") for p in line.split()] for line in lines]
    return [[(float(x), float(y)) for x, y in line] for line in points]


class _TagBalance(HTMLParser):
    """Records tags that close out of order: unbalanced markup means a value broke out."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _parse(page: str) -> _TagBalance:
    parser = _TagBalance()
    parser.feed(page)
    parser.close()
    return parser


def test_all_good_is_green() -> None:
    page = _render(_records())
    verdict = _section(page, "verdict")
    assert page.startswith("<!DOCTYPE html>")
    assert '<section class="verdict ok"' in page
    assert "Everything checks out" in verdict
    assert "Problems found" not in page
    assert verdict.count("✓") == len(OK_CHECKS)
    assert "✗" not in verdict
    assert "size 20 → 28" in verdict


def test_problems_turn_it_red() -> None:
    problem = "round 2 committed an update from node 3 that was rejected"
    page = _render(_records(), problems=[problem])
    verdict = _section(page, "verdict")
    assert '<section class="verdict fail"' in page
    assert "Problems found" in verdict
    assert "Everything checks out" not in page
    assert f"<li>{problem}</li>" in verdict
    assert "<p>1 problem was found. Do not rely" in verdict


def test_a_failed_check_alone_turns_it_red() -> None:
    checks = [*OK_CHECKS[:3], ("Policy across events", False, "1 violation")]
    verdict = _section(_render(_records(), checks=checks), "verdict")
    assert "Problems found" in verdict
    assert "1 of 4 checks failed. Do not rely" in verdict
    assert '<li class="failed"><span class="mark">✗</span><strong>Policy across events' in verdict
    assert verdict.count("✓") == 3


def test_header_names_the_checkpoint() -> None:
    records = _records()
    page = _render(records)
    assert "<title>Ark Sandbox — audit report</title>" in page
    assert "<h1>Ark Sandbox — audit report</h1>" in page
    assert f"<code>{ORIGIN}</code>" in page
    assert f"<dd>{len(records)}</dd>" in page
    assert f'<code title="{ROOT}">{ROOT[:12]}…</code>' in page
    assert '<span class="nw">2025-03-04</span> <span class="nw">11:00:00 UTC</span>' in page


def test_at_a_glance_counts() -> None:
    page = _render(_records())
    assert _stat(page, "attestations") == 5
    assert "4 trusted, " in _section(page, "glance")
    assert _stat(page, "keys-released") == 3
    assert _stat(page, "keys-denied") == 1
    assert _stat(page, "runs") == 1
    assert _stat(page, "rounds") == 2
    assert _stat(page, "accepted") == 5
    assert _stat(page, "rejected") == 1


def test_timeline_has_one_row_per_round_and_the_rejection() -> None:
    runs = _section(_render(_records()), "runs")
    assert "Run 7 — job ark-demo" in runs
    assert "Sealed" in runs
    rows = re.findall(r"<tr><td>(\d+)</td><td>training</td><td>([^<]*)</td>", runs)
    assert rows == [("1", "1, 2, 3"), ("2", "1, 2, 3")]
    assert "<td>2</td><td>training</td><td>1, 2, 3</td><td>2</td>" in runs
    assert "Round 2, node 3: update norm 412.0 exceeds the bound 100.0" in runs
    assert f'title="{_h("adapter-2")}"' in runs
    assert "accuracy 0.810 · loss 0.440" in runs
    assert "Macro F1" in runs


def test_chart_has_a_point_per_round() -> None:
    page = _render(_records())
    metrics = _section(page, "metrics")
    assert metrics.count("<svg") == 1
    accuracy, loss = _polylines(page)
    assert len(accuracy) == 2
    assert len(loss) == 2
    assert metrics.count("<circle") == 2 * 2 + 2  # the points, plus one per legend entry
    # Rounds go left to right; accuracy rose and loss fell (SVG y grows downwards).
    assert accuracy[0][0] < accuracy[1][0]
    assert accuracy[1][1] < accuracy[0][1]
    assert loss[1][1] > loss[0][1]
    assert "Accuracy" in metrics
    assert "Training loss" in metrics
    assert "Round" in metrics


def test_chart_without_metrics_says_so() -> None:
    records = [r for r in _records() if r["kind"] != "aggregate_committed"]
    metrics = _section(_render(records), "metrics")
    assert "<svg" not in metrics
    assert "no plot" in metrics


def test_attestation_table() -> None:
    section = _section(_render(_records()), "attestations")
    assert "proved which code it runs" in section
    trusted = '<span class="tag good" title="attestation status: affirming">Trusted</span>'
    assert section.count(trusted) == 4
    assert 'title="attestation status: contraindicated">Not trusted</span>' in section
    assert section.count(">test stub</span>") == 5
    assert section.count('<span class="tag good">Released</span>') == 3
    assert '<span class="tag bad">Refused</span>' in section
    assert "NODE_NOT_ALLOWED" in section
    assert "3: <code" in section  # three measurements, named
    assert f'<code title="{_h("node-1")}">{_h("node-1")[:12]}…</code>' in section


def test_a_flood_summary_reads_as_a_count_of_refusals() -> None:
    summary = denials_rate_limited(suppressed=5000, logged=16)
    section = _section(_render([*_records(), summary]), "attestations")
    assert "Refusals counted, not listed" in section
    assert '<span class="tag warn">Rate limited</span>' in section
    assert "5000 more refusals from one client (16 listed one by one)" in section


def test_participants() -> None:
    section = _section(_render(_records()), "participants")
    assert section.count("Admitted") == 3
    assert "Refused" not in section


def test_full_log_lists_every_record() -> None:
    records = _records()
    log = _section(_render(records), "log")
    indices = re.findall(r"<tr><td>(\d+)</td>", log)
    assert indices == [str(i) for i in range(len(records))]
    # Long digests are shortened; the full value stays in a tooltip.
    assert f'title="{_h("model")}"' in log
    assert f">{_h('model')}<" not in log


def test_untrusted_text_is_escaped() -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    records: list[Any] = _records(reason=evil)
    records.append({"kind": evil, "time": evil, evil: evil, "run": 7, "node": evil})
    records.append(NodeRefused(time=_t(30), run=7, job="ark-demo", node=9, reason=evil).to_json())
    page = _render(records, origin=evil, problems=[evil], root_hex=evil)
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "&lt;script&gt;" in page
    parsed = _parse(page)
    assert parsed.errors == []
    assert parsed.stack == []
    assert "script" not in parsed.tags
    assert "img" not in parsed.tags


def test_page_is_self_contained() -> None:
    page = _render(_records())
    assert "<script" not in page
    assert "src=" not in page
    assert "<link" not in page
    # The only URL is the SVG namespace, which is a name, never fetched.
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    parsed = _parse(page)
    assert parsed.errors == []
    assert parsed.stack == []


@pytest.mark.parametrize(
    "odd",
    [
        {},
        {"kind": "mystery_event", "time": "2025-03-04T12:00:00Z", "extra": [1, 2]},
        {"kind": None, "time": 12345},
        {"kind": "round_started", "run": [1], "round": "two", "participants": "everyone"},
        {"kind": "round_started", "run": 7, "round": True, "participants": [None, 3, {"x": 1}]},
        {"kind": "aggregate_committed", "run": 7, "round": 3, "metrics": "fine"},
        {"kind": "aggregate_committed", "run": 7, "round": 4, "metrics": {"train_loss": 1e400}},
        {"kind": "aggregate_committed", "run": 7, "round": 5, "metrics": {"train_loss": "low"}},
        {"kind": "attestation_appraised", "status": 3, "measurements": [1], "stub": "yes"},
        {"kind": "key_denied", "code": {"nested": True}, "cause": 7},
        {"kind": "run_started", "run": "r-2", "protection": 1, "time": "yesterday"},
        {"kind": "run_finished", "run": 7, "metrics": {"final": [0.5]}},
        {"kind": "run_finished", "run": 7, "metrics": {"final": {"1": "great"}}},
        {"kind": "node_declined", "run": 7, "node": "three", "round": None, "reason": None},
        {"kind": "update_rejected", "run": 7, "round": 1, "node": 1, "reason": ["x"] * 50},
        {"kind": "model_published", "files": {"a": {"b": {"c": 1}}}, "size": 10**400},
    ],
)
def test_odd_records_do_not_crash(odd: dict[str, Any]) -> None:
    records: list[Any] = [*_records(), odd]
    page = _render(records)
    log = _section(page, "log")
    assert f"<tr><td>{len(records) - 1}</td>" in log
    assert _parse(page).errors == []
    # The well-formed run still renders its two rounds.
    assert _stat(page, "rounds") >= 2


def test_unknown_kind_appears_in_the_log() -> None:
    records: list[Any] = [{"kind": "mystery_event", "time": _t(1).isoformat(), "detail": "hello"}]
    log = _section(_render(records), "log")
    assert "mystery_event" in log
    assert "<strong>detail</strong>: hello" in log


def test_non_mapping_records_and_empty_log() -> None:
    page = _render([None, "text", 3], checks=[], size=3)
    assert "Everything checks out" in page
    assert "The log records no training runs." in page
    assert "no plot" in page
    assert _stat(page, "runs") == 0
    assert re.findall(r"<tr><td>(\d+)</td>", _section(page, "log")) == ["0", "1", "2"]


def test_a_single_round_chart_still_has_its_point() -> None:
    records = [r for r in _records() if r.get("round") != 2]
    accuracy, loss = _polylines(_render(records))
    assert len(accuracy) == 1
    assert len(loss) == 1
    assert accuracy[0][0] == pytest.approx(56 + (640 - 56 - 20) / 2)
