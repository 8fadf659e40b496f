"""Attester and verifier backends, registered by TEE kind.

Callers (the key broker, the ClientApp) talk to these protocols only, so a TDX, SEV-SNP
or NVIDIA CC backend is a new registration, not a change to any caller: its TEE kind
(:mod:`sandbox.attestation.kinds`), its attester loader here, and its evidence verifier
(the x5c :class:`Verifier` for x5c-signed EATs).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from cryptography import x509

from sandbox.attestation.stub import STUB, StubAttester
from sandbox.attestation.verifier import Appraisal, AppraisalPolicy, Verifier
from sandbox.errors import ConfigError, TeeNotAccepted


class Attester(Protocol):
    """Produces evidence for one TEE instance (the RATS Attester role)."""

    @property
    def tee(self) -> str:
        """The TEE kind whose evidence this attester produces."""
        ...

    def evidence(
        self, *, nonce: bytes, tee_pubkey: bytes, measurements: dict[str, str], now: dt.datetime
    ) -> str:
        """Signed evidence over ``nonce`` that binds ``tee_pubkey`` and ``measurements``."""
        ...


class EvidenceVerifier(Protocol):
    """Appraises one kind of evidence against a policy (the RATS Verifier role)."""

    def appraise(
        self,
        token: str,
        *,
        nonce: bytes,
        tee_pubkey: bytes,
        policy: AppraisalPolicy,
        now: dt.datetime,
    ) -> Appraisal:
        """Return the appraisal, or raise an AttestationError subclass naming the cause."""
        ...


class VerifierRegistry:
    """One evidence verifier per TEE kind; an unregistered kind is refused, never guessed."""

    def __init__(self, backends: Mapping[str, EvidenceVerifier]):
        self._backends = dict(backends)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._backends)

    def appraise(
        self,
        tee: str,
        token: str,
        *,
        nonce: bytes,
        tee_pubkey: bytes,
        policy: AppraisalPolicy,
        now: dt.datetime,
    ) -> Appraisal:
        """Dispatch to the backend for ``tee``; its appraisal must agree on the kind."""
        backend = self._backends.get(tee)
        if backend is None:
            raise TeeNotAccepted(f"no verifier backend for TEE kind {tee!r}")
        appraisal = backend.appraise(
            token, nonce=nonce, tee_pubkey=tee_pubkey, policy=policy, now=now
        )
        if appraisal.tee != tee:
            raise TeeNotAccepted(f"evidence presented as {tee!r} appraised as {appraisal.tee!r}")
        return appraisal


# How a sandbox loads its attester: (key file, chain file, ueid).
ATTESTER_LOADERS: dict[str, Callable[[Path, Path, str], Attester]] = {
    STUB.name: StubAttester.load,
}


def load_attester(
    tee: str,
    key: Path,
    chain: Path,
    ueid: str,
    *,
    config_path: Path | None = None,
    config_key: str | None = "node.sandbox.tee",
) -> Attester:
    """The registered attester for ``tee``; ConfigError for a kind with no backend, naming
    where ``tee`` was configured (by default a node's ``[node.sandbox]`` key)."""
    loader = ATTESTER_LOADERS.get(tee)
    if loader is None:
        raise ConfigError(
            f"no attester backend for TEE kind {tee!r}; known: {sorted(ATTESTER_LOADERS)}",
            path=config_path,
            key=config_key,
        )
    return loader(key, chain, ueid)


def load_trusted_roots(folder: Path) -> dict[str, list[x509.Certificate]]:
    """Manufacturer roots by TEE kind from ``folder/<tee>/*.pem``."""
    roots: dict[str, list[x509.Certificate]] = {}
    if not folder.is_dir():
        return roots
    for kind in sorted(p for p in folder.iterdir() if p.is_dir()):
        for pem in sorted(kind.glob("*.pem")):
            try:
                roots.setdefault(kind.name, []).extend(
                    x509.load_pem_x509_certificates(pem.read_bytes())
                )
            except ValueError as exc:
                raise ConfigError(f"unreadable root certificate: {exc}", path=pem) from exc
    return roots


def verifiers_for(roots: dict[str, list[x509.Certificate]]) -> VerifierRegistry:
    """One x5c verifier per TEE kind, each trusting only that kind's roots."""
    return VerifierRegistry({kind: Verifier({kind: certs}) for kind, certs in roots.items()})
