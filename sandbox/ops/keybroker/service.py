"""The key broker over gRPC with TLS: a thin translation layer over :class:`KeyBroker`."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote

import grpc

from protos.ark.v1 import keybroker_pb2 as pb
from protos.ark.v1 import keybroker_pb2_grpc as pb_grpc
from sandbox.attestation.result import PURPOSE_KEY_RELEASE
from sandbox.keybroker import RATE_LIMITED
from sandbox.ops.keybroker.broker import (
    Certified,
    Denied,
    KeyBroker,
    Outcome,
    RateLimited,
    UnknownKey,
    denial_of,
)
from sandbox.ops.tls import start_tls_server

log = logging.getLogger("ark.keybroker")
# Evidence with a short chain is a few KiB; nothing legitimate comes near this.
MAX_REQUEST_BYTES = 256 * 1024
# Clients on one IPv6 network share limits: a single host is commonly given a whole /64.
IPV6_CLIENT_PREFIX = 64


def client_of(peer: str) -> str:
    """The client a call counts against, from gRPC's peer address: the IP address without
    its port (a new connection gets a new port), an IPv6 address's /64, and for any other
    transport (a Unix socket) its kind alone.

    Nodes behind one NAT (or one proxy) are one client and share its limits; a finer key,
    such as something the caller sends, would be the caller's to choose.
    """
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return kind
    host = unquote(address).rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return kind
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def _rate_limited(context: grpc.ServicerContext) -> NoReturn:
    """RATE_LIMITED goes out as gRPC's RESOURCE_EXHAUSTED: the proto's DenialCode has no
    value for it yet, and the status is the one gRPC clients already back off on."""
    _, reason = denial_of(RateLimited())
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{RATE_LIMITED}: {reason}")
    raise RuntimeError("grpc's context.abort returned instead of raising")


def _reply(outcome: Outcome, context: grpc.ServicerContext) -> pb.AttestReply:
    if isinstance(outcome, Denied) and outcome.code == RATE_LIMITED:
        _rate_limited(context)
    if isinstance(outcome, Denied):
        return pb.AttestReply(
            denied=pb.Denial(
                code=pb.DenialCode.Value(f"DENIAL_CODE_{outcome.code}"),
                reason=outcome.reason,
                attestation_result="" if outcome.result is None else outcome.result.token,
            )
        )
    # The proto has one reply for every purpose: a channel's or signing key's certification
    # has no key.
    wrapped_key = b"" if isinstance(outcome, Certified) else outcome.wrapped_key
    return pb.AttestReply(
        released=pb.KeyRelease(
            attestation_result=outcome.result.token,
            wrapped_key=wrapped_key,
            key_id=outcome.key_id,
            model_id=outcome.model_id,
            session_id=outcome.result.session_id,
            hpke_suite=outcome.result.hpke_suite,
        )
    )


class KeyBrokerServicer(pb_grpc.KeyBrokerServicer):
    """Serialises calls into the broker (its session table is not thread-safe)."""

    def __init__(self, broker: KeyBroker):
        self.broker = broker
        self._lock = threading.Lock()

    def Challenge(
        self, request: pb.ChallengeRequest, context: grpc.ServicerContext
    ) -> pb.ChallengeReply:
        client = client_of(context.peer())
        with self._lock:
            try:
                session = self.broker.challenge(request.key_id, client=client)
            except UnknownKey:
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown key id")
            except RateLimited:
                _rate_limited(context)
        return pb.ChallengeReply(
            session_id=session.session_id,
            nonce=session.nonce,
            expires_at=int(session.expires_at.timestamp()),
        )

    def Attest(self, request: pb.AttestRequest, context: grpc.ServicerContext) -> pb.AttestReply:
        client = client_of(context.peer())
        with self._lock:
            outcome = self.broker.attest(
                session_id=request.session_id,
                tee=request.tee,
                evidence=request.evidence,
                tee_pubkey=request.tee_pubkey,
                hpke_suite=request.hpke_suite,
                key_id=request.key_id,
                purpose=request.purpose or PURPOSE_KEY_RELEASE,
                client=client,
            )
        return _reply(outcome, context)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.AttestReply:
        client = client_of(context.peer())
        with self._lock:
            outcome = self.broker.release(
                attestation_result=request.attestation_result, key_id=request.key_id, client=client
            )
        return _reply(outcome, context)


def serve(
    broker: KeyBroker,
    *,
    address: str,
    cert: Path,
    key: Path,
    workers: int = 4,
    services: Sequence[Callable[[grpc.Server], None]] = (),
) -> tuple[grpc.Server, int]:
    """Start the TLS gRPC server on ``address`` (port 0 picks one); return it and its port.

    ``services`` register more services on the same server (the transparency log)."""
    server, port = start_tls_server(
        [
            lambda grpc_server: pb_grpc.add_KeyBrokerServicer_to_server(
                KeyBrokerServicer(broker), grpc_server
            ),
            *services,
        ],
        address=address,
        cert=cert,
        key=key,
        workers=workers,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    log.info("key broker listening on %s (TLS)", address.rsplit(":", 1)[0] + f":{port}")
    return server, port
