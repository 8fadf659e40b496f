"""The node's egress guard: a Flower client mod that checks every reply before it leaves.

Allowed out: one ConfigRecord ``sealed`` holding exactly one bytes value ``update`` (the
HPKE envelope, at most ``max-update-bytes``), one MetricRecord ``metrics`` whose keys
are in the node's allowlist and whose values are single numbers, and the handshake's
ConfigRecord ``hello`` (a nonce, a public key and an attestation result, all bytes of
bounded size). Nothing else: no ArrayRecord (raw tensors), no strings, no lists, no
unknown record or key. A violation is blocked, written to the node's log and journal,
and replaced by an error reply. An ``unprotected`` node (test and bench only) has no
guard.

The allowlist comes from the node operator's ``[node.egress]``, never from the run
config, so provider-shipped code cannot widen it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from clients.channel import NodeChannel, channel_path
from sandbox.attestation.result import PURPOSE_CHANNEL, verify_result
from sandbox.config import EgressPolicy, NodeConfig
from sandbox.errors import (
    AggregatorRefused,
    ArkError,
    AttestationError,
    EgressViolation,
    KeyBrokerUnavailable,
    KeyReleaseDenied,
)
from sandbox.journal import append_journal
from sandbox.keyfiles import load_ec_public
from sandbox.protocol import (
    HELLO_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
)

log = logging.getLogger("ark.egress")
# Flower's code for a reply a mod refused to let through.
EGRESS_BLOCKED = 3
# The code of a ClientApp failure the guard reported in its own words.
CLIENTAPP_FAILED = 4
# Upper bounds of the handshake's fields: nonce, public key (hybrid suite), result token.
HELLO_LIMITS = {HELLO_NONCE: 64, HELLO_NODE_KEY: 1216, HELLO_RESULT: 16 * 1024}
# Which records may leave in a reply to which instruction.
ALLOWED_RECORDS = {
    MessageType.QUERY: frozenset({HELLO_KEY}),
    MessageType.TRAIN: frozenset({SEALED_KEY, METRICS_KEY}),
    MessageType.EVALUATE: frozenset({METRICS_KEY}),
}
# Failures whose messages carry no private data (they describe keys, evidence and
# policies); any other exception leaves the node as its type name only.
SAYABLE = (AggregatorRefused, AttestationError, KeyReleaseDenied, KeyBrokerUnavailable)

HelloCheck = Callable[[ConfigRecord], None]


def check_reply(
    content: RecordDict,
    policy: EgressPolicy,
    kind: str,
    check_hello: HelloCheck | None = None,
) -> None:
    """Raise EgressViolation naming the first thing outside the allowlist for ``kind``."""
    allowed = ALLOWED_RECORDS.get(kind, frozenset())
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            raise EgressViolation(f"record {name!r} carries raw arrays")
        if name not in allowed:
            raise EgressViolation(
                f"record {name!r} ({type(record).__name__}) may not leave in a {kind} reply"
            )
        if name == SEALED_KEY and isinstance(record, ConfigRecord):
            _check_sealed(record, policy)
        elif name == METRICS_KEY and isinstance(record, MetricRecord):
            _check_metrics(record, policy)
        elif name == HELLO_KEY and isinstance(record, ConfigRecord):
            _check_hello(record)
            if check_hello is not None:
                check_hello(record)
        else:
            raise EgressViolation(f"record {name!r} ({type(record).__name__}) is not allowed")


def _check_sealed(record: ConfigRecord, policy: EgressPolicy) -> None:
    if set(record) != {SEALED_UPDATE_KEY}:
        raise EgressViolation(f"sealed record may hold only {SEALED_UPDATE_KEY!r}")
    blob = record[SEALED_UPDATE_KEY]
    if not isinstance(blob, bytes):
        raise EgressViolation(f"sealed update must be bytes, not {type(blob).__name__}")
    if len(blob) > policy.max_update_bytes:
        raise EgressViolation(
            f"sealed update of {len(blob)} bytes exceeds {policy.max_update_bytes}"
        )


def _check_hello(record: ConfigRecord) -> None:
    if set(record) != set(HELLO_LIMITS):
        raise EgressViolation(f"hello record may hold only {sorted(HELLO_LIMITS)}")
    for key, limit in HELLO_LIMITS.items():
        value = record[key]
        if not isinstance(value, bytes) or len(value) > limit:
            raise EgressViolation(f"hello field {key!r} must be at most {limit} bytes")


def hello_matches_channel(node: NodeConfig, run_id: int) -> HelloCheck:
    """A hello may carry only this run's saved nonce and key, and a result that certifies
    exactly that key (verified with the provider's result key): nothing else fits."""

    def check(record: ConfigRecord) -> None:
        try:
            channel = NodeChannel.load(channel_path(node, run_id), run_id)
            result = verify_result(
                bytes(record[HELLO_RESULT]).decode("ascii"),  # type: ignore[arg-type]
                load_ec_public(node.require_sandbox().result_key),
                now=dt.datetime.now(dt.UTC),
            )
        except (ArkError, AttestationError, UnicodeDecodeError) as exc:
            raise EgressViolation(f"hello does not match this run's channel: {exc}") from exc
        if (
            record[HELLO_NONCE] != channel.nonce
            or record[HELLO_NODE_KEY] != channel.key.public_bytes
            or result.tee_pubkey != channel.key.public_bytes
            or result.purpose != PURPOSE_CHANNEL
        ):
            raise EgressViolation("hello does not carry this run's nonce, key and result")

    return check


def _check_metrics(record: MetricRecord, policy: EgressPolicy) -> None:
    for key, value in record.items():
        if key not in policy.metrics:
            raise EgressViolation(f"metric {key!r} is not in the egress allowlist")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressViolation(f"metric {key!r} must be a single number")


def _record(
    node: NodeConfig | None, context: Context, reason: str, kind: str = "egress_blocked"
) -> None:
    """Log the event on the node and, when it keeps one, in its journal."""
    log.error("egress guard: %s", reason)
    if node is not None:
        entry = {"run_id": context.run_id, "node_id": context.node_id, "kind": kind}
        append_journal(node, {**entry, "reason": reason})


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, SAYABLE):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (details in the node's own log)"


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply out only if it is within the node's egress allowlist.

    Errors are replies too: an exception leaves as its type (and, for attestation and
    channel failures, their message); an app's own error reply loses its reason text.
    """
    node: NodeConfig | None = None
    try:
        path = context.node_config.get(NODE_CONFIG_KEY)
        node = NodeConfig.load(Path(str(path)))
    except (ArkError, TypeError) as exc:
        reason = f"no usable node config for the egress allowlist: {exc}"
        _record(None, context, reason)
        return Message(Error(code=EGRESS_BLOCKED, reason=reason), reply_to=msg)
    if node.unprotected:
        log.warning("node %s is unprotected: its replies leave unchecked", node.name)
        return call_next(msg, context)
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # the ClientApp failed; say so without its details
        log.exception("the ClientApp failed")
        reason = _failure_reason(exc)
        _record(node, context, f"ClientApp failed: {reason}", kind="clientapp_failed")
        return Message(Error(code=CLIENTAPP_FAILED, reason=reason), reply_to=msg)
    if reply.has_error():
        code = reply.error.code
        _record(node, context, f"error reply {code}: {reply.error.reason}", kind="error_withheld")
        withheld = f"ClientApp error {code} (reason withheld by the node's egress guard)"
        return Message(Error(code=code, reason=withheld), reply_to=msg)
    try:
        kind = msg.metadata.message_type
        check_reply(reply.content, node.egress, kind, hello_matches_channel(node, context.run_id))
    except EgressViolation as exc:
        reason = f"egress guard blocked the reply: {exc}"
        _record(node, context, reason)
        return Message(Error(code=EGRESS_BLOCKED, reason=reason), reply_to=msg)
    return reply
