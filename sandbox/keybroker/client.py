"""The sandbox's side of key release: challenge, evidence, attest, check the result, unwrap.

Everything the broker says is checked here before it is used, whichever transport
carried it (:class:`KeyBrokerClient` over gRPC/TLS, or the provider's in-process
adapter): the attestation result must verify under the provider's result key, be
affirming, and be bound to this session and this sandbox's ephemeral key; the wrapped
key opens only with that key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protos.ark.v1 import keybroker_pb2 as pb
from protos.ark.v1 import keybroker_pb2_grpc as pb_grpc
from sandbox.attestation.backends import Attester
from sandbox.attestation.result import (
    AFFIRMING,
    CERTIFYING_PURPOSES,
    PURPOSE_CHANNEL,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
    SIGNING_SUITE,
    AttestationResult,
    verify_result,
)
from sandbox.errors import KeyBrokerUnavailable, KeyReleaseDenied, ResultInvalid
from sandbox.keybroker import RATE_LIMITED
from sandbox.keybroker.transport import Certification, Challenge, KeyBrokerTransport, KeyRelease
from sandbox.seal.envelope import SUITE_X25519, RecipientKey, unwrap_content_key
from sandbox.tls import TlsChannel

DEFAULT_TIMEOUT = 30.0
Request = TypeVar("Request")
Reply = TypeVar("Reply")


@dataclass(frozen=True)
class ReleasedKey:
    """A content key opened inside the sandbox, and the result it was released under."""

    key_id: str
    model_id: str
    result: AttestationResult
    content_key: bytes = field(repr=False)


class KeyBrokerClient(TlsChannel):
    """The key broker's transport over gRPC with TLS (a :class:`KeyBrokerTransport`)."""

    def __init__(self, address: str, *, ca_cert: Path | bytes, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(address, ca_cert=ca_cert, timeout=timeout)
        self._stub = pb_grpc.KeyBrokerStub(self._channel)

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[Request, Reply], request: Request
    ) -> Reply:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            detail = str(exc.details()) if isinstance(exc, grpc.Call) else str(exc)
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyReleaseDenied("UNKNOWN_KEY", detail) from exc
            if (
                isinstance(exc, grpc.Call)
                and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and detail.startswith(f"{RATE_LIMITED}: ")
            ):
                # The broker's RATE_LIMITED (sandbox.ops.keybroker.service): a denial to retry
                # after its window, sent as a status until the proto has a code for it.
                # gRPC's own RESOURCE_EXHAUSTED (a message over the size limit) is not one.
                raise KeyReleaseDenied(
                    RATE_LIMITED, detail.removeprefix(f"{RATE_LIMITED}: ")
                ) from exc
            raise KeyBrokerUnavailable(f"key broker at {self.address}: {detail}") from exc

    def challenge(self, key_id: str) -> Challenge:
        reply = self._call(self._stub.Challenge, pb.ChallengeRequest(key_id=key_id))
        return Challenge(reply.session_id, reply.nonce, reply.expires_at)

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
    ) -> KeyRelease | Certification:
        """The broker's release (or certification), or KeyReleaseDenied with its code."""
        request = pb.AttestRequest(
            session_id=session_id,
            tee=tee,
            evidence=evidence,
            tee_pubkey=tee_pubkey,
            hpke_suite=hpke_suite,
            key_id=key_id,
            purpose=purpose,
        )
        released = _released(self._call(self._stub.Attest, request))
        if purpose in CERTIFYING_PURPOSES:
            # The wire's KeyRelease with no key: the proto has one reply for every purpose.
            return Certification(released.attestation_result, released.key_id, released.session_id)
        return _key_release(released)

    def release(self, *, attestation_result: str, key_id: str) -> KeyRelease:
        request = pb.ReleaseRequest(attestation_result=attestation_result, key_id=key_id)
        return _key_release(_released(self._call(self._stub.Release, request)))


def _released(reply: pb.AttestReply) -> pb.KeyRelease:
    """The reply's release, or KeyReleaseDenied carrying the broker's code and reason."""
    if reply.WhichOneof("outcome") != "released":
        code = pb.DenialCode.Name(reply.denied.code).removeprefix("DENIAL_CODE_")
        raise KeyReleaseDenied(code, reply.denied.reason)
    return reply.released


