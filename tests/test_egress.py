"""The node's egress guard, a Flower client mod, on real Flower messages.

Only a bounded sealed envelope and allowlisted scalar metrics may leave; anything else
is blocked, journalled on the node, and replaced by an error reply.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as node_app
from clients.channel import NodeChannel, channel_path, hello_record
from clients.egress import EGRESS_BLOCKED, check_reply, egress_guard
from sandbox.attestation.result import PURPOSE_CHANNEL, ResultContext, ResultSigner
from sandbox.attestation.verifier import Appraisal
from sandbox.config import EgressPolicy, NodeConfig
from sandbox.errors import AggregatorRefused, ConfigError, DataError, EgressViolation
from sandbox.journal import read_journal
from sandbox.keyfiles import public_pem, write_private
from sandbox.protocol import (
    HELLO_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    to_record,
)


@pytest.fixture(autouse=True)
def clientapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process identity Flower sets in a ClientApp process."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 2)
    monkeypatch.setattr(TaskIdentity, "_run_id", 11)
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)


def _node(tmp_path: Path, egress: str = "") -> Context:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "alpine"\ndata-path = "d.jsonl"\njournal = "journal.jsonl"\n' + egress,
        encoding="utf-8",
    )
    return Context(
        run_id=11,
        node_id=7,
        node_config={NODE_CONFIG_KEY: str(config)},
        state=RecordDict(),
        run_config={},
    )


def _reply_with(content: RecordDict) -> Callable[[Message, Context], Message]:
    return lambda msg, context: Message(content, reply_to=msg)


def _incoming() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type="train")


SEALED = ConfigRecord({SEALED_UPDATE_KEY: b"\x01" * 128})
METRICS = MetricRecord({"num-examples": 40.0, "after-accuracy": 0.8})


def test_sealed_update_and_allowlisted_metrics_pass(tmp_path: Path) -> None:
    context = _node(tmp_path)
    content = RecordDict({SEALED_KEY: SEALED, METRICS_KEY: METRICS})
    reply = egress_guard(_incoming(), context, _reply_with(content))
    assert not reply.has_error()
    assert reply.content[SEALED_KEY] is SEALED


HOSTILE = {
    "raw-array": RecordDict(
        {"update": to_record({"w": np.zeros(3, np.float32)}), METRICS_KEY: METRICS}
    ),
    "training-text-as-config": RecordDict(
        {SEALED_KEY: SEALED, "notes": ConfigRecord({"row": "ticket: tree on line 4"})}
    ),
    "text-inside-sealed-record": RecordDict(
        {SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: b"x", "row": "ticket text"})}
    ),
    "string-as-update": RecordDict(
        {SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: "ticket: tree on line 4"})}
    ),
    "unknown-metric": RecordDict({METRICS_KEY: MetricRecord({"label-of-row-17": 3.0})}),
    "metric-list": RecordDict({METRICS_KEY: MetricRecord({"train-loss": [0.1, 0.2]})}),
    "oversize-blob": RecordDict({SEALED_KEY: ConfigRecord({SEALED_UPDATE_KEY: b"\0" * 2048})}),
}


@pytest.mark.parametrize("content", HOSTILE.values(), ids=HOSTILE.keys())
def test_anything_else_is_blocked_journalled_and_reported(
    tmp_path: Path, content: RecordDict
) -> None:
    context = _node(tmp_path, "[node.egress]\nmax-update-bytes = 1024\n")
    reply = egress_guard(_incoming(), context, _reply_with(content))
    assert reply.has_error()
    assert reply.error.code == EGRESS_BLOCKED
    assert "egress guard blocked the reply" in str(reply.error.reason)
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [e["kind"] for e in journal] == ["egress_blocked"]
    assert "ticket" not in journal[0]["reason"], "the journal must not copy the payload"


def test_the_allowlist_is_the_node_operators(tmp_path: Path) -> None:
    context = _node(tmp_path, '[node.egress]\nmetrics = ["num-examples"]\n')
    content = RecordDict({METRICS_KEY: METRICS})
    reply = egress_guard(_incoming(), context, _reply_with(content))
    assert reply.has_error()
    assert "'after-accuracy' is not in the egress allowlist" in str(reply.error.reason)
    policy = NodeConfig.load(Path(str(context.node_config[NODE_CONFIG_KEY]))).egress
    assert policy.metrics == frozenset({"num-examples"})


def test_error_replies_keep_their_code(tmp_path: Path) -> None:
    reply = egress_guard(_incoming(), _node(tmp_path), _reply_with_error("CUDA out of memory"))
    assert reply.error.code == 9
    assert "withheld" in str(reply.error.reason)


def test_bad_egress_section_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'node\.egress\.metrics'"):
        NodeConfig.load(
            Path(
                str(
                    _node(tmp_path, '[node.egress]\nmetrics = "all"\n').node_config[NODE_CONFIG_KEY]
                )
            )
        )


def test_check_reply_raises_a_typed_error() -> None:
    with pytest.raises(EgressViolation, match="raw arrays"):
        check_reply(
            RecordDict({"x": to_record({"w": np.zeros(1, np.float32)})}),
            EgressPolicy(),
            MessageType.TRAIN,
        )


def _channel_node(tmp_path: Path) -> tuple[Context, ConfigRecord]:
    """A node with this run's saved channel, and the hello that matches it exactly."""
    result_key = ec.generate_private_key(ec.SECP256R1())
    write_private(tmp_path / "result.pub", public_pem(result_key.public_key()), overwrite=True)
    sandbox = "\n".join(
        [
            "[node.sandbox]",
            'tee = "stub"',
            'ueid = "alpine-1"',
            *(f'{k} = "unused"' for k in ("attestation-key", "attestation-chain", "provider-ca")),
            *(f'{k} = "unused"' for k in ("manifest-key", "package")),
            'key-broker = "localhost:1"',
            'result-key = "result.pub"',
        ]
    )
    context = _node(tmp_path, sandbox + "\n")
    node = NodeConfig.load(tmp_path / "node.toml")
    channel = NodeChannel.create(11, "x25519-hkdf-sha256-aes256gcm")
    channel_path(node, 11).parent.mkdir(parents=True)
    channel.save(channel_path(node, 11))
    now = dt.datetime.now(dt.UTC)
    signer = ResultSigner(result_key, {"build": "test"})
    appraisal = Appraisal({"ueid": "alpine-1", "measurements": {}}, "stub", "p", now)
    result = signer.affirm(
        appraisal,
        ResultContext(
            "s",
            "stub",
            channel.key.public_bytes,
            channel.key.suite,
            "e",
            "p",
            "d",
            PURPOSE_CHANNEL,
        ),
        now=now,
    )
    return context, hello_record(channel, result.token)


