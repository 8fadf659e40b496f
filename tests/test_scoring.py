"""A node's part in a comparison, on real components: the held-out commitment and the
scorecard its sandbox signs, the key the key broker certified for them, what the egress
guard lets out, and what the ServerApp logs.

The run is driven in-process as the ServerApp drives one (``tests/sealed_run.py``): the
key broker over TLS on loopback, the node sandbox's attestation and key release, and the
aggregator sandbox sealing each instruction to the node's channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from clients.channels import RunIds
from clients.data import Example
from clients.egress import check_reply
from clients.sandbox import NodeSandbox, Request, load_split
from clients.scoring import (
    RunTally,
    Scoring,
    commit_heldout,
    heldout_salt,
    own_model_digest,
    salt_path,
    sign_commitment_bytes,
    sign_scorecard_bytes,
)
from sandbox.channel import (
    LOCAL_MODEL_DIGEST,
    STAGE_EVALUATE,
    STAGE_TRAIN,
    adapter_bytes,
    model_dir_digest,
)
from sandbox.config import LOCAL_MODEL, NodeConfig, RunSpec
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import ConfigError, EgressViolation, ProtocolError, ScorecardError
from sandbox.journal import read_journal
from sandbox.ops.federation import free_port
from sandbox.ops.provision import LoopbackDeployment, provision_loopback
from sandbox.ops.translog.audit import crosscheck
from sandbox.protocol import COMMITMENT_KEY, METRICS_KEY, SCORECARD_KEY, SIGNED_KEY
from sandbox.scorecard import Commitment, open_commitment, open_scorecard
from sandbox.seal.package import MANIFEST
from server.sandbox import AggregatorSandbox
from server.scoring import ComparisonRecords, signed_record
from tests.conftest import make_spec
from tests.sealed_run import SealedExchange, drive_sealed_exchange, key_broker

LABELS = ("a", "b")
COMPARISON = "cmp-test"
RUN_ID = 11


def _rows(n: int) -> str:
    return "".join(
        json.dumps({"text": f"row {i} {'good' if i % 2 else 'bad'}", "label": LABELS[i % 2]}) + "\n"
        for i in range(n)
    )


@dataclass
class Compared:
    """One node's sealed comparison run, and what it left."""

    deployment: LoopbackDeployment
    node: NodeConfig
    spec: RunSpec
    exchange: SealedExchange

    def provider_events(self) -> list[dict[str, Any]]:
        lines = self.deployment.provider.events.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Compared:
    root = tmp_path_factory.mktemp("scoring")
    data = {"alpine": root / "alpine.jsonl"}
    data["alpine"].write_text(_rows(24), encoding="utf-8")
    deployment = provision_loopback(
        root, model_dir=tiny_bert_dir, node_data=data, key_broker_port=free_port(), model_id="tiny"
    )
    spec = make_spec(
        tiny_bert_dir,
        labels=LABELS,
        model_id="tiny",
        local_steps=2,
        comparison=COMPARISON,
        job_id=f"{COMPARISON}-tiny",
    )
    node = NodeConfig.load(deployment.node_configs["alpine"])
    with key_broker(deployment):
        sandbox = NodeSandbox(node)
        sandbox.start()
        exchange = drive_sealed_exchange(sandbox, deployment, spec, RUN_ID)
    return Compared(deployment, node, spec, exchange)


def test_the_commitment_is_the_root_of_the_nodes_own_heldout_rows(compared: Compared) -> None:
    commitment, _ = open_commitment(compared.exchange.train.commitment)
    heldout = load_split(compared.spec, compared.node).heldout
    expected = commit_heldout(
        COMPARISON, compared.node.require_sandbox().ueid, heldout_salt(compared.node), heldout
    )
    assert commitment == expected
    assert commitment.count == len(heldout) > 0