def _key_release(released: pb.KeyRelease) -> KeyRelease:
    return KeyRelease(
        released.attestation_result,
        released.wrapped_key,
        released.key_id,
        released.model_id,
        released.session_id,
        released.hpke_suite,
    )


def _attested(
    broker: KeyBrokerTransport,
    attester: Attester,
    *,
    key_id: str,
    tee_pubkey: bytes,
    suite: str,
    measurements: Mapping[str, str],
    result_key: ec.EllipticCurvePublicKey,
    purpose: str,
    clock: Callable[[], dt.datetime],
) -> tuple[KeyRelease | Certification, AttestationResult]:
    """Challenge, evidence binding ``tee_pubkey`` (of ``suite``), attest; the broker's
    checked result."""
    challenge = broker.challenge(key_id)
    evidence = attester.evidence(
        nonce=challenge.nonce,
        tee_pubkey=tee_pubkey,
        measurements=dict(measurements),
        now=clock(),
    )
    granted = broker.attest(
        session_id=challenge.session_id,
        tee=attester.tee,
        evidence=evidence,
        tee_pubkey=tee_pubkey,
        hpke_suite=suite,
        key_id=key_id,
        purpose=purpose,
    )
    result = verify_result(granted.attestation_result, result_key, now=clock())
    if (
        result.status != AFFIRMING
        or result.session_id != challenge.session_id
        or result.tee_pubkey != tee_pubkey
        or result.hpke_suite != suite
        or result.purpose != purpose
        or granted.key_id != key_id
    ):
        raise ResultInvalid("the key broker's result is not bound to this session and key")
    return granted, result


def obtain_content_key(
    broker: KeyBrokerTransport,
    attester: Attester,
    *,
    key_id: str,
    measurements: Mapping[str, str],
    result_key: ec.EllipticCurvePublicKey,
    suite: str = SUITE_X25519,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> ReleasedKey:
    """Attest this sandbox and open the released content key with a fresh ephemeral key."""
    sandbox_key = RecipientKey.generate(suite)
    release, result = _attested(
        broker,
        attester,
        key_id=key_id,
        tee_pubkey=sandbox_key.public_bytes,
        suite=sandbox_key.suite,
        measurements=measurements,
        result_key=result_key,
        purpose=PURPOSE_KEY_RELEASE,
        clock=clock,
    )
    if not isinstance(release, KeyRelease):
        raise ResultInvalid("the key broker certified a channel key where a key was asked for")
    content_key = unwrap_content_key(
        release.wrapped_key,
        sandbox_key.private_key,
        session_id=result.session_id,
        key_id=key_id,
        model_id=release.model_id,
        suite=suite,
    )
    return ReleasedKey(key_id, release.model_id, result, content_key)


def certify_channel_key(
    broker: KeyBrokerTransport,
    attester: Attester,
    channel_key: RecipientKey,
    *,
    key_id: str,
    measurements: Mapping[str, str],
    result_key: ec.EllipticCurvePublicKey,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> AttestationResult:
    """Attest this sandbox with ``channel_key`` bound; the result certifies that key only.

    The broker releases nothing for it, and refuses the result on ``Release``.
    """
    _, result = _attested(
        broker,
        attester,
        key_id=key_id,
        tee_pubkey=channel_key.public_bytes,
        suite=channel_key.suite,
        measurements=measurements,
        result_key=result_key,
        purpose=PURPOSE_CHANNEL,
        clock=clock,
    )
    return result


def certify_signing_key(
    broker: KeyBrokerTransport,
    attester: Attester,
    public_key: Ed25519PublicKey,
    *,
    key_id: str,
    measurements: Mapping[str, str],
    result_key: ec.EllipticCurvePublicKey,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> AttestationResult:
    """Attest this sandbox with its Ed25519 signing key bound (raw 32 bytes, suite
    "ed25519"); the result certifies that key for signing only (the held-out commitments
    and scorecards of :mod:`sandbox.scorecard`), and the broker logs it as
    ``channel_certified`` with purpose "signing". Nothing is released for it, and the
    broker refuses the result on ``Release``.
    """
    _, result = _attested(
        broker,
        attester,
        key_id=key_id,
        tee_pubkey=public_key.public_bytes_raw(),
        suite=SIGNING_SUITE,
        measurements=measurements,
        result_key=result_key,
        purpose=PURPOSE_SIGNING,
        clock=clock,
    )
    return result
