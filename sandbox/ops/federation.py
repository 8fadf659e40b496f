"""A loopback federation of real Flower processes: one SuperLink, one SuperNode per node.

Used by ``ark demo`` and the end-to-end tests. Each party gets its own HOME and
FLWR_HOME under the workspace, so runs never touch the user's own Flower config.

The SuperLink listens on loopback only and serves the provider's ``flwr`` CLI and its
ServerApps there; SuperNodes reach it only through the provider's gateway
(``ark provider gateway``: nginx forwarding the Fleet API calls and nothing else), at
one node-facing address, ``Federation.node_address``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import tomli_w

from sandbox.config import RunSpec
from sandbox.errors import ConfigError, FederationError
from sandbox.events import JOB_EVENTS_FILE, RunFinished
from sandbox.launcher import NODE_CONFIG_ENV, install_launcher
from sandbox.models import OFFLINE_ENV
from sandbox.ops.gateway import split_address
from sandbox.ops.processes import (
    ManagedProcess,
    kill_tree,
    start_process,
    stop_processes,
    wait_for_port,
)
from sandbox.ops.tls import TlsFiles, issue_loopback_tls
from sandbox.protocol import NODE_CONFIG_KEY, SANDBOX_READY
from sandbox.warmstart import POOL_ENV, POOL_READY, pool_socket

HOST = "127.0.0.1"
FEDERATION_NAME = "ark"
# What flower-supernode logs once the SuperLink has activated it (and given it a node id).
SUPERNODE_ONLINE = "SuperNode ID:"
# How long a node's sandbox may take to attest and unseal before it serves.
SANDBOX_TIMEOUT = 180.0


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def check_port_free(port: int, host: str = HOST) -> None:
    """Raise FederationError naming the port if something already listens on it (or
    ``host`` is not an address of this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: connections of a stopped server lingering in TIME_WAIT do
        # not make the port busy, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FederationError(
                f"port {port} on {host} is already in use, or {host} is not an address "
                f"of this host ({exc.strerror})"
            ) from exc