def test_the_scorecard_names_the_model_adapter_root_and_figures(compared: Compared) -> None:
    exchange = compared.exchange
    commitment, committer = open_commitment(exchange.train.commitment)
    card, signer = open_scorecard(exchange.evaluate.scorecard)
    package = compared.node.require_sandbox().package
    assert signer == committer
    assert (card.comparison, card.run, card.job, card.model_id) == (
        COMPARISON,
        RUN_ID,
        compared.spec.job_id,
        "tiny",
    )
    assert card.ueid == compared.node.require_sandbox().ueid
    assert card.manifest_sha256 == sha256_file(package / MANIFEST)[0]
    assert card.adapter_sha256 == sha256_hex(adapter_bytes(exchange.final))
    assert (card.heldout_root, card.heldout_count) == (commitment.root, commitment.count)
    metrics = exchange.train.metrics
    assert card.before == {
        k.removeprefix("before-"): v for k, v in metrics.items() if k.startswith("before-")
    }
    assert card.after == {
        k.removeprefix("before-"): v
        for k, v in exchange.evaluate.metrics.items()
        if k.startswith("before-")
    }
    assert card.cost.train_seconds_per_step > 0
    assert card.cost.inference_ms_per_example > 0
    assert card.cost.update_bytes_per_round > 0
    assert card.cost.adapter_bytes == sum(a.nbytes for a in exchange.final.values())


def test_the_signing_key_was_certified_by_the_key_broker_for_this_tee(
    compared: Compared,
) -> None:
    _, signer = open_scorecard(compared.exchange.evaluate.scorecard)
    certified = [
        e
        for e in compared.provider_events()
        if e["kind"] == "channel_certified" and e["purpose"] == "signing"
    ]
    assert [(e["tee_pubkey_sha256"], e["ueid"]) for e in certified] == [
        (signer, compared.node.require_sandbox().ueid)
    ]


def test_the_journal_keeps_the_digests_of_both_records(compared: Compared) -> None:
    assert compared.node.journal_path is not None
    entries = read_journal(compared.node.journal_path)
    committed = [e for e in entries if e["kind"] == "heldout_commitment"]
    signed = [e for e in entries if e["kind"] == "scorecard_signed"]
    assert [e["record_sha256"] for e in committed] == [
        sha256_hex(compared.exchange.train.commitment)
    ]
    assert [e["record_sha256"] for e in signed] == [
        sha256_hex(compared.exchange.evaluate.scorecard)
    ]
    assert signed[0]["model_id"] == "tiny"


def test_a_run_outside_a_comparison_signs_nothing(tmp_path: Path, compared: Compared) -> None:
    plain = dataclasses.replace(compared.spec, comparison="", job_id="tiny-plain")
    with key_broker(compared.deployment):
        sandbox = NodeSandbox(compared.node)
        sandbox.start()
        exchange = drive_sealed_exchange(sandbox, compared.deployment, plain, RUN_ID + 1)
    assert exchange.train.commitment == b""
    assert exchange.evaluate.scorecard == b""


# -- the held-out salt and root ----------------------------------------------------------


def test_the_salt_is_made_once_private_and_kept(compared: Compared) -> None:
    path = salt_path(compared.node)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert heldout_salt(compared.node) == heldout_salt(compared.node) == path.read_bytes()


def test_a_symlinked_salt_is_refused(tmp_path: Path, compared: Compared) -> None:
    workspace = tmp_path / "node"
    workspace.mkdir()
    config = workspace / "node.toml"
    config.write_text(compared.node.to_toml(), encoding="utf-8")
    node = NodeConfig.load(config)
    (workspace / "scoring").mkdir(mode=0o700)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(os.urandom(32))
    os.symlink(decoy, salt_path(node))
    with pytest.raises(ConfigError, match=r"heldout\.salt"):
        heldout_salt(node)


def test_another_heldout_set_commits_another_root() -> None:
    rows = tuple(Example(f"ticket {i}", LABELS[i % 2]) for i in range(10))
    salt = bytes(32)
    first = commit_heldout(COMPARISON, "u", salt, rows)
    assert commit_heldout(COMPARISON, "u", salt, rows) == first
    swapped = (Example("ticket 0", "b"), *rows[1:])
    assert commit_heldout(COMPARISON, "u", salt, swapped).root != first.root
    assert commit_heldout(COMPARISON, "u", bytes([1]) * 32, rows).root != first.root
    assert commit_heldout(COMPARISON, "u", salt, rows[:-1]).count == 9
    # The same set has another root in another comparison: roots do not link.
    assert commit_heldout("cmp-other", "u", salt, rows).root != first.root


