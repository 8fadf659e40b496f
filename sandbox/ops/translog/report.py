"""The auditor's report on a provider's transparency log, as one self-contained HTML page.

``ark audit report --html OUT`` verifies the provider's log (checkpoint signature,
consistency with the last checkpoint seen, inclusion of every entry, policy across events)
and hands the outcome and every logged event to :func:`render_report`. The reader is often
a compliance officer rather than an engineer, so the page opens with a plain verdict, then
summarises what the sandbox did in plain sentences, and only at the end lists the raw
events. Digests are shortened to their first 12 hex characters, the full value in a tooltip.

Every field of every record comes from the log, which the auditor does not trust: each
value is type-checked before use and HTML-escaped on output, and a missing or odd-typed
field renders as "—" instead of failing. The page runs no script and loads nothing (its
Content-Security-Policy forbids both), so it can be archived and opened offline.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sandbox.attestation.result import AFFIRMING, PURPOSE_CHANNEL, PURPOSE_KEY_RELEASE
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN
from sandbox.config import PROTECTION_OFF, PROTECTION_SEALED
from sandbox.events import (
    AggregateCommitted,
    AttestationAppraised,
    ChannelCertified,
    ComparisonFinished,
    ComparisonStarted,
    DenialsRateLimited,
    DpAggregate,
    DpSpent,
    Event,
    HeldoutCommitted,
    Key,
    KeyDenied,
    KeyReleased,
    ListMember,
    ModelPublished,
    NodeAdmitted,
    NodeDeclined,
    NodeRefused,
    RoundStarted,
    RunEvent,
    RunFinished,
    RunStarted,
    ScorecardLogged,
    SecaggAdvertised,
    SecaggStage,
    SecaggUnmasked,
    UpdateAccepted,
    UpdateRejected,
)
from sandbox.ops.translog.audit import Spending, finite_number, privacy_spending

__all__ = ["render_report"]

Record = Mapping[str, Any]
RunKey = int | str | None

DASH = "—"
DIGEST_CHARS = 12
MAX_TEXT_CHARS = 80
# A round's participants are named up to this many; beyond, counted.
MAX_NODES_LISTED = 12

# Events the ServerApp logs; each belongs to one federated run.
RUN_KINDS = frozenset(kind for kind, cls in Event.registry.items() if issubclass(cls, RunEvent))
ROUND_KINDS = (
    RoundStarted.kind,
    UpdateAccepted.kind,
    UpdateRejected.kind,
    AggregateCommitted.kind,
    SecaggAdvertised.kind,
    SecaggStage.kind,
    SecaggUnmasked.kind,
)
KEY_KINDS = (
    AttestationAppraised.kind,
    ChannelCertified.kind,
    KeyReleased.kind,
    KeyDenied.kind,
    DenialsRateLimited.kind,
)

KIND_LABELS = {
    ModelPublished.kind: "Model published",
    AttestationAppraised.kind: "Sandbox attestation checked",
    ChannelCertified.kind: "Secure channel certified",
    KeyReleased.kind: "Model key released",
    KeyDenied.kind: "Model key refused",
    DenialsRateLimited.kind: "Refusals counted, not listed",
    RunStarted.kind: "Training run started",
    NodeAdmitted.kind: "Participant admitted",
    NodeRefused.kind: "Participant refused",
    NodeDeclined.kind: "Participant declined a round",
    RoundStarted.kind: "Round started",
    UpdateAccepted.kind: "Update accepted",
    UpdateRejected.kind: "Update rejected",
    AggregateCommitted.kind: "Round completed",
    SecaggAdvertised.kind: "Secure aggregation: keys advertised",
    SecaggStage.kind: "Secure aggregation: stage completed",
    SecaggUnmasked.kind: "Secure aggregation: sum unmasked",
    DpSpent.kind: "Privacy spent by a participant",
    DpAggregate.kind: "Privacy spent by an aggregate",
    RunFinished.kind: "Training run finished",
    ComparisonStarted.kind: "Model comparison started",
    HeldoutCommitted.kind: "Held-out set committed",
    ScorecardLogged.kind: "Scorecard logged",
    ComparisonFinished.kind: "Model comparison finished",
}

# (label, CSS class) per attestation status; the names are EAR's (RFC 9334 appraisal).
STATUS_LABELS = {
    AFFIRMING: ("Trusted", "good"),
    "warning": ("Warning", "warn"),
    "contraindicated": ("Not trusted", "bad"),
    "none": ("No verdict", "bad"),
}
PURPOSE_LABELS = {
    PURPOSE_KEY_RELEASE: "to receive the model key",
    PURPOSE_CHANNEL: "to open a secure channel",
}
STAGE_LABELS = {STAGE_TRAIN: "training", STAGE_EVALUATE: "evaluation"}

STYLE = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --soft: #f6f8fa; --good: #1a7f37; --good-bg: #dafbe1; --bad: #b42318; --bad-bg: #ffebe9;
  --warn: #9a6700; --warn-bg: #fff8c5; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink); line-height: 1.5; font-size: 15px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 32px 24px 64px; }
h1 { font-size: 28px; margin: 0 0 8px; }
h2 { font-size: 21px; margin: 40px 0 8px; padding-bottom: 6px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 8px; }
p { margin: 8px 0; }
.intro { color: var(--muted); margin-top: 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 13px; background: var(--soft); padding: 1px 4px; border-radius: 4px; }
code[title] { cursor: help; border-bottom: 1px dotted var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px;
  margin: 8px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.verdict { border: 2px solid; border-radius: 10px; padding: 16px 20px; margin: 24px 0; }
.verdict.ok { border-color: var(--good); background: var(--good-bg); }
.verdict.fail { border-color: var(--bad); background: var(--bad-bg); }
.verdict h2 { margin: 0; border: 0; padding: 0; font-size: 24px; }
.verdict.ok h2 { color: var(--good); }
.verdict.fail h2 { color: var(--bad); }
.verdict h3 { margin: 16px 0 4px; font-size: 16px; }
ul.checks { list-style: none; padding: 0; margin: 8px 0 0; }
ul.checks li { padding: 3px 0; }
.mark { display: inline-block; width: 1.4em; font-weight: 700; }
.pass .mark { color: var(--good); }
.failed .mark { color: var(--bad); }
.skipped .mark { color: var(--warn, #9a6700); }
.detail { color: var(--muted); }
.bad-text { color: var(--bad); }
ol.problems { margin: 4px 0 0; padding-left: 24px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
  gap: 12px; margin: 12px 0; }
.stat { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
  background: var(--soft); }
.stat .num { display: block; font-size: 28px; font-weight: 700; line-height: 1.2; }
.stat .label { display: block; color: var(--muted); font-size: 14px; }
.stat .sub { display: block; font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 8px; text-align: left;
  vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.log { font-size: 13px; }
table.log td:first-child { text-align: right; color: var(--muted); }
.tag { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 13px;
  font-weight: 600; white-space: nowrap; }
.tag.good { color: var(--good); background: var(--good-bg); }
.tag.bad { color: var(--bad); background: var(--bad-bg); }
.tag.warn { color: var(--warn); background: var(--warn-bg); }
.run { border: 1px solid var(--line); border-radius: 10px; padding: 4px 20px 8px;
  margin: 16px 0; }
.run h3 { margin-top: 14px; }
.kind, td .sub { display: block; color: var(--muted); font-size: 12px; }
.nw, td code { white-space: nowrap; }
.chart { margin: 8px 0 20px; }
.chart svg { max-width: 100%; height: auto; border: 1px solid var(--line);
  border-radius: 8px; }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; }
@media print { .verdict, .stat, .tag { -webkit-print-color-adjust: exact;
  print-color-adjust: exact; } }
"""


