"""The key broker as a transport without the network: for tests, simulators and tooling.

:class:`InProcessTransport` implements the sandbox's
:class:`~sandbox.keybroker.transport.KeyBrokerTransport` over a :class:`KeyBroker` in this
process, answering what the gRPC service would send: the same releases, certifications
and denial codes. The sandbox's own checks (``sandbox.keybroker.client``) run over it
unchanged, so a test attests exactly as a node does.
"""

from __future__ import annotations

from sandbox.attestation.result import PURPOSE_KEY_RELEASE
from sandbox.errors import KeyReleaseDenied
from sandbox.keybroker.transport import Certification, Challenge, KeyRelease
from sandbox.ops.keybroker.broker import (
    Certified,
    Denied,
    KeyBroker,
    RateLimited,
    Released,
    UnknownKey,
    denial_of,
)
from sandbox.ops.keybroker.limits import LOCAL_CLIENT


class InProcessTransport:
    """Calls ``broker`` directly, as the peer ``client`` (whose limits the calls count
    against); a denial raises ``KeyReleaseDenied`` with the broker's code and reason."""

    def __init__(self, broker: KeyBroker, *, client: str = LOCAL_CLIENT):
        self.broker = broker
        self.client = client

    def challenge(self, key_id: str) -> Challenge:
        try:
            session = self.broker.challenge(key_id, client=self.client)
        except (UnknownKey, RateLimited) as exc:
            raise KeyReleaseDenied(*denial_of(exc)) from exc
        return Challenge(session.session_id, session.nonce, int(session.expires_at.timestamp()))

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
        outcome = self.broker.attest(
            session_id=session_id,
            tee=tee,
            evidence=evidence,
            tee_pubkey=tee_pubkey,
            hpke_suite=hpke_suite,
            key_id=key_id,
            # As the service reads it: proto3 sends an unset purpose as "".
            purpose=purpose or PURPOSE_KEY_RELEASE,
            client=self.client,
        )
        if isinstance(outcome, Denied):
            raise KeyReleaseDenied(outcome.code, outcome.reason)
        if isinstance(outcome, Certified):
            return Certification(outcome.result.token, outcome.key_id, outcome.result.session_id)
        return _key_release(outcome)

    def release(self, *, attestation_result: str, key_id: str) -> KeyRelease:
        outcome = self.broker.release(
            attestation_result=attestation_result, key_id=key_id, client=self.client
        )
        if isinstance(outcome, Denied):
            raise KeyReleaseDenied(outcome.code, outcome.reason)
        return _key_release(outcome)


def _key_release(released: Released) -> KeyRelease:
    return KeyRelease(
        released.result.token,
        released.wrapped_key,
        released.key_id,
        released.model_id,
        released.session_id,
        released.hpke_suite,
    )
