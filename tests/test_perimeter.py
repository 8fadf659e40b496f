"""The provider's perimeter: nodes reach the Fleet API through nginx, and nothing else.

The attacker here holds exactly what every node holds: the provider's CA certificate
and the node-facing address. Against the real SuperLink behind the real gateway, the
Control API (``flwr ls``, ``flwr supernode register``, ``flwr run``) and every path
trick are refused by nginx before they reach Flower; the provider's own CLI on
loopback still works. The federated runs in test_e2e.py go through the same gateway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from sandbox.errors import GatewayError
from sandbox.keyfiles import write_openssh_keypair
from sandbox.ops.federation import (
    HOST,
    Federation,
    _exe,
    _flower_env,
    free_port,
    run_flwr,
    write_cli_config,
)
from sandbox.ops.gateway import (
    FLEET_ROUTES,
    SELF_REGISTRATION_ROUTES,
    GatewaySpec,
    find_nginx,
    render_config,
    split_address,
)
from sandbox.ops.processes import still_running
from sandbox.ops.tls import issue_loopback_tls
from tests.conftest import APP_DIR
from tests.gateway_probe import PROBES, request_status


def _spec(tmp_path: Path, **overrides: object) -> GatewaySpec:
    values: dict[str, object] = {
        "listen": "127.0.0.1:9443",
        "superlink": "127.0.0.1:9444",
        "state_dir": tmp_path / "gateway",
        "tls": issue_loopback_tls(tmp_path / "tls"),
    }
    values.update(overrides)
    return GatewaySpec(**values)  # type: ignore[arg-type]


def test_config_forwards_exactly_the_fleet_calls_a_supernode_makes(tmp_path: Path) -> None:
    authenticated = render_config(_spec(tmp_path))
    for route in FLEET_ROUTES:
        assert route in authenticated
    # With SuperNode authentication, nodes never register themselves: not forwarded.
    for route in SELF_REGISTRATION_ROUTES:
        assert route not in authenticated
    assert "/v1/control" not in authenticated
    assert "/v1/runtime" not in authenticated
    plain = render_config(_spec(tmp_path, tls=None, node_auth=False))
    assert all(route in plain for route in SELF_REGISTRATION_ROUTES)
    assert " ssl;" not in plain


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("superlink", "198.51.100.7:9093", "198.51.100.7:9093"),
        ("superlink", "0.0.0.0:9093", "0.0.0.0:9093"),
        ("listen", "127.0.0.1", "'127.0.0.1'"),
        ("listen", "127.0.0.1:99999", "99999"),
    ],
)
def test_bad_addresses_are_refused_by_name(
    tmp_path: Path, field: str, value: str, named: str
) -> None:
    with pytest.raises(GatewayError, match=named):
        _spec(tmp_path, **{field: value})


def test_paths_nginx_would_expand_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match=r"contains '\$'"):
        _spec(tmp_path, state_dir=tmp_path / "$host")


def test_flowers_internal_listener_switches_are_never_inherited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLWR_INTERNAL_GRPC_CONTROL_API=1 would open a gRPC Control API on all interfaces."""
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    env = _flower_env(tmp_path)
    assert not [key for key in env if key.startswith("FLWR_INTERNAL_")]
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_node_authentication_needs_tls_and_a_real_nginx(tmp_path: Path) -> None:
    with pytest.raises(GatewayError, match="needs TLS"):
        _spec(tmp_path, tls=None)
    with pytest.raises(GatewayError, match="/nonexistent/nginx"):
        find_nginx("/nonexistent/nginx")


def _node_home(tmp_path: Path, federation: Federation) -> Path:
    """A Flower CLI home with only what a node holds: the CA and the node-facing address."""
    assert federation.tls is not None
    home = tmp_path / "attacker"
    write_cli_config(home, federation.node_address, federation.tls.ca_cert)
    return home


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_node_reaches_only_the_fleet_api(tmp_path: Path, federation: Federation) -> None:
    federation.start_superlink()
    assert federation.superlink is not None
    assert federation.tls is not None
    # The SuperLink listens on loopback only; the node-facing address is the gateway's.
    listening = {
        conn.laddr.ip
        for conn in psutil.Process(federation.superlink.pid).net_connections("inet")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening == {HOST}, listening
    assert split_address(federation.node_address)[1] != federation.port

    home = _node_home(tmp_path, federation)
    key = write_openssh_keypair(tmp_path / "intruder" / "node")
    attempts = {
        "ls": run_flwr(home, "ls"),
        "supernode register": run_flwr(
            home, "supernode", "register", str(key.with_suffix(".pub")), "ark", "--name", "x"
        ),
        "supernode list": run_flwr(home, "supernode", "list"),
        "run": run_flwr(home, "run", str(APP_DIR), "ark", timeout=180.0),
    }
    for name, result in attempts.items():
        assert result.returncode != 0, f"flwr {name} through the gateway succeeded"
        assert "404" in result.stdout + result.stderr, (name, result.stdout, result.stderr)

    for probe in PROBES:
        status = request_status(
            federation.node_address, federation.tls.ca_cert, probe.method, probe.path, probe.length
        )
        assert status == probe.status, probe

    # Nothing the intruder tried changed the provider's state: its own CLI, on loopback,
    # sees no registered node and no run.
    for args, listed in ((("supernode", "list"), "nodes"), (("ls",), "runs")):
        seen = federation._flwr(*args, "--format", "json")
        assert json.loads(seen.stdout) == {"success": True, listed: []}, seen.stdout + seen.stderr

    # Every refused call is in the gateway's own log with nginx's status.
    access = (federation.provider_home / "gateway" / "access.log").read_text(encoding="utf-8")
    assert '"POST /v1/control/start-run HTTP/1.1" 404' in access
    assert '"POST /v1/control/register-node HTTP/1.1" 404' in access


def test_gateway_command_stops_nginx_on_interrupt(tmp_path: Path) -> None:
    """``ark provider gateway`` starts nginx by PID and leaves nothing behind on Ctrl-C."""
    provider = tmp_path / "provider"
    issue_loopback_tls(provider / "tls")
    listen = f"{HOST}:{free_port()}"
    proc = subprocess.Popen(
        [
            _exe("ark"),
            "provider",
            "gateway",
            "--workdir",
            str(provider),
            "--listen",
            listen,
            "--superlink",
            f"{HOST}:{free_port()}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "40"},
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        # One whole line although COLUMNS is 40: output to a pipe is never wrapped.
        assert f"listening on {listen}" in banner, banner
        assert str(provider / "gateway" / "nginx.conf") in banner, banner
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "nginx did not start"
        assert any("nginx" in child.name() for child in children)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
        assert not [c.pid for c in children if still_running(c)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
