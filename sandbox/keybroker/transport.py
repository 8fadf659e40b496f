"""How the sandbox reaches a key broker: the wire's three calls, and what each answers.

:class:`KeyBrokerTransport` is the interface the sandbox's checks
(:mod:`sandbox.keybroker.client`) run over. Two implementations: the gRPC/TLS client
(:class:`~sandbox.keybroker.client.KeyBrokerClient`) and, for tests and tooling, an
in-process adapter over the provider's broker (``sandbox.ops.keybroker.inprocess``).
Nothing a transport returns is trusted: the result it carries is verified by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sandbox.attestation.result import PURPOSE_KEY_RELEASE


@dataclass(frozen=True)
class Challenge:
    """An attestation session: its id, the single-use nonce, its expiry (Unix seconds)."""

    session_id: str
    nonce: bytes
    expires_at: int


@dataclass(frozen=True)
class KeyRelease:
    """A key release as the broker sent it: the signed attestation result, not yet
    verified, and the content key HPKE-wrapped to the TEE key that result binds."""

    attestation_result: str
    wrapped_key: bytes
    key_id: str
    model_id: str
    session_id: str
    hpke_suite: str


@dataclass(frozen=True)
class Certification:
    """A channel or signing attestation as the broker sent it: the signed attestation
    result, not yet verified, certifying the presented key as a node's update-channel key
    or a sandbox's signing key. No key."""

    attestation_result: str
    key_id: str
    session_id: str


class KeyBrokerTransport(Protocol):
    """The key broker's calls. A refusal raises ``KeyReleaseDenied`` with the broker's
    denial code and public reason; a broker that cannot be reached raises
    ``KeyBrokerUnavailable``."""

    def challenge(self, key_id: str) -> Challenge:
        """Open an attestation session for ``key_id``."""
        ...

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
        """Present evidence for a session: a key release, or for the "channel" and
        "signing" purposes a certification of ``tee_pubkey``."""
        ...

    def release(self, *, attestation_result: str, key_id: str) -> KeyRelease:
        """Release a key against an unexpired affirming result the broker signed."""
        ...