def _flower_env(home: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    # Flower's internal switches (FLWR_INTERNAL_GRPC_CONTROL_API and the like) open
    # extra listeners on all interfaces, outside the gateway: never inherited.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    env.update(
        HOME=str(home),
        FLWR_HOME=str(home / ".flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1",
        PYTHONUNBUFFERED="1",
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
    )
    env.update(OFFLINE_ENV)
    return env


def _node_config_arg(home: Path, node_config: Path) -> Path:
    """A TOML file for ``flower-supernode --node-config`` that points the node's apps at
    ``node_config``. Flower reads a ``.toml`` argument with a real TOML parser; its
    ``key=value`` form is split by a regular expression that no quoting survives."""
    path = home / "supernode-config.toml"
    path.write_text(tomli_w.dumps({NODE_CONFIG_KEY: str(node_config)}), encoding="utf-8")
    return path


def wait_logged(
    proc: ManagedProcess,
    line: str,
    what: str,
    timeout: float,
    *,
    relay: Callable[[str], None] | None = None,
    marker: str = "",
) -> None:
    """Block until ``proc`` logs ``line`` (it serves); FederationError if it exits or takes
    longer than ``timeout`` seconds. Lines holding ``marker`` go to ``relay`` as they
    appear (the message part of a logging line)."""
    deadline = time.monotonic() + timeout
    relayed = 0
    while True:
        tail = proc.log_tail(400).splitlines()
        if relay is not None and marker:
            said = [entry for entry in tail if marker in entry]
            for entry in said[relayed:]:
                relay(entry[entry.index(marker) :])
            relayed = max(relayed, len(said))
        if any(line in entry for entry in tail):
            return
        if not proc.alive():
            raise FederationError(f"{what} exited:\n{proc.log_tail()}")
        if time.monotonic() >= deadline:
            raise FederationError(f"{what} did not serve within {timeout:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.1)


def _exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


# -- what each process of each party runs: one definition, used by the loopback harness
# below and by the parties' own commands (``ark provider start``, ``ark node start``) -----


def superlink_argv(
    database: Path, port: int, tls: TlsFiles | None, *, node_auth: bool
) -> list[str]:
    """``flower-superlink`` on loopback ``port`` (TLS with ``tls``; plaintext when None,
    which rules out node authentication), its state in ``database``."""
    if tls is not None:
        transport = [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    else:
        if node_auth:
            raise FederationError("SuperNode authentication needs TLS")
        transport = ["--insecure"]
    argv = [
        _exe("flower-superlink"),
        *transport,
        "--host",
        HOST,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
    ]
    if node_auth:
        argv.append("--enable-supernode-auth")
    return argv


def gateway_argv(provider_home: Path, listen: str, superlink: str, *, tls_on: bool) -> list[str]:
    """``ark provider gateway``: nginx on ``listen`` forwarding the Fleet API to ``superlink``."""
    argv = [
        _exe("ark"),
        "provider",
        "gateway",
        "--workdir",
        str(provider_home),
        "--listen",
        listen,
        "--superlink",
        superlink,
    ]
    return argv if tls_on else [*argv, "--insecure"]


def key_broker_argv(provider_home: Path, address: str) -> list[str]:
    """``ark provider serve``: the key broker and the transparency log on ``address``."""
    return [_exe("ark"), "provider", "serve", "--workdir", str(provider_home), "--address", address]


def sandbox_argv(node_config: Path, *, broker_wait: float | None = None) -> list[str]:
    """``ark node sandbox`` for ``node_config`` (waiting up to ``broker_wait`` seconds for
    an unreachable key broker)."""
    argv = [_exe("ark"), "node", "sandbox", "--config", str(node_config)]
    return argv if broker_wait is None else [*argv, "--broker-wait", str(broker_wait)]


def pool_argv(node_config: Path) -> list[str]:
    """``ark node launch-pool`` for ``node_config``."""
    return [_exe("ark"), "node", "launch-pool", "--config", str(node_config)]


def node_home(node_config: Path) -> Path:
    """A node's processes' HOME: its workspace, the folder of its ``node.toml``."""
    return node_config.parent


def node_env(home: Path) -> dict[str, str]:
    """A node process's environment: its own HOME, and temporary files in its own
    workspace, where it (and the tests that look for leaked plaintext) can see them."""
    env = _flower_env(home)
    env["TMPDIR"] = str(home / "tmp")
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def supernode_env(home: Path, node_config: Path) -> dict[str, str]:
    """The SuperNode's (and its launch pool's) environment: the node's launcher answers
    to ``flwr-clientapp`` ahead of Flower's own, so no app runs on this node unless its
    config approved the app's digest; the launcher hands over to the node's pool."""
    env = node_env(home)
    launcher = install_launcher(home / "bin")
    env["PATH"] = str(launcher.parent) + os.pathsep + env["PATH"]
    env[NODE_CONFIG_ENV] = str(node_config)
    env[POOL_ENV] = str(pool_socket(node_config))
    return env


def supernode_argv(
    home: Path,
    node_config: Path,
    *,
    superlink: str,
    ca_cert: Path | None,
    auth_key: Path | None,
) -> list[str]:
    """``flower-supernode`` reaching the provider at ``superlink`` (its gateway) over TLS
    trusting ``ca_cert`` (plaintext when None), authenticating with ``auth_key``."""
    argv = [
        _exe("flower-supernode"),
        *(["--root-certificates", str(ca_cert)] if ca_cert is not None else ["--insecure"]),
        "--superlink",
        superlink,
        "--host",
        HOST,
        "--port",
        str(free_port()),
        "--node-config",
        str(_node_config_arg(home, node_config)),
        "--max-retries",
        "10",
    ]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    return argv


@dataclass(frozen=True)
class RunOutcome:
    """How a Flower run ended: completed when its ServerApp wrote the event that ends a
    run (``run_finished``) and exited; otherwise as ``flwr list`` reports it."""

    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def ok(self) -> bool:
        return self.sub_status == "completed"


@dataclass
class Federation:
    """Start, run and stop a TLS-secured loopback federation under ``workdir``."""

    workdir: Path
    port: int | None = None
    superlink: ManagedProcess | None = None
    supernodes: dict[str, ManagedProcess] = field(default_factory=dict)
    # Each node's sandbox process (``ark node sandbox``), by node name.
    sandboxes: dict[str, ManagedProcess] = field(default_factory=dict)
    # Each node's ClientApp launcher pool (``ark node launch-pool``), by node name.
    pools: dict[str, ManagedProcess] = field(default_factory=dict)
    key_broker: ManagedProcess | None = None
    gateway: ManagedProcess | None = None
    # Where nodes connect: the gateway's host:port (a free loopback port when None).
    gateway_address: str | None = None
    tls: TlsFiles | None = None
    # SuperNodes must present a registered key (`flwr supernode register`).
    node_auth: bool = True
    # False only for the canary test's negative control and the overhead bench's
    # baseline: plaintext HTTP on loopback (and so no node authentication either).
    tls_on: bool = True

    def __post_init__(self) -> None:
        self.provider_home = self.workdir / "provider"
        self.database = self.provider_home / "superlink.db"
        self.logs = self.workdir / "logs"
        self.leftovers: list[int] = []
        # The job events file each submitted run's ServerApp writes, by run id.
        self.run_events: dict[int, Path] = {}

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Issue TLS material and start ``flower-superlink`` on a free (or given) port."""
        if self.superlink is not None:
            raise RuntimeError("the SuperLink is already running")
        port = self.port if self.port is not None else free_port()
        check_port_free(port)
        self.port = port
        self.provider_home.mkdir(parents=True, exist_ok=True)
        self.tls = self._provider_tls()
        argv = superlink_argv(
            self.database, port, self.tls if self.tls_on else None, node_auth=self.node_auth
        )
        self.superlink = self._start_service("SuperLink", argv, HOST, port, timeout)
        self._write_cli_config()
        self.start_gateway(timeout)

    @property
    def node_address(self) -> str:
        """The one address nodes are given: the gateway's, never the SuperLink's own."""
        if self.gateway_address is None:
            raise RuntimeError("start the gateway before asking for the node-facing address")
        return self.gateway_address

    def start_gateway(self, timeout: float = 60.0) -> ManagedProcess:
        """Start ``ark provider gateway`` (nginx) in front of the running SuperLink."""
        if self.gateway is not None:
            raise RuntimeError("the gateway is already running")
        if self.superlink is None:
            raise RuntimeError("start the SuperLink before its gateway")
        address = self.gateway_address or f"{HOST}:{free_port()}"
        host, port = split_address(address)
        check_port_free(port)
        argv = gateway_argv(self.provider_home, address, f"{HOST}:{self.port}", tls_on=self.tls_on)
        self.gateway = self._start_service("gateway", argv, host, port, timeout)
        self.gateway.remember_descendants()
        self.gateway_address = address
        return self.gateway

    def _provider_tls(self) -> TlsFiles:
        """The provider workspace's TLS material (``ark provider init``), or fresh material."""
        if self.tls is not None:
            return self.tls
        existing = TlsFiles.in_dir(self.provider_home / "tls")
        if not existing.missing():
            return existing
        return issue_loopback_tls(self.provider_home / "tls")

    def start_key_broker(self, port: int, timeout: float = 60.0) -> ManagedProcess:
        """Start ``ark provider serve`` for the provider workspace, next to the SuperLink."""
        if self.key_broker is not None:
            raise RuntimeError("the key broker is already running")
        check_port_free(port)
        argv = key_broker_argv(self.provider_home, f"{HOST}:{port}")
        self.key_broker = self._start_service("key broker", argv, HOST, port, timeout)
        return self.key_broker

    def _start_service(
        self, name: str, argv: list[str], host: str, port: int, timeout: float
    ) -> ManagedProcess:
        """Start one provider service, logging to ``logs/``, once it accepts connections."""
        proc = start_process(
            name,
            argv,
            env=_flower_env(self.provider_home),
            log_path=self.logs / f"{name.lower().replace(' ', '-')}.log",
        )
        try:
            wait_for_port(host, port, proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise FederationError(f"the {name} failed to start: {exc}\n{proc.log_tail()}") from exc
        return proc

    def _write_cli_config(self) -> None:
        assert self.tls is not None  # set by start_superlink just before
        ca_cert = self.tls.ca_cert if self.tls_on else None
        write_cli_config(self.provider_home, f"{HOST}:{self.port}", ca_cert)

    def register_supernode(self, name: str, public_key: Path) -> None:
        """Register a node's public key with the SuperLink through the ``flwr`` CLI."""
        result = self._flwr(
            "supernode", "register", str(public_key), FEDERATION_NAME, "--name", name
        )
        if result.returncode != 0:
            raise FederationError(
                f"registering SuperNode {name!r} ({public_key}) failed: "
                f"{result.stdout}{result.stderr}"
            )

    def start_sandbox(
        self,
        name: str,
        node_config: Path,
        *,
        home: Path | None = None,
        timeout: float = SANDBOX_TIMEOUT,
        wait: bool = True,
    ) -> ManagedProcess:
        """Start the node's sandbox (``ark node sandbox``) and (``wait``) wait until it
        serves: it attests and unseals the model before it opens its socket."""
        if name in self.sandboxes and self.sandboxes[name].alive():
            raise RuntimeError(f"the sandbox of node {name!r} is already running")
        home = home or self.workdir / "nodes" / name
        proc = start_process(
            f"ark-sandbox[{name}]",
            sandbox_argv(node_config),
            env=node_env(home),
            log_path=self.logs / f"sandbox-{name}.log",
        )
        self.sandboxes[name] = proc
        if wait:
            self.wait_for_sandbox(name, timeout)
        return proc

    def wait_for_sandbox(self, name: str, timeout: float = SANDBOX_TIMEOUT) -> None:
        """Block until the node's sandbox serves (it attested and unsealed)."""
        wait_logged(self.sandboxes[name], SANDBOX_READY, f"the sandbox of node {name!r}", timeout)

    def _start_pool(self, name: str, node_config: Path, env: dict[str, str]) -> None:
        """Start the node's launcher pool with its SuperNode's environment (which points
        the SuperNode's ``flwr-clientapp`` shim at it). Until the pool serves, the shim
        runs the cold launcher: nothing waits for it."""
        running = self.pools.get(name)
        if running is not None and running.alive():
            return
        proc = start_process(
            f"launch-pool[{name}]",
            pool_argv(node_config),
            env=env,
            log_path=self.logs / f"launch-pool-{name}.log",
        )
        self.pools[name] = proc

    def wait_for_pools(self, timeout: float = 120.0) -> None:
        """Block until every node's launch pool serves (a run's first messages then find
        them warm)."""
        for name, proc in self.pools.items():
            wait_logged(proc, POOL_READY, f"the launch pool of node {name!r}", timeout)

    def kill_sandbox(self, name: str) -> None:
        """Crash one node's sandbox with SIGKILL (for restart tests)."""
        kill_tree(self.sandboxes[name])

    def start_supernode(
        self,
        name: str,
        node_config: Path,
        *,
        auth_key: Path | None = None,
        home: Path | None = None,
    ) -> ManagedProcess:
        """Start one ``flower-supernode`` whose ClientApps read ``node_config``.

        With node authentication on, ``auth_key`` is the node's OpenSSH private key,
        whose public half must have been registered first.
        """
        if self.superlink is None or self.tls is None:
            raise RuntimeError("start the SuperLink before any SuperNode")
        if name in self.supernodes and self.supernodes[name].alive():
            raise RuntimeError(f"SuperNode {name!r} is already running")
        home = home or self.workdir / "nodes" / name
        home.mkdir(parents=True, exist_ok=True)
        argv = supernode_argv(
            home,
            node_config,
            superlink=self.node_address,
            ca_cert=self.tls.ca_cert if self.tls_on else None,
            auth_key=auth_key,
        )
        env = supernode_env(home, node_config)
        self._start_pool(name, node_config, env)
        proc = start_process(
            f"flower-supernode[{name}]",
            argv,
            env=env,
            log_path=self.logs / f"supernode-{name}.log",
        )
        self.supernodes[name] = proc
        return proc

    def add_node(self, name: str, node_config: Path, auth_key: Path | None) -> ManagedProcess:
        """Register the node's key (when authentication is on), then start its SuperNode;
        its sandbox serves already."""
        if self.node_auth and auth_key is not None:
            self.register_supernode(name, auth_key.with_name(auth_key.name + ".pub"))
        return self.start_supernode(name, node_config, auth_key=auth_key)

    def start_nodes(self, configs: Mapping[str, Path]) -> None:
        """One sandbox and one SuperNode per node workspace (``ark node init``), keys
        registered first."""
        from sandbox.ops.provision import node_auth_key

        # The sandboxes attest and unseal side by side; each SuperNode starts once its
        # node's sandbox serves.
        for name, config in configs.items():
            self.start_sandbox(name, config, wait=False)
        for name, config in configs.items():
            self.wait_for_sandbox(name)
            self.add_node(name, config, node_auth_key(config.parent) if self.node_auth else None)
        self.wait_for_pools()

    def wait_until_online(self, names: Iterable[str], timeout: float = 120.0) -> None:
        """Block until each named SuperNode has been activated by the SuperLink (its log
        names the node id Flower gave it), so a run submitted next sees all of them."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in sorted(pending):
                proc = self.supernodes[name]
                if SUPERNODE_ONLINE in proc.log_tail(200):
                    pending.discard(name)
                elif not proc.alive():
                    raise FederationError(f"SuperNode {name!r} exited:\n{proc.log_tail()}")
            if pending and time.monotonic() >= deadline:
                raise FederationError(
                    f"SuperNodes {sorted(pending)} were not online within {timeout:.0f}s"
                )
            if pending:
                time.sleep(0.2)

    def kill_supernode(self, name: str) -> None:
        """Crash one SuperNode, its launcher pool and its ClientApps with SIGKILL (for
        dropout tests); the node's sandbox runs on."""
        kill_tree(self.supernodes[name])
        pool = self.pools.pop(name, None)
        if pool is not None:
            kill_tree(pool)

    def stop(self) -> list[int]:
        """Stop SuperNodes, then sandboxes, then the services; return any PID that survived.

        Idempotent: processes are forgotten once stopped.
        """
        # Everything of the nodes at once, then the provider's services in order.
        groups = [[*self.supernodes.values(), *self.pools.values(), *self.sandboxes.values()]]
        for service in (self.gateway, self.superlink, self.key_broker):
            if service is not None:
                groups.append([service])
        self.leftovers += stop_processes(groups)
        self.supernodes.clear()
        self.pools.clear()
        self.sandboxes.clear()
        self.gateway = None
        self.superlink = None
        self.key_broker = None
        return self.leftovers

    def all_processes(self) -> list[ManagedProcess]:
        procs = [*self.supernodes.values(), *self.pools.values(), *self.sandboxes.values()]
        for service in (self.gateway, self.superlink, self.key_broker):
            if service is not None:
                procs.append(service)
        return procs

    # -- runs ----------------------------------------------------------------------
    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_flwr(self.provider_home, *args, timeout=timeout)

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """Submit the app with a run-config TOML; return the run id."""
        result = self._flwr(
            "run",
            str(app_dir),
            FEDERATION_NAME,
            "--run-config",
            str(run_config),
            "--format",
            "json",
        )
        try:
            payload = json.loads(result.stdout)
            run_id = int(payload["run-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise FederationError(
                f"flwr run failed (exit {result.returncode}): {result.stdout}{result.stderr}"
            ) from exc
        out = job_output_dir(run_config)
        if out is not None:
            self.run_events[run_id] = out / JOB_EVENTS_FILE
        return run_id

    def outcome(self, run_id: int) -> RunOutcome | None:
        """The run's status, or None while it is still pending or running."""
        return run_outcome(self.provider_home, run_id)

    def stop_run(self, run_id: int) -> None:
        """Have the SuperLink stop a run (``flwr stop``): its pending messages are no longer
        handed to nodes, e.g. after its ServerApp died and the job is submitted again."""
        result = self._flwr("stop", str(run_id), FEDERATION_NAME, timeout=60.0)
        if result.returncode != 0:
            raise FederationError(
                f"flwr stop {run_id} failed: {(result.stdout + result.stderr)[-500:]}"
            )

    def run_log(self, run_id: int, lines: int = 25) -> str:
        """The last lines of a run's ServerApp log, as the SuperLink kept it."""
        result = self._flwr("log", str(run_id), FEDERATION_NAME, "--show", timeout=60.0)
        return "\n".join(result.stdout.splitlines()[-lines:])

    def wait(
        self,
        run_id: int,
        *,
        timeout: float,
        poll: float = 0.2,
        on_tick: Callable[[], None] | None = None,
    ) -> RunOutcome:
        """Wait for a run submitted here to finish (see :class:`RunFollower`); our
        processes are checked (and their children remembered) once a second."""
        events = self.run_events.get(run_id)
        if events is None:
            raise FederationError(
                f"run {run_id} has no events file to watch: it was not submitted here, "
                "with a run config naming an output-dir"
            )
        follower = RunFollower(self.provider_home, run_id, events, self._check_services)
        return follower.wait(timeout=timeout, poll=poll, on_tick=on_tick)

    def _check_services(self) -> psutil.Process:
        """Remember every child of ours; raise if a provider service has exited; the
        SuperLink."""
        for proc in self.all_processes():
            proc.remember_descendants()
        if self.superlink is None or not self.superlink.alive():
            tail = "" if self.superlink is None else self.superlink.log_tail()
            raise FederationError(f"the SuperLink exited:\n{tail}")
        for name, service in (("key broker", self.key_broker), ("gateway", self.gateway)):
            if service is not None and not service.alive():
                raise FederationError(f"the {name} exited:\n{service.log_tail()}")
        return psutil.Process(self.superlink.pid)


@dataclass
class RunFollower:
    """Follows one submitted run to its end by reading its ServerApp's events, not by
    polling a CLI.

    The run completed once its ServerApp wrote the event that ends it (``run_finished``)
    to the job's events file and exited, so every sink it writes to (the transparency
    log included) has the event. A ServerApp that exits without it failed: ``flwr list``
    then says how. ``services`` is called once a second: it raises FederationError when
    a provider service is gone and returns the SuperLink's process (whose children
    include the run's ServerApp). ``on_events`` sees every event as it lands.
    """

    home: Path  # the provider's HOME, whose flwr config names the SuperLink
    run_id: int
    events: Path
    services: Callable[[], psutil.Process]
    on_events: Callable[[list[dict[str, Any]]], None] | None = None

    def wait(
        self, *, timeout: float, poll: float = 0.2, on_tick: Callable[[], None] | None = None
    ) -> RunOutcome:
        """Block until the run ends (each ``poll`` seconds costs one ``stat``); FederationError
        when it does not within ``timeout`` seconds or a provider service exits."""
        tail = EventsTail(self.events)
        deadline = time.monotonic() + timeout
        next_check = 0.0
        app_seen = False
        while time.monotonic() < deadline:
            finished = self._finished(tail)
            if finished is not None:
                self._wait_server_app_gone(deadline)
                return RunOutcome(
                    self.run_id, "finished:completed", "completed", json.dumps(finished)
                )
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                superlink = self.services()
                if server_app_pids(superlink):
                    app_seen = True
                elif app_seen:
                    return self._ended_unfinished(tail, deadline)
                if on_tick is not None:
                    on_tick()
            time.sleep(poll)
        raise FederationError(
            f"run {self.run_id} did not finish within {timeout:.0f}s "
            f"(no {RunFinished.kind} in {self.events}); {self._status_line()}"
        )

    def _finished(self, tail: EventsTail) -> dict[str, Any] | None:
        # The job's events file holds every run of the job (a resumed job appends).
        events = [e for e in tail.read() if str(e.get("run")) == str(self.run_id)]
        if events and self.on_events is not None:
            self.on_events(events)
        return _run_finished(events, self.run_id)

    def _wait_server_app_gone(self, deadline: float) -> None:
        """After the run's last event: wait for the ServerApp to exit, so that its sinks are
        written and Flower has the run's final status. The run has completed: a service
        that stops meanwhile does not change that."""
        while True:
            try:
                if not server_app_pids(self.services()):
                    return
            except FederationError:
                return
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"run {self.run_id} wrote its last event but its ServerApp did not exit"
                )
            time.sleep(0.2)

    def _ended_unfinished(self, tail: EventsTail, deadline: float) -> RunOutcome:
        """The ServerApp exited: completed if the run's last event landed just before, else
        ask Flower how the run ended (again each second, for at most 30 s, while Flower
        has not yet recorded that)."""
        finished = self._finished(tail)
        if finished is not None:
            return RunOutcome(self.run_id, "finished:completed", "completed", json.dumps(finished))
        give_up = min(deadline, time.monotonic() + 30.0)
        while True:
            outcome = run_outcome(self.home, self.run_id)
            if outcome is not None:
                break
            if time.monotonic() >= give_up:
                raise FederationError(
                    f"run {self.run_id}: its ServerApp exited without {RunFinished.kind} and "
                    "Flower never reported the run finished"
                )
            time.sleep(1.0)
        if outcome.ok:
            raise FederationError(
                f"run {self.run_id}: Flower reports it completed, but its ServerApp wrote no "
                f"{RunFinished.kind} to {tail.path}: {outcome.details}"
            )
        return outcome

    def _status_line(self) -> str:
        """Flower's own word on the run, for an error message."""
        try:
            outcome = run_outcome(self.home, self.run_id)
        except FederationError as exc:
            return str(exc)
        return "Flower reports it still running" if outcome is None else outcome.details


def run_outcome(home: Path, run_id: int) -> RunOutcome | None:
    """Run ``run_id``'s status as ``flwr list`` reports it, or None while it is still
    pending or running."""
    result = run_flwr(home, "list", "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(result.stdout)["runs"]
        run = next(r for r in runs if int(r["run-id"]) == run_id)
    except (json.JSONDecodeError, KeyError, StopIteration, TypeError, ValueError) as exc:
        raise FederationError(f"flwr list failed: {result.stdout}{result.stderr}") from exc
    status = str(run.get("status", ""))
    if not status.startswith("finished"):
        return None
    sub = status.split(":", 1)[1] if ":" in status else ""
    return RunOutcome(run_id, status, sub, json.dumps(run))


class EventsTail:
    """Reads the JSON lines appended to an events file since the last read.

    A read costs one ``stat`` when nothing was appended; a line still being written
    waits for its newline.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size <= self.offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as exc:
            raise FederationError(f"{self.path}: an event is not JSON ({exc})") from exc


def _run_finished(events: list[dict[str, Any]], run_id: int) -> dict[str, Any] | None:
    """The ``run_finished`` event of run ``run_id`` among ``events``, if any."""
    for event in events:
        if event.get("kind") == RunFinished.kind and str(event.get("run")) == str(run_id):
            return event
    return None


def read_run_config(run_config: Path) -> RunSpec:
    """The job a run-config TOML describes, validated; ConfigError naming the file."""
    try:
        with run_config.open("rb") as handle:
            raw = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the run config ({exc})", path=run_config) from exc
    return RunSpec.from_run_config(raw, source=run_config)


def job_output_dir(run_config: Path) -> Path | None:
    """The output-dir a ServerApp started with ``run_config`` writes its job to (None
    when the run config names none: that ServerApp fails before writing anything)."""
    try:
        return read_run_config(run_config).output_dir
    except ConfigError as exc:
        raise FederationError(f"{run_config}: cannot read the run config ({exc})") from exc


def server_app_pids(superlink: ManagedProcess | psutil.Process) -> list[int]:
    """PIDs of ``flwr-serverapp`` processes below our SuperLink."""
    pids = []
    try:
        for child in psutil.Process(superlink.pid).children(recursive=True):
            try:
                if any("flwr-serverapp" in part for part in child.cmdline()):
                    pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return []
    return pids


def run_flwr(home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The ``flwr`` CLI with ``home`` as its HOME (its ``config.toml`` says which SuperLink)."""
    try:
        return subprocess.run(
            [_exe("flwr"), *args],
            env=_flower_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=home,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FederationError(f"flwr {args[0]} failed: {exc}") from exc


def write_run_config(path: Path, values: Mapping[str, str | int | float]) -> Path:
    """Write run-config overrides as TOML (values are strings, ints or floats)."""
    path.write_text(tomli_w.dumps(dict(values)), encoding="utf-8")
    return path


# The run-config keys a provider's workspace fills in (``ark provider submit``).
WORKSPACE_KEYS = ("output-dir", "aggregator-dir", "log-db")


def write_job_config(path: Path, spec: RunSpec) -> Path:
    """``spec`` as a provider writes a job's run config: what to train, not where its
    workspace's files are (``ark provider submit`` fills those in)."""
    values = spec.to_run_config()
    return write_run_config(path, {k: v for k, v in values.items() if k not in WORKSPACE_KEYS})


def write_cli_config(home: Path, address: str, ca_cert: Path | None) -> Path:
    """The ``flwr`` CLI's ``config.toml`` under ``home``: one SuperLink connection named
    after the federation, over TLS with ``ca_cert`` (plaintext when None)."""
    connection: dict[str, str | bool] = {"address": address}
    if ca_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(ca_cert)
    config = home / ".flwr" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    document = {"superlink": {"default": FEDERATION_NAME, FEDERATION_NAME: connection}}
    config.write_text(tomli_w.dumps(document), encoding="utf-8")
    return config