def test_before_figures_come_from_round_one_only(tmp_path: Path, compared: Compared) -> None:
    scoring = Scoring(compared.node)
    scoring.trained(5, 2, before={"accuracy": 0.9}, seconds=2.0, steps=4, update_bytes=100)
    assert scoring.tally(5) == RunTally(None, 2.0, 4, 100, 1)
    scoring.trained(5, 1, before={"accuracy": 0.5}, seconds=1.0, steps=4, update_bytes=300)
    assert scoring.tally(5).before == {"accuracy": 0.5}
    assert scoring.tally(5).update_bytes / scoring.tally(5).updates == 200


# -- what the egress guard lets out ------------------------------------------------------


def _signed(compared: Compared, **changes: Any) -> tuple[bytes, bytes]:
    """A commitment and a scorecard of the fixture's run, changed as asked, signed by a
    fresh key (the egress guard checks what they say, the audit who signed them)."""
    key = Ed25519PrivateKey.generate()
    commitment, _ = open_commitment(compared.exchange.train.commitment)
    card, _ = open_scorecard(compared.exchange.evaluate.scorecard)
    commitment = dataclasses.replace(
        commitment, **{k: v for k, v in changes.items() if k in ("comparison", "ueid")}
    )
    card = dataclasses.replace(card, **changes)
    return sign_commitment_bytes(key, commitment), sign_scorecard_bytes(key, card)


def _content(key: str, blob: bytes) -> RecordDict:
    return RecordDict(
        {METRICS_KEY: MetricRecord({"num-examples": 4.0}), key: ConfigRecord({SIGNED_KEY: blob})}
    )


def test_the_guard_lets_the_runs_own_records_out(compared: Compared) -> None:
    node, spec = compared.node, compared.spec
    commitment, card = _signed(compared)
    check_reply(
        _content(COMMITMENT_KEY, commitment), node.egress, MessageType.TRAIN, run=spec, node=node
    )
    check_reply(
        _content(SCORECARD_KEY, card), node.egress, MessageType.EVALUATE, run=spec, node=node
    )


@pytest.mark.parametrize(
    ("changes", "record", "why"),
    [
        ({"comparison": "cmp-other"}, COMMITMENT_KEY, "not for this comparison"),
        ({"ueid": "someone-else"}, SCORECARD_KEY, "not for this comparison and node"),
        ({"job": "another-job"}, SCORECARD_KEY, "job and model"),
        ({"model_id": "another-model"}, SCORECARD_KEY, "job and model"),
        ({"after": {"private_row": 1.0}}, SCORECARD_KEY, "not allowlisted"),
    ],
)
def test_the_guard_keeps_a_record_for_another_run_or_with_free_text(
    compared: Compared, changes: dict[str, Any], record: str, why: str
) -> None:
    commitment, card = _signed(compared, **changes)
    blob, kind = (
        (commitment, MessageType.TRAIN)
        if record == COMMITMENT_KEY
        else (card, MessageType.EVALUATE)
    )
    node = compared.node
    with pytest.raises(EgressViolation, match=why):
        check_reply(_content(record, blob), node.egress, kind, run=compared.spec, node=node)


def test_the_guard_keeps_signed_records_outside_a_comparison_and_garbage(
    compared: Compared,
) -> None:
    node = compared.node
    commitment, card = _signed(compared)
    plain = dataclasses.replace(compared.spec, comparison="")
    with pytest.raises(EgressViolation, match="only in a comparison"):
        check_reply(
            _content(COMMITMENT_KEY, commitment),
            node.egress,
            MessageType.TRAIN,
            run=plain,
            node=node,
        )
    with pytest.raises(EgressViolation, match="does not open"):
        check_reply(
            _content(SCORECARD_KEY, b'{"body": "a private row"}'),
            node.egress,
            MessageType.EVALUATE,
            run=compared.spec,
            node=node,
        )
    with pytest.raises(EgressViolation, match="may not leave"):
        check_reply(
            _content(SCORECARD_KEY, card),
            node.egress,
            MessageType.TRAIN,
            run=compared.spec,
            node=node,
        )


# -- what the ServerApp logs -------------------------------------------------------------


def _reply(key: str, blob: bytes) -> RecordDict:
    return RecordDict({key: ConfigRecord({SIGNED_KEY: blob})})