# --- Reading untrusted values -------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _as_int(value: object) -> int | None:
    # bool is an int subclass, but a logged ``true`` is no node id or round number.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _as_list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _as_map(value: object) -> Mapping[Any, Any]:
    return value if isinstance(value, Mapping) else {}


def _kind(record: Record) -> str:
    return _as_str(record.get(Key.KIND)) or ""


def _is_hex(value: str) -> bool:
    return all(c in string.hexdigits for c in value)


# --- Formatting ---------------------------------------------------------------------------


def _text(value: object) -> str:
    """A scalar as escaped text; anything else (missing, list, dict) as a dash."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return _esc(value) if value else DASH
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    return DASH


def _number(value: object, digits: int = 3) -> str:
    number = finite_number(value)
    if number is None:
        return DASH
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return _esc(f"{number:.{digits}f}")


def _digest(value: object) -> str:
    """A digest or identifier, shortened, with the whole value in a tooltip."""
    text = _as_str(value)
    if not text:
        return DASH
    if len(text) <= DIGEST_CHARS:
        return f"<code>{_esc(text)}</code>"
    return f'<code title="{_esc(text)}">{_esc(text[:DIGEST_CHARS])}…</code>'


def _long_text(text: str) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return _esc(text)
    return f'<span title="{_esc(text)}">{_esc(text[: MAX_TEXT_CHARS - 1])}…</span>'


def _time(value: object) -> str:
    """An ISO-8601 time in a friendlier spelling; the logged value stays in the markup."""
    text = _as_str(value)
    if not text:
        return DASH
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return _esc(text)
    clock = parsed.strftime("%H:%M:%S")
    offset = parsed.utcoffset()
    if offset == dt.timedelta(0):
        clock += " UTC"
    elif offset is not None:
        clock += parsed.strftime(" %z")
    # Two unbreakable halves: a narrow column wraps between date and clock, nowhere else.
    return (
        f'<time datetime="{_esc(text)}"><span class="nw">{parsed:%Y-%m-%d}</span> '
        f'<span class="nw">{_esc(clock)}</span></time>'
    )


def _tag(label: str, tone: str, title: str = "") -> str:
    tip = f' title="{_esc(title)}"' if title else ""
    return f'<span class="tag {tone}"{tip}>{label}</span>'


def _plural(count: int, word: str) -> str:
    return f"{count} {word if count == 1 else word + 's'}"


def _node(value: object) -> str:
    node = _as_int(value)
    return f"node {node}" if node is not None else f"node {_text(value)}"


def _join(items: Iterable[str]) -> str:
    joined = ", ".join(items)
    return joined or DASH


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    """A table from already-escaped cells; ``headers`` are our own constant text."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- Grouping events ----------------------------------------------------------------------


