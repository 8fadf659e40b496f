"""The node's egress guard: a Flower client mod that checks every reply before it leaves.

Allowed out: one ConfigRecord ``sealed`` holding exactly one bytes value ``update`` (the
HPKE envelope, at most ``max-update-bytes``), one MetricRecord ``metrics`` whose keys
are in the node's allowlist and whose values are single numbers, and the handshake's
ConfigRecord ``hello`` (a nonce, a public key and an attestation result, all bytes of
bounded size). With secure aggregation, also one ConfigRecord ``secagg`` holding one
bounded bytes value that parses strictly as the stage's message (a key advertisement
whose certification verifies, sealed shares, a split signature or revealed shares), each
only in its own stage's reply, the sealed masked input only in the mask stage's. Nothing
else: no ArrayRecord (raw tensors), no strings, no lists, no
unknown record or key. A violation is blocked, written to the node's log and journal,
and replaced by an error reply. A reply's metadata must be what its instruction sets.
Every error reply that leaves is a fixed code from ``sandbox/reasons.py`` with its fixed
label: the detail (an exception, a blocked metric name) stays in the node's log and
journal. An ``unprotected`` node (test and bench only) has no guard.

The allowlist comes from the node operator's ``[node.egress]``, never from the run
config, so provider-shipped code cannot widen it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import MESSAGE_TTL_TOLERANCE

from clients.shuttle import SandboxApi, node_config, node_sandbox
from sandbox.attestation.result import PURPOSE_CHANNEL, verify_result
from sandbox.config import EgressPolicy, NodeConfig, RunSpec
from sandbox.errors import (
    AggregatorRefused,
    ArkError,
    AttestationError,
    ConfigError,
    EgressViolation,
    KeyBrokerUnavailable,
    KeyReleaseDenied,
    PrivacyBudgetExhausted,
    PrivacyBudgetRefused,
    ReplyMetadataAltered,
    SandboxRefused,
    SandboxUnavailable,
    ScorecardError,
    SecAggError,
)
from sandbox.events import ClientappFailed, EgressBlocked, ErrorWithheld, Key, Withheld
from sandbox.journal import append_journal
from sandbox.keyfiles import load_ec_public
from sandbox.protocol import (
    COMMITMENT_KEY,
    HELLO_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    SCORECARD_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    SECAGG_KEY,
    SECAGG_MESSAGE_TYPE,
    SECAGG_PAYLOAD,
    SECAGG_STAGE,
    SIGNED_KEY,
)
from sandbox.reasons import NodeReason
from sandbox.scorecard import Commitment, Scorecard, open_commitment, open_scorecard
from sandbox.secagg import (
    MAX_REPLY_BYTES,
    STAGE_CHECK,
    STAGE_MASK,
    STAGE_SHARE,
    STAGE_UNMASK,
    Advertisement,
    Consistency,
    Reveal,
    ShareBundle,
    node_reply,
)

log = logging.getLogger("ark.egress")
# Upper bounds of the handshake's fields: nonce, public key (hybrid suite), result token.
HELLO_LIMITS = {HELLO_NONCE: 64, HELLO_NODE_KEY: 1216, HELLO_RESULT: 16 * 1024}
# Which answer a secure-aggregation query of each stage may carry (the mask stage's is
# the sealed masked input, no secure-aggregation message).
STAGE_ANSWERS: dict[str, type] = {
    STAGE_SHARE: ShareBundle,
    STAGE_CHECK: Consistency,
    STAGE_UNMASK: Reveal,
}
# Which records may leave in a reply to which instruction.
ALLOWED_RECORDS = {
    MessageType.QUERY: frozenset({HELLO_KEY}),
    # Secure aggregation's later stages: sealed or revealed shares, or the masked input
    # (sealed like an update) with its metrics.
    SECAGG_MESSAGE_TYPE: frozenset({SECAGG_KEY, SEALED_KEY, METRICS_KEY}),
    MessageType.TRAIN: frozenset({SEALED_KEY, METRICS_KEY, COMMITMENT_KEY, SECAGG_KEY}),
    MessageType.EVALUATE: frozenset({METRICS_KEY, SCORECARD_KEY}),
}
# The code a ClientApp failure leaves the node as, by cause; the first match wins and
# any other exception is CLIENTAPP_FAILED. Neither its type nor its message leaves.
FAILURES: list[tuple[type[Exception], NodeReason]] = [
    (AggregatorRefused, NodeReason.AGGREGATOR_REFUSED),
    (AttestationError, NodeReason.ATTESTATION_FAILED),
    (KeyReleaseDenied, NodeReason.KEY_RELEASE_DENIED),
    (KeyBrokerUnavailable, NodeReason.KEY_BROKER_UNAVAILABLE),
    (SandboxUnavailable, NodeReason.SANDBOX_UNAVAILABLE),
    (PrivacyBudgetRefused, NodeReason.PRIVACY_BUDGET_REFUSED),
    (PrivacyBudgetExhausted, NodeReason.PRIVACY_BUDGET_EXHAUSTED),
]
# Each metadata field of a reply and the instruction's field Flower's
# ``Message(..., reply_to=instruction)`` copies into it.
REPLY_FIELDS = {
    "run_id": "run_id",
    "src_node_id": "dst_node_id",
    "dst_node_id": "src_node_id",
    "src_task_id": "dst_task_id",
    "dst_task_id": "src_task_id",
    "reply_to_message_id": "message_id",
    "group_id": "group_id",
    "message_type": "message_type",
}
# Slack (seconds) for float rounding in reply times, as Flower's own TTL check allows.
TIME_TOLERANCE = MESSAGE_TTL_TOLERANCE

HelloCheck = Callable[[ConfigRecord], None]
# How long the guard waits for the sandbox to say which channel it holds for a hello (it
# answered that hello a moment ago, so it is up).
HELLO_CHECK_SECONDS = 3.0


def check_reply(
    content: RecordDict,
    policy: EgressPolicy,
    kind: str,
    check_hello: HelloCheck | None = None,
    *,
    run: RunSpec | None = None,
    node: NodeConfig | None = None,
    stage: str | None = None,
) -> None:
    """Raise EgressViolation naming the first thing outside the allowlist for ``kind``.

    A secure-aggregation query's reply (``stage``: the query's stage) carries exactly that
    stage's answer: sealed shares, a signature or revealed shares, or (the mask stage
    only) the sealed masked input and its metrics.

    A comparison's signed commitment or scorecard may leave only for the run (``run``)
    and node (``node``) it names, with allowlisted metric names: every string in it is
    then the provider's own (comparison, job, model) or the node's public ueid, and the
    rest are digests and numbers."""
    allowed = ALLOWED_RECORDS.get(kind, frozenset())
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            raise EgressViolation(f"record {name!r} carries raw arrays")
        if name not in allowed:
            raise EgressViolation(
                f"record {name!r} ({type(record).__name__}) may not leave in a {kind} reply"
            )
        if kind == SECAGG_MESSAGE_TYPE and (name == SECAGG_KEY) == (stage == STAGE_MASK):
            raise EgressViolation(f"record {name!r} may not leave in a {stage!r} stage reply")
        if name == SEALED_KEY and isinstance(record, ConfigRecord):
            _check_sealed(record, policy)
        elif name == METRICS_KEY and isinstance(record, MetricRecord):
            _check_metrics(record, policy)
        elif name == HELLO_KEY and isinstance(record, ConfigRecord):
            _check_hello(record)
            if check_hello is not None:
                check_hello(record)
        elif name in (COMMITMENT_KEY, SCORECARD_KEY) and isinstance(record, ConfigRecord):
            _check_signed(name, record, policy, run, node)
        elif name == SECAGG_KEY and isinstance(record, ConfigRecord):
            _check_secagg(record, kind, node, stage)
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


def _check_secagg(
    record: ConfigRecord, kind: str, node: NodeConfig | None, stage: str | None
) -> None:
    """A secure-aggregation message: one bytes value that parses strictly as what this
    reply may carry. A key advertisement (the train reply) must carry a certification the
    key broker signed for its signing key, so its one text field is no channel either;
    sealed and revealed shares are node ids and fixed-size blobs only."""
    if set(record) != {SECAGG_PAYLOAD}:
        raise EgressViolation(f"{SECAGG_KEY} record may hold only {SECAGG_PAYLOAD!r}")
    blob = record[SECAGG_PAYLOAD]
    if not isinstance(blob, bytes) or len(blob) > MAX_REPLY_BYTES:
        raise EgressViolation(f"{SECAGG_KEY} must be bytes of at most {MAX_REPLY_BYTES}")
    try:
        if kind == MessageType.TRAIN:
            if node is None:
                raise EgressViolation("a key advertisement leaves only from a known node")
            advert = Advertisement.from_json(blob)
            result_key = load_ec_public(node.require_sandbox().result_key)
            advert.verify(result_key, now=dt.datetime.now(dt.UTC), run=advert.run, rnd=advert.round)
        else:
            answer = node_reply(blob)
            if stage not in STAGE_ANSWERS or not isinstance(answer, STAGE_ANSWERS[stage]):
                raise EgressViolation(f"{SECAGG_KEY} message is not the {stage!r} stage's answer")
    except SecAggError as exc:
        raise EgressViolation(f"{SECAGG_KEY} message does not parse as one: {exc}") from exc


def _check_signed(
    name: str,
    record: ConfigRecord,
    policy: EgressPolicy,
    run: RunSpec | None,
    node: NodeConfig | None,
) -> None:
    """A signed comparison record: one bytes value that opens as its kind, for this run
    and node, naming only allowlisted metrics."""
    if set(record) != {SIGNED_KEY}:
        raise EgressViolation(f"{name} record may hold only {SIGNED_KEY!r}")
    blob = record[SIGNED_KEY]
    if not isinstance(blob, bytes):
        raise EgressViolation(f"{name} must be bytes, not {type(blob).__name__}")
    if run is None or node is None or not run.comparison:
        raise EgressViolation(f"a {name} may leave only in a comparison run")
    try:
        if name == COMMITMENT_KEY:
            body: Commitment | Scorecard = open_commitment(blob)[0]
        else:
            body = open_scorecard(blob)[0]
    except ScorecardError as exc:
        raise EgressViolation(f"{name} does not open: {exc}") from exc
    if body.comparison != run.comparison or body.ueid != node.require_sandbox().ueid:
        raise EgressViolation(f"{name} is not for this comparison and node")
    if isinstance(body, Scorecard):
        if body.job != run.job_id or (run.model_id and body.model_id != run.model_id):
            raise EgressViolation(f"{name} is not for this run's job and model")
        for when, metrics in (("before", body.before), ("after", body.after)):
            for metric in metrics:
                if f"{when}-{metric}" not in policy.metrics:
                    raise EgressViolation(f"{name} metric {when}-{metric!r} is not allowlisted")


def _check_hello(record: ConfigRecord) -> None:
    if set(record) != set(HELLO_LIMITS):
        raise EgressViolation(f"hello record may hold only {sorted(HELLO_LIMITS)}")
    for key, limit in HELLO_LIMITS.items():
        value = record[key]
        if not isinstance(value, bytes) or len(value) > limit:
            raise EgressViolation(f"hello field {key!r} must be at most {limit} bytes")


def hello_matches_sandbox(
    node: NodeConfig, run_id: int, connect: Callable[[], AbstractContextManager[SandboxApi]]
) -> HelloCheck:
    """A hello may carry only the nonce and channel key the node's sandbox holds for this
    run (asked over its socket, which ``connect`` opens: both are public), and a result
    that certifies exactly that key for the channel (verified with the provider's result
    key): nothing else fits, so no byte of a hello is the ClientApp's choice."""

    def check(record: ConfigRecord) -> None:
        try:
            result = verify_result(
                bytes(record[HELLO_RESULT]).decode("ascii"),  # type: ignore[arg-type]
                load_ec_public(node.require_sandbox().result_key),
                now=dt.datetime.now(dt.UTC),
            )
            with connect() as sandbox:
                held = {c.run_id: c for c in sandbox.status(HELLO_CHECK_SECONDS).channels}
        except (ArkError, AttestationError, UnicodeDecodeError) as exc:
            raise EgressViolation(f"hello cannot be checked against its channel: {exc}") from exc
        channel = held.get(run_id)
        if (
            channel is None
            or record[HELLO_NONCE] != channel.nonce
            or record[HELLO_NODE_KEY] != channel.node_key
            or result.tee_pubkey != channel.node_key
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


def check_reply_metadata(
    reply: Metadata, instruction: Metadata, *, called_at: float, returned_at: float
) -> None:
    """Raise ReplyMetadataAltered unless ``reply`` is what Flower's
    ``Message(..., reply_to=instruction)`` gives while the app ran from ``called_at`` to
    ``returned_at``: every field the instruction determines copied from it, no message id
    or delivery time (the runtime sets those), a creation time in that window and a TTL
    that ends when the instruction's does. The message names the field, never its value.
    """
    for field, source in REPLY_FIELDS.items():
        if getattr(reply, field) != getattr(instruction, source):
            raise ReplyMetadataAltered(f"reply {field} is not the one its instruction sets")
    if reply.message_id != "" or reply.delivered_at != "":
        raise ReplyMetadataAltered("reply carries a message id or delivery time of its own")
    created, ttl = reply.created_at, reply.ttl
    if not all(_is_time(value) for value in (created, ttl)):
        raise ReplyMetadataAltered("reply created_at and ttl must be finite numbers")
    if not called_at - TIME_TOLERANCE <= created <= returned_at + TIME_TOLERANCE:
        raise ReplyMetadataAltered("reply created_at is not within the app's call")
    expires = instruction.created_at + instruction.ttl
    if abs(created + ttl - expires) > TIME_TOLERANCE:
        raise ReplyMetadataAltered("reply ttl does not end with its instruction's")


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _carries_signed(content: RecordDict) -> bool:
    """Whether a reply carries a comparison's signed record (only then is the run config
    read, to check the record against it)."""
    return any(key in content for key in (COMMITMENT_KEY, SCORECARD_KEY))


def _run_spec(context: Context) -> RunSpec | None:
    """The run's config as the node reads it; None when it does not validate (a signed
    comparison record then cannot leave: nothing to check it against)."""
    try:
        return RunSpec.from_run_config(context.run_config)
    except ConfigError:
        return None


def secagg_stage(content: RecordDict) -> str | None:
    """The stage a secure-aggregation query names (None if it names none as text)."""
    record = content.config_records.get(SECAGG_KEY)
    stage = None if record is None else record.get(SECAGG_STAGE)
    return stage if isinstance(stage, str) else None


def failure_reason(exc: Exception) -> NodeReason:
    """The fixed code a ClientApp failure leaves the node as (see FAILURES); a code the
    node's sandbox already reported is passed on as it is."""
    if isinstance(exc, SandboxRefused):
        return exc.reason
    for kind, reason in FAILURES:
        if isinstance(exc, kind):
            return reason
    return NodeReason.CLIENTAPP_FAILED


def _refuse(
    msg: Message,
    context: Context,
    node: NodeConfig | None,
    reason: NodeReason,
    detail: str,
    kind: type[Withheld] = EgressBlocked,
) -> Message:
    """Keep ``detail`` on the node (its log and, when it keeps one, its journal) and
    answer ``msg`` with ``reason``'s fixed code and label only."""
    log.error("egress guard: %s (%s)", detail, reason.label)
    if node is not None:
        ids = {Key.RUN_ID: context.run_id, Key.NODE_ID: context.node_id}
        append_journal(node, kind(**ids, code=reason.label, reason=detail))
    return Message(reason.error(), reply_to=msg)


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply out only if it is within the node's egress allowlist.

    Errors are replies too: whatever fails, only a fixed code from ``NodeReason`` leaves
    (an exception as its cause's code, an app's own error reply as ``clientapp-error``).
    A reply that passes leaves with metadata the guard derives from ``msg`` itself.
    """
    try:
        node = node_config(context)
    except (ArkError, TypeError) as exc:
        detail = f"no usable node config for the egress allowlist: {exc}"
        return _refuse(msg, context, None, NodeReason.NODE_CONFIG_UNUSABLE, detail)
    if node.unprotected:
        log.warning("node %s is unprotected: its replies leave unchecked", node.name)
        return call_next(msg, context)
    called_at = time.time()
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # the ClientApp failed; say so with a code only
        log.exception("the ClientApp failed")
        detail = f"ClientApp failed: {type(exc).__name__}: {exc}"
        return _refuse(msg, context, node, failure_reason(exc), detail, kind=ClientappFailed)
    if not isinstance(reply, Message):
        detail = f"the ClientApp returned a {type(reply).__name__}, not a Message"
        return _refuse(msg, context, node, NodeReason.EGRESS_BLOCKED, detail)
    if reply.has_error():
        detail = f"error reply {reply.error.code}: {reply.error.reason}"
        return _refuse(msg, context, node, NodeReason.CLIENTAPP_ERROR, detail, ErrorWithheld)
    try:
        check_reply_metadata(
            reply.metadata, msg.metadata, called_at=called_at, returned_at=time.time()
        )
        kind = msg.metadata.message_type
        check_reply(
            reply.content,
            node.egress,
            kind,
            hello_matches_sandbox(node, context.run_id, lambda: node_sandbox(context, node)),
            run=_run_spec(context) if _carries_signed(reply.content) else None,
            node=node,
            stage=secagg_stage(msg.content) if kind == SECAGG_MESSAGE_TYPE else None,
        )
    except EgressViolation as exc:
        reason = (
            NodeReason.REPLY_METADATA_ALTERED
            if isinstance(exc, ReplyMetadataAltered)
            else NodeReason.EGRESS_BLOCKED
        )
        return _refuse(msg, context, node, reason, f"egress guard blocked the reply: {exc}")
    # Flower's own metadata for a reply to ``msg``: not even the low bits of the app's
    # creation time leave.
    return Message(reply.content, reply_to=msg)
