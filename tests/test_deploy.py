"""A deployment across test hosts, driven by each party's own commands, and its faults.

The provider runs in one network namespace and each node in its own, joined by veth pairs
on 198.51.100.0/24 (sandbox/ops/netns.py). Every process is started by `ark provider
start` or `ark node start` on its own host and stopped by the stop commands. One
deployment carries four faults, one job each, and the tests only read what happened
(a federation of real processes costs most of a test):

- the key broker is down when a node starts: the node waits, says so, and serves;
- a node host's link is cut mid-round and restored: the job completes;
- a node host's processes are killed and started again with `ark node start`;
- the provider's SuperLink is killed mid-job and started again with `ark provider
  start`; the job, submitted again, resumes from its checkpoint, no round redone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox.config import NodeConfig
from sandbox.digests import sha256_file
from sandbox.journal import read_journal
from sandbox.ops.apps import approve
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.deployment import PartyCommands
from sandbox.ops.federation import node_home, write_job_config
from sandbox.ops.netns import Topology, netns_unavailable
from sandbox.ops.parties import KEY_BROKER, SUPERLINK, ProviderAddresses
from sandbox.ops.provision import provision_loopback
from sandbox.ops.registry import ProcessRecord
from sandbox.protocol import BROKER_RETRY
from tests.conftest import app_digest, make_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

UNAVAILABLE = netns_unavailable()
ROUNDS = 3


@dataclass
class Job:
    """One job's submit command (run in the background) and where its files are."""

    name: str
    out: Path
    proc: subprocess.Popen[str] | None = None
    output: str = ""
    code: int | None = None

    @property
    def events_file(self) -> Path:
        return self.out / "events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        lines = self.events_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def committed(self) -> list[int]:
        return [e["round"] for e in self.events() if e["kind"] == "aggregate_committed"]

    def finish(self, timeout: float = 600) -> None:
        assert self.proc is not None
        self.output, _ = self.proc.communicate(timeout=timeout)
        self.code = self.proc.returncode


@dataclass
class FaultRun:
    """What the deployment did under each fault."""

    topology: Topology
    configs: dict[str, Path]
    provider: Path
    broker_wait_output: str = ""
    broker_down_seconds: float = 0.0
    cut: Job | None = None
    cut_seconds: float = 0.0
    killed: Job | None = None
    killed_pids: list[int] = field(default_factory=list)
    restart_output: str = ""
    bounced: Job | None = None
    bounced_first: Job | None = None
    round1_digest: tuple[str, int] | None = None
    survivors: list[int] = field(default_factory=list)
    namespaces_left: list[str] = field(default_factory=list)
    status: str = ""


