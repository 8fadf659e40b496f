"""Held-out commitments and signed scorecards (:mod:`sandbox.scorecard`) against their
vectors, and the auditor's comparison rules over real signed logs: an honest comparison
passes, and each attack ends in its own violation and ``ark audit verify`` exit code."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from typer.testing import CliRunner

from sandbox import scorecard as scorecards
from sandbox import strictjson
from sandbox.attestation.result import PURPOSE_CHANNEL
from sandbox.canonical import canonical_entry
from sandbox.errors import (
    EventInvalid,
    PolicyViolation,
    ScorecardInvalid,
    ScorecardMissing,
    ScorecardRootMismatch,
    ScorecardUnattested,
)
from sandbox.events import Event, HeldoutCommitted, Key, NodeAdmitted, ScorecardLogged
from sandbox.ops.cli import app
from sandbox.ops.translog.audit import check_policy, verify_log
from sandbox.ops.translog.report import render_report
from sandbox.scorecard import (
    COMMITMENT_DOMAIN,
    MAX_RECORD_BYTES,
    MAX_TEXT,
    SCORECARD_DOMAIN,
    Commitment,
    Cost,
    Scorecard,
    heldout_leaf,
    heldout_root,
    open_commitment,
    open_scorecard,
    sign_commitment,
    sign_record,
    sign_scorecard,
    signer_sha256,
    signing_public_key,
)
from tests.loghistory import (
    COMPARISON,
    COMPARISON_RUN,
    TIME,
    ComparisonLog,
    build_log,
    committed,
    comparison_history,
    heldout_set,
    honest_history,
    new_signer,
    scorecard,
    scored,
    signing_certification,
    signing_key,
    ueid_of,
)
from tests.vectorload import load_vector, load_vectors, vector_cases

runner = CliRunner()
RECORDS = [document for document in load_vectors("scorecard") if "kind" in document]
OPENERS: dict[str, Callable[[Any], tuple[Any, str]]] = {
    "commitment": open_commitment,
    "scorecard": open_scorecard,
}


# -- the wire form, against its vectors ------------------------------------------------------


@pytest.mark.parametrize(
    "vector",
    vector_cases(
        [(d["kind"], case) for d in RECORDS for case in d["valid"]],
        lambda v: f"{v[0]}: {v[1]['name']}",
    ),
)
def test_a_valid_record_opens_to_its_body_and_signer(vector: tuple[str, Any]) -> None:
    kind, case = vector
    opened, signer = OPENERS[kind](case["record"])
    assert canonical_entry(opened.to_body()) == canonical_entry(case["record"]["body"])
    assert signer == case["signer_sha256"]
    # The same record arriving as bytes opens to the same thing.
    assert OPENERS[kind](canonical_entry(case["record"])) == (opened, signer)


@pytest.mark.parametrize(
    "vector",
    vector_cases(
        [(d["kind"], case) for d in RECORDS for case in d["invalid"]],
        lambda v: f"{v[0]}: {v[1]['name']}",
    ),
)
def test_an_invalid_record_is_refused_naming_the_cause(vector: tuple[str, Any]) -> None:
    kind, case = vector
    record = case["record"]
    if case["form"] == "bytes":
        record = canonical_entry(record)
    with pytest.raises(ScorecardInvalid) as caught:
        OPENERS[kind](record)
    assert case["error"] in str(caught.value)


@pytest.mark.parametrize(
    "case", vector_cases(load_vector("scorecard", "heldout.json")["valid"], lambda v: v["name"])
)
def test_a_heldout_root_is_the_merkle_hash_of_its_salted_leaves(case: dict[str, Any]) -> None:
    salt = bytes.fromhex(case["salt"])
    leaves = [heldout_leaf(salt, text, label) for text, label in case["examples"]]
    assert [leaf.decode("utf-8") for leaf in leaves] == case["leaves"]
    assert heldout_root(leaves) == case["root"]


def test_the_vectors_cover_both_kinds_and_every_record_check() -> None:
    assert {d["kind"] for d in RECORDS} == set(OPENERS)
    domains = {"commitment": COMMITMENT_DOMAIN, "scorecard": SCORECARD_DOMAIN}
    assert {d["kind"]: bytes.fromhex(d["domain_hex"]) for d in RECORDS} == domains
    for document in RECORDS:
        assert document["valid"]
        assert len(document["invalid"]) >= 20


# -- signing, opening and the checks on build ----------------------------------------------


def _card(**changes: Any) -> Scorecard:
    return scorecard("node-1", "minilm", **changes)


def test_a_signed_record_opens_to_what_was_signed_and_names_its_signer() -> None:
    key = Ed25519PrivateKey.generate()
    commitment = Commitment(comparison=COMPARISON, ueid="node-1", root="ab" * 32, count=5)
    assert open_commitment(sign_commitment(key, commitment)) == (
        commitment,
        signer_sha256(key.public_key()),
    )
    card = _card()
    record = sign_scorecard(key, card)
    assert open_scorecard(record) == (card, signer_sha256(key.public_key()))
    # The size limit is measured from the parts; it is the record's canonical length.
    signed = canonical_entry(card.to_body())
    assert scorecards._record_size(signed, record["signer"], record["sig"]) == len(
        canonical_entry(record)
    )


def test_a_signed_record_verifies_the_same_after_it_is_logged() -> None:
    """The log spells a Flower run id beyond 2**53 as text; the signature still holds."""
    key = signing_key("node-1")
    card = _card(run=2**64 - 1)
    record = sign_scorecard(key, card)
    event = ScorecardLogged(
        time=TIME, run=card.run, job="demo", node=1, comparison=COMPARISON, scorecard=record
    )
    logged = strictjson.loads(event.canonical())
    assert logged[Key.SCORECARD]["body"]["run"] == str(2**64 - 1)
    assert open_scorecard(logged[Key.SCORECARD])[0] == card
    assert Event.from_json(logged).canonical() == event.canonical()


def test_the_largest_scorecard_the_bounds_allow_is_far_under_the_size_limit() -> None:
    wide = "\U0001f600" * MAX_TEXT  # 4 bytes each in UTF-8, which JCS does not escape
    metrics = {f"m{n:02d}" + "x" * 60: -1.2345678901234567e-300 for n in range(32)}
    card = dataclasses.replace(
        _card(),
        comparison=wide,
        job=wide,
        ueid=wide,
        model_id=wide,
        run=2**64 - 1,
        before=metrics,
        after=metrics,
    )
    record = sign_scorecard(Ed25519PrivateKey.generate(), card)
    assert len(canonical_entry(record)) < MAX_RECORD_BYTES * 3 // 4
    assert open_scorecard(record)[0] == card


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"heldout_count": 0}, "heldout_count must be an integer from 1 to 4294967295, got 0"),
        ({"after": {"accuracy": math.nan}}, "after.accuracy must be a finite number, got nan"),
        ({"after": {"steps": 2**53}}, "after.steps must be a finite number, got 9007199254740992"),
        ({"before": {"loss": 10**400}}, "before.loss must be a finite number, got 1000000"),
        ({"before": {"": 1.0}}, "before metric name must be text matching"),
        ({"adapter_sha256": "AB" * 32}, "adapter_sha256 must be a SHA-256 digest"),
        ({"run": -1}, "run must be an integer from 0 to 18446744073709551615, got -1"),
        ({"job": "a\tb"}, "job must be printable text of 1 to 256 characters, got 'a\\tb'"),
        ({"cost": {"adapter_bytes": 1}}, "cost must be a Cost, got {'adapter_bytes': 1}"),
    ],
)
def test_a_scorecard_is_checked_when_it_is_built(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ScorecardInvalid) as caught:
        dataclasses.replace(_card(), **changes)
    assert named in str(caught.value)


def test_a_cost_and_a_commitment_are_checked_when_built() -> None:
    with pytest.raises(ScorecardInvalid, match=r"cost\.inference_ms_per_example must be a fini"):
        Cost(
            train_seconds_per_step=1,
            inference_ms_per_example=math.inf,
            update_bytes_per_round=1,
            adapter_bytes=1,
        )
    with pytest.raises(ScorecardInvalid, match=r"root must be a SHA-256 digest .*, got 'ab'"):
        Commitment(comparison=COMPARISON, ueid="node-1", root="ab", count=1)


def test_a_scorecard_keeps_its_metrics_as_they_were_when_signed() -> None:
    after = {"accuracy": 0.5}
    card = dataclasses.replace(_card(), after=after)
    after["accuracy"] = 1.0
    assert card.after == {"accuracy": 0.5}
    with pytest.raises(TypeError):
        card.after["accuracy"] = 1.0  # type: ignore[index]


def test_misuse_is_a_value_error() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="unknown signing domain"):
        sign_record(key, _card().to_body(), b"ark/v1/other\x00")
    with pytest.raises(ValueError, match="32 bytes"):
        heldout_leaf(b"short", "text", "label")
    with pytest.raises(ValueError, match="at least one example"):
        heldout_root([])


@pytest.mark.parametrize("sign_bit", [0, 0x80])
@pytest.mark.parametrize("y", sorted(scorecards._SMALL_ORDER_ED25519))
def test_a_signing_key_of_small_order_is_refused(y: bytes, sign_bit: int) -> None:
    key = y[:-1] + bytes([y[-1] | sign_bit])
    with pytest.raises(ScorecardInvalid, match="small order"):
        signing_public_key(key)


def test_why_small_order_keys_are_refused() -> None:
    """The negative control: the library itself accepts a forgery under the identity."""
    identity = bytes([1]) + bytes(31)
    forged = identity + bytes(32)  # R = identity, S = 0
    Ed25519PublicKey.from_public_bytes(identity).verify(forged, b"any message at all")


def test_an_event_carrying_text_no_writer_can_encode_is_refused() -> None:
    fields: dict[str, Any] = {"time": TIME, "run": 7, "job": "demo", "node": 1}
    with pytest.raises(EventInvalid, match=r"'heldout_committed', key 'commitment\.body'"):
        HeldoutCommitted(**fields, comparison=COMPARISON, commitment={"body": "\ud800"})
    with pytest.raises(EventInvalid, match="not JSON"):
        HeldoutCommitted(**fields, comparison=COMPARISON, commitment={"body": b"raw"})


# -- the auditor: an honest comparison and each attack ---------------------------------------


def _violations(tmp_path: Path, events: list[dict[str, Any]]) -> list[PolicyViolation]:
    """The policy violations ``verify_log`` finds in a real signed log of ``events``."""
    signer = new_signer()
    store = build_log(tmp_path / "log.db", events, signer)
    try:
        return verify_log(store, signer.verifier).violations
    finally:
        store.close()


def _replace_scorecard(log: ComparisonLog, node: str, model: str, record: dict[str, Any]) -> None:
    log.events[log.find(ScorecardLogged.kind, model_id=model, ueid=ueid_of(node))] = record


def _other_heldout_set(log: ComparisonLog) -> None:
    """node-2 scores model-1 on an easier set than the one it committed to."""
    card = scorecard("node-2", "model-1", run=COMPARISON_RUN + 1, heldout=heldout_set("easy"))
    _replace_scorecard(log, "node-2", "model-1", scored(2, card, signing_key("node-2")))


def _losing_scorecard_dropped(log: ComparisonLog) -> None:
    """The provider leaves out node-3's scorecard of the model that scored worst."""
    del log.events[log.find(ScorecardLogged.kind, model_id=log.models[0], ueid=ueid_of("node-3"))]