def test_the_serverapp_logs_each_nodes_commitment_once_and_its_scorecard(
    compared: Compared,
) -> None:
    logged: list[tuple[str, dict[str, Any]]] = []
    records = ComparisonRecords(
        compared.spec, RUN_ID, lambda kind, **f: logged.append((kind.kind, f))
    )
    ueid = compared.node.require_sandbox().ueid
    commitment = signed_record(
        _reply(COMMITMENT_KEY, compared.exchange.train.commitment), COMMITMENT_KEY
    )
    for _ in range(2):
        records.commitment(3, ueid, commitment)
    records.scorecard(3, ueid, compared.exchange.evaluate.scorecard)
    assert [kind for kind, _ in logged] == ["heldout_committed", "scorecard_logged"]
    assert logged[0][1]["commitment"] == json.loads(compared.exchange.train.commitment)
    assert logged[1][1]["scorecard"] == json.loads(compared.exchange.evaluate.scorecard)


@pytest.mark.parametrize("case", ["other tee", "other run", "garbage"])
def test_the_serverapp_does_not_log_a_record_that_is_not_this_nodes(
    compared: Compared, case: str
) -> None:
    logged: list[str] = []
    run = RUN_ID + 1 if case == "other run" else RUN_ID
    records = ComparisonRecords(compared.spec, run, lambda kind, **f: logged.append(kind.kind))
    ueid = "someone-else" if case == "other tee" else compared.node.require_sandbox().ueid
    card = b"{}" if case == "garbage" else compared.exchange.evaluate.scorecard
    records.scorecard(3, ueid, card)
    if case != "other run":
        records.commitment(
            3, ueid, b"{}" if case == "garbage" else compared.exchange.train.commitment
        )
    assert logged == []


def test_a_reply_record_of_the_wrong_shape_is_refused() -> None:
    reply = RecordDict({SCORECARD_KEY: ConfigRecord({SIGNED_KEY: "text", "extra": 1})})
    with pytest.raises(ScorecardError, match="must hold only"):
        signed_record(reply, SCORECARD_KEY)
    assert signed_record(_reply(METRICS_KEY, b""), SCORECARD_KEY) is None


def test_a_commitment_needs_a_heldout_example() -> None:
    with pytest.raises(ScorecardError):
        Commitment(comparison=COMPARISON, ueid="u", root="0" * 64, count=0)


# -- the node's own model (the "1") -----------------------------------------------------


@dataclass
class LocalRun:
    """A node's sandbox admitted to a comparison's local-model run."""

    aggregator: AggregatorSandbox
    sandbox: NodeSandbox
    ids: RunIds
    peer: Any
    spec: RunSpec

    def request(self, stage: str, adapter: Any) -> Request:
        """The aggregator's instruction of ``stage`` carrying ``adapter``."""
        content = self.aggregator.instruction(self.peer, 0, adapter, stage)
        return Request(self.ids, 0, stage, self.spec, content)


@contextlib.contextmanager
def _local_run(compared: Compared, node: NodeConfig, run_id: int) -> Iterator[LocalRun]:
    """``node``'s sandbox started and admitted to local-model run ``run_id``, with the key
    broker serving for the block's duration."""
    spec = dataclasses.replace(compared.spec, model_id=LOCAL_MODEL, job_id=f"{COMPARISON}-local")
    with key_broker(compared.deployment):
        sandbox = NodeSandbox(node)
        sandbox.start()
        aggregator = AggregatorSandbox.load(
            compared.deployment.provider.aggregator, run_id=run_id, model_digest=LOCAL_MODEL_DIGEST
        )
        ids = RunIds(run_id=run_id, node_id=3)
        peer = aggregator.admit(ids.node_id, sandbox.hello(ids, 0, spec).record)
        yield LocalRun(aggregator, sandbox, ids, peer, spec)


@pytest.fixture
def local_run(compared: Compared, tiny_bert_dir: Path) -> Iterator[LocalRun]:
    """The fixture's node, keeping the tiny BERT as a model of its own."""
    sandbox = dataclasses.replace(compared.node.require_sandbox(), local_model=tiny_bert_dir)
    with _local_run(
        compared, dataclasses.replace(compared.node, sandbox=sandbox), RUN_ID + 5
    ) as run:
        yield run


