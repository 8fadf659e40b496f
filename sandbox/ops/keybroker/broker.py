"""The key broker's decisions, with no I/O: sessions, appraisal, release, denial, events.

The gRPC service (:mod:`sandbox.ops.keybroker.service`) only translates messages to and from
this state machine, so tests drive every attack here and over the wire alike.
A key leaves only as an HPKE envelope to the TEE key an affirming result is bound to. A
result for a node's channel key (an HPKE key) or a sandbox's signing key (Ed25519) only
certifies that key: nothing is released for it.
What one client may hold or make the broker log is bounded by :mod:`.limits`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.attestation.backends import VerifierRegistry
from sandbox.attestation.result import (
    AFFIRMING,
    CERTIFYING_PURPOSES,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
    PURPOSES,
    SIGNING_SUITE,
    AttestationResult,
    ResultContext,
    ResultSigner,
    verify_result,
)
from sandbox.attestation.verifier import AppraisalPolicy
from sandbox.digests import sha256_hex
from sandbox.errors import (
    ArkError,
    AttestationError,
    ChainUntrusted,
    ConfigError,
    DebugEnabled,
    EnvelopeError,
    EvidenceFormatError,
    MeasurementRejected,
    NodeNotAllowed,
    NonceMismatch,
    ReportDataMismatch,
    ResultExpired,
    ResultInvalid,
    ScorecardInvalid,
    SessionExpired,
    SessionUnknown,
    SessionUsed,
    SignatureInvalid,
    TeeNotAccepted,
)
from sandbox.events import (
    AttestationAppraised,
    ChannelCertified,
    DenialsRateLimited,
    EventSink,
    Key,
    KeyDenied,
    KeyReleased,
    SentDigest,
)
from sandbox.files import PRIVATE, create_new
from sandbox.keybroker import RATE_LIMITED
from sandbox.ops.keybroker.limits import (
    ALL_CLIENTS,
    DEFAULT_LIMITS,
    LOCAL_CLIENT,
    DenialBudget,
    DenialWindow,
    Limits,
    Session,
    SessionTable,
)
from sandbox.scorecard import signing_public_key
from sandbox.seal.envelope import load_public_key, wrap_content_key
from sandbox.seal.stream import KEY_SIZE

log = logging.getLogger("ark.keybroker")

NONCE_BYTES = 32
DEFAULT_SESSION_TTL = dt.timedelta(seconds=60)
# The local log quotes at most this much of an error message (they can quote a request).
MAX_LOGGED_DETAIL = 200
# Names clients in events by a keyed digest: the log is read by nodes and auditors.
CLIENT_PSEUDONYM_INFO = b"ark/v1/keybroker/client-pseudonym"


class BadRequest(ArkError):
    """A request is malformed (unknown suite, bad public key, mismatched key id)."""


class UnknownKey(ArkError):
    """No content key with this id is in the broker's keystore."""


class NotAffirming(AttestationError):
    """Appraisal produced a result that is not affirming (e.g. warning); no key is released."""


class RateLimited(ArkError):
    """The client was denied more often than its budget allows in this window; further
    denials are answered with this code only and counted, not logged one by one."""


# Denial code (the proto enum's suffix) and the public reason a peer sees, by cause.
DENIALS: list[tuple[type[Exception], str, str]] = [
    (SessionUnknown, "SESSION_UNKNOWN", "unknown attestation session"),
    (SessionExpired, "SESSION_EXPIRED", "attestation session expired; request a new challenge"),
    (SessionUsed, "SESSION_USED", "attestation session already used; nonces are single-use"),
    (EvidenceFormatError, "EVIDENCE_MALFORMED", "evidence is malformed"),
    (SignatureInvalid, "SIGNATURE_INVALID", "evidence signature is invalid"),
    (ChainUntrusted, "CHAIN_UNTRUSTED", "attestation key is not certified by a trusted root"),
    (NonceMismatch, "NONCE_MISMATCH", "evidence is not fresh for this session"),
    (ReportDataMismatch, "REPORT_DATA_MISMATCH", "evidence does not bind the presented key"),
    (DebugEnabled, "DEBUG_ENABLED", "debug is not disabled"),
    (MeasurementRejected, "MEASUREMENT_REJECTED", "measurement is not a reference value"),
    (TeeNotAccepted, "TEE_NOT_ACCEPTED", "TEE kind not accepted by policy"),
    (NodeNotAllowed, "NODE_NOT_ALLOWED", "node is not allowed by policy"),
    (ResultExpired, "RESULT_EXPIRED", "attestation result expired; attest again"),
    (ResultInvalid, "RESULT_INVALID", "attestation result is invalid"),
    (NotAffirming, "NOT_AFFIRMING", "attestation result is not affirming"),
    (UnknownKey, "UNKNOWN_KEY", "unknown key id"),
    (BadRequest, "BAD_REQUEST", "malformed request"),
    # No proto value yet: the service sends this one as RESOURCE_EXHAUSTED.
    (RateLimited, RATE_LIMITED, "too many refused requests from this address; try again later"),
    (AttestationError, "EVIDENCE_MALFORMED", "evidence did not pass appraisal"),
]