def _run_key(record: Record) -> RunKey:
    run = record.get(Key.RUN)
    return run if isinstance(run, str) else _as_int(run)


def _group_runs(records: Sequence[Record]) -> list[tuple[RunKey, list[Record]]]:
    """ServerApp events by run, runs in order of first appearance."""
    runs: dict[RunKey, list[Record]] = {}
    for record in records:
        if Key.RUN in record or _kind(record) in RUN_KINDS:
            runs.setdefault(_run_key(record), []).append(record)
    return list(runs.items())


def _group_rounds(events: Sequence[Record]) -> list[tuple[int | None, list[Record]]]:
    """A run's per-round events by round number, ascending; unnumbered ones last."""
    rounds: dict[int | None, list[Record]] = {}
    for event in events:
        if _kind(event) in ROUND_KINDS:
            rounds.setdefault(_as_int(event.get(Key.ROUND)), []).append(event)
    return sorted(rounds.items(), key=lambda item: (item[0] is None, item[0] or 0))


def _first(events: Iterable[Record], kind: str) -> Record | None:
    return next((e for e in events if _kind(e) == kind), None)


def _of_kind(events: Iterable[Record], kind: str) -> list[Record]:
    return [e for e in events if _kind(e) == kind]


def _run_title(key: RunKey, events: Sequence[Record]) -> str:
    job = next((j for e in events if (j := _as_str(e.get(Key.JOB)))), None)
    title = f"Run {_esc(key)}" if key is not None else "Run (unnumbered)"
    return f"{title} — job {_esc(job)}" if job else title


# --- Sections -----------------------------------------------------------------------------


def _header(origin: str, size: int, root_hex: str, generated_at: str) -> str:
    return (
        "<header><h1>Ark Sandbox — audit report</h1>"
        '<p class="intro">An independent check of the provider’s transparency log: a '
        "tamper-evident, append-only record of every security decision the sandbox made.</p>"
        '<dl class="facts">'
        f"<dt>Log</dt><dd><code>{_esc(origin)}</code></dd>"
        f"<dt>Entries checked</dt><dd>{_text(size)}</dd>"
        f"<dt>Signed root hash</dt><dd>{_digest(root_hex)}</dd>"
        f"<dt>Report generated</dt><dd>{_time(generated_at)}</dd>"
        "</dl></header>"
    )


_CHECK_CLASS = {True: "pass", False: "failed", None: "skipped"}
_CHECK_MARK = {True: "✓", False: "✗", None: "–"}


def _verdict(checks: Sequence[tuple[str, bool | None, str]], problems: Sequence[str]) -> str:
    # A check is passed (True), failed (False) or not run (None, e.g. no earlier
    # checkpoint to compare with); only a failure or a problem turns the verdict red.
    failed = [check for check in checks if check[1] is False]
    skipped = [check for check in checks if check[1] is None]
    ok = not failed and not problems
    if ok:
        title = "Everything checks out"
        passed = len(checks) - len(skipped)
        sentence = (
            f"All {_plural(passed, 'check')} run passed and no problems were found: the log "
            "is signed by the provider, nothing in it was changed or removed, and the events "
            "it records follow the policy."
            if checks
            else "No problems were reported."
        )
        if skipped:
            sentence += f" {_plural(len(skipped), 'check')} could not be run; see below."
    else:
        title = "Problems found"
        findings = []
        if failed:
            findings.append(f"{len(failed)} of {_plural(len(checks), 'check')} failed")
        if problems:
            verb = "was" if len(problems) == 1 else "were"
            findings.append(f"{_plural(len(problems), 'problem')} {verb} found")
        sentence = (
            " and ".join(findings) + ". Do not rely on this log until each item below is explained."
        )
    items = "".join(
        f'<li class="{_CHECK_CLASS[passed]}">'
        f'<span class="mark">{_CHECK_MARK[passed]}</span>'
        f'<strong>{_esc(name)}</strong> <span class="detail">— {_esc(detail)}</span></li>'
        for name, passed, detail in checks
    )
    parts = [
        f'<section class="verdict {"ok" if ok else "fail"}" id="verdict">',
        f"<h2>{title}</h2><p>{sentence}</p>",
    ]
    if checks:
        parts.append(f'<h3>What was verified</h3><ul class="checks">{items}</ul>')
    if problems:
        listed = "".join(f"<li>{_esc(problem)}</li>" for problem in problems)
        parts.append(f'<h3>What went wrong</h3><ol class="problems">{listed}</ol>')
    parts.append("</section>")
    return "".join(parts)


def _stat(ident: str, count: int, label: str, sub: str = "") -> str:
    extra = f'<span class="sub">{sub}</span>' if sub else ""
    return (
        f'<div class="stat" id="stat-{ident}"><span class="num">{count}</span>'
        f'<span class="label">{label}</span>{extra}</div>'
    )