def _forged_scorecard(log: ComparisonLog) -> None:
    """The provider replaces node-2's scorecard of the losing model with a better one it
    signed itself."""
    card = scorecard("node-2", log.models[0], run=COMPARISON_RUN, accuracy=0.99)
    _replace_scorecard(log, "node-2", log.models[0], scored(2, card, signing_key("provider")))


ATTACKS: dict[str, Callable[[ComparisonLog], None]] = {
    "another held-out set": _other_heldout_set,
    "the losing scorecard dropped": _losing_scorecard_dropped,
    "a forged scorecard": _forged_scorecard,
}


def test_an_honest_comparison_passes(tmp_path: Path) -> None:
    log = comparison_history(models=3, local_model=True)
    assert _violations(tmp_path, [*honest_history(), *log.events]) == []


def test_scoring_on_another_set_than_committed_is_a_root_mismatch(tmp_path: Path) -> None:
    log = comparison_history()
    _other_heldout_set(log)
    violations = _violations(tmp_path, log.events)
    # No valid scorecard of model-1 by node-2 is left, so it is also missing.
    assert [type(v) for v in violations] == [ScorecardRootMismatch, ScorecardMissing]
    assert violations[0].exit_code == 37
    assert "model 'model-1'" in str(violations[0])
    assert "not the committed" in str(violations[0])


