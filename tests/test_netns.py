"""The test-host topology: namespaces made and removed, who reaches whom, a cut link.

Every listener is a process this module starts and stops by its own Popen; every
namespace is made by a topology the test closes (or, for the one made by hand, deleted
by hand).
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sandbox.errors import TopologyError
from sandbox.ops.netns import (
    PROVIDER_ADDRESS,
    Host,
    Topology,
    listening_ports,
    netns_unavailable,
    reachable,
)

UNAVAILABLE = netns_unavailable()
needs_netns = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"running on loopback: {UNAVAILABLE}"
)

# Binds, says so, and serves until its stdin closes (accepts pile up in the backlog).
_LISTEN = """\
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
sys.stdin.read()
"""
# Long enough for a connection on a quiet link (one lost SYN is retried after 1 s).
REACHED_WITHIN = 3.0
# A dropped connect waits this long before it counts as unreachable.
DROPPED_AFTER = 0.5


def _namespaces() -> set[str]:
    """The machine's named namespaces, read here rather than by the code under test."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _tagged(tag: str | None) -> set[str]:
    return {name for name in _namespaces() if name.startswith(f"ark-{tag}-")}


@contextlib.contextmanager
def listener(host: Host, address: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A TCP listener on ``address:port`` inside ``host``, stopped by its PID on exit."""
    cmd = host.argv([sys.executable, "-I", "-S", "-c", _LISTEN, address, str(port)])
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "listening\n", f"{cmd} did not start"
        yield process
    finally:
        process.kill()
        process.wait(timeout=5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def topology() -> Iterator[Topology]:
    with Topology.create(["alpha", "beta"]) as made:
        yield made


@needs_netns
def test_topology_is_made_and_removed() -> None:
    topology = Topology.create(["alpha", "beta"])
    try:
        assert not topology.loopback
        assert [(h.name, h.address) for h in topology.hosts] == [
            ("provider", "198.51.100.1"),
            ("alpha", "198.51.100.11"),
            ("beta", "198.51.100.12"),
        ]
        assert all(h.isolated for h in topology.hosts)
        assert _tagged(topology.tag) == {h.netns for h in topology.hosts}
        shown = subprocess.run(
            topology.nodes["beta"].argv(["ip", "-br", "-4", "addr", "show", "dev", "eth0"]),
            capture_output=True,
            text=True,
            check=True,
        )
        assert "198.51.100.12/24" in shown.stdout
    finally:
        topology.close()
    assert _tagged(topology.tag) == set()
    topology.close()  # a second close has nothing left to do and does not raise


@needs_netns
def test_node_reaches_the_provider_address_and_nothing_on_its_loopback(
    topology: Topology,
) -> None:
    provider, alpha = topology.provider, topology.nodes["alpha"]
    with (
        listener(provider, PROVIDER_ADDRESS, 9092) as fleet,
        listener(provider, "127.0.0.1", 9093),
    ):
        # `ip netns exec` replaced itself: the PID we hold is the listener's own.
        with open(f"/proc/{fleet.pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[0] == sys.executable.encode()
        assert listening_ports(provider) == {(PROVIDER_ADDRESS, 9092), ("127.0.0.1", 9093)}
        assert listening_ports(alpha) == set()
        assert reachable(alpha, PROVIDER_ADDRESS, 9092, REACHED_WITHIN)
        assert not reachable(alpha, PROVIDER_ADDRESS, 9093, REACHED_WITHIN)
        # The node's 127.0.0.1 is its own loopback, not the provider's.
        assert not reachable(alpha, "127.0.0.1", 9093, REACHED_WITHIN)
        assert reachable(provider, "127.0.0.1", 9093, REACHED_WITHIN)


@needs_netns
def test_nodes_cannot_reach_each_other(topology: Topology) -> None:
    alpha, beta = topology.nodes["alpha"], topology.nodes["beta"]
    with listener(alpha, alpha.address, 9094):
        # The listener is there for the provider: only the bridge's isolation stops beta.
        assert reachable(topology.provider, alpha.address, 9094, REACHED_WITHIN)
        assert not reachable(beta, alpha.address, 9094, DROPPED_AFTER)


@needs_netns
def test_cut_link_is_unreachable_until_restored(topology: Topology) -> None:
    alpha, beta = topology.nodes["alpha"], topology.nodes["beta"]
    with listener(topology.provider, PROVIDER_ADDRESS, 9092):
        assert reachable(alpha, PROVIDER_ADDRESS, 9092, REACHED_WITHIN)
        topology.cut("alpha")
        assert not reachable(alpha, PROVIDER_ADDRESS, 9092, DROPPED_AFTER)
        assert reachable(beta, PROVIDER_ADDRESS, 9092, REACHED_WITHIN)  # only alpha is cut
        topology.restore("alpha")
        assert reachable(alpha, PROVIDER_ADDRESS, 9092, REACHED_WITHIN)


def test_loopback_hosts_share_127_0_0_1_and_refuse_a_cut() -> None:
    with Topology.create(["alpha", "beta"], loopback=True) as topology:
        assert topology.loopback
        assert topology.tag is None
        assert {(h.address, h.netns) for h in topology.hosts} == {("127.0.0.1", None)}
        assert topology.nodes["alpha"].argv(["ark", "node", "status"]) == ["ark", "node", "status"]
        with pytest.raises(TopologyError, match="'alpha' runs on loopback"):
            topology.cut("alpha")
        with pytest.raises(TopologyError, match="'alpha' runs on loopback"):
            topology.restore("alpha")


@needs_netns
def test_failed_create_names_the_command_and_removes_only_what_it_made() -> None:
    tag = f"t{secrets.token_hex(3)}"
    taken = f"ark-{tag}-1"
    subprocess.run(["ip", "netns", "add", taken], check=True)
    try:
        with pytest.raises(TopologyError, match=f"`ip netns add {taken}` failed") as raised:
            Topology.create(["alpha"], tag=tag)
        assert raised.value.command == ("ip", "netns", "add", taken)
        assert "File exists" in str(raised.value)
        # Its provider namespace was made, then deleted; the one it did not make is kept.
        assert _tagged(tag) == {taken}
    finally:
        subprocess.run(["ip", "netns", "del", taken], check=True)


@needs_netns
def test_close_tolerates_a_namespace_already_gone() -> None:
    topology = Topology.create(["alpha"])
    try:
        provider = topology.provider.netns
        assert provider is not None
        subprocess.run(["ip", "netns", "del", provider], check=True)
        with pytest.raises(TopologyError, match=f"`ip -n {provider} link set node1 down`"):
            topology.cut("alpha")
    finally:
        topology.close()
    assert _tagged(topology.tag) == set()
    topology.close()
    with pytest.raises(RuntimeError, match="closed"):
        topology.restore("alpha")