def test_a_node_scores_its_own_model_and_sends_nothing_of_it(
    compared: Compared, local_run: LocalRun, tiny_bert_dir: Path
) -> None:
    result = local_run.sandbox.evaluate(local_run.request(STAGE_EVALUATE, {}))
    card, _ = open_scorecard(result.scorecard)
    commitment, _ = open_commitment(compared.exchange.train.commitment)
    assert card.model_id == LOCAL_MODEL
    assert card.manifest_sha256 == own_model_digest(
        heldout_salt(compared.node), model_dir_digest(tiny_bert_dir)
    )
    assert card.manifest_sha256 != model_dir_digest(tiny_bert_dir)
    assert (card.heldout_root, card.heldout_count) == (commitment.root, commitment.count)
    assert card.cost.update_bytes_per_round == 0
    assert card.cost.adapter_bytes > 0
    assert set(card.before) == set(card.after) == {"accuracy", "macro_f1"}
    # Only the metrics and the scorecard leave: the metrics are the local model's after.
    assert result.metrics == {
        "num-examples": float(card.heldout_count),
        **{f"before-{name}": value for name, value in card.after.items()},
    }


def test_a_local_model_run_never_yields_an_update(compared: Compared, local_run: LocalRun) -> None:
    """A provider that asks a node to train its own model, or sends it an adapter to
    evaluate, is refused before anything is trained."""
    with pytest.raises(ConfigError, match="sends no update"):
        local_run.sandbox.train(local_run.request(STAGE_TRAIN, {}))
    initial = compared.exchange.final
    with pytest.raises(ProtocolError, match="carries an adapter"):
        local_run.sandbox.evaluate(local_run.request(STAGE_EVALUATE, initial))


def test_a_node_without_a_model_of_its_own_declines(compared: Compared) -> None:
    with (
        _local_run(compared, compared.node, RUN_ID + 6) as run,
        pytest.raises(ConfigError, match="local-model"),
    ):
        run.sandbox.evaluate(run.request(STAGE_EVALUATE, {}))


# -- the node's journal against the provider's log ----------------------------------------


def _logged(compared: Compared, *, scorecard: bytes | None) -> list[dict[str, Any]]:
    """The provider's log of the fixture's run as the ServerApp writes it: the node's
    commitment and (unless withheld) a scorecard attributed to it."""
    fields = {"time": "2026-12-01T00:00:00+00:00", "run": str(RUN_ID), "job": "j", "node": "3"}
    records = [
        {
            **fields,
            "kind": "heldout_committed",
            "comparison": COMPARISON,
            "commitment": json.loads(compared.exchange.train.commitment),
        }
    ]
    if scorecard is not None:
        records.append(
            {
                **fields,
                "kind": "scorecard_logged",
                "comparison": COMPARISON,
                "scorecard": json.loads(scorecard),
            }
        )
    return records


def _signed_mismatches(compared: Compared, records: list[dict[str, Any]]) -> list[str]:
    assert compared.node.journal_path is not None
    journal = read_journal(compared.node.journal_path)
    found = [str(m) for m in crosscheck(records, journal, "alpine")]
    # Only this run's: other tests here add runs of their own to the node's journal.
    return [m for m in found if ("commitment" in m or "scorecard" in m) and f"run {RUN_ID} " in m]


def test_the_journal_and_the_log_agree_on_the_signed_records(compared: Compared) -> None:
    records = _logged(compared, scorecard=compared.exchange.evaluate.scorecard)
    assert _signed_mismatches(compared, records) == []


def test_a_scorecard_the_provider_withheld_shows_in_the_crosscheck(compared: Compared) -> None:
    """The provider drops the scorecard of the model that lost: the node's journal still
    holds its digest."""
    found = _signed_mismatches(compared, _logged(compared, scorecard=None))
    assert len(found) == 1
    assert "scorecard" in found[0]
    assert "is not in the provider's log" in found[0]


def test_a_scorecard_the_provider_made_up_shows_in_the_crosscheck(compared: Compared) -> None:
    """The provider logs a better scorecard under the node's name, signed with a key it
    had certified for that ueid: the node's journal never sent it."""
    _, forged = _signed(compared, after={"accuracy": 0.99, "macro_f1": 0.99})
    found = _signed_mismatches(compared, _logged(compared, scorecard=forged))
    assert len(found) == 2
    assert any("never sent" in m for m in found)
    assert any("is not in the provider's log" in m for m in found)