def _wait(condition: Any, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def _run_config(root: Path, model_dir: Path, name: str, **overrides: Any) -> Path:
    """A job's run config as a provider writes it: what to train, not where its own
    files are (``ark provider submit`` fills those in from its workspace)."""
    values: dict[str, Any] = {
        "job_id": name,
        "labels": tuple(sorted(DEMO_LABELS)),
        "num_rounds": ROUNDS,
        "batch_size": 8,
        "max_length": 48,
        "round_timeout": 150.0,
        "expected_nodes": 2,
        "min_nodes": 1,
        **overrides,
    }
    return write_job_config(root / f"{name}.toml", make_spec(model_dir, **values))


def _submit(cmds: PartyCommands, run_config: Path, name: str) -> Job:
    job = Job(name, cmds.provider_dir / "jobs" / name)
    argv = cmds.argv(
        cmds.topology.provider,
        "provider",
        "submit",
        str(run_config),
        "--workdir",
        str(cmds.provider_dir),
        "--timeout",
        "600",
    )
    job.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return job


def _started_round(job: Job, rnd: int) -> bool:
    return any(e["kind"] == "round_started" and e["round"] == rnd for e in job.events())


def _kill_recorded(workspace: Path, roles: tuple[str, ...]) -> list[int]:
    """SIGKILL the recorded processes of ``roles`` and their descendants, as a crash."""
    victims: list[psutil.Process] = []
    for role, (_, proc) in ProcessRecord(workspace).live().items():
        if role in roles:
            victims += [proc, *proc.children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return [v.pid for v in victims]


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> FaultRun:
    if UNAVAILABLE is not None:
        pytest.skip(f"network namespaces cannot be made here: {UNAVAILABLE}")
    root = tmp_path_factory.mktemp("deploy")
    data = write_demo_data(root / "data", 2, rows_per_node=40, seed=3)
    topology = Topology.create(sorted(data))
    addresses = ProviderAddresses(topology.provider.address)
    deployment = provision_loopback(
        root,
        model_dir=tiny_bert_dir,
        node_data=data,
        key_broker_port=addresses.broker_port,
        threads=1,
        provider_host=addresses.host,
    )
    configs = deployment.node_configs
    for config in configs.values():
        approve(config, app_digest())
    log: list[str] = []
    cmds = PartyCommands(topology, deployment.provider.root, configs, addresses, say=log.append)
    run = FaultRun(topology, configs, deployment.provider.root)
    first, second = sorted(configs)
    try:
        cmds.start_provider()
        cmds.register_nodes()

        # (1) The key broker is down when the first node starts.
        _kill_recorded(run.provider, (KEY_BROKER,))
        down = time.monotonic()
        waiting = subprocess.Popen(
            cmds.node_start_argv(first), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        sandbox_log = node_home(configs[first]) / "logs" / "sandbox.log"
        _wait(
            lambda: sandbox_log.exists() and BROKER_RETRY in sandbox_log.read_text(),
            "the node's sandbox said it waits for the key broker",
        )
        time.sleep(4)  # a second attempt fails too
        cmds.start_provider()  # starts the key broker again, and only it
        run.broker_down_seconds = time.monotonic() - down
        run.broker_wait_output, _ = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, run.broker_wait_output
        cmds.start_nodes([second])

        # (2) The second node's link is cut while round 2 runs, and restored.
        job = run.cut = _submit(cmds, _run_config(root, tiny_bert_dir, "cut"), "cut")
        _wait(lambda: _started_round(job, 2), "round 2 started")
        topology.cut(second)
        cut = time.monotonic()
        time.sleep(10)
        topology.restore(second)
        run.cut_seconds = time.monotonic() - cut
        job.finish()

        # (3) The second node's processes are killed after round 1 and started again.
        job = run.killed = _submit(cmds, _run_config(root, tiny_bert_dir, "killed"), "killed")
        _wait(lambda: 1 in job.committed(), "round 1 committed")
        run.killed_pids = _kill_recorded(
            node_home(configs[second]), ("supernode", "launch-pool", "sandbox")
        )
        run.restart_output = cmds.ark(
            topology.nodes[second],
            "node",
            "start",
            "--config",
            str(configs[second]),
            "--superlink",
            addresses.fleet,
        )
        job.finish()

        # (4) The SuperLink is killed after round 1, started again, the job resubmitted.
        config = _run_config(root, tiny_bert_dir, "bounced")
        job = run.bounced_first = _submit(cmds, config, "bounced")
        _wait(lambda: 1 in job.committed(), "round 1 committed")
        run.round1_digest = sha256_file(job.out / "checkpoints" / "round-0001.safetensors")
        _kill_recorded(run.provider, (SUPERLINK,))
        job.finish()
        cmds.start_provider()
        run.bounced = _submit(cmds, config, "bounced")
        run.bounced.finish()
        run.status = cmds.ark(
            topology.provider, "provider", "status", "--workdir", str(run.provider)
        )
    finally:
        run.survivors = cmds.stop_all()
        topology.close()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    run.namespaces_left = [n for n in names.stdout.split() if topology.tag and topology.tag in n]
    return run


def _journal(config: Path) -> list[dict[str, Any]]:
    path = NodeConfig.load(config).journal_path
    assert path is not None
    return read_journal(path)


def _trained(config: Path, job: Job) -> list[int]:
    runs = {str(e["run"]) for e in job.events()}
    return [
        e["round"] for e in _journal(config) if e["kind"] == "train" and str(e["run_id"]) in runs
    ]


def test_a_node_waits_for_a_key_broker_that_is_down_then_serves(fault_run: FaultRun) -> None:
    out = fault_run.broker_wait_output
    assert BROKER_RETRY in out, out
    assert "node up: attested, connected" in out, out
    assert fault_run.broker_down_seconds > 4


def test_a_link_cut_mid_round_and_restored_lets_the_job_complete(fault_run: FaultRun) -> None:
    job = fault_run.cut
    assert job is not None
    assert job.code == 0, job.output
    assert job.committed() == [1, 2, 3]
    second = sorted(fault_run.configs)[1]
    # The cut node was not dropped: it trained in every round, the cut one included.
    assert _trained(fault_run.configs[second], job) == [1, 2, 3]


def test_a_node_killed_and_started_again_rejoins_the_job(fault_run: FaultRun) -> None:
    job = fault_run.killed
    assert job is not None
    assert job.code == 0, job.output
    assert job.committed() == [1, 2, 3]
    assert "node up: attested, connected" in fault_run.restart_output
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in fault_run.killed_pids
    )
    second = sorted(fault_run.configs)[1]
    trained = _trained(fault_run.configs[second], job)
    assert 1 in trained, trained  # before the crash
    assert 3 in trained, trained  # and after its restart


def test_a_superlink_restarted_mid_job_resumes_from_its_checkpoint(fault_run: FaultRun) -> None:
    first, job = fault_run.bounced_first, fault_run.bounced
    assert first is not None
    assert job is not None
    assert first.code != 0, "the follower did not notice the SuperLink go"
    assert "the provider's SuperLink is not running" in first.output
    assert job.code == 0, job.output
    # Every round committed exactly once over both runs of the job: none was redone.
    assert job.committed() == [1, 2, 3]
    assert (
        sha256_file(job.out / "checkpoints" / "round-0001.safetensors") == fault_run.round1_digest
    )
    started = [e for e in job.events() if e["kind"] == "run_started"]
    assert [e["resumed_after_round"] for e in started] == [0, 1]


def test_the_deployment_leaves_no_process_and_no_namespace(fault_run: FaultRun) -> None:
    assert "superlink   running" in fault_run.status
    assert fault_run.survivors == []
    assert fault_run.namespaces_left == []
