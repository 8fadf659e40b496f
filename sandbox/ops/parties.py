"""Each party's own side of a deployment, started and stopped by that party's commands.

The provider (``ark provider start|stop|status|submit``) runs three long-lived processes
on its host: the SuperLink (loopback only), the node-facing gateway (nginx: the Fleet API
and nothing else) and the key broker with the transparency log. A node
(``ark node start|stop|status``) runs its sandbox, its ClientApp launch pool and its
SuperNode, which reaches the provider's gateway from another host. Every process is one
of the foreground commands a service manager would run (``ark provider superlink``,
``ark node supernode``, …; ``deploy/systemd/``), started detached, recorded by PID in
the party's workspace (:mod:`sandbox.ops.registry`) and stopped by that PID with its
descendants. A command that fails or is interrupted stops what it started.

The loopback harness (:mod:`sandbox.ops.federation`) builds its processes' argv and
environment with the same functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import ConfigError, FederationError
from sandbox.events import JOB_EVENTS_FILE
from sandbox.ops.federation import (
    FEDERATION_NAME,
    HOST,
    SANDBOX_TIMEOUT,
    SUPERNODE_ONLINE,
    RunFollower,
    RunOutcome,
    _exe,
    _flower_env,
    check_port_free,
    gateway_argv,
    key_broker_argv,
    node_env,
    node_home,
    pool_argv,
    read_run_config,
    run_flwr,
    sandbox_argv,
    supernode_env,
    wait_logged,
    write_run_config,
)
from sandbox.ops.gateway import split_address
from sandbox.ops.processes import (
    ManagedProcess,
    signals_held,
    start_process,
    stop_processes,
    wait_for_port,
)
from sandbox.ops.provision import ProviderWorkspace, node_auth_key
from sandbox.ops.registry import ProcessRecord, Recorded
from sandbox.ops.tls import require_name
from sandbox.protocol import BROKER_RETRY, SANDBOX_READY
from sandbox.warmstart import POOL_READY

Say = Callable[[str], None]

FLEET_PORT = 9092
SUPERLINK_PORT = 9093
BROKER_PORT = 9100
# How long a node's sandbox keeps trying an unreachable key broker at start.
BROKER_WAIT = 300.0

# What flower-supernode logs when the SuperLink refuses its key (Flower 1.41: the key is
# not registered, or the SuperLink still counts an earlier SuperNode with it online).
REFUSED = "code: 2004"
SUPERNODE_RETRY = 5.0

SUPERLINK, GATEWAY, KEY_BROKER = "superlink", "gateway", "key-broker"
SANDBOX, LAUNCH_POOL, SUPERNODE = "sandbox", "launch-pool", "supernode"
SERVICE_NAMES = {SUPERLINK: "SuperLink", GATEWAY: "gateway", KEY_BROKER: "key broker"}
# Stop order: the gateway before the SuperLink (no node reaches a stopping SuperLink),
# the key broker last (it signs the log's final checkpoint); a node's three together.
PROVIDER_STOP = ((GATEWAY,), (SUPERLINK,), (KEY_BROKER,))
NODE_STOP = ((SUPERNODE, LAUNCH_POOL, SANDBOX),)


@dataclass(frozen=True)
class ProviderAddresses:
    """Where the provider's services are reached and listen: ``host`` is the name or
    address nodes use (its certificate must name it: ``ark provider init --host``),
    ``listen`` the local address the gateway and the key broker bind (default: ``host``;
    another one behind NAT, say); the SuperLink stays on loopback."""

    host: str
    fleet_port: int = FLEET_PORT
    broker_port: int = BROKER_PORT
    superlink_port: int = SUPERLINK_PORT
    listen: str = ""

    @property
    def fleet(self) -> str:
        return f"{self.host}:{self.fleet_port}"

    @property
    def broker(self) -> str:
        return f"{self.host}:{self.broker_port}"

    def bound(self, port: int) -> str:
        """The local address a published service binds for ``port``."""
        return f"{self.listen or self.host}:{port}"

    @property
    def superlink(self) -> str:
        return f"{HOST}:{self.superlink_port}"


def superlink_command(workdir: Path, port: int) -> list[str]:
    """``ark provider superlink``: the foreground form of the provider's SuperLink."""
    return [_exe("ark"), "provider", "superlink", "--workdir", str(workdir), "--port", str(port)]