def _query() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)


def test_the_handshake_passes_only_in_its_exact_shape_and_content(tmp_path: Path) -> None:
    context, hello = _channel_node(tmp_path)
    reply = egress_guard(_query(), context, _reply_with(RecordDict({HELLO_KEY: hello})))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    other_nonce = ConfigRecord({**hello, HELLO_NONCE: b"n" * 32})
    forged_result = ConfigRecord({**hello, HELLO_RESULT: b"e" * 900})
    smuggling = ConfigRecord({**hello, "row": b"ticket: tree on line 4"})
    oversize = ConfigRecord({**hello, HELLO_RESULT: b"e" * (64 * 1024)})
    for bad in (other_nonce, forged_result, smuggling, oversize):
        reply = egress_guard(_query(), context, _reply_with(RecordDict({HELLO_KEY: bad})))
        assert reply.has_error()
        assert reply.error.code == EGRESS_BLOCKED
    # The hello, even the right one, may not ride along on a training reply.
    content = RecordDict({SEALED_KEY: SEALED, HELLO_KEY: hello})
    assert egress_guard(_incoming(), context, _reply_with(content)).has_error()


def test_failures_leave_as_their_type_not_their_details(tmp_path: Path) -> None:
    context = _node(tmp_path)

    def failing(msg: Message, context: Context) -> Message:
        raise DataError("private.jsonl", "unknown label 'tree on line 4 at Alpe Rossa'", row=3)

    reply = egress_guard(_incoming(), context, failing)
    assert reply.has_error()
    assert reply.error.reason == "DataError (details in the node's own log)"

    def refusing(msg: Message, context: Context) -> Message:
        raise AggregatorRefused("aggregator evidence failed: NonceMismatch")

    reply = egress_guard(_incoming(), context, refusing)
    assert "AggregatorRefused: aggregator evidence failed: NonceMismatch" in str(reply.error.reason)
    leaky_error = _reply_with_error("ticket: tree on line 4")
    reply = egress_guard(_incoming(), context, leaky_error)
    assert reply.has_error()
    assert "ticket" not in str(reply.error.reason)


def _reply_with_error(reason: str) -> Callable[[Message, Context], Message]:
    return lambda msg, context: Message(Error(code=9, reason=reason), reply_to=msg)


def test_a_clientapp_leaking_training_text_or_arrays_is_stopped_by_the_installed_guard(
    tmp_path: Path,
) -> None:
    """The guard as the node's ClientApp installs it: a mod around every handler."""
    assert egress_guard in node_app._mods
    leaky = ClientApp(mods=list(node_app._mods))

    @leaky.train()
    def train(msg: Message, context: Context) -> Message:
        row = ConfigRecord({"row": "ticket: tree on line 4"})
        raw = to_record({"w": np.ones(4, np.float32)})
        return Message(RecordDict({SEALED_KEY: SEALED, "row": row, "raw": raw}), reply_to=msg)

    reply = leaky(_incoming(), _node(tmp_path))
    assert reply.has_error()
    assert reply.error.code == EGRESS_BLOCKED
    assert not reply.has_content()


def test_an_unprotected_node_has_no_guard(tmp_path: Path) -> None:
    """Only for the canary's negative control: the node's own config must say so."""
    context = _node(tmp_path, "unprotected = true\n")
    content = RecordDict({"update": to_record({"w": np.zeros(3, np.float32)})})
    assert not egress_guard(_incoming(), context, _reply_with(content)).has_error()
