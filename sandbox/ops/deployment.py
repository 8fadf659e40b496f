"""A deployment driven by each party's own commands, each on its own host.

``ark demo`` and the deployment tests use this to play every party at once: the
provider's commands run on the provider's host, each node's on its node's host (network
namespaces, or loopback where they cannot be made: :mod:`sandbox.ops.netns`). Nothing
here starts a long-running process itself: ``ark provider start`` and ``ark node start``
do, and record them; :meth:`PartyCommands.stop_all` runs the parties' stop commands.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sandbox.errors import ArkError, FederationError
from sandbox.ops.federation import _exe, node_home
from sandbox.ops.netns import Host, Topology
from sandbox.ops.parties import NODE_STOP, PROVIDER_STOP, ProviderAddresses
from sandbox.ops.processes import still_running
from sandbox.ops.registry import ProcessRecord, Recorded

Say = Callable[[str], None]
# Output that is not a terminal is never wrapped (sandbox/ops/cli/base.py): drop the
# caller's terminal size so every command's lines arrive whole.
_UNSIZED = ("COLUMNS", "LINES")


def _quiet(line: str) -> None:
    """A ``say`` that says nothing."""


def _end(proc: subprocess.Popen[str]) -> None:
    """End a party command of ours that we stop waiting for: it gets SIGTERM (which it
    takes as Ctrl-C: it stops what it started) and the time to act on it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class PartyCommands:
    """Runs ``ark`` commands as each party would, on that party's host."""

    topology: Topology
    provider_dir: Path
    node_configs: Mapping[str, Path]
    addresses: ProviderAddresses
    say: Say = _quiet
    # Every process any party recorded, by PID: what must be gone after stop_all.
    recorded: dict[int, Recorded] = field(default_factory=dict)
    # Their descendants, as seen while they ran (Flower's SuperExec, nginx workers, …).
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def _spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start one party command, its output (both streams) to read as text."""
        env = {k: v for k, v in os.environ.items() if k not in _UNSIZED}
        return subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def argv(self, host: Host, *args: str) -> list[str]:
        """``ark ARGS`` as run on ``host``."""
        return host.argv([_exe("ark"), *args])

    def ark(self, host: Host, *args: str, timeout: float = 600.0, relay: bool = True) -> str:
        """Run ``ark ARGS`` on ``host`` to its end, relaying each line it prints (when
        ``relay``); its output, or FederationError with it when it fails."""
        argv = self.argv(host, *args)
        proc = self._spawn(argv)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as waiting:
                waiting.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    if not waiting.select(timeout=max(0.0, deadline - time.monotonic())):
                        raise subprocess.TimeoutExpired(argv, timeout)
                    line = proc.stdout.readline()
                    if not line:
                        break
                    lines.append(line.rstrip("\n"))
                    if relay:
                        self.say(f"[{host.name}] {lines[-1]}")
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            _end(proc)
            raise
        finally:
            self._remember()
        output = "\n".join(lines)
        if code != 0:
            raise FederationError(
                f"`ark {' '.join(args)}` on {host.name} exited {code}:\n{output[-3000:]}"
            )
        return output

    def _remember(self) -> None:
        """Note every PID the parties have recorded so far."""
        for workspace in self._workspaces():
            try:
                records = ProcessRecord(workspace).live()
            except ArkError:
                continue
            for record, proc in records.values():
                self.recorded[record.pid] = record
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.seen.update({c.pid: c for c in proc.children(recursive=True)})

    def _workspaces(self) -> list[Path]:
        return [self.provider_dir, *(node_home(c) for c in self.node_configs.values())]

    # -- the provider ------------------------------------------------------------------
    def start_provider(self) -> None:
        a = self.addresses
        self.ark(
            self.topology.provider,
            "provider",
            "start",
            "--workdir",
            str(self.provider_dir),
            "--host",
            a.host,
            "--fleet-port",
            str(a.fleet_port),
            "--broker-port",
            str(a.broker_port),
            "--superlink-port",
            str(a.superlink_port),
        )

    def register_nodes(self) -> None:
        """Register every node's SuperNode key (its public half travelled to the provider)."""
        for name, config in self.node_configs.items():
            self.ark(
                self.topology.provider,
                "provider",
                "register-node",
                name,
                str(node_home(config) / "flower" / "node-auth.pub"),
                "--workdir",
                str(self.provider_dir),
            )

    def start_nodes(self, names: list[str] | None = None, *, timeout: float = 600.0) -> None:
        """``ark node start`` on every named node's host at once; each must come up."""
        names = list(self.node_configs) if names is None else names
        self._at_once({name: self.node_start_argv(name) for name in names}, "start", timeout)

    def _at_once(self, argvs: dict[str, list[str]], what: str, timeout: float) -> None:
        """Run one party command per node side by side (each on its node's host), then
        relay what each printed; FederationError naming the nodes whose command failed."""
        procs = {name: self._spawn(argv) for name, argv in argvs.items()}
        failed = []
        deadline = time.monotonic() + timeout  # one for all: they run side by side
        try:
            for name, proc in procs.items():
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                for line in out.splitlines():
                    self.say(f"[{name}] {line}")
                if proc.returncode != 0:
                    failed.append(f"{name} (exit {proc.returncode}):\n{out[-2000:]}")
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            for proc in procs.values():
                _end(proc)
            raise
        finally:
            self._remember()
        if failed:
            raise FederationError(f"`ark node {what}` failed on " + "\n".join(failed))

    def node_start_argv(self, name: str) -> list[str]:
        return self.argv(
            self.topology.nodes[name],
            "node",
            "start",
            "--config",
            str(self.node_configs[name]),
            "--superlink",
            self.addresses.fleet,
        )

    def submit(self, run_config: Path, *, timeout: float) -> str:
        """``ark provider submit`` on the provider's host, following the job to its end."""
        return self.ark(
            self.topology.provider,
            "provider",
            "submit",
            str(run_config),
            "--workdir",
            str(self.provider_dir),
            "--timeout",
            str(timeout),
            timeout=timeout + 60,
        )

    def compare(
        self,
        catalog: Path,
        run_config: Path,
        *,
        comparison: str,
        timeout: float,
        models: int,
        with_local: bool = False,
        show: bool = True,
    ) -> str:
        """``ark compare run`` on the provider's host: one job per catalog model (and,
        ``with_local``, one for each node's own model), each followed to its end, then the
        comparison's report."""
        return self.ark(
            self.topology.provider,
            "compare",
            "run",
            str(catalog),
            str(run_config),
            "--workdir",
            str(self.provider_dir),
            "--comparison",
            comparison,
            "--timeout",
            str(timeout),
            *(["--with-local"] if with_local else []),
            *([] if show else ["--no-show"]),
            timeout=(models + with_local) * (timeout + 60),
        )

    # -- stopping ----------------------------------------------------------------------
    def stop_node(self, name: str) -> None:
        self.ark(
            self.topology.nodes[name], "node", "stop", "--config", str(self.node_configs[name])
        )

    def stop_all(self) -> list[int]:
        """Every node's stop command (all at once) and then the provider's, also after a
        failure, a Ctrl-C or a command killed halfway: what the records name is stopped;
        return any recorded PID still running afterwards."""
        from sandbox.ops.parties import stop_party

        self._remember()
        argvs = {
            name: self.argv(self.topology.nodes[name], "node", "stop", "--config", str(config))
            for name, config in self.node_configs.items()
        }
        try:
            self._at_once(argvs, "stop", 120.0)
        except ArkError:
            # A command could not run on its host (e.g. the namespace is gone): the
            # records are on the shared disk, so stop by them from here.
            for config in self.node_configs.values():
                with contextlib.suppress(ArkError):
                    stop_party(node_home(config), NODE_STOP)
        try:
            self.ark(
                self.topology.provider, "provider", "stop", "--workdir", str(self.provider_dir)
            )
        except ArkError:
            with contextlib.suppress(ArkError):
                stop_party(self.provider_dir, PROVIDER_STOP)
        return self.survivors()

    def survivors(self) -> list[int]:
        """Recorded PIDs, or PIDs of their descendants, that still run (the same
        processes, not reused PIDs)."""
        alive = {pid for pid, record in self.recorded.items() if record.process()}
        alive |= {pid for pid, proc in self.seen.items() if still_running(proc)}
        return sorted(alive)