def _glance(records: Sequence[Record], runs: Sequence[tuple[RunKey, list[Record]]]) -> str:
    appraisals = _of_kind(records, AttestationAppraised.kind)
    trusted = sum(1 for a in appraisals if a.get(Key.STATUS) == AFFIRMING)
    untrusted = len(appraisals) - trusted
    sub = f"{trusted} trusted, {untrusted} not"
    if untrusted:
        sub = f'{trusted} trusted, <strong class="bad-text">{untrusted} not</strong>'
    stats = [
        _stat("attestations", len(appraisals), "Sandbox attestations checked", sub),
        _stat("keys-released", len(_of_kind(records, KeyReleased.kind)), "Model keys released"),
        _stat("keys-denied", len(_of_kind(records, KeyDenied.kind)), "Model keys refused"),
        _stat("runs", len(runs), "Training runs"),
        _stat("rounds", len(_of_kind(records, AggregateCommitted.kind)), "Rounds completed"),
        _stat("accepted", len(_of_kind(records, UpdateAccepted.kind)), "Updates accepted"),
        _stat("rejected", len(_of_kind(records, UpdateRejected.kind)), "Updates rejected"),
    ]
    return (
        '<section id="glance"><h2>At a glance</h2>'
        f'<div class="stats">{"".join(stats)}</div></section>'
    )


def _protection(value: object) -> str:
    if value == PROTECTION_SEALED:
        return _tag("Sealed", "good") + " updates encrypted end to end, aggregator attested"
    if value == PROTECTION_OFF:
        return _tag("Off", "bad") + " no protection: test configuration only"
    return _text(value)


def _round_metrics(committed: Record | None) -> str:
    if committed is None:
        return DASH
    metrics = _as_map(committed.get(Key.METRICS))
    parts = []
    if (accuracy := finite_number(metrics.get("local_accuracy"))) is not None:
        parts.append(f"accuracy {_number(accuracy)}")
    if (loss := finite_number(metrics.get("train_loss"))) is not None:
        parts.append(f"loss {_number(loss)}")
    if (examples := _as_int(committed.get(Key.EXAMPLES))) is not None:
        parts.append(f"{examples} examples")
    return " · ".join(parts) or DASH


def _round_row(number: int | None, events: Sequence[Record]) -> list[str]:
    stages: list[str] = []
    nodes: dict[str, None] = {}  # in order, once each
    for started in _of_kind(events, RoundStarted.kind):
        stage = _as_str(started.get(Key.STAGE))
        label = STAGE_LABELS.get(stage, stage) if stage else None
        if label and _esc(label) not in stages:
            stages.append(_esc(label))
        for participant in _as_list(started.get(Key.PARTICIPANTS)):
            nodes[_text(_as_map(participant).get(Key.NODE))] = None
    committed = _first(events, AggregateCommitted.kind)
    rejected = len(_of_kind(events, UpdateRejected.kind))
    accepted = str(len(_of_kind(events, UpdateAccepted.kind)))
    if (unmasked := _first(events, SecaggUnmasked.kind)) is not None:
        # A secure round accepts no update on its own: the aggregate is a sum of masked
        # inputs, one per surviving node; a dropped node's masking key was rebuilt.
        survivors = len(_as_list(unmasked.get(Key.SURVIVORS)))
        dropped = len(_as_list(unmasked.get(Key.DROPPED)))
        accepted = f"{_plural(survivors, 'masked input')}, {dropped} dropped"
        accepted += '<span class="sub">secure aggregation</span>'
    shown = _join(nodes) if len(nodes) <= MAX_NODES_LISTED else _plural(len(nodes), "node")
    return [
        _text(number),
        _join(stages),
        shown,
        accepted,
        _tag(str(rejected), "bad") if rejected else "0",
        _digest(committed.get(Key.ADAPTER_SHA256)) if committed else DASH,
        _round_metrics(committed),
    ]


def _final_metrics(finished: Record | None) -> str:
    final = _as_map(_as_map(finished.get(Key.METRICS) if finished else None).get(Key.FINAL))
    rows = []
    for node, value in final.items():
        scores = _as_map(value)
        rows.append([_esc(node), _number(scores.get("accuracy")), _number(scores.get("macro_f1"))])
    if not rows:
        return ""
    return (
        "<p>Final evaluation of the trained model on each participant’s held-out data:</p>"
        + _table(["Node", "Accuracy", "Macro F1"], rows)
    )


