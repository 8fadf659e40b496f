"""The node's egress guard, a Flower client mod, on real Flower messages.

Only a bounded sealed envelope and allowlisted scalar metrics may leave, in a reply whose
metadata is what its instruction sets; anything else is blocked, journalled on the node,
and replaced by an error reply that is a fixed code, never text from the app or its data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as node_app
from clients.channel import NodeChannel, hello_record
from clients.egress import check_reply, egress_guard
from clients.sandbox import NodeSandbox, load_split
from clients.service import serve_grpc
from clients.shuttle import node_config
from sandbox.attestation.result import PURPOSE_CHANNEL, ResultContext, ResultSigner
from sandbox.attestation.verifier import Appraisal
from sandbox.config import EgressPolicy, NodeConfig
from sandbox.errors import (
    AggregatorRefused,
    AppNotApproved,
    ConfigError,
    DataError,
    EgressViolation,
)
from sandbox.journal import read_journal
from sandbox.keyfiles import public_pem, write_private
from sandbox.launcher import ApprovalGate, fab_digest
from sandbox.localsocket import prepare_socket
from sandbox.protocol import (
    HELLO_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    to_record,
)
from sandbox.reasons import NodeReason
from tests.conftest import make_spec

# A private training row, as a hostile or buggy app might try to send it out.
PRIVATE = "ticket 4417: tree down on line 4 at Alpe Rossa, call Anna 079 555 01 23"


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
    assert_fixed(reply, NodeReason.EGRESS_BLOCKED)
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [(e["kind"], e["code"]) for e in journal] == [("egress_blocked", "egress-blocked")]
    assert "ticket" not in journal[0]["reason"], "the journal must not copy the payload"


def test_the_allowlist_is_the_node_operators(tmp_path: Path) -> None:
    context = _node(tmp_path, '[node.egress]\nmetrics = ["num-examples"]\n')
    content = RecordDict({METRICS_KEY: METRICS})
    reply = egress_guard(_incoming(), context, _reply_with(content))
    assert_fixed(reply, NodeReason.EGRESS_BLOCKED)
    detail = read_journal(tmp_path / "journal.jsonl")[0]["reason"]
    assert "'after-accuracy' is not in the egress allowlist" in detail
    policy = NodeConfig.load(Path(str(context.node_config[NODE_CONFIG_KEY]))).egress
    assert policy.metrics == frozenset({"num-examples"})


def test_an_apps_own_error_reply_leaves_as_one_fixed_code(tmp_path: Path) -> None:
    """The app picks an error's code and reason, so neither leaves: both could carry data."""
    reply = egress_guard(_incoming(), _node(tmp_path), _reply_with_error(PRIVATE, code=4417))
    assert_fixed(reply, NodeReason.CLIENTAPP_ERROR)
    assert traces(reply) == []
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [(e["kind"], e["code"]) for e in journal] == [("error_withheld", "clientapp-error")]
    assert journal[0]["reason"] == f"error reply 4417: {PRIVATE}"  # kept on the node


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


@contextlib.contextmanager
def _channel_node(tmp_path: Path) -> Iterator[tuple[Context, ConfigRecord]]:
    """A node whose sandbox (serving on its real socket) holds this run's channel, and
    the hello that matches it exactly."""
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
    channel = NodeChannel.create(11, "x25519-hkdf-sha256-aes256gcm")
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
    node = NodeConfig.load(tmp_path / "node.toml")
    held = NodeSandbox(node)
    held.channels[11] = channel
    stop, ready = threading.Event(), threading.Event()
    path = node.socket_path()
    prepare_socket(path, "node.sandbox-socket")
    serving = threading.Thread(
        target=serve_grpc,
        args=(node, path, held, stop, lambda _: ready.set(), str),
        daemon=True,
    )
    serving.start()
    assert ready.wait(30)
    try:
        yield context, hello_record(channel, result.token)
    finally:
        stop.set()
        serving.join(30)