def supernode_command(config: Path, superlink: str) -> list[str]:
    """``ark node supernode``: the foreground form of a node's SuperNode."""
    return [_exe("ark"), "node", "supernode", "--config", str(config), "--superlink", superlink]


@contextlib.contextmanager
def _starting(record: ProcessRecord) -> Iterator[list[tuple[str, ManagedProcess]]]:
    """Collects what a start command launches; on any failure or interrupt, stops those
    processes (by PID, with their children) and forgets them before re-raising."""
    started: list[tuple[str, ManagedProcess]] = []
    try:
        yield started
    except BaseException:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        with signals_held():
            stop_processes([[proc for _, proc in reversed(started)]])
            record.forget([role for role, _ in started])
        raise


def _start(
    record: ProcessRecord,
    started: list[tuple[str, ManagedProcess]],
    role: str,
    argv: list[str],
    env: dict[str, str],
    workspace: Path,
    address: str = "",
) -> ManagedProcess:
    proc = start_process(role, argv, env=env, log_path=workspace / "logs" / f"{role}.log")
    started.append((role, proc))
    record.add(role, proc, address=address)
    return proc


# -- the provider ------------------------------------------------------------------------


def start_provider(
    workdir: Path, addresses: ProviderAddresses, *, timeout: float = 60.0, say: Say = print
) -> dict[str, Recorded]:
    """Start whichever of the provider's three services is not running; return them all
    once each accepts connections."""
    ws = ProviderWorkspace(workdir.resolve()).require()
    require_name(ws.tls / "server.crt", addresses.host)
    record = ProcessRecord(ws.root)
    env = _flower_env(ws.root)
    broker, fleet = addresses.bound(addresses.broker_port), addresses.bound(addresses.fleet_port)
    plan = [
        (KEY_BROKER, key_broker_argv(ws.root, broker), broker),
        (SUPERLINK, superlink_command(ws.root, addresses.superlink_port), addresses.superlink),
        (GATEWAY, gateway_argv(ws.root, fleet, addresses.superlink, tls_on=True), fleet),
    ]
    with record.locked(say=say), _starting(record) as started:
        live = record.live()
        for role, argv, address in plan:
            if role in live:
                say(f"{role} already running (pid {live[role][0].pid}, {live[role][0].address})")
                continue
            host, port = split_address(address)
            check_port_free(port, host)
            proc = _start(record, started, role, argv, env, ws.root, address)
            try:
                wait_for_port(host, port, proc, timeout)
            except (RuntimeError, TimeoutError) as exc:
                raise FederationError(
                    f"the provider's {role} failed to start: {exc}\n{proc.log_tail()}"
                ) from exc
            say(f"{role} up on {address} (pid {proc.pid}, log {proc.log_path})")
        return {role: rec for role, (rec, _) in record.live().items()}


def stop_party(
    workspace: Path, order: tuple[tuple[str, ...], ...], *, say: Say | None = None
) -> list[int]:
    """Stop every process the party's record names, in ``order``; return PIDs that
    survived (they stay recorded: a second stop, or ``status``, still finds them)."""
    record = ProcessRecord(workspace)
    with record.locked(say=say), signals_held():
        return record.stop(order)


def superlink_process(workdir: Path, *, all_services: bool = False) -> psutil.Process:
    """The provider's running SuperLink; FederationError when it (or, with
    ``all_services``, the gateway or the key broker) is not running."""
    live = ProcessRecord(workdir).live()
    for role in (SUPERLINK, GATEWAY, KEY_BROKER) if all_services else (SUPERLINK,):
        if role not in live:
            raise FederationError(
                f"the provider's {SERVICE_NAMES[role]} is not running "
                f"(ark provider start --workdir {workdir})"
            )
    return live[SUPERLINK][1]


