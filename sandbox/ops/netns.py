"""Test hosts on one machine: a provider and its nodes, each in its own network namespace.

The demo and the end-to-end tests run every party's processes as they would run on
separate machines: each party gets a network namespace of its own (its own loopback, its
own address, its own listening ports), and the provider's namespace holds the network
between them, a bridge every node's link is plugged into::

    provider namespace (ark-<tag>-p)               node namespace (ark-<tag>-<i>)
    lo 127.0.0.1                                    lo 127.0.0.1
    br0 198.51.100.1/24 ── node<i> ═══ veth ═══ eth0 198.51.100.(10+i)/24

Bridge ports are isolated from each other, so a node reaches the provider and never
another node, as enterprises on the internet reach the provider and not each other. Only
the 198.51.100.0/24 documentation range (RFC 5737) is used, and no IPv6 link-local
address is made, so nothing here can be mistaken for, or leak to, a real network.

Where namespaces cannot be made (not root, no iproute2, a container that forbids them),
the same :class:`Topology` runs every party on 127.0.0.1: :func:`netns_unavailable` says
why, and callers print ``running on loopback: <reason>``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import weakref
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from sandbox.errors import TopologyError

SUBNET = ipaddress.IPv4Network("198.51.100.0/24")  # TEST-NET-2 (RFC 5737)
PROVIDER_ADDRESS = str(SUBNET[1])
LOOPBACK_ADDRESS = "127.0.0.1"
PROVIDER_NAME = "provider"
# Node i (from 1) is 198.51.100.(10 + i): the provider keeps .1 and the low addresses.
_FIRST_NODE_HOST = 10
MAX_NODES = SUBNET.num_addresses - 2 - _FIRST_NODE_HOST  # .255 is the broadcast address

BRIDGE = "br0"
NODE_INTERFACE = "eth0"
NAMESPACE_PREFIX = "ark-"
_TAG = re.compile(r"[0-9a-z]{1,8}")
# How long a link may take to carry traffic after it is set up (tens of milliseconds here;
# the kernel applies carrier changes in deferred work, which a busy machine can delay).
LINK_UP_TIMEOUT = 5.0
_COMMAND_TIMEOUT = 20.0

# Run inside a host's namespace by reachable(): exit 0 when the connection is accepted,
# 3 when it is refused, times out or has no route. Any other exit is the check failing.
_CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(3)
"""
_NOT_REACHED = 3


@dataclass(frozen=True)
class Host:
    """One party's test host: its name, the address the other parties use for it, and
    the network namespace its processes run in (None on loopback)."""

    name: str
    address: str
    netns: str | None

    @property
    def isolated(self) -> bool:
        """Whether this host has a network namespace of its own (not loopback)."""
        return self.netns is not None

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run on this host: inside its namespace, or unchanged on loopback.

        ``ip netns exec`` replaces itself with ``cmd``, so the PID of the process started
        from this argv is ``cmd``'s own, and stopping it by that PID stops ``cmd``.
        """
        if self.netns is None:
            return list(cmd)
        return ["ip", "netns", "exec", self.netns, *cmd]


def _run(
    cmd: Sequence[str], *, ok: Container[int] = (0,), timeout: float = _COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (no shell); an exit code not in ``ok``, or one that cannot run, is a
    TopologyError naming the command and what it wrote to stderr."""
    shown = shlex.join(cmd)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"`{shown}` could not run: {exc}", command=cmd) from exc
    if done.returncode not in ok:
        stderr = " ".join(done.stderr.split()) or "(nothing on stderr)"
        raise TopologyError(
            f"`{shown}` failed with exit code {done.returncode}: {stderr}", command=cmd
        )
    return done


def _ip(*args: str) -> str:
    """Run ``ip`` with ``args``; its stdout."""
    return _run(["ip", *args]).stdout


def _namespaces() -> set[str]:
    """The names of the machine's named network namespaces (``ip netns list``)."""
    # Each line is "NAME" or "NAME (id: N)".
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _delete_namespaces(names: list[str]) -> None:
    """Delete every namespace in ``names`` (and empty the list), skipping any already gone;
    tries them all before raising one TopologyError for those that remain."""
    failures = []
    while names:
        name = names.pop()
        try:
            _ip("netns", "del", name)
        except TopologyError as exc:
            try:
                still_there = name in _namespaces()
            except TopologyError:
                still_there = True
            if still_there:
                failures.append(str(exc))
    if failures:
        raise TopologyError("; ".join(failures))


def _link_up(netns: str, interface: str) -> bool:
    """Whether the interface carries traffic (operational state UP, not just set up)."""
    shown = json.loads(_ip("-j", "-n", netns, "link", "show", "dev", interface))
    return bool(shown) and shown[0].get("operstate") == "UP"