def denial_of(error: Exception) -> tuple[str, str]:
    """The (code, public reason) for an error; the most specific cause wins."""
    for kind, code, reason in DENIALS:
        if isinstance(error, kind):
            return code, reason
    return "BAD_REQUEST", "malformed request"


def sent_digest(value: str | bytes) -> SentDigest:
    """What a client sent, as its size and SHA-256: an event never holds its bytes, so a
    denial fits a log entry whatever the request was."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return SentDigest(bytes=len(raw), sha256=sha256_hex(raw))


def _presented_key(purpose: str, suite: str, tee_pubkey: bytes) -> Any:
    """The key a request presents, checked for its purpose before appraisal: a signing
    key is a raw Ed25519 key under the suite "ed25519"; any other is an HPKE key of a known
    suite. A malformed or small-order key is refused (BadRequest): a certified channel key
    is one the aggregator must seal to, a certified signing key one the auditor trusts."""
    try:
        if purpose == PURPOSE_SIGNING:
            if suite != SIGNING_SUITE:
                raise BadRequest(f"a signing key's suite is {SIGNING_SUITE!r}, not {suite[:32]!r}")
            return signing_public_key(tee_pubkey)
        return load_public_key(suite, tee_pubkey)
    except (EnvelopeError, ScorecardInvalid) as exc:
        raise BadRequest(str(exc)) from exc


def _excerpt(text: str) -> str:
    return text if len(text) <= MAX_LOGGED_DETAIL else text[:MAX_LOGGED_DETAIL] + "…"


@dataclass(frozen=True)
class ContentKey:
    key_id: str
    model_id: str
    key: bytes = field(repr=False)


class KeyStore:
    """The provider's content keys: one 0600 JSON file per key id under a directory."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, key_id: str) -> Path:
        if (
            not key_id
            or len(key_id) > 128
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in key_id)
            or key_id[0] == "."
        ):
            raise UnknownKey(f"key id {key_id!r} is not a valid key id")
        return self.directory / f"{key_id}.json"

    def put(self, key: ContentKey) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(key.key_id)
        body = {
            "key_id": key.key_id,
            "model_id": key.model_id,
            "key": base64.b64encode(key.key).decode(),
        }
        create_new(path, json.dumps(body).encode("utf-8"), PRIVATE)
        return path

    def holds(self, key_id: str) -> bool:
        """Whether a content key with this id is in the store."""
        try:
            return self._path(key_id).is_file()
        except UnknownKey:
            return False

    def get(self, key_id: str) -> ContentKey:
        path = self._path(key_id)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnknownKey(f"no content key {key_id!r} in {self.directory}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable content key: {exc}", path=path) from exc
        try:
            key = base64.b64decode(body["key"], validate=True)
            if len(key) != KEY_SIZE or body["key_id"] != key_id:
                raise ValueError("wrong size or id")
            return ContentKey(key_id, str(body["model_id"]), key)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed content key file: {exc}", path=path) from exc


@dataclass(frozen=True)
class Released:
    """A key release: the affirming result and the content key wrapped to its TEE key."""

    result: AttestationResult
    wrapped_key: bytes
    key_id: str
    model_id: str
    session_id: str
    hpke_suite: str


@dataclass(frozen=True)
class Certified:
    """A channel or signing attestation: the affirming result certifies its TEE key as a
    node's update-channel key, or as a sandbox's signing key. No key is released with it,
    nor later against it."""

    result: AttestationResult
    key_id: str
    model_id: str


@dataclass(frozen=True)
class Denied:
    """A denial: the public code and reason, the typed cause, and any signed result."""

    code: str
    reason: str
    error: Exception
    result: AttestationResult | None = None


Outcome = Released | Certified | Denied