def _flwr_json(workdir: Path, *args: str) -> dict[str, Any]:
    """A ``flwr`` command's JSON answer; FederationError with its output otherwise."""
    result = run_flwr(workdir, *args, "--format", "json")
    start = result.stdout.find("{")  # flwr prints one JSON document, perhaps indented
    with contextlib.suppress(json.JSONDecodeError):
        answer, _ = json.JSONDecoder().raw_decode(result.stdout[max(start, 0) :])
        if isinstance(answer, dict) and answer.get("success") is True:
            return answer
    detail = (result.stdout + result.stderr).strip()[-800:]
    raise FederationError(f"flwr {' '.join(args[:2])} failed (exit {result.returncode}): {detail}")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# A SuperNode public key as another party hands it over: one OpenSSH line of a NIST
# curve Flower accepts (P-256 or P-384), an optional comment.
_PUBLIC_KEY = re.compile(
    rb"(ecdsa-sha2-nistp256|ecdsa-sha2-nistp384) [A-Za-z0-9+/]{100,400}={0,2}( [ -~]{0,200})?\n?"
)
_MAX_KEY_BYTES = 1024


def _nodes_file(workdir: Path) -> Path:
    return workdir / "run" / "nodes.json"


def registered_nodes(workdir: Path) -> dict[str, str]:
    """Flower's node id of each SuperNode key this provider registered, by node name."""
    path = _nodes_file(workdir)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"unreadable node registry ({exc})", path=path) from exc
    if not isinstance(document, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.isdigit() for k, v in document.items()
    ):
        raise ConfigError("the node registry must map node names to node ids", path=path)
    return document


def node_names(workdir: Path) -> dict[str, str]:
    """Each registered node's name, by the node id Flower gave it."""
    return {node_id: name for name, node_id in registered_nodes(workdir).items()}


def _save_nodes(workdir: Path, nodes: dict[str, str]) -> None:
    from sandbox.files import write_atomic

    write_atomic(_nodes_file(workdir), json.dumps(nodes, indent=2).encode(), mode=0o600)


def register_node(workdir: Path, name: str, public_key: Path) -> str:
    """Register a node's SuperNode public key under ``name``; return the node id Flower
    gave it. The key is another party's file: it must be one OpenSSH ECDSA line (P-256 or
    P-384); the copy kept in the workspace (``run/keys/NAME.pub``) is the one registered,
    and the name is remembered for ``remove_node``."""
    from sandbox.files import read_regular, write_atomic

    if not _NAME.fullmatch(name):
        raise ConfigError(f"node name {name[:80]!r} must be 1-64 letters, digits, . _ -")
    key = read_regular(
        public_key,
        _MAX_KEY_BYTES,
        lambda why: ConfigError(f"the node's public key: {why}", path=public_key),
    )
    if len(key) > _MAX_KEY_BYTES or not _PUBLIC_KEY.fullmatch(key):
        raise ConfigError(
            "not a SuperNode public key: one OpenSSH line, ecdsa-sha2-nistp256 or -nistp384",
            path=public_key,
        )
    with ProcessRecord(workdir).locked():
        nodes = registered_nodes(workdir)
        if name in nodes:
            raise ConfigError(
                f"a node named {name!r} is registered already (node id {nodes[name]}); "
                "remove it first",
                path=_nodes_file(workdir),
            )
        kept = workdir / "run" / "keys" / f"{name}.pub"
        kept.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(kept, key, mode=0o600)
        answer = _flwr_json(
            workdir, "supernode", "register", str(kept), FEDERATION_NAME, "--name", name
        )
        node_id = str(answer.get("node-id", ""))
        if not node_id.isdigit():
            raise FederationError(f"flwr supernode register gave no node id: {answer}")
        nodes[name] = node_id
        _save_nodes(workdir, nodes)
    return node_id


def remove_node(workdir: Path, name: str) -> str:
    """Unregister the SuperNode key registered under ``name``; return its node id."""
    with ProcessRecord(workdir).locked():
        nodes = registered_nodes(workdir)
        if name not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise ConfigError(f"no node named {name!r} is registered (registered: {known})")
        node_id = nodes.pop(name)
        _flwr_json(workdir, "supernode", "unregister", node_id, FEDERATION_NAME)
        _save_nodes(workdir, nodes)
        (workdir / "run" / "keys" / f"{name}.pub").unlink(missing_ok=True)
    return node_id