def _run_section(key: RunKey, events: Sequence[Record]) -> str:
    started = _first(events, RunStarted.kind)
    finished = _first(events, RunFinished.kind)
    start = started or {}
    facts = [
        ("Protection", _protection(start.get(Key.PROTECTION))),
        ("Model", _digest(start.get(Key.MODEL_ID))),
        ("Rounds planned", _text(start.get(Key.ROUNDS))),
        ("Minimum participants", _text(start.get(Key.MIN_NODES))),
        ("Started", _time(start.get(Key.TIME) if started else events[0].get(Key.TIME))),
        ("Finished", _time(finished.get(Key.TIME)) if finished else _tag("Not finished", "warn")),
    ]
    resumed = _as_int(start.get(Key.RESUMED_AFTER_ROUND))
    if resumed:
        facts.append(("Resumed", f"after round {resumed}"))
    if finished:
        facts.append(("Final model", _digest(finished.get(Key.ADAPTER_SHA256))))
    parts = [
        f'<div class="run"><h3>{_run_title(key, events)}</h3><dl class="facts">',
        "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts),
        "</dl>",
    ]
    rounds = _group_rounds(events)
    if rounds:
        headers = ["Round", "Stage", "Participants", "Accepted", "Rejected", "New model"]
        rows = [_round_row(number, round_events) for number, round_events in rounds]
        parts.append(_table([*headers, "Results"], rows))
    else:
        parts.append("<p>No rounds were logged for this run.</p>")
    rejections = [
        f"<li>Round {_text(e.get(Key.ROUND))}, {_node(e.get(Key.NODE))}: "
        f"{_long_text(_as_str(e.get(Key.REASON)) or DASH)} "
        f'<span class="detail">(update {_digest(e.get(Key.ENVELOPE_SHA256))})</span></li>'
        for e in _of_kind(events, UpdateRejected.kind)
    ]
    if rejections:
        parts.append(f"<p>Rejected updates and why:</p><ul>{''.join(rejections)}</ul>")
    parts.append(_final_metrics(finished))
    parts.append("</div>")
    return "".join(parts)


def _runs(runs: Sequence[tuple[RunKey, list[Record]]]) -> str:
    intro = (
        "<p>In each training run the participants (nodes) train the model on their own data "
        "inside a sandbox and send back encrypted updates; each round combines the accepted "
        "updates into a new version of the model.</p>"
    )
    body = "".join(_run_section(key, events) for key, events in runs)
    if not runs:
        body = "<p>The log records no training runs.</p>"
    return f'<section id="runs"><h2>Runs and rounds</h2>{intro}{body}</section>'


# --- Metrics chart ------------------------------------------------------------------------

CHART_W, CHART_H = 640, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 20, 40, 44
X_INSET = 24


@dataclass(frozen=True)
class _Series:
    label: str
    color: str
    dashed: bool
    points: list[tuple[int, float]]


def _series(events: Sequence[Record], metric: str) -> list[tuple[int, float]]:
    points = []
    for committed in _of_kind(events, AggregateCommitted.kind):
        number = _as_int(committed.get(Key.ROUND))
        value = finite_number(_as_map(committed.get(Key.METRICS)).get(metric))
        if number is not None and value is not None:
            points.append((number, value))
    return sorted(points)


def _nice_step(span: float) -> float:
    """A 1-2-2.5-5 step that cuts ``span`` into about five intervals."""
    raw = span / 5
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)


def _tick(value: float) -> str:
    return f"{round(value, 10):g}"


def _svg_text(x: float, y: float, text: str, anchor: str = "middle", fill: str = "#59636e") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12" '
        f'fill="{fill}">{text}</text>'
    )