def test_the_losing_models_scorecard_missing_from_the_log(tmp_path: Path) -> None:
    log = comparison_history()
    _losing_scorecard_dropped(log)
    violations = _violations(tmp_path, log.events)
    assert [type(v) for v in violations] == [ScorecardMissing]
    assert violations[0].exit_code == 38
    assert f"model {log.models[0]!r} from ueid {ueid_of('node-3')!r}" in str(violations[0])


def test_a_scorecard_forged_with_a_key_no_sandbox_attested(tmp_path: Path) -> None:
    log = comparison_history()
    _forged_scorecard(log)
    violations = _violations(tmp_path, log.events)
    assert [type(v) for v in violations] == [ScorecardUnattested, ScorecardMissing]
    assert violations[0].exit_code == 39
    assert "did not certify for signing" in str(violations[0])


def test_a_forged_scorecard_beside_the_real_one(tmp_path: Path) -> None:
    log = comparison_history()
    card = scorecard("node-2", log.models[0], accuracy=0.99)
    log.events.insert(-1, scored(2, card, signing_key("provider")))
    assert [type(v) for v in _violations(tmp_path, log.events)] == [ScorecardUnattested]


def test_a_scorecard_by_a_key_certified_for_another_ueid(tmp_path: Path) -> None:
    """A rogue but attested sandbox (node-9) signs a scorecard in node-2's name."""
    log = comparison_history()
    rogue = signing_key("node-9")
    log.events[:0] = signing_certification("node-9", rogue)
    card = scorecard("node-2", log.models[0], accuracy=0.99)
    _replace_scorecard(log, "node-2", log.models[0], scored(2, card, rogue))
    violations = _violations(tmp_path, log.events)
    assert type(violations[0]) is ScorecardUnattested
    assert f"by ueid {ueid_of('node-2')!r}" in str(violations[0])