def node_states(workdir: Path) -> list[dict[str, Any]]:
    """Flower's view of the registered SuperNodes (id, status), as ``flwr supernode ls``."""
    answer = _flwr_json(workdir, "supernode", "ls", FEDERATION_NAME)
    return list(answer.get("nodes", []))


@dataclass(frozen=True)
class SubmittedJob:
    """A job handed to the SuperLink: its Flower run id, its validated spec (with every
    provider path filled in) and the events file its ServerApp writes."""

    run_id: int
    spec: RunSpec
    run_config: Path

    @property
    def output_dir(self) -> Path:
        assert self.spec.output_dir is not None  # submit_job always fills it in
        return self.spec.output_dir

    @property
    def events(self) -> Path:
        return self.output_dir / JOB_EVENTS_FILE


def complete_run_config(workdir: Path, run_config: Path) -> RunSpec:
    """The job ``run_config`` describes, validated, with what only the provider's
    workspace knows filled in where the file leaves it out: the aggregator sandbox's
    identity (``aggregator-dir``), the transparency log (``log-db``) and the job's folder
    (``output-dir``: ``jobs/<job-id>``)."""
    ws = ProviderWorkspace(workdir.resolve()).require()
    spec = read_run_config(run_config)
    return dataclasses.replace(
        spec,
        aggregator_dir=spec.aggregator_dir or ws.aggregator,
        log_db=spec.log_db or ws.log_db,
        output_dir=spec.output_dir or ws.root / "jobs" / spec.job_id,
    )


def submit_job(workdir: Path, run_config: Path, app_dir: Path, *, say: Say = print) -> SubmittedJob:
    """Submit the app at ``app_dir`` with the completed run config (kept in the job's
    folder as ``run-config.toml``); the SuperLink must be running.

    Submitting a job again resumes it from its last checkpoint (the ServerApp does). An
    earlier run of the job that Flower still counts as running (its ServerApp died with
    the SuperLink, say) is stopped first, so no node spends time on its instructions."""
    from sandbox.files import write_atomic
    from sandbox.ops.federation import run_outcome

    spec = complete_run_config(workdir, run_config)
    superlink_process(workdir)
    assert spec.output_dir is not None
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    runs_file = spec.output_dir / "runs.json"
    try:
        earlier = [int(r) for r in json.loads(runs_file.read_text(encoding="utf-8"))]
    except FileNotFoundError:
        earlier = []
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"unreadable list of the job's runs ({exc})", path=runs_file) from exc
    for run_id in earlier:
        try:
            unfinished = run_outcome(workdir, run_id) is None
        except FederationError:
            unfinished = False  # the SuperLink's database no longer knows it
        if unfinished:
            _flwr_json(workdir, "stop", str(run_id), FEDERATION_NAME)
            say(f"earlier run {run_id} of job {spec.job_id} stopped (it did not finish)")
    completed = write_run_config(spec.output_dir / "run-config.toml", spec.to_run_config())
    answer = _flwr_json(
        workdir, "run", str(app_dir.resolve()), FEDERATION_NAME, "--run-config", str(completed)
    )
    run_id = int(answer["run-id"])
    write_atomic(runs_file, json.dumps([*earlier, run_id]).encode())
    return SubmittedJob(run_id, spec, completed)


def follow_job(
    workdir: Path,
    job: SubmittedJob,
    *,
    timeout: float,
    on_events: Callable[[list[dict[str, Any]]], None] | None = None,
    on_tick: Callable[[], None] | None = None,
) -> RunOutcome:
    """Follow a submitted job to its end (see :class:`RunFollower`); FederationError when
    the SuperLink stops meanwhile."""
    follower = RunFollower(
        workdir,
        job.run_id,
        job.events,
        lambda: superlink_process(workdir, all_services=True),
        on_events,
    )
    return follower.wait(timeout=timeout, on_tick=on_tick)


