"""What a node can ask the provider's gateway, and what the gateway must answer.

The requester holds exactly what every node holds: the provider's CA certificate and
the node-facing address. Each :data:`PROBES` entry is one request sent byte for byte as
written (no client-side normalising of the path) and the status nginx must answer:
404 for the Control and Runtime APIs, health and every path trick, 403 for a Fleet path
with another method, 413 for a body over the gateway's cap, and Flower's own 401 for a
Fleet call without a SuperNode's signature, which proves the route is forwarded.

tests/test_perimeter.py sends them from the provider's own machine; run as
``python -m tests.gateway_probe ADDRESS CA_CERT`` (tests/test_deploy_guide.py does, on a
node's host) it sends every probe and prints one JSON list of
``[method, path, status]``.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from sandbox.ops.gateway import split_address

# Paths that must never reach the SuperLink from a node: the Control and Runtime APIs,
# health, and dot-segment or encoding tricks that normalise onto a Fleet path or away
# from one.
FORBIDDEN_PATHS = [
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/runtime/get-run",
    "/v1/fleet/register-node",
    "/v1/fleet/unregister-node",
    "/health",
    "/",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/pull-messages%2f..%2f..%2fcontrol%2flist-runs",
    "/v1/fleet/PULL-MESSAGES",
    "/v1/fleet/pull-messages/",
]

NOT_FOUND, FORBIDDEN, UNAUTHORIZED, TOO_LARGE = 404, 403, 401, 413
# Over the gateway's cap on a request body (64 MiB); announced, never sent.
OVERSIZED = 65 * 2**20


@dataclass(frozen=True)
class Probe:
    """One request to the gateway and the status it must get."""

    method: str
    path: str
    status: int
    length: int = 0  # the Content-Length announced; the body itself is never sent


PROBES = [
    *(Probe("POST", path, NOT_FOUND) for path in FORBIDDEN_PATHS),
    Probe("GET", "/v1/fleet/pull-messages", FORBIDDEN),
    Probe("PUT", "/v1/fleet/push-messages", FORBIDDEN),
    # Forwarded: Flower itself refuses a caller without a SuperNode signature.
    Probe("POST", "/v1/fleet/pull-messages", UNAUTHORIZED),
    # Refused before a byte of the body is read or forwarded.
    Probe("POST", "/v1/fleet/push-object", TOO_LARGE, length=OVERSIZED),
]


def request_status(address: str, ca_cert: Path, method: str, path: str, length: int = 0) -> int:
    """Send one request over TLS (trusting only ``ca_cert``) with the path exactly as
    given, announcing a body of ``length`` bytes without sending it; the status."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/protobuf")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def main(argv: list[str]) -> None:
    """Send every probe to ``argv[0]`` (host:port) trusting ``argv[1]`` (the CA); print
    what each got."""
    address, ca_cert = argv[0], Path(argv[1])
    answers = [
        [p.method, p.path, request_status(address, ca_cert, p.method, p.path, p.length)]
        for p in PROBES
    ]
    print(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1:])