def test_a_key_certified_for_a_channel_does_not_sign(tmp_path: Path) -> None:
    log = comparison_history(nodes=2)
    channel = signing_certification("node-1", signing_key("node-1"), purpose=PURPOSE_CHANNEL)
    log.events[0:2] = channel  # node-1's certification, for the wrong purpose
    violations = _violations(tmp_path, log.events)
    assert violations
    assert {type(v) for v in violations} == {ScorecardUnattested}


def test_a_certification_after_the_record_does_not_count(tmp_path: Path) -> None:
    log = comparison_history(nodes=2)
    certification = log.events[0:2]
    del log.events[0:2]
    log.events[-1:-1] = certification  # node-1 certified only at the end
    # Its commitment and two scorecards are unattested; with no commitment that counts,
    # node-1 owes no scorecard.
    violations = _violations(tmp_path, log.events)
    assert [type(v) for v in violations] == [ScorecardUnattested] * 3


def test_a_scorecard_before_its_nodes_commitment(tmp_path: Path) -> None:
    log = comparison_history()
    commitment = log.find(HeldoutCommitted.kind, ueid=ueid_of("node-1"))
    card = log.events.pop(commitment + 1)  # node-1's first scorecard, moved ahead of it
    log.events.insert(commitment, card)
    violations = _violations(tmp_path, log.events)
    assert type(violations[0]) is ScorecardRootMismatch
    assert violations[0].exit_code == 37
    assert "before that ueid committed" in str(violations[0])


def test_two_different_commitments_by_one_node_in_one_comparison(tmp_path: Path) -> None:
    log = comparison_history()
    second = committed("node-2", 2, heldout=heldout_set("easy"))
    log.events.insert(log.find(HeldoutCommitted.kind, ueid=ueid_of("node-2")) + 1, second)
    violations = _violations(tmp_path, log.events)
    assert [type(v) for v in violations] == [ScorecardRootMismatch]
    assert "having committed" in str(violations[0])


def test_the_same_commitment_twice_is_fine(tmp_path: Path) -> None:
    log = comparison_history()
    log.events.insert(-1, committed("node-2", 2, run=COMPARISON_RUN + 1))
    assert _violations(tmp_path, log.events) == []