def _query() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)


def test_the_handshake_passes_only_in_its_exact_shape_and_content(tmp_path: Path) -> None:
    with _channel_node(tmp_path) as (context, hello):
        reply = egress_guard(_query(), context, _reply_with(RecordDict({HELLO_KEY: hello})))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        # 32 bytes of the app's choosing in place of the sandbox's nonce.
        other_nonce = ConfigRecord({**hello, HELLO_NONCE: b"ticket 4417: Alpe Rossa, 079 55"})
        other_key = NodeChannel.create(11, "x25519-hkdf-sha256-aes256gcm").key.public_bytes
        uncertified_key = ConfigRecord({**hello, HELLO_NODE_KEY: other_key})
        forged_result = ConfigRecord({**hello, HELLO_RESULT: b"e" * 900})
        smuggling = ConfigRecord({**hello, "row": b"ticket: tree on line 4"})
        oversize = ConfigRecord({**hello, HELLO_RESULT: b"e" * (64 * 1024)})
        for bad in (other_nonce, uncertified_key, forged_result, smuggling, oversize):
            reply = egress_guard(_query(), context, _reply_with(RecordDict({HELLO_KEY: bad})))
            assert_fixed(reply, NodeReason.EGRESS_BLOCKED)
        # The hello, even the right one, may not ride along on a training reply.
        content = RecordDict({SEALED_KEY: SEALED, HELLO_KEY: hello})
        assert egress_guard(_incoming(), context, _reply_with(content)).has_error()
    # Nor leave for a run whose channel the sandbox does not hold (it has stopped).
    reply = egress_guard(_query(), context, _reply_with(RecordDict({HELLO_KEY: hello})))
    assert_fixed(reply, NodeReason.EGRESS_BLOCKED)


def test_failures_leave_as_their_causes_code_not_their_details(tmp_path: Path) -> None:
    context = _node(tmp_path)

    def failing(msg: Message, context: Context) -> Message:
        raise DataError("private.jsonl", f"unknown label in {PRIVATE!r}", row=3)

    reply = egress_guard(_incoming(), context, failing)
    assert_fixed(reply, NodeReason.CLIENTAPP_FAILED)

    def refusing(msg: Message, context: Context) -> Message:
        raise AggregatorRefused("aggregator evidence failed: NonceMismatch")

    reply = egress_guard(_incoming(), context, refusing)
    assert_fixed(reply, NodeReason.AGGREGATOR_REFUSED)
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [e["code"] for e in journal] == ["clientapp-failed", "aggregator-refused"]
    assert "NonceMismatch" in journal[1]["reason"]  # the detail stays on the node


def _reply_with_error(reason: str, code: int = 9) -> Callable[[Message, Context], Message]:
    return lambda msg, context: Message(Error(code=code, reason=reason), reply_to=msg)


def wire(reply: Message) -> bytes:
    """Every object of ``reply`` as Flower serializes it to push it off the node."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(reply).values())


def traces(reply: Message) -> list[str]:
    """The parts of PRIVATE (or the number hidden elsewhere) found in ``reply``'s bytes."""
    sent = wire(reply)
    return [part for part in (PRIVATE, "4417", "Alpe", "079 555") if part.encode() in sent]


def assert_fixed(reply: Message, reason: NodeReason) -> None:
    """``reply`` is exactly ``reason``'s error: its code and label, no content."""
    assert reply.has_error()
    assert not reply.has_content()
    assert (reply.error.code, reply.error.reason) == (reason.value, reason.label)


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
    assert_fixed(reply, NodeReason.EGRESS_BLOCKED)


def test_an_unprotected_node_has_no_guard(tmp_path: Path) -> None:
    """Only for the canary's negative control: the node's own config must say so."""
    context = _node(tmp_path, "unprotected = true\n")
    content = RecordDict({"update": to_record({"w": np.zeros(3, np.float32)})})
    assert not egress_guard(_incoming(), context, _reply_with(content)).has_error()