def _chart(title: str, series: Sequence[_Series]) -> str:
    """A line chart of ``series`` against round number, as inline SVG."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    # Accuracy lives in [0, 1], so the axis always shows that range; loss may exceed it.
    low, high = min(0.0, *ys), max(1.0, *ys)
    if not math.isfinite(high - low):
        return f"<p>{title}: the values are too large to plot.</p>"
    step = _nice_step(high - low)
    low, high = math.floor(low / step) * step, math.ceil(high / step) * step
    x_min, x_max = min(xs), max(xs)
    if x_min == x_max:
        x_min, x_max = x_min - 1, x_max + 1
    plot_w = CHART_W - PAD_LEFT - PAD_RIGHT
    plot_h = CHART_H - PAD_TOP - PAD_BOTTOM

    # Inset so the first and last points sit clear of the axes.
    def px(x: float) -> float:
        return PAD_LEFT + X_INSET + (x - x_min) / (x_max - x_min) * (plot_w - 2 * X_INSET)

    def py(y: float) -> float:
        return PAD_TOP + (high - y) / (high - low) * plot_h

    bottom = PAD_TOP + plot_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{title}">',
        f"<title>{title}</title>",
        f'<rect x="0" y="0" width="{CHART_W}" height="{CHART_H}" fill="#fff"/>',
    ]
    for i in range(round((high - low) / step) + 1):
        value = low + i * step
        y = py(value)
        out.append(
            f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{CHART_W - PAD_RIGHT}" y2="{y:.1f}" '
            'stroke="#e6e9ec"/>'
        )
        out.append(_svg_text(PAD_LEFT - 8, y + 4, _tick(value), "end"))
    x_step = max(1, math.ceil((x_max - x_min) / 10))
    for x in range(x_min, x_max + 1, x_step):
        if x in xs or x_step > 1:
            out.append(_svg_text(px(x), bottom + 18, str(x)))
    out.append(
        f'<path d="M{PAD_LEFT},{PAD_TOP} V{bottom} H{CHART_W - PAD_RIGHT}" '
        'fill="none" stroke="#59636e"/>'
    )
    out.append(_svg_text(PAD_LEFT + plot_w / 2, CHART_H - 6, "Round"))
    legend_x = float(PAD_LEFT)
    for s in series:
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>'
        )
        out.extend(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{s.color}">'
            f"<title>Round {x}: {_esc(s.label.lower())} {_number(y)}</title></circle>"
            for x, y in s.points
        )
        out.append(
            f'<line x1="{legend_x:.1f}" y1="18" x2="{legend_x + 24:.1f}" y2="18" '
            f'stroke="{s.color}" stroke-width="2"{dash}/>'
            f'<circle cx="{legend_x + 12:.1f}" cy="18" r="4" fill="{s.color}"/>'
        )
        out.append(_svg_text(legend_x + 30, 22, _esc(s.label), "start", "#1f2328"))
        legend_x += 30 + 7.5 * len(s.label) + 24
    out.append("</svg>")
    return f'<figure class="chart">{"".join(out)}</figure>'


def _metrics(runs: Sequence[tuple[RunKey, list[Record]]]) -> str:
    explanation = (
        "<p>How training progressed. Each point is one completed round. <strong>Accuracy"
        "</strong> is the share of examples the participants’ updated models got right on "
        "their own data, averaged across participants (higher is better, 1 = all right). "
        "<strong>Training loss</strong> measures the error left during training (lower is "
        "better). Hover over a point for its exact value.</p>"
    )
    charts = []
    for key, events in runs:
        series = [
            _Series("Accuracy", "#0969da", False, _series(events, "local_accuracy")),
            _Series("Training loss", "#bc4c00", True, _series(events, "train_loss")),
        ]
        series = [s for s in series if s.points]
        if series:
            title = _run_title(key, events)
            charts.append(f"<h3>{title}</h3>{_chart(title, series)}")
    if not charts:
        charts.append("<p>No round in the log reported accuracy or loss, so there is no plot.</p>")
    return (
        f'<section id="metrics"><h2>Metrics per round</h2>{explanation}{"".join(charts)}</section>'
    )


# --- Attestations, participants and the full log ------------------------------------------


def _measurements(value: object) -> str:
    measurements = _as_map(value)
    if not measurements:
        return DASH
    names = [
        f'<code title="{_esc(digest)}">{_esc(name)}</code>'
        if isinstance(digest, str)
        else f"<code>{_esc(name)}</code>"
        for name, digest in measurements.items()
    ]
    return f"{len(names)}: {', '.join(names)}"


def _key_outcome(event: Record) -> str:
    kind = _kind(event)
    if kind == AttestationAppraised.kind:
        status = _as_str(event.get(Key.STATUS))
        label, tone = STATUS_LABELS.get(status or "", (_text(status), "bad"))
        # The label is for people; the tooltip keeps the appraisal's own word.
        outcome = _tag(label, tone, f"attestation status: {status}" if status else "")
        if event.get(Key.STUB) is True:
            stub = "A simulated attestation: no real secure hardware vouched for this sandbox."
            outcome += " " + _tag("test stub", "warn", stub)
        return outcome
    if kind == KeyReleased.kind:
        return _tag("Released", "good")
    if kind == ChannelCertified.kind:
        return _tag("Certified", "good")
    if kind == DenialsRateLimited.kind:
        return _tag("Rate limited", "warn")
    return _tag("Refused", "bad")


def _key_detail(event: Record) -> str:
    kind = _kind(event)
    parts = []
    if kind == AttestationAppraised.kind:
        if (tee := _as_str(event.get(Key.TEE))) is not None:
            parts.append(f"hardware: {_esc(tee)}")
        if (failure := _as_str(event.get(Key.FAILURE))) is not None:
            parts.append(f"failure: {_long_text(failure)}")
    elif kind == KeyDenied.kind:
        parts.append(f"<code>{_text(event.get(Key.CODE))}</code>")
        if (cause := _as_str(event.get(Key.CAUSE))) is not None:
            parts.append(_long_text(cause))
    elif kind == DenialsRateLimited.kind:
        # A flood's refusals beyond the broker's budget: counted per code, not one by one.
        who = "all clients" if event.get(Key.SCOPE) == "all" else "one client"
        parts.append(
            f"{_text(event.get(Key.SUPPRESSED))} more refusals from {who} "
            f"({_text(event.get(Key.LOGGED))} listed one by one) between "
            f"{_time(event.get(Key.WINDOW_START))} and {_time(event.get(Key.WINDOW_END))}"
        )
    elif kind == KeyReleased.kind and event.get(Key.MODEL_ID) is not None:
        parts.append(f"model {_digest(event.get(Key.MODEL_ID))}")
    return "; ".join(parts) or DASH


def _key_event(event: Record) -> str:
    label = KIND_LABELS.get(_kind(event), DASH)
    purpose = _as_str(event.get(Key.PURPOSE))
    if purpose is None:
        return label
    return f'{label}<span class="sub">{_esc(PURPOSE_LABELS.get(purpose, purpose))}</span>'


def _attestations(records: Sequence[Record]) -> str:
    events = [r for r in records if _kind(r) in KEY_KINDS]
    intro = (
        "<p>An attestation is how the sandbox proved which code it runs before it received a "
        "key. The key broker releases the model key only to a sandbox whose attestation it "
        "trusts; each refusal below names the reason. Rows marked <em>test stub</em> were "
        "checked with real cryptography but without secure hardware behind them.</p>"
    )
    if not events:
        return (
            f'<section id="attestations"><h2>Attestations and key releases</h2>{intro}'
            "<p>The log records no attestations or key releases.</p></section>"
        )
    rows = [
        [
            _time(e.get(Key.TIME)),
            _key_event(e),
            _digest(e.get(Key.UEID)),
            _key_outcome(e),
            _measurements(e.get(Key.MEASUREMENTS)),
            _digest(e.get(Key.KEY_ID)),
            _key_detail(e),
        ]
        for e in events
    ]
    headers = ["Time", "Event", "Sandbox", "Outcome", "Measurements", "Key", "Details"]
    return (
        f'<section id="attestations"><h2>Attestations and key releases</h2>{intro}'
        f"{_table(headers, rows)}</section>"
    )


def _participant_rows(events: Sequence[Record]) -> list[list[str]]:
    rows = []
    for e in events:
        kind = _kind(e)
        if kind == NodeAdmitted.kind:
            detail = (
                f"sandbox {_digest(e.get(Key.UEID))}, attestation {_digest(e.get(Key.EAR_SHA256))}"
            )
            rows.append([_text(e.get(Key.NODE)), _tag("Admitted", "good"), DASH, detail])
        elif kind == NodeRefused.kind:
            reason = _long_text(_as_str(e.get(Key.REASON)) or DASH)
            rows.append([_text(e.get(Key.NODE)), _tag("Refused", "bad"), DASH, reason])
        elif kind == NodeDeclined.kind:
            reason = _long_text(_as_str(e.get(Key.REASON)) or DASH)
            status = _tag("Declined a round", "warn")
            rows.append([_text(e.get(Key.NODE)), status, _text(e.get(Key.ROUND)), reason])
    return rows


def _participants(runs: Sequence[tuple[RunKey, list[Record]]]) -> str:
    intro = (
        "<p>Who took part in each run: a participant is admitted only after its sandbox "
        "passed attestation.</p>"
    )
    blocks = []
    for key, events in runs:
        rows = _participant_rows(events)
        table = (
            _table(["Node", "Status", "Round", "Details"], rows)
            if rows
            else "<p>No participants were logged for this run.</p>"
        )
        blocks.append(f"<h3>{_run_title(key, events)}</h3>{table}")
    if not blocks:
        blocks.append("<p>The log records no training runs.</p>")
    return f'<section id="participants"><h2>Participants</h2>{intro}{"".join(blocks)}</section>'


def _numbers(values: Iterable[float], digits: int = 3) -> str:
    return _join(_number(value, digits) for value in values)


def _recomputed(row: Spending) -> str:
    """The audit's epsilon (a range where its accountant can only bound it), marked when
    some logged epsilon of the row is not what the mechanism costs."""
    lower, upper = (_number(bound) for bound in row.recomputed)
    shown = upper if lower == upper else f"{lower}–{upper}"
    if row.disagreed:
        why = f"{_plural(row.disagreed, 'logged epsilon')} not reproduced by the audit"
        shown += " " + _tag("differs", "bad", why)
    return shown


def _privacy(records: Sequence[Record]) -> str:
    intro = (
        "<p>Differential privacy bounds what anyone could learn from the trained model about "
        "one training example (<em>record-level</em>: each participant trains with clipped, "
        "noisy steps) or about one participant (<em>client-level</em>: noise on each round’s "
        "combined update). <strong>ε</strong> (epsilon) is how much of that protection was "
        "spent: lower is more private; δ is the small chance the bound does not hold. Each "
        "participant reports what its rounds cost; the auditor recomputes ε from the logged "
        "noise (σ), sampling rate and steps with an accountant of its own, and marks in red "
        "a logged ε it does not reproduce. <strong>ε total</strong> counts every run the "
        "participant’s data trained in, against its declared <strong>budget</strong>.</p>"
    )
    rows = privacy_spending(records)
    nodes = [
        [
            _esc(row.run),
            _esc(row.node),
            _digest(row.ueid),
            str(row.rounds),
            _numbers(row.noise_multiplier),
            _numbers(row.sample_rate, 4),
            _join(str(steps) for steps in row.steps),
            _numbers(row.clip),
            _esc(f"{row.delta:g}"),
            _number(row.epsilon),
            _recomputed(row),
            _number(row.epsilon_total),
            _number(row.budget),
        ]
        for row in rows
        if row.node is not None
    ]
    clients = [
        [
            _esc(row.run),
            str(row.rounds),
            _numbers(row.noise_multiplier),
            _numbers(row.clip),
            _esc(f"{row.delta:g}"),
            _number(row.epsilon),
            _recomputed(row),
        ]
        for row in rows
        if row.node is None
    ]
    parts = ['<section id="privacy"><h2>Differential privacy</h2>', intro]
    if nodes:
        headers = ["Run", "Node", "Sandbox", "Rounds", "Noise σ", "Sampling rate q"]
        headers += ["Steps per round", "Clip", "δ", "Logged ε (run)", "Recomputed ε"]
        parts.append("<h3>Per participant (record-level)</h3>")
        parts.append(_table([*headers, "ε total", "Budget"], nodes))
    if clients:
        headers = ["Run", "Noisy aggregates", "Noise σ", "Clip", "δ", "Logged ε"]
        parts.append("<h3>Per run (client-level)</h3>")
        parts.append(_table([*headers, "Recomputed ε"], clients))
    if not rows:
        parts.append("<p>The log records no differential-privacy spending.</p>")
    parts.append("</section>")
    return "".join(parts)


def _summary_value(value: object, nested: bool = False) -> str:
    """One field's value, compact: long digests shortened, big structures counted."""
    if isinstance(value, str):
        if len(value) > DIGEST_CHARS + 4 and _is_hex(value):
            return _digest(value)
        return _long_text(value) if value else '""'
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        if not nested and 0 < len(value) <= 6:
            fields = (f"{_esc(k)}={_summary_value(v, True)}" for k, v in value.items())
            return "{" + ", ".join(fields) + "}"
        return _plural(len(value), "field")
    if isinstance(value, list | tuple):
        if (
            not nested
            and 0 < len(value) <= 6
            and not any(isinstance(v, Mapping | list | tuple) for v in value)
        ):
            return "[" + ", ".join(_summary_value(v, True) for v in value) + "]"
        return _plural(len(value), "item")
    return _text(value)