def _wrapped(kind: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "time": TIME.isoformat(), **fields}


def test_what_the_provider_wrote_around_a_signed_record_must_agree_with_it(
    tmp_path: Path,
) -> None:
    log = comparison_history(nodes=2)
    index = log.find(ScorecardLogged.kind, model_id="model-1", ueid=ueid_of("node-1"))
    log.events[index] = {**log.events[index], Key.COMPARISON: "cmp-other"}
    index = log.find(ScorecardLogged.kind, model_id="model-1", ueid=ueid_of("node-2"))
    log.events[index] = {**log.events[index], Key.RUN: 7}
    log.events[log.find("comparison_started")][Key.MODELS][0]["manifest_sha256"] = "ab" * 32
    log.events.append(_wrapped("comparison_finished", comparison="never-started", runs={}))
    log.events.append(log.events[log.find("comparison_started")])
    violations = _violations(tmp_path, log.events)
    # None of the four scorecards counts, so all four are missing at the finish.
    assert [type(v) for v in violations] == [
        *[PolicyViolation] * 4,
        *[ScorecardMissing] * 4,
        *[PolicyViolation] * 2,
    ]
    messages = [str(v) for v in violations]
    assert "scores manifest" in messages[0]  # model-0, by node-1 then node-2
    assert "scores manifest" in messages[1]
    assert "logged as one of 'cmp-other'" in messages[2]
    assert "is of run 16401725734191279428, logged in another" in messages[3]
    assert "'never-started' finished, never started" in messages[8]
    assert "started twice" in messages[9]


def test_malformed_records_in_the_log_do_not_crash_the_audit(tmp_path: Path) -> None:
    log = comparison_history(nodes=2)
    good = log.events[log.find(ScorecardLogged.kind)]
    commitment = log.events[log.find(HeldoutCommitted.kind)]
    nested: Any = "deep"
    for _ in range(20):  # 40 levels: under the parser's limit, so the entry is decoded
        nested = {"x": [nested]}
    hostile = [
        _wrapped("heldout_committed", node=1, comparison=COMPARISON, commitment="x"),
        _wrapped("heldout_committed", node=1),
        _wrapped("heldout_committed", commitment={"body": [1], "signer": 5, "sig": None}),
        _wrapped("scorecard_logged", scorecard={**good[Key.SCORECARD], "body": nested}),
        _wrapped("scorecard_logged", scorecard={**good[Key.SCORECARD], "sig": "A" * 40_000}),
        _wrapped("scorecard_logged", comparison=COMPARISON, scorecard=commitment["commitment"]),
        {**good, Key.SCORECARD: {**good[Key.SCORECARD], "body": {"run": {"a": 1}}}},
        _wrapped("comparison_started", models="x"),
        _wrapped("comparison_started", comparison="cmp-2", models=[1, "a", {"model_id": ["x"]}]),
        _wrapped("comparison_finished", comparison={"a": 1}),
        _wrapped("comparison_finished", comparison="cmp-2"),
        _wrapped("channel_certified", purpose="signing", ueid=["x"], tee_pubkey_sha256=None),
    ]
    log.events[-1:-1] = hostile
    violations = _violations(tmp_path, log.events)
    assert [type(v) for v in violations] == [
        *[ScorecardUnattested] * 7,
        PolicyViolation,  # a comparison with no name
        PolicyViolation,  # one that finished, never started
        ScorecardMissing,  # one that finished naming no run of the model it started with
    ]
    assert "AAAA" not in str(violations[4])  # the signature is refused, never quoted
    # On its own (no certification, no comparison started) the same holds.
    alone = check_policy(hostile)
    assert [type(v) for v in alone] == [type(v) for v in violations]


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (None, 0),
        ("another held-out set", ScorecardRootMismatch.exit_code),
        ("the losing scorecard dropped", ScorecardMissing.exit_code),
        ("a forged scorecard", ScorecardUnattested.exit_code),
    ],
)
def test_ark_audit_verify_exits_with_the_attacks_code(
    tmp_path: Path, attack: str | None, code: int
) -> None:
    log = comparison_history()
    if attack is not None:
        ATTACKS[attack](log)
    signer = new_signer()
    db = tmp_path / "provider" / "translog.db"
    build_log(db, log.events, signer).close()
    vkey = tmp_path / "log.vkey"
    vkey.write_text(signer.verifier.vkey() + "\n", encoding="utf-8")
    result = runner.invoke(app, ["audit", "verify", "--log", str(db), "--key", str(vkey)])
    assert result.exit_code == code, result.output
    assert (code == 0) == ("ok: Policy across events" in result.output)


