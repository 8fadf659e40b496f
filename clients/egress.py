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

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from sandbox.config import EgressPolicy, NodeConfig
from sandbox.errors import ArkError, EgressViolation
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
# Upper bounds of the handshake's fields: nonce, public key (hybrid suite), result token.
HELLO_LIMITS = {HELLO_NONCE: 64, HELLO_NODE_KEY: 1216, HELLO_RESULT: 16 * 1024}


def check_reply(content: RecordDict, policy: EgressPolicy) -> None:
    """Raise EgressViolation naming the first thing outside the allowlist."""
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            raise EgressViolation(f"record {name!r} carries raw arrays")
        if name == SEALED_KEY and isinstance(record, ConfigRecord):
            _check_sealed(record, policy)
        elif name == METRICS_KEY and isinstance(record, MetricRecord):
            _check_metrics(record, policy)
        elif name == HELLO_KEY and isinstance(record, ConfigRecord):
            _check_hello(record)
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


def _check_metrics(record: MetricRecord, policy: EgressPolicy) -> None:
    for key, value in record.items():
        if key not in policy.metrics:
            raise EgressViolation(f"metric {key!r} is not in the egress allowlist")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressViolation(f"metric {key!r} must be a single number")


def _record(node: NodeConfig | None, context: Context, reason: str) -> None:
    """Log the block on the node and, when it keeps one, in its journal."""
    log.error("egress guard blocked a reply: %s", reason)
    if node is None or node.journal_path is None:
        return
    node.journal_path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": time.time(),
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node": node.name,
        "kind": "egress_blocked",
        "reason": reason,
    }
    with node.journal_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply out only if it is within the node's egress allowlist."""
    node: NodeConfig | None = None
    try:
        path = context.node_config.get(NODE_CONFIG_KEY)
        node = NodeConfig.load(Path(str(path)))
    except (ArkError, TypeError) as exc:
        reason = f"no usable node config for the egress allowlist: {exc}"
        _record(None, context, reason)
        return Message(Error(code=EGRESS_BLOCKED, reason=reason), reply_to=msg)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if node.unprotected:
        log.warning("node %s is unprotected: its reply leaves unchecked", node.name)
        return reply
    try:
        check_reply(reply.content, node.egress)
    except EgressViolation as exc:
        reason = f"egress guard blocked the reply: {exc}"
        _record(node, context, reason)
        return Message(Error(code=EGRESS_BLOCKED, reason=reason), reply_to=msg)
    return reply