# -- a node ------------------------------------------------------------------------------


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def start_node(
    config: Path,
    superlink: str,
    *,
    timeout: float | None = None,
    broker_wait: float = BROKER_WAIT,
    say: Say = print,
) -> dict[str, Recorded]:
    """Start whichever of the node's sandbox, launch pool and SuperNode is not running,
    against the provider's gateway at ``superlink``; return once the sandbox has attested
    and unsealed and the SuperNode is connected (the SuperLink activated it), within
    ``timeout`` seconds (default: the sandbox's own start time plus ``broker_wait``)."""
    config = config.resolve()
    node = NodeConfig.load(config)
    sandbox = node.require_sandbox()
    split_address(superlink)  # a bad address is refused before anything starts
    home = node_home(config)
    if not node_auth_key(home).is_file():
        raise ConfigError(
            "the node has no SuperNode key (ark node init writes flower/node-auth)",
            path=node_auth_key(home),
        )
    record = ProcessRecord(home)
    deadline = time.monotonic() + (SANDBOX_TIMEOUT + broker_wait if timeout is None else timeout)
    with record.locked(say=say), _starting(record) as started:
        live = record.live()
        for role in (SANDBOX, LAUNCH_POOL, SUPERNODE):
            if role in live:
                say(f"{role} already running (pid {live[role][0].pid})")
        if SANDBOX not in live:
            proc = _start(
                record,
                started,
                SANDBOX,
                sandbox_argv(config, broker_wait=broker_wait),
                node_env(home),
                home,
            )
            say(f"sandbox starting (pid {proc.pid}): attesting to {sandbox.key_broker}")
            wait_logged(
                proc,
                SANDBOX_READY,
                "the node's sandbox",
                _left(deadline),
                relay=say,
                marker=BROKER_RETRY,
            )
            say("sandbox attested; the model is unsealed in its memory")
        if LAUNCH_POOL not in live:
            pool = _start(
                record, started, LAUNCH_POOL, pool_argv(config), supernode_env(home, config), home
            )
            wait_logged(pool, POOL_READY, "the node's launch pool", _left(deadline))
        if SUPERNODE not in live:
            argv = supernode_command(config, superlink)
            while True:
                proc = _start(record, started, SUPERNODE, argv, node_env(home), home, superlink)
                try:
                    wait_logged(
                        proc, SUPERNODE_ONLINE, f"the SuperNode (to {superlink})", _left(deadline)
                    )
                    break
                except FederationError:
                    if proc.alive() or REFUSED not in proc.log_tail(50):
                        raise
                    if time.monotonic() + SUPERNODE_RETRY >= deadline:
                        raise
                    started.pop()
                    say(
                        f"the SuperLink refused this SuperNode ({REFUSED}): its key is not "
                        "registered, or a crashed SuperNode of this node still counts as "
                        "online until its heartbeat expires; trying again in "
                        f"{SUPERNODE_RETRY:.0f}s"
                    )
                    time.sleep(SUPERNODE_RETRY)
            say(f"SuperNode connected to {superlink} (pid {proc.pid})")
        return {role: rec for role, (rec, _) in record.live().items()}


def supernode_exec(config: Path, superlink: str) -> tuple[list[str], dict[str, str]]:
    """What ``ark node supernode`` executes: ``flower-supernode`` for this node, reaching
    the provider's gateway at ``superlink`` over TLS (the provider CA the node was given)
    with the node's own SuperNode key, and its launcher first on PATH."""
    from sandbox.ops.federation import supernode_argv

    config = config.resolve()
    node = NodeConfig.load(config)
    sandbox = node.require_sandbox()
    home = node_home(config)
    split_address(superlink)
    argv = supernode_argv(
        home, config, superlink=superlink, ca_cert=sandbox.provider_ca, auth_key=node_auth_key(home)
    )
    return argv, supernode_env(home, config)


def connected(config: Path) -> str | None:
    """The SuperNode's line saying the SuperLink activated it (since it last started), or
    None while it is not running or has not been activated."""
    live = ProcessRecord(node_home(config.resolve())).live()
    if SUPERNODE not in live:
        return None
    found = _ONLINE.findall(live[SUPERNODE][0].log_tail(10_000))
    return f"{SUPERNODE_ONLINE} {found[-1]}" if found else None


_ONLINE = re.compile(re.escape(SUPERNODE_ONLINE) + r"\s*(\d+)")