def _wait_links_up(links: Iterable[tuple[str, str]], *, timeout: float = LINK_UP_TIMEOUT) -> None:
    """Return once every (namespace, interface) link is operationally up.

    Setting a link up only asks for it: the carrier and the bridge port follow in the
    kernel's deferred work, and packets sent before are dropped (a connect then waits for
    a SYN retransmit, 1 s). Waiting here makes "created" and "restored" mean "carries
    traffic".
    """
    waiting = list(links)
    deadline = time.monotonic() + timeout
    while True:
        waiting = [(netns, dev) for netns, dev in waiting if not _link_up(netns, dev)]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            down = ", ".join(f"{dev} in {netns}" for netns, dev in waiting)
            raise TopologyError(f"links not up after {timeout:g} s: {down}")
        time.sleep(0.02)


class Topology:
    """A provider host and node hosts, made by :meth:`create` and removed by :meth:`close`.

    A context manager: leaving the ``with`` block closes it. It is also closed when it
    is garbage-collected and at interpreter exit, whichever comes first, so a crashed
    test run leaves no namespace behind.
    """

    def __init__(self, nodes: Sequence[str], *, tag: str | None):
        """Name the hosts (makes nothing; :meth:`create` does): node i (from 1) is
        198.51.100.(10 + i) in namespace ``ark-<tag>-<i>``, linked to the provider's port
        ``node<i>``; with no ``tag``, every host is on loopback."""
        self.tag = tag
        if tag is None:
            self.provider = Host(PROVIDER_NAME, LOOPBACK_ADDRESS, None)
            self.nodes = {name: Host(name, LOOPBACK_ADDRESS, None) for name in nodes}
        else:
            prefix = f"{NAMESPACE_PREFIX}{tag}-"
            self.provider = Host(PROVIDER_NAME, PROVIDER_ADDRESS, f"{prefix}p")
            self.nodes = {
                name: Host(name, str(SUBNET[_FIRST_NODE_HOST + i]), f"{prefix}{i}")
                for i, name in enumerate(nodes, start=1)
            }
        self._ports = {name: f"node{i}" for i, name in enumerate(nodes, start=1)}
        # Namespaces this topology made, deleted by close(). The finalizer holds the list,
        # not the topology, so it can run when the topology is collected.
        self._made: list[str] = []
        self._finalizer = weakref.finalize(self, _delete_namespaces, self._made)

    @classmethod
    def create(
        cls, nodes: Sequence[str], *, loopback: bool = False, tag: str | None = None
    ) -> Topology:
        """Make the provider's host and one host per name in ``nodes`` (node i from 1 at
        198.51.100.(10 + i)), or, with ``loopback``, hosts that all run on 127.0.0.1.

        ``tag`` names this run's namespaces (``ark-<tag>-p``, ``ark-<tag>-<i>``); by
        default it is random, so parallel runs never share a name. When any step fails,
        what was made so far is deleted before the TopologyError is raised.
        """
        names = list(nodes)
        if len(set(names)) != len(names) or PROVIDER_NAME in names or "" in names:
            raise ValueError(f"node names must be unique, non-empty, not {PROVIDER_NAME!r}")
        if len(names) > MAX_NODES:
            raise ValueError(f"{len(names)} nodes: at most {MAX_NODES} fit in {SUBNET}")
        if loopback:
            return cls(names, tag=None)
        tag = secrets.token_hex(3) if tag is None else tag
        if not _TAG.fullmatch(tag):
            raise ValueError(f"tag {tag!r} is not 1 to 8 lowercase letters or digits")
        topology = cls(names, tag=tag)
        try:
            topology._build()
        except BaseException:
            topology.close()
            raise
        return topology

    def _build(self) -> None:
        provider = self._add_namespace(self.provider)
        # No STP: a port forwards as soon as it is up, not after a 15 s learning delay.
        _ip("-n", provider, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        _ip("-n", provider, "link", "set", BRIDGE, "addrgenmode", "none")
        _ip("-n", provider, "addr", "add", f"{PROVIDER_ADDRESS}/{SUBNET.prefixlen}", "dev", BRIDGE)
        _ip("-n", provider, "link", "set", BRIDGE, "up")
        for name, host in self.nodes.items():
            node = self._add_namespace(host)
            _, port = self._link_ends(name)[0]
            # Made directly between the two namespaces: nothing ever appears in the root
            # namespace, where a name could clash with the machine's or another run's.
            _ip(
                "link", "add", port, "netns", provider, "type", "veth",
                "peer", "name", NODE_INTERFACE, "netns", node,
            )  # fmt: skip
            _ip("-n", provider, "link", "set", port, "addrgenmode", "none")
            _ip("-n", provider, "link", "set", port, "master", BRIDGE)
            # Isolated ports forward only to non-isolated ones (the bridge itself, i.e.
            # the provider), never to each other: nodes cannot reach one another.
            _ip("-n", provider, "link", "set", port, "type", "bridge_slave", "isolated", "on")
            _ip("-n", provider, "link", "set", port, "up")
            _ip("-n", node, "link", "set", NODE_INTERFACE, "addrgenmode", "none")
            address = f"{host.address}/{SUBNET.prefixlen}"
            _ip("-n", node, "addr", "add", address, "dev", NODE_INTERFACE)
            _ip("-n", node, "link", "set", NODE_INTERFACE, "up")
        _wait_links_up(end for name in self.nodes for end in self._link_ends(name))

    def _add_namespace(self, host: Host) -> str:
        if host.netns is None:
            raise TopologyError(f"host {host.name!r} runs on loopback: it has no namespace")
        _ip("netns", "add", host.netns)
        self._made.append(host.netns)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host.netns

    def _link_ends(self, node: str) -> list[tuple[str, str]]:
        """Both ends of ``node``'s link as (namespace, interface), the provider's first."""
        host = self._node(node)
        if host.netns is None or self.provider.netns is None:
            raise TopologyError(
                f"node {node!r} runs on loopback ({LOOPBACK_ADDRESS}): it has no link"
            )
        return [(self.provider.netns, self._ports[node]), (host.netns, NODE_INTERFACE)]

    def _node(self, name: str) -> Host:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(
                f"no node {name!r} in this topology (nodes: {sorted(self.nodes)})"
            ) from None

    @property
    def hosts(self) -> tuple[Host, ...]:
        """The provider's host, then the nodes' in the order they were given."""
        return (self.provider, *self.nodes.values())

    @property
    def loopback(self) -> bool:
        """Whether every host runs on 127.0.0.1 (no namespaces were made)."""
        return not self.provider.isolated

    def cut(self, node: str) -> None:
        """Cut ``node``'s link to the provider, as a pulled cable or a network partition.

        The provider-side end (the bridge port) goes down, not the node's ``eth0``: the
        node keeps its interface, address and route as its operator set them, and its
        packets vanish silently, so its connections fail by timeout as between real
        machines. (Downing ``eth0`` instead drops the node's route, and every send fails at
        once with "network unreachable", which no fault between two machines produces.)
        """
        (provider, port), _ = self._open_link(node)
        _ip("-n", provider, "link", "set", port, "down")

    def restore(self, node: str) -> None:
        """Undo :meth:`cut`: returns once the link carries traffic again."""
        ends = self._open_link(node)
        (provider, port), _ = ends
        _ip("-n", provider, "link", "set", port, "up")
        _wait_links_up(ends)

    def _open_link(self, node: str) -> list[tuple[str, str]]:
        ends = self._link_ends(node)
        if not self._finalizer.alive:
            raise RuntimeError("the topology is closed: its links are gone")
        return ends

    def close(self) -> None:
        """Delete every namespace this topology made, with the bridge and links in them.

        Safe to call twice, and quiet about a namespace already gone. Processes still
        running inside are not stopped here (callers stop the ones they started first);
        while one runs, its namespace and the links in it live on, nameless.
        """
        self._finalizer()

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def netns_unavailable() -> str | None:
    """None when this machine can make the test hosts, else a one-line reason why not.

    The check makes (and deletes) a throwaway topology of one node, so it tries exactly
    what :meth:`Topology.create` needs: root, ``ip``, namespaces, a bridge with isolated
    ports and a veth pair between namespaces.
    """
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    try:
        with Topology.create(["probe"]):
            pass
    except TopologyError as exc:
        return f"cannot make network namespaces: {exc}"
    return None


def listening_ports(host: Host) -> set[tuple[str, int]]:
    """The TCP ports listening on ``host`` (inside its namespace), as (address, port).

    Addresses are as ``ss`` writes them without brackets or ``%device``: ``0.0.0.0`` and
    ``::`` are every IPv4 or IPv6 address, ``*`` every address of both. A loopback host
    has no namespace of its own, so for it this is every listener on the machine.
    """
    listeners = set()
    for line in _run(host.argv(["ss", "-Hltn"])).stdout.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        listeners.add((address.strip("[]").split("%")[0], int(port)))
    return listeners


def reachable(from_host: Host, address: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from inside ``from_host`` to ``address:port`` is accepted
    within ``timeout`` seconds (refused, timed out or unroutable: False)."""
    # -I -S: the check needs only the standard library; skipping site starts it faster.
    connect = [sys.executable, "-I", "-S", "-c", _CONNECT, address, str(port), str(timeout)]
    done = _run(from_host.argv(connect), ok=(0, _NOT_REACHED), timeout=timeout + _COMMAND_TIMEOUT)
    return done.returncode == 0
