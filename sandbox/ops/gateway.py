"""The provider's node-facing gateway: nginx in front of a loopback-only SuperLink.

Flower 1.41 serves its Control, Fleet and Runtime APIs from one HTTP app on one port,
and Control API account authentication is a no-op in this distribution. A node that
reached that port could register SuperNode keys, remove other nodes and start any
ServerApp as the provider's user. So the SuperLink binds loopback only, and the one
listener nodes reach is nginx, which terminates TLS with the provider's certificate and
forwards exactly the Fleet API calls a SuperNode makes (``POST`` on the paths below,
read from ``flwr/supernode/fleet_http_client.py``). Every other path gets 404, every
other method on a Fleet path 403.

Why nginx: it is a small, widely deployed, security-maintained proxy in Debian's main
archive; Flower's SuperNode speaks plain HTTP/1.1 (httpx), so an HTTP proxy with exact
path matching is all the perimeter needs, and nginx's config is one short file that a
security reviewer can read. The config is built with ``crossplane`` (nginx's own
config builder), so paths with any characters are quoted correctly.

The forwarded URI is rebuilt from the matched route name, never the client's raw
request line, so no encoding or dot-segment trick can reach another route behind the
proxy.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.errors import GatewayError
from sandbox.ops.processes import ManagedProcess, start_process, stop_processes, wait_for_port
from sandbox.ops.tls import TlsFiles

# What a SuperNode calls on the Fleet API (flwr 1.41, fleet_http_client.py), all POST.
FLEET_ROUTES = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
# Only a SuperNode without an authentication key registers itself; with SuperNode
# authentication on, the SuperLink refuses these anyway, and the gateway never forwards them.
SELF_REGISTRATION_ROUTES = ("register-node", "unregister-node")
FLEET_PREFIX = "/v1/fleet/"
# Largest request body a node may send in one call. Flower chunks arrays into 5 MiB
# objects and caps a FAB at 10 MB; a sealed update is one object of at most the node's
# max-update-bytes. Anything larger is refused by the gateway with 413.
DEFAULT_MAX_BODY = "64m"
# The name the SuperLink's certificate carries (tls.LOOPBACK_NAMES).
UPSTREAM_TLS_NAME = "localhost"
CONFIG_NAME = "nginx.conf"
# nginx's temporary folders, all kept in the gateway's own state folder (the package
# defaults under /var/lib/nginx are root's).
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
NGINX_PACKAGE = "nginx (Debian)"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as a pair; GatewayError naming a bad value."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"address {address!r} is not host:port")
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class GatewaySpec:
    """Where the gateway listens, where the SuperLink is, and with what TLS material.

    ``tls`` None means plaintext on both sides: only for the canary test's negative
    control and the overhead bench's baseline, where the SuperLink runs without TLS.
    """

    listen: str
    superlink: str
    state_dir: Path
    tls: TlsFiles | None
    node_auth: bool = True
    max_body: str = DEFAULT_MAX_BODY

    def __post_init__(self) -> None:
        split_address(self.listen)
        host, _ = split_address(self.superlink)
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise GatewayError(
                f"superlink address {self.superlink!r} is not on loopback: the SuperLink "
                "must never listen where nodes can reach it"
            )
        if self.node_auth and self.tls is None:
            raise GatewayError("SuperNode authentication needs TLS on the gateway")
        # nginx expands variables in log and certificate paths, and some of them (the
        # Host header, the URI) are the client's: no path of ours may contain one.
        paths = [self.state_dir]
        if self.tls is not None:
            paths += [self.tls.ca_cert, self.tls.server_cert, self.tls.server_key]
        for path in paths:
            if "$" in str(path):
                raise GatewayError(f"path {str(path)!r} contains '$', which nginx would expand")

    @property
    def routes(self) -> tuple[str, ...]:
        return FLEET_ROUTES if self.node_auth else FLEET_ROUTES + SELF_REGISTRATION_ROUTES

    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_NAME

    @property
    def error_log(self) -> Path:
        return self.state_dir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.state_dir / "access.log"


def _d(directive: str, *args: str, block: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"directive": directive, "args": list(args)}
    if block is not None:
        out["block"] = block
    return out


def _worker_user() -> list[dict[str, Any]]:
    """As root, nginx's workers drop to ``nobody`` and its own primary group."""
    if os.geteuid() != 0:
        return []
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return []
    return [_d("user", entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name)]


