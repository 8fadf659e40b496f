"""The attester for every TEE kind whose evidence is an x5c-signed EAT.

Its key is certified by the kind's manufacturer root; the evidence carries that chain
(``x5c``), and :class:`~sandbox.attestation.verifier.Verifier` appraises it against the
roots it trusts for the kind. What differs between such kinds (hardware model, how the
certificate names the instance) is the kind's :class:`~sandbox.attestation.kinds.TeeKind`.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.attestation.evidence import (
    EAT_PROFILE,
    JWS_ALG,
    JWS_TYP,
    b64url,
    encode_jws,
    es256_sign,
    report_data,
)
from sandbox.attestation.kinds import TeeKind


@dataclass(kw_only=True)
class X5cAttester:
    """Produces ES256-signed evidence for one TEE instance (``ueid``) of ``kind``."""

    kind: TeeKind
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]
    ueid: str
    swname: str = "ark-sandbox"
    swversion: str = "0.1.0"
    dbgstat: str | None = "disabled-since-boot"
    extra_claims: dict[str, Any] = field(default_factory=dict)

    @property
    def tee(self) -> str:
        return self.kind.name

    def evidence(
        self, *, nonce: bytes, tee_pubkey: bytes, measurements: dict[str, str], now: dt.datetime
    ) -> str:
        """An ES256-signed EAT over ``nonce`` binding ``tee_pubkey`` and ``measurements``."""
        claims: dict[str, Any] = {
            "eat_profile": EAT_PROFILE,
            "eat_nonce": b64url(nonce),
            "ueid": self.ueid,
            "hwmodel": self.kind.hwmodel,
            "swname": self.swname,
            "swversion": self.swversion,
            "measurements": dict(measurements),
            "report_data": report_data(nonce, tee_pubkey),
            "tee": self.tee,
            "iat": int(now.timestamp()),
            **self.extra_claims,
        }
        if self.dbgstat is not None:
            claims["dbgstat"] = self.dbgstat
        x5c = [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
            for c in self.chain
        ]
        header = {"alg": JWS_ALG, "typ": JWS_TYP, "x5c": x5c}
        return encode_jws(header, claims, lambda data: es256_sign(self.key, data))