class KeyBroker:
    """Issues challenges, appraises evidence, and releases keys only on affirming results.

    Every call names its ``client`` (the service passes the peer's address): the session
    table and the denial budget in ``limits`` are kept per client, so one client cannot
    lock others out or flood the log.
    """

    def __init__(
        self,
        *,
        verifiers: VerifierRegistry,
        policy: AppraisalPolicy,
        signer: ResultSigner,
        keystore: KeyStore,
        events: EventSink,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        rng: Callable[[int], bytes] = os.urandom,
        session_ttl: dt.timedelta = DEFAULT_SESSION_TTL,
        limits: Limits = DEFAULT_LIMITS,
    ):
        self.verifiers = verifiers
        self.policy = policy
        self.signer = signer
        self.keystore = keystore
        self.events = events
        self.clock = clock
        self.rng = rng
        self.session_ttl = session_ttl
        self.limits = limits
        self._sessions = SessionTable(limits)
        self._denials = DenialBudget(limits)
        # Keys the client pseudonyms of this broker's lifetime; never leaves the process.
        self._pseudonym_key = rng(32)

    def challenge(self, key_id: str, *, client: str = LOCAL_CLIENT) -> Session:
        """A new session with a fresh 32-byte nonce; expired sessions are dropped.

        An unknown key id gets no session: UnknownKey, or RateLimited once the client is
        over its denial budget. A client at its session cap loses its oldest session.
        """
        now = self.clock()
        self._summarise(now)
        try:
            self.keystore.get(key_id)  # an unknown or malformed key id gets no session
        except UnknownKey as exc:
            denied = self._deny(exc, {"key_id": key_id}, now, client)
            if isinstance(denied.error, RateLimited):
                raise denied.error from None
            raise
        self._sessions.drop_expired(now)
        session = Session(
            session_id=base64.urlsafe_b64encode(self.rng(16)).decode().rstrip("="),
            nonce=self.rng(NONCE_BYTES),
            key_id=key_id,
            expires_at=now + self.session_ttl,
            client=client,
        )
        for evicted in self._sessions.add(session):
            log.debug("session %s of %s evicted for a newer one", evicted.session_id, client)
        return session

    def _take_session(self, session_id: str, now: dt.datetime) -> Session:
        """The session, marked used; a second use, expiry or unknown id is refused."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionUnknown("session was never issued, expired or was evicted")
        if session.used:
            raise SessionUsed(f"session {session_id!r} was already used")
        session.used = True
        if now >= session.expires_at:
            raise SessionExpired(f"session {session_id!r} expired at {session.expires_at}")
        return session

    def attest(
        self,
        *,
        session_id: str,
        tee: str,
        evidence: str,
        tee_pubkey: bytes,
        hpke_suite: str,
        key_id: str,
        purpose: str = PURPOSE_KEY_RELEASE,
        client: str = LOCAL_CLIENT,
    ) -> Outcome:
        """Appraise evidence for a session; release the key only if the result affirms.

        With ``purpose`` "channel" an affirming result only certifies ``tee_pubkey`` as a
        node's update-channel key, and with "signing" (``hpke_suite`` "ed25519") as a
        sandbox's Ed25519 signing key: nothing is released, now or later through
        ``release``.
        """
        now = self.clock()
        self._summarise(now)
        sent: dict[str, str | bytes] = {
            "session": session_id,
            "key_id": key_id,
            "tee": tee,
            "purpose": purpose,
            "hpke_suite": hpke_suite,
            "tee_pubkey": tee_pubkey,
            "evidence": evidence,
        }
        try:
            if purpose not in PURPOSES:
                raise BadRequest(f"unknown attestation purpose {purpose[:32]!r}")
            return self._attest(
                session_id,
                tee,
                evidence,
                tee_pubkey,
                hpke_suite,
                key_id,
                sent,
                now,
                purpose,
                client,
            )
        except (ArkError, AttestationError) as exc:
            return self._deny(exc, sent, now, client)
        except Exception as exc:  # a parser's own error type: still a recorded denial
            log.exception("attest failed unexpectedly for %s", client)
            return self._deny(BadRequest(f"unexpected {type(exc).__name__}"), sent, now, client)

    def _attest(
        self,
        session_id: str,
        tee: str,
        evidence: str,
        tee_pubkey: bytes,
        hpke_suite: str,
        key_id: str,
        sent: Mapping[str, str | bytes],
        now: dt.datetime,
        purpose: str,
        client: str,
    ) -> Outcome:
        policy = self.policy  # one read: a reload mid-call cannot mix two policies
        session = self._take_session(session_id, now)
        if session.key_id != key_id:
            raise BadRequest("session was opened for another key id")
        if tee not in self.verifiers.kinds:
            # Refused before appraisal: an unregistered kind would go into a signed result
            # and the appraisal event as the client spelled it, at any length.
            raise TeeNotAccepted("no verifier backend for the TEE kind presented")
        public_key = _presented_key(purpose, hpke_suite, tee_pubkey)
        content_key = self.keystore.get(key_id)
        # Every value here is now one the broker issued or knows, so events may name it.
        request = {Key.SESSION: session_id, Key.KEY_ID: key_id, Key.TEE: tee, Key.PURPOSE: purpose}
        context = ResultContext(
            session_id,
            tee,
            tee_pubkey,
            hpke_suite,
            evidence,
            policy.policy_id,
            policy.digest,
            purpose,
        )
        try:
            appraisal = self.verifiers.appraise(
                tee, evidence, nonce=session.nonce, tee_pubkey=tee_pubkey, policy=policy, now=now
            )
        except AttestationError as exc:
            result = self.signer.contraindicate(exc, context, now=now)
            appraised = self._appraised(result, request, now)
            return self._deny(exc, sent, now, client, result=result, appraised=appraised)
        result = self.signer.affirm(appraisal, context, now=now)
        appraised = self._appraised(result, request, now)
        if result.status != AFFIRMING:
            error = NotAffirming(f"result is {result.status}: {appraisal.warnings}")
            return self._deny(error, sent, now, client, result=result, appraised=appraised)
        self.events.emit(appraised)
        if purpose in CERTIFYING_PURPOSES:
            return self._certified(result, content_key, request, now)
        return self._release(result, content_key, public_key, request, now)

    def _certified(
        self,
        result: AttestationResult,
        content_key: ContentKey,
        request: dict[Key, Any],
        now: dt.datetime,
    ) -> Certified:
        """A channel or signing attestation: the signed result and no key."""
        self.events.emit(
            ChannelCertified(
                time=now,
                **request,
                ueid=result.ueid,
                ear_sha256=result.digest,
                tee_pubkey_sha256=sha256_hex(result.tee_pubkey),
            )
        )
        return Certified(result, content_key.key_id, content_key.model_id)

    def release(
        self, *, attestation_result: str, key_id: str, client: str = LOCAL_CLIENT
    ) -> Released | Denied:
        """Release another key against an unexpired affirming result this broker signed.

        The result must have been appraised under the policy in force now, and that
        policy must still admit its TEE kind, node and measurements.
        """
        now = self.clock()
        self._summarise(now)
        sent: dict[str, str | bytes] = {"attestation_result": attestation_result, "key_id": key_id}
        session: str | None = None
        try:
            policy = self.policy
            result = verify_result(attestation_result, self.signer.key.public_key(), now=now)
            session = result.session_id
            if result.status != AFFIRMING:
                raise NotAffirming(f"presented result is {result.status}")
            if result.purpose != PURPOSE_KEY_RELEASE:
                raise ResultInvalid(
                    f"presented result certifies a {result.purpose} key; it releases nothing"
                )
            if result.policy_digest != policy.digest:
                raise ResultInvalid("presented result was appraised under another policy")
            policy.admit(tee=result.tee, ueid=result.ueid or "", measurements=result.measurements)
            try:
                public_key = load_public_key(result.hpke_suite, result.tee_pubkey)
            except EnvelopeError as exc:
                raise ResultInvalid("presented result binds no usable TEE key") from exc
            content_key = self.keystore.get(key_id)
        except (ArkError, AttestationError) as exc:
            return self._deny(exc, sent, now, client, session=session)
        except Exception as exc:  # a parser's own error type: still a recorded denial
            log.exception("release failed unexpectedly for %s", client)
            error = BadRequest(f"unexpected {type(exc).__name__}")
            return self._deny(error, sent, now, client, session=session)
        request = {
            Key.KEY_ID: key_id,
            Key.RESULT_SHA256: sha256_hex(attestation_result.encode("utf-8", "replace")),
        }
        return self._release(result, content_key, public_key, request, now)

    def _release(
        self,
        result: AttestationResult,
        content_key: ContentKey,
        public_key: Any,
        request: dict[Key, Any],
        now: dt.datetime,
    ) -> Released:
        wrapped = wrap_content_key(
            content_key.key,
            public_key,
            session_id=result.session_id,
            key_id=content_key.key_id,
            model_id=content_key.model_id,
            suite=result.hpke_suite,
        )
        self.events.emit(
            KeyReleased(
                time=now,
                **{**request, Key.SESSION: result.session_id},
                model_id=content_key.model_id,
                ueid=result.ueid,
                ear_sha256=result.digest,
                tee_pubkey_sha256=sha256_hex(result.tee_pubkey),
            )
        )
        log.info(
            "released key %s to session %s (%s)", content_key.key_id, result.session_id, result.ueid
        )
        return Released(
            result,
            wrapped,
            content_key.key_id,
            content_key.model_id,
            result.session_id,
            result.hpke_suite,
        )

    @staticmethod
    def _appraised(
        result: AttestationResult, request: dict[Key, Any], now: dt.datetime
    ) -> AttestationAppraised:
        """The appraisal event, emitted by the caller: before a release, or with a denial
        (and then only if the denial is logged)."""
        submod = result.submod
        return AttestationAppraised(
            time=now,
            **request,
            status=result.status,
            ear_sha256=result.digest,
            tee_pubkey_sha256=sha256_hex(result.tee_pubkey),
            stub=result.is_stub,
            policy_id=submod["ear.appraisal-policy-id"],
            ueid=result.ueid,
            measurements=submod.get("ark.measurements", {}),
            trustworthiness=submod["ear.trustworthiness-vector"],
            failure=submod.get("ark.failure"),
        )

    def _deny(
        self,
        error: Exception,
        sent: Mapping[str, str | bytes],
        now: dt.datetime,
        client: str,
        *,
        session: str | None = None,
        result: AttestationResult | None = None,
        appraised: AttestationAppraised | None = None,
    ) -> Denied:
        """A denial: logged with its appraisal while the client is within its budget,
        otherwise counted for the window's summary and answered RATE_LIMITED.

        ``session`` is a session id the broker vouches for (from a result it signed).
        """
        code, reason = denial_of(error)
        over = self._denials.admit(client, code, now)
        if over is not None:
            if over.suppressed_total == 1:
                log.warning(
                    "denials from %s are over budget until %s: counted, not logged",
                    "all clients" if over.client == ALL_CLIENTS else client,
                    over.end.isoformat(),
                )
            limited = RateLimited(f"{code} counted in the window ending {over.end.isoformat()}")
            return Denied(*denial_of(limited), limited)
        # Full detail goes to the broker's own log only; events and peers get the code.
        log.warning(
            "denied %s to %s: %s: %s", code, client, type(error).__name__, _excerpt(str(error))
        )
        if appraised is not None:
            self.events.emit(appraised)
        self.events.emit(
            KeyDenied(
                time=now,
                **self._known(sent, session),
                request={name: sent_digest(value) for name, value in sent.items()},
                client=self._pseudonym(client),
                code=code,
                cause=type(error).__name__,
                ear_sha256=None if result is None else result.digest,
            )
        )
        return Denied(code, reason, error, result)

    def _known(self, sent: Mapping[str, str | bytes], session: str | None) -> dict[Key, str]:
        """The request's values the broker itself issued or holds, which a denial may
        name as they are: never bytes only the client chose."""
        known: dict[Key, str] = {}
        sent_session = sent.get("session")
        if session is not None:
            known[Key.SESSION] = session
        elif isinstance(sent_session, str) and self._sessions.get(sent_session) is not None:
            known[Key.SESSION] = sent_session
        key_id = sent.get("key_id")
        if isinstance(key_id, str) and self.keystore.holds(key_id):
            known[Key.KEY_ID] = key_id
        tee = sent.get("tee")
        if isinstance(tee, str) and tee in self.verifiers.kinds:
            known[Key.TEE] = tee
        purpose = sent.get("purpose")
        if isinstance(purpose, str) and purpose in PURPOSES:
            known[Key.PURPOSE] = purpose
        return known

    def _pseudonym(self, client: str) -> str:
        """A stable name for ``client`` in this broker's events that does not publish its
        address (a plain digest of an IPv4 address is reversed by trying them all)."""
        message = CLIENT_PSEUDONYM_INFO + b"\0" + client.encode("utf-8", "surrogatepass")
        return hmac.new(self._pseudonym_key, message, hashlib.sha256).hexdigest()[:32]

    def _summarise(self, now: dt.datetime) -> None:
        """Log one summary for each denial window that ended with denials counted."""
        for window in self._denials.closed(now):
            self.events.emit(self._summary(window, now))

    def flush(self) -> None:
        """Log the summaries of every window still open, as on shutdown: a summary is
        otherwise logged by the first call after its window ends."""
        now = self.clock()
        self._summarise(now)
        for window in self._denials.close_all():
            self.events.emit(self._summary(window, now))

    def _summary(self, window: DenialWindow, now: dt.datetime) -> DenialsRateLimited:
        return DenialsRateLimited(
            time=now,
            scope="all" if window.client == ALL_CLIENTS else "client",
            client=None if window.client == ALL_CLIENTS else self._pseudonym(window.client),
            window_start=window.start,
            window_end=window.end,
            logged=window.logged,
            suppressed=window.suppressed_total,
            codes=dict(sorted(window.suppressed.items())),
        )