def render_config(spec: GatewaySpec) -> str:
    """The nginx configuration for ``spec``: one server, one allowlisted location."""
    state = spec.state_dir
    listen_host, listen_port = split_address(spec.listen)
    scheme = "https" if spec.tls is not None else "http"
    route = "^" + FLEET_PREFIX + "(" + "|".join(spec.routes) + ")$"
    proxy: list[dict[str, Any]] = [
        _d("limit_except", "POST", block=[_d("deny", "all")]),
        _d("proxy_pass", f"{scheme}://superlink{FLEET_PREFIX}$1"),
        _d("proxy_http_version", "1.1"),
        _d("proxy_set_header", "Connection", ""),
        _d("proxy_set_header", "Host", UPSTREAM_TLS_NAME),
        _d("proxy_request_buffering", "off"),
        _d("proxy_buffering", "off"),
        _d("proxy_read_timeout", "120s"),
        _d("proxy_send_timeout", "120s"),
    ]
    server: list[dict[str, Any]] = []
    if spec.tls is not None:
        server += [
            _d("listen", _join(listen_host, listen_port), "ssl"),
            _d("ssl_certificate", str(spec.tls.server_cert)),
            _d("ssl_certificate_key", str(spec.tls.server_key)),
            _d("ssl_protocols", "TLSv1.2", "TLSv1.3"),
            _d("ssl_prefer_server_ciphers", "on"),
        ]
        proxy += [
            _d("proxy_ssl_verify", "on"),
            _d("proxy_ssl_trusted_certificate", str(spec.tls.ca_cert)),
            _d("proxy_ssl_name", UPSTREAM_TLS_NAME),
            _d("proxy_ssl_server_name", "on"),
            _d("proxy_ssl_protocols", "TLSv1.2", "TLSv1.3"),
        ]
    else:
        server.append(_d("listen", _join(listen_host, listen_port)))
    server += [
        _d("client_max_body_size", spec.max_body),
        _d("location", "~", route, block=proxy),
        _d("location", "/", block=[_d("return", "404")]),
    ]
    http = [
        _d("access_log", str(spec.access_log)),
        _d("error_log", str(spec.error_log), "warn"),
        _d("server_tokens", "off"),
        *(_d(f"{kind}_temp_path", str(state / "tmp" / kind)) for kind in TEMP_KINDS),
        _d("upstream", "superlink", block=[_d("server", spec.superlink), _d("keepalive", "8")]),
        _d("server", block=server),
    ]
    import crossplane

    config = [
        *_worker_user(),
        _d("daemon", "off"),
        _d("worker_processes", "1"),
        _d("pid", str(state / "nginx.pid")),
        _d("error_log", str(spec.error_log), "warn"),
        _d("events", block=[_d("worker_connections", "512")]),
        _d("http", block=http),
    ]
    return str(crossplane.build(config)) + "\n"


def find_nginx(explicit: str | None = None) -> str:
    """The nginx binary: ``explicit``, else on PATH, else Debian's /usr/sbin/nginx."""
    candidates = [explicit] if explicit else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    where = explicit or "on PATH or at /usr/sbin/nginx"
    raise GatewayError(f"nginx not found {where}; install the Debian package {NGINX_PACKAGE}")


def _argv(nginx: str, spec: GatewaySpec, *extra: str) -> list[str]:
    return [
        nginx,
        "-p",
        str(spec.state_dir),
        "-c",
        str(spec.config_path),
        "-e",
        str(spec.error_log),
        *extra,
    ]


def write_config(spec: GatewaySpec, nginx: str) -> Path:
    """Write the config and have nginx check it (``nginx -t``); GatewayError if it fails."""
    for kind in TEMP_KINDS:
        (spec.state_dir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    spec.config_path.write_text(render_config(spec), encoding="utf-8")
    try:
        checked = subprocess.run(
            _argv(nginx, spec, "-t", "-q"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GatewayError(f"cannot run {nginx} -t: {exc}") from exc
    if checked.returncode != 0:
        raise GatewayError(
            f"nginx refused {spec.config_path}: {(checked.stderr or checked.stdout).strip()}"
        )
    return spec.config_path


def start_gateway(
    spec: GatewaySpec, *, nginx: str | None = None, log_path: Path, timeout: float = 30.0
) -> ManagedProcess:
    """Start nginx in the foreground for ``spec``, once it listens; stop it by its PID."""
    binary = find_nginx(nginx)
    write_config(spec, binary)
    proc = start_process("gateway", _argv(binary, spec), env=dict(os.environ), log_path=log_path)
    host, port = split_address(spec.listen)
    try:
        wait_for_port(host, port, proc, timeout)
    except (RuntimeError, TimeoutError) as exc:
        stop_processes([[proc]])
        errors = spec.error_log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise GatewayError(f"the gateway did not start: {exc}\n{errors}") from exc
    proc.remember_descendants()
    return proc