def _instruction(message_type: str = MessageType.TRAIN) -> Message:
    """An instruction as a node receives it: from the SuperLink, with its message id."""
    msg = Message(RecordDict(), dst_node_id=7, message_type=message_type, group_id="3")
    msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    msg.metadata.__dict__["_message_id"] = "instruction-1"
    return msg


def test_a_private_row_in_a_metric_name_never_leaves_the_node(tmp_path: Path) -> None:
    context = _node(tmp_path)
    content = RecordDict({SEALED_KEY: SEALED, METRICS_KEY: MetricRecord({PRIVATE: 1.0})})
    reply = egress_guard(_instruction(), context, _reply_with(content))
    assert_fixed(reply, NodeReason.EGRESS_BLOCKED)
    assert traces(reply) == []
    assert traces(Message(content, reply_to=_instruction())), "negative control: unguarded"
    # The block is recorded on the node, with the detail the node's operator needs.
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [(e["kind"], e["code"]) for e in journal] == [("egress_blocked", "egress-blocked")]
    assert PRIVATE in journal[0]["reason"]


def test_an_exception_whose_name_and_message_carry_a_row_leaves_as_a_code(
    tmp_path: Path,
) -> None:
    """Through the ClientApp as the node installs it; the class and message are the app's."""
    leaky = ClientApp(mods=list(node_app._mods))
    raised: list[type[Exception]] = [
        type(PRIVATE, (Exception,), {}),
        type(PRIVATE, (AggregatorRefused,), {}),  # a refusal in name only still says nothing
    ]

    @leaky.train()
    def train(msg: Message, context: Context) -> Message:
        raise raised.pop(0)(PRIVATE)

    for expected in (NodeReason.CLIENTAPP_FAILED, NodeReason.AGGREGATOR_REFUSED):
        reply = leaky(_instruction(), _node(tmp_path))
        assert_fixed(reply, expected)
        assert traces(reply) == []
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [e["kind"] for e in journal] == ["clientapp_failed"] * 2
    assert all(PRIVATE in e["reason"] for e in journal)


def test_an_honest_reply_leaves_with_the_metadata_its_instruction_sets(tmp_path: Path) -> None:
    msg = _instruction()
    content = RecordDict({SEALED_KEY: SEALED, METRICS_KEY: METRICS})
    sent = egress_guard(msg, _node(tmp_path), _reply_with(content))
    assert not sent.has_error()
    assert sent.content is content
    meta, ins = sent.metadata, msg.metadata
    assert (meta.reply_to_message_id, meta.group_id, meta.run_id) == ("instruction-1", "3", 11)
    assert (meta.src_node_id, meta.dst_node_id) == (ins.dst_node_id, ins.src_node_id)
    assert meta.created_at + meta.ttl == pytest.approx(ins.created_at + ins.ttl)


ALTERED: dict[str, Callable[[Any], None]] = {
    "group-id-carries-a-row": lambda m: setattr(m, "group_id", PRIVATE),
    "message-type-action": lambda m: setattr(m, "message_type", "train.Alpe_Rossa_4417"),
    "message-id-of-its-own": lambda m: m.__dict__.update(_message_id="Alpe-Rossa-4417"),
    "reply-to-another-message": lambda m: m.__dict__.update(_reply_to_message_id="other"),
    "run-id": lambda m: m.__dict__.update(_run_id=4417),
    "sent-to-another-node": lambda m: setattr(m, "dst_node_id", 4417),
    "src-task-id": lambda m: setattr(m, "src_task_id", 4417),
    "created-before-the-call": lambda m: setattr(m, "created_at", m.created_at - 4417.0),
    "created-at-not-a-number": lambda m: setattr(m, "created_at", float("nan")),
    "ttl-carries-bits": lambda m: setattr(m, "ttl", m.ttl - 0.4417),
    "delivered-at": lambda m: setattr(m, "delivered_at", "Alpe Rossa 4417"),
}