def _member_list(record: Record) -> tuple[str, ...]:
    """Which list of which event a member belongs to (what its row groups by)."""
    return tuple(str(record.get(k)) for k in (Key.RUN, Key.ROUND, Key.STAGE, Key.LIST))


def _members_row(first: int, last: int, record: Record) -> list[str]:
    """One row for the consecutive ``list_member`` entries ``first`` to ``last`` of one
    list (thousands in a large round): which list, and how many."""
    name = _text(record.get(Key.LIST))
    where = f"run {_text(record.get(Key.RUN))}"
    if Key.ROUND in record:
        where += f", round {_text(record.get(Key.ROUND))}"
    if Key.STAGE in record:
        where += f", {_text(record.get(Key.STAGE))}"
    count = _plural(last - first + 1, "member")
    label = f"List members<span class='kind'>{_esc(ListMember.kind)}</span>"
    details = f"{count} of <strong>{name}</strong>, {where}"
    numbers = str(first) if first == last else f"{first}–{last}"
    return [numbers, _time(record.get(Key.TIME)), label, details]


def _event_log(records: Sequence[Record]) -> str:
    rows = []
    index = 0
    while index < len(records):
        record = records[index]
        if _kind(record) == ListMember.kind:
            last = index
            while (
                last + 1 < len(records)
                and _kind(records[last + 1]) == ListMember.kind
                and _member_list(records[last + 1]) == _member_list(record)
            ):
                last += 1
            rows.append(_members_row(index, last, record))
            index = last + 1
            continue
        kind = _kind(record)
        label = KIND_LABELS.get(kind)
        shown = f"{label}<span class='kind'>{_esc(kind)}</span>" if label else _text(kind)
        fields = (
            f"<strong>{_esc(k)}</strong>: {_summary_value(v)}"
            for k, v in record.items()
            if k not in (Key.KIND, Key.TIME)
        )
        rows.append([str(index), _time(record.get(Key.TIME)), shown, "; ".join(fields) or DASH])
        index += 1
    return (
        '<section id="log"><h2>Full event log</h2>'
        "<p>Every entry in the log, in order. The entry number is its position in the log, "
        "which the signed root hash covers: changing or removing any entry would break the "
        "checks above. A list that grows with the number of nodes is logged one entry per "
        "member, before the event that commits to it; consecutive members of one list share "
        "a row.</p>"
        f"{_table(['#', 'Time', 'Event', 'Details'], rows, 'log')}</section>"
    )


# --- The page -----------------------------------------------------------------------------


def render_report(
    records: Sequence[Mapping[str, Any]],
    *,
    origin: str,
    size: int,
    root_hex: str,
    checks: Sequence[tuple[str, bool | None, str]],
    problems: Sequence[str],
    generated_at: str,
) -> str:
    """The whole HTML document (str) for a verified log and its events, in log order."""
    # A record that is not a mapping still occupies its index; it renders as an empty row.
    events: list[Record] = [r if isinstance(r, Mapping) else {} for r in records]
    runs = _group_runs(events)
    sections = [
        _header(origin, size, root_hex, generated_at),
        _verdict(checks, problems),
        _glance(events, runs),
        _runs(runs),
        _metrics(runs),
        _attestations(events),
        _participants(runs),
        _privacy(events),
        _event_log(events),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Defence in depth: even if some value escaped unescaped, no script could run and
        # nothing could be fetched.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        f"<title>Ark Sandbox — audit report</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(sections)}"
        "<footer>Generated by <code>ark audit report</code>. This page is self-contained: "
        "it runs no script and loads nothing from the network.</footer>"
        "</main></body></html>\n"
    )