def test_the_report_labels_comparison_events() -> None:
    log = comparison_history(models=1, nodes=1)
    page = render_report(
        log.events,
        origin="ark-sandbox.local/log",
        size=len(log.events),
        root_hex="00" * 32,
        checks=[("Policy across events", True, "no violation")],
        problems=[],
        generated_at=dt.datetime(2026, 11, 23, tzinfo=dt.UTC).isoformat(),
    )
    for label in (
        "Model comparison started",
        "Held-out set committed",
        "Scorecard logged",
        "Model comparison finished",
    ):
        assert label in page


# -- a provider cherry-picking around the comparison's bounds -----------------------------


def _kinds(violations: list[PolicyViolation]) -> list[str]:
    return [f"{type(v).__name__}: {v}" for v in violations]


def test_a_comparison_never_finished_cannot_be_checked_complete() -> None:
    """A provider that never logs comparison_finished would never have its scorecards
    counted: the audit says the comparison is open at the log's end."""
    log = comparison_history(nodes=2)
    del log.events[log.find("comparison_finished")]
    found = check_policy(log.events)
    assert [type(v) for v in found] == [ScorecardMissing], _kinds(found)
    assert "not finished" in str(found[0])


def test_a_record_outside_a_started_comparison_is_a_violation() -> None:
    """A trial run scored before the comparison started (or after it finished) is one the
    completeness check would never weigh."""
    log = comparison_history(nodes=2)
    trial = scored(1, scorecard("node-1", "model-1", run=COMPARISON_RUN + 7), signing_key("node-1"))
    log.events.insert(log.find("comparison_started"), dict(trial))
    log.events.append(dict(trial))
    found = check_policy(log.events)
    messages = _kinds(found)
    assert len(found) == 2, messages
    assert "never started" in messages[0]
    assert "finished" in messages[1]


def test_a_best_of_several_runs_pick_is_a_violation() -> None:
    """The provider ran one model twice and names only the better run as the comparison's:
    the other run's valid scorecard gives it away."""
    log = comparison_history(nodes=2)
    rerun = scored(1, scorecard("node-1", "model-0", run=COMPARISON_RUN + 9), signing_key("node-1"))
    log.events.insert(log.find("comparison_finished"), rerun)
    found = check_policy(log.events)
    assert [type(v) for v in found] == [PolicyViolation], _kinds(found)
    assert "best-of-several" in str(found[0])


def test_a_node_admitted_to_a_models_run_without_a_scorecard_is_missing() -> None:
    """Dropping a whole node (its commitment and every scorecard) still shows: the node
    was admitted to the model's run, so its scorecard is due."""
    log = comparison_history(nodes=2)
    admitted = NodeAdmitted(
        time=TIME,
        run=COMPARISON_RUN,
        job="cmp-1-model-0",
        node=3,
        ear_sha256="e" * 64,
        ueid=ueid_of("node-3"),
        tee_pubkey_sha256="f" * 64,
    ).to_json()
    log.events.insert(log.find("comparison_started") + 1, admitted)
    found = check_policy(log.events)
    assert [type(v) for v in found] == [ScorecardMissing], _kinds(found)
    assert ueid_of("node-3") in str(found[0])


def test_a_signing_certification_with_no_affirming_appraisal_does_not_count() -> None:
    """The provider logs a certification of a key of its own for a node's ueid, with no
    appraisal of the node's sandbox before it: records signed with it are unattested."""
    log = comparison_history(nodes=2)
    log.events = [
        e
        for e in log.events
        if not (e[Key.KIND] == "attestation_appraised" and e.get(Key.PURPOSE) == "signing")
    ]
    found = check_policy(log.events)
    assert found
    assert {type(v) for v in found} <= {ScorecardUnattested, ScorecardMissing}, _kinds(found)
    assert isinstance(found[0], ScorecardUnattested)