@pytest.mark.parametrize("alter", ALTERED.values(), ids=ALTERED.keys())
def test_a_reply_whose_metadata_its_instruction_did_not_set_is_refused(
    tmp_path: Path, alter: Callable[[Any], None]
) -> None:
    def altering(msg: Message, context: Context) -> Message:
        reply = Message(RecordDict({SEALED_KEY: SEALED, METRICS_KEY: METRICS}), reply_to=msg)
        alter(reply.metadata)
        return reply

    reply = egress_guard(_instruction(), _node(tmp_path), altering)
    assert_fixed(reply, NodeReason.REPLY_METADATA_ALTERED)
    assert reply.metadata.group_id == "3"
    assert traces(reply) == []
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [(e["kind"], e["code"]) for e in journal] == [
        ("egress_blocked", "reply-metadata-altered")
    ]
    assert "4417" not in journal[0]["reason"], "the detail names the field, not its value"


def test_errors_flowers_runtime_builds_leave_the_launcher_as_fixed_codes(tmp_path: Path) -> None:
    """Flower's runtime answers an exception outside the guard (app loading, the launcher's
    own refusal) with the exception's text; the node's launcher sends a code instead."""
    node = NodeConfig.load(Path(str(_node(tmp_path).node_config[NODE_CONFIG_KEY])))
    pushed: list[Message] = []
    fab = b"PK\x03\x04 an unapproved app"
    claimed = SimpleNamespace(hash_str=fab_digest(fab))

    def pull(client: object) -> tuple[object, object, object, object]:
        return "message", "context", SimpleNamespace(run_id=11), claimed

    def push(client: object, message: Message, context: object) -> None:
        pushed.append(message)

    def flower_error(reason: str) -> Message:
        return Message(Error(code=2, reason=reason), reply_to=_instruction())

    gate = ApprovalGate(node, pull, lambda content, **kwargs: None, push)
    gate.push(object(), flower_error(f"<class 'LeakError'>:<'{PRIVATE}'>"), None)
    gate.pull(object())
    with pytest.raises(AppNotApproved):
        gate.install(fab, skip_prompt=True)
    gate.push(object(), flower_error("<class 'AppNotApproved'>:<'node launcher refused'>"), None)
    assert_fixed(pushed[0], NodeReason.FLOWER_CLIENTAPP_RAISED)
    assert_fixed(pushed[1], NodeReason.APP_NOT_APPROVED)
    assert traces(pushed[0]) == []


def test_a_label_mismatch_leaves_as_the_one_fixed_failure_code_naming_no_label(
    tmp_path: Path,
) -> None:
    """A row whose label the run does not list, and a row with no label, leave the node
    as the same fixed code as any failure: the provider learns neither the label nor
    which it was. Through the node's real data loading and its installed guard."""
    spec = make_spec(tmp_path, labels=("a", "b", "c"))
    app = ClientApp(mods=list(node_app._mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        split = load_split(spec, node_config(context))
        metrics = MetricRecord({"num-examples": float(len(split.train))})
        return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)

    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate("abab")]
    data = {
        "extra": [*rows, {"text": "t", "label": PRIVATE}],
        "missing": [*rows, {"text": "t", "label": " "}],
        "fits": rows,  # negative control; the run may list a label ("c") the node lacks
    }
    replies = {}
    for case, content in data.items():
        (tmp_path / "d.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in content), encoding="utf-8"
        )
        replies[case] = app(_instruction(), _node(tmp_path))
    assert not replies["fits"].has_error()
    for case in ("extra", "missing"):
        assert_fixed(replies[case], NodeReason.CLIENTAPP_FAILED)
        assert traces(replies[case]) == []
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [e["code"] for e in journal] == ["clientapp-failed"] * 2
    assert "unknown label" in journal[0]["reason"]  # the detail stays on the node
