"""End-to-end runs on real flower-superlink / flower-supernode processes over TLS on loopback.

A federation of real processes costs most of a test, so tests whose properties one run
can show read a shared run (a fixture that runs once; the tests only look): the
two-node, two-round checks read the protected canary run (tests/scenarios.py); a node
crashing mid-round, a node refusing an unapproved app and a SuperNode with an
unregistered key share one federation; the resume and causal-LM checks share one
tiny-Llama run whose ServerApp is killed after round 1 and resubmitted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.numpy import load_file

from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION, NodeConfig, RunSpec
from sandbox.digests import sha256_file
from sandbox.errors import FederationError
from sandbox.events import JsonlEventSink
from sandbox.journal import read_journal
from sandbox.ops.apps import approve
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.federation import (
    Federation,
    RunOutcome,
    free_port,
    server_app_pids,
    write_run_config,
)
from sandbox.ops.processes import still_running
from sandbox.ops.provision import node_auth_key, provision_loopback
from sandbox.translog.store import LogStore
from tests.canary import files_holding, weight_windows
from tests.conftest import APP_DIR, app_digest, checked_federation, make_spec
from tests.scenarios import ProtectedRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _nodes(
    tmp_path: Path, count: int, model_dir: Path, task: str = TASK_CLASSIFICATION
) -> dict[str, Path]:
    """Provision a provider (sealing ``model_dir``) and ``count`` attesting nodes."""
    data = write_demo_data(tmp_path / "data", count, rows_per_node=40, seed=3, task=task)
    deployment = provision_loopback(
        tmp_path, model_dir=model_dir, node_data=data, key_broker_port=free_port(), threads=1
    )
    return deployment.node_configs


def _spec(tmp_path: Path, model_dir: Path, nodes: int, **overrides: object) -> RunSpec:
    values: dict[str, object] = {
        "job_id": "e2e",
        "labels": tuple(sorted(DEMO_LABELS)),
        "num_rounds": 2,
        "batch_size": 8,
        "max_length": 48,
        "round_timeout": 120.0,
        "expected_nodes": nodes,
        "output_dir": tmp_path / "provider" / "job",
        "aggregator_dir": tmp_path / "provider" / "aggregator",
        "log_db": tmp_path / "provider" / "translog.db",
        **overrides,
    }
    return make_spec(model_dir, str(values.pop("task", TASK_CLASSIFICATION)), **values)


def _journal(config: Path) -> list[dict[str, Any]]:
    path = NodeConfig.load(config).journal_path
    assert path is not None
    # A journal being opened exists, empty, for a moment before its first line: polled
    # then, it has no entries yet.
    if not path.exists() or path.stat().st_size == 0:
        return []
    return read_journal(path)


def _launch(
    federation: Federation, configs: dict[str, Path], approved: tuple[str, ...] | None = None
) -> None:
    """Start the key broker, the SuperLink and one SuperNode per node.

    Nodes approve this checkout's app first (``approved``: only the nodes named).
    """
    for name, config in configs.items():
        if approved is None or name in approved:
            approve(config, app_digest())
    sandbox = NodeConfig.load(next(iter(configs.values()))).sandbox
    assert sandbox is not None
    federation.start_key_broker(int(sandbox.key_broker.rsplit(":", 1)[1]))
    federation.start_superlink()
    federation.start_nodes(configs)


def _submit(federation: Federation, spec: RunSpec, tmp_path: Path) -> int:
    return federation.submit(APP_DIR, write_run_config(tmp_path / "run.toml", spec.to_run_config()))


def _start(federation: Federation, configs: dict[str, Path], spec: RunSpec, tmp_path: Path) -> int:
    """:func:`_launch` every node, then submit the job."""
    _launch(federation, configs)
    return _submit(federation, spec, tmp_path)


def test_two_nodes_two_rounds_over_tls(protected_run: ProtectedRun) -> None:
    """Read from the canary test's protected run (tests/scenarios.py): two nodes, two
    rounds, sealed, over TLS through the gateway, audited while its log was served."""
    run = protected_run
    assert run.outcome.ok, run.outcome.details
    # The nodes were given only the gateway's address, and the whole run went through it.
    assert len(run.supernode_argv) == 2
    for argv in run.supernode_argv.values():
        assert argv[argv.index("--superlink") + 1] == run.node_address
    access = (run.provider_home / "gateway" / "access.log").read_text(encoding="utf-8")
    for call in ("activate-node", "pull-messages", "push-messages", "get-fab", "push-object"):
        assert f'"POST /v1/fleet/{call} HTTP/1.1" 200' in access, call

    out = run.spec.output_dir
    assert out is not None
    assert run.spec.num_rounds == 2
    initial = load_file(str(out / "checkpoints" / "round-0000.safetensors"))
    final = load_file(str(out / "checkpoints" / "round-0002.safetensors"))
    assert initial.keys() == final.keys()
    changed = [name for name in initial if (initial[name] != final[name]).any()]
    assert any(".lora_B." in name for name in changed), "global LoRA B did not change"

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for entry in results["rounds"]:
        assert len(entry["nodes"]) == 2, entry
        for metrics in entry["nodes"].values():
            assert 0.0 <= metrics["accuracy"] <= 1.0
            assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert (out / "metrics.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for config in run.configs.values():
        journal = _journal(config)
        kinds = [(e["kind"], e["round"]) for e in journal if e["kind"] != "app_approved"]
        # The launcher checked the app once per ClientApp process (hello, 2 trains, eval).
        assert [e["kind"] for e in journal].count("app_approved") == 4
        assert kinds == [("hello", 1), ("train", 1), ("train", 2), ("evaluate", 2)]
    # The provider's SuperLink state is a real SQLite file in its workspace.
    assert (run.provider_home / "superlink.db").stat().st_size > 0
    # Each node's sandbox got its model through attestation and one key release, once
    # for the whole run (not once per message, as when every ClientApp unsealed it).
    events = JsonlEventSink(run.provider_home / "events.jsonl").read()
    releases = [e for e in events if e["kind"] == "key_released"]
    assert len(releases) == 2, [e["kind"] for e in events]
    # Each node's hello had its channel key certified, with no key released for it.
    assert [e["kind"] for e in events].count("channel_certified") == 2
    for config in run.configs.values():
        for entry in _journal(config):
            if entry["kind"] not in ("train", "evaluate"):
                continue
            assert entry["attestation"]["status"] == "affirming"
            assert entry["attestation"]["stub"] is True
            assert entry["aggregator"]["ueid"].startswith("aggregator-")
    # Every update arrived sealed and opened under the run's aggregator key.
    served = JsonlEventSink(out / "events.jsonl").read()
    assert [e["kind"] for e in served].count("node_admitted") == 2
    accepted = [e for e in served if e["kind"] == "update_accepted"]
    assert len(accepted) == 2 * 2
    assert all(len(e["envelope_sha256"]) == 64 for e in accepted)
    assert not [e for e in served if e["kind"] in ("update_rejected", "node_declined")]
    _assert_no_plaintext_weights(run.model, [run.workdir / "nodes"])
    _audit_the_run(run, served)


def _audit_the_run(run: ProtectedRun, served: list[dict[str, Any]]) -> None:
    """The auditor's view of the run just finished: the log over TLS verifies, holds every
    event both provider services wrote, matches both node journals, and reports."""
    verified = run.audit.verified
    assert verified.exit_code == 0, verified.output
    assert "ok: Policy across events" in verified.output
    entries = LogStore(run.provider_home / "translog.db", readonly=True)
    kinds = [json.loads(entry)["kind"] for entry in entries.entries(0, entries.size())]
    for kind in (
        "model_published",
        "attestation_appraised",
        "channel_certified",
        "key_released",
        "run_started",
        "node_admitted",
        "round_started",
        "update_accepted",
        "aggregate_committed",
        "run_finished",
    ):
        assert kind in kinds, (kind, kinds)
    # The ServerApp's events reached the log in the order its job file has them.
    assert [k for k in kinds if k in {e["kind"] for e in served}] == [e["kind"] for e in served]
    crosschecked = run.audit.crosschecked
    assert crosschecked.exit_code == 0, crosschecked.output
    assert crosschecked.output.count(" 0 missing from the log") == 2
    written = run.audit.written
    assert written.exit_code == 0, written.output
    assert "<svg" in run.audit.report.read_text(encoding="utf-8")


def _assert_no_plaintext_weights(model_dir: Path, roots: list[Path]) -> None:
    """The property: no node file (temp files included) holds plaintext weight bytes."""
    windows = weight_windows(model_dir)
    # The detector finds what it looks for: the plaintext directory itself is a hit.
    assert files_holding(windows, [model_dir]) == [str(model_dir / "model.safetensors")]
    assert files_holding(windows, roots) == []


def _clientapp_running(proc_pid: int) -> bool:
    try:
        children = psutil.Process(proc_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if "flwr-clientapp" in " ".join(child.cmdline()):
                return True
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return False


@dataclass(frozen=True)
class TroubledRun:
    """A sealed run on three training nodes, one of which crashes mid-round, beside a
    fourth node that did not approve the app and a stranger whose key nobody registered."""

    workdir: Path
    configs: dict[str, Path]
    spec: RunSpec
    outcome: RunOutcome
    victim: str
    refusing: str
    stranger: str
    stranger_returncode: int | None
    stranger_log: str
    # Whether every registered SuperNode (the crashed one aside) ran on after the
    # stranger was refused.
    registered_alive: bool
    listed_nodes: list[dict[str, Any]]


@pytest.fixture(scope="module")
def troubled_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> TroubledRun:
    """Three properties of one federation, each once shown by a run of its own: a node
    dropping mid-round, a node refusing an app it did not approve, and a SuperNode with
    an unregistered key, refused while the registered ones work."""
    tmp_path = tmp_path_factory.mktemp("troubled-run")
    configs = _nodes(tmp_path, 5, tiny_bert_dir)
    *training, refusing, stranger = configs
    victim = sorted(training)[-1]
    members = {name: configs[name] for name in (*training, refusing)}
    # Every member is online before the run starts, so the run need not wait for a
    # count of nodes: after the crash it goes on with the rest at once, instead of
    # waiting out a round timeout per stage for a node that is gone (that wait is
    # tests/test_rounds.py's wait_for_nodes test).
    spec = _spec(tmp_path, tiny_bert_dir, 0, round_timeout=60.0, min_nodes=2)
    with checked_federation(tmp_path) as federation:
        _launch(federation, members, approved=tuple(training))
        federation.wait_until_online(members)
        # The stranger has a key, but nobody registered it.
        stranger_started = time.monotonic()
        stranger_proc = federation.start_supernode(
            stranger, configs[stranger], auth_key=node_auth_key(configs[stranger].parent)
        )
        run_id = _submit(federation, spec, tmp_path)
        victim_proc = federation.supernodes[victim]
        deadline = time.monotonic() + 300

        def training_started() -> bool:
            """The victim shook hands and its launcher let the training ClientApp start."""
            kinds = [e["kind"] for e in _journal(configs[victim])]
            return "hello" in kinds and kinds.count("app_approved") >= 2

        while not (training_started() and _clientapp_running(victim_proc.pid)):
            assert time.monotonic() < deadline, "the victim never started training"
            time.sleep(0.2)
        # The node's host goes down: its SuperNode, ClientApp and sandbox all die.
        federation.kill_supernode(victim)
        federation.kill_sandbox(victim)

        while stranger_proc.alive() and time.monotonic() < stranger_started + 120:
            time.sleep(0.5)
        registered_alive = all(
            proc.alive()
            for name, proc in federation.supernodes.items()
            if name not in (victim, stranger)
        )
        listed = federation._flwr("supernode", "list", "ark", "--format", "json")
        outcome = federation.wait(run_id, timeout=600)
    return TroubledRun(
        workdir=tmp_path,
        configs=configs,
        spec=spec,
        outcome=outcome,
        victim=victim,
        refusing=refusing,
        stranger=stranger,
        stranger_returncode=stranger_proc.popen.returncode,
        stranger_log=stranger_proc.log_tail(40),
        registered_alive=registered_alive,
        listed_nodes=json.loads(listed.stdout)["nodes"],
    )


def test_node_dropping_mid_round_does_not_fail_the_run(troubled_run: TroubledRun) -> None:
    run = troubled_run
    assert run.outcome.ok, run.outcome.details
    assert run.spec.output_dir is not None
    results = json.loads((run.spec.output_dir / "results.json").read_text(encoding="utf-8"))
    round1 = results["rounds"][1]
    assert len(round1["examples"]) == 2, "round 1 must aggregate the two surviving nodes"
    lost = set(round1["missing"]) | set(round1["rejected"])
    assert len(lost) == 1, round1
    assert not lost & set(round1["examples"]), round1
    assert all(len(entry["nodes"]) == 2 for entry in results["rounds"][1:])
    assert not any(e["kind"] == "train" for e in _journal(run.configs[run.victim])), (
        "victim replied"
    )


@dataclass(frozen=True)
class ResumedRun:
    """A two-round causal-LM run on a tiny Llama whose ServerApp was killed after round 1
    and whose job was submitted again."""

    configs: dict[str, Path]
    spec: RunSpec
    first_run: int
    second_run: int
    killed: list[int]
    round_when_killed: int
    round1_digest: tuple[str, int]  # (SHA-256, size), as sha256_file gives it
    outcome: RunOutcome

    @property
    def out(self) -> Path:
        assert self.spec.output_dir is not None
        return self.spec.output_dir


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> ResumedRun:
    """The run both the resume test and the causal-LM test read: resuming is the same
    for every task, and the causal LM's outputs are those the resumed job wrote."""
    tmp_path = tmp_path_factory.mktemp("resumed-run")
    configs = _nodes(tmp_path, 2, tiny_llama_dir, task=TASK_CAUSAL_LM)
    spec = _spec(
        tmp_path, tiny_llama_dir, 2, task=TASK_CAUSAL_LM, labels=(), num_rounds=2, max_length=96
    )
    assert spec.output_dir is not None
    state_file = spec.output_dir / "checkpoints" / "state.json"
    with checked_federation(tmp_path) as federation:
        first_run = _start(federation, configs, spec, tmp_path)
        assert federation.superlink is not None

        deadline = time.monotonic() + 300
        while not (state_file.exists() and json.loads(state_file.read_text())["round"] >= 1):
            assert time.monotonic() < deadline, "round 1 never finished"
            federation.superlink.remember_descendants()
            time.sleep(0.1)
        pids = server_app_pids(federation.superlink)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        round_when_killed = json.loads(state_file.read_text())["round"]
        round1 = spec.output_dir / "checkpoints" / "round-0001.safetensors"
        round1_digest = sha256_file(round1)
        # What an operator restarting a crashed job does: the dead run's round-2
        # instructions are withdrawn, so no node spends the resumed run's time on them.
        federation.stop_run(first_run)

        second_run = federation.submit(APP_DIR, tmp_path / "run.toml")
        outcome = federation.wait(second_run, timeout=600)
    return ResumedRun(
        configs, spec, first_run, second_run, pids, round_when_killed, round1_digest, outcome
    )


def test_killed_serverapp_resumes_from_last_checkpoint(resumed_run: ResumedRun) -> None:
    run = resumed_run
    assert run.killed, "no flwr-serverapp process found under our SuperLink"
    assert run.round_when_killed == 1, "killed too late: round 2 finished"
    assert run.outcome.ok, run.outcome.details

    state = json.loads((run.out / "checkpoints" / "state.json").read_text())
    assert state["round"] == 2
    assert state["finished"] is True
    round1 = run.out / "checkpoints" / "round-0001.safetensors"
    assert sha256_file(round1) == run.round1_digest, "round 1 was redone"
    for config in run.configs.values():
        journal = _journal(config)
        round1_trains = [e for e in journal if e["kind"] == "train" and e["round"] == 1]
        assert len(round1_trains) == 1
        assert str(round1_trains[0]["run_id"]) == str(run.first_run)
        resumed = [e for e in journal if str(e["run_id"]) == str(run.second_run)]
        work = [(e["kind"], e.get("round")) for e in resumed if e["kind"] != "app_approved"]
        # A new ServerApp process: a new aggregator key, so a new handshake first.
        assert work == [("hello", 2), ("train", 2), ("evaluate", 2)]


def _demo_argv(workdir: Path, model: Path, *extra: str) -> list[str]:
    import sys

    ark = Path(sys.executable).parent / "ark"
    return [str(ark), "demo", "--workdir", str(workdir), "--model", str(model), *extra]


def _recorded(workdir: Path) -> dict[int, psutil.Process]:
    """Every process the demo's parties recorded so far, and their descendants."""
    from sandbox.ops.registry import ProcessRecord

    found: dict[int, psutil.Process] = {}
    for record_dir in [workdir / "provider", *(workdir / "nodes").glob("*")]:
        for _, proc in ProcessRecord(record_dir).live().values():
            found[proc.pid] = proc
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in proc.children(recursive=True)})
    return found


def _runs(program: str, proc: psutil.Process) -> bool:
    """Whether ``proc`` runs ``program`` (False once it has exited, zombies included)."""
    try:
        return any(program in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _our_namespaces(output: str) -> list[str]:
    """The demo's network namespaces still present (named in its output)."""
    tags = set(re.findall(r"ark-([0-9a-f]{6})-", output))
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [n for n in names.split() if any(f"ark-{tag}-" in n for tag in tags)]


def _tidy_after(demo: subprocess.Popen[str], workdir: Path, output: str) -> None:
    """Hygiene when a demo test failed halfway: the demo gets its own Ctrl-C first, then
    whatever its parties recorded is stopped and its namespaces are removed."""
    from sandbox.ops.parties import NODE_STOP, PROVIDER_STOP, stop_party

    if demo.poll() is None:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=180)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    for node in (workdir / "nodes").glob("*"):
        stop_party(node, NODE_STOP)
    if (workdir / "provider").is_dir():
        stop_party(workdir / "provider", PROVIDER_STOP)
    for name in _our_namespaces(output):
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path, tiny_bert_dir: Path) -> None:
    workdir = tmp_path / "ws"
    argv = _demo_argv(workdir, tiny_bert_dir, "--nodes", "2", "--rounds", "1")
    demo = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    )
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    supernodes = 0
    output = ""
    try:
        # Until both nodes' SuperNodes run: the provider's services and every node process.
        while supernodes < 2:
            assert demo.poll() is None, demo.stdout.read() if demo.stdout else ""
            assert time.monotonic() < deadline, "the demo never started its federation"
            found = _recorded(workdir)
            seen.update(found)
            supernodes = sum(_runs("flower-supernode", p) for p in found.values())
            time.sleep(0.2)
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=180)
        alive = [p.pid for p in seen.values() if still_running(p)]
        namespaces = _our_namespaces(output)
    finally:
        _tidy_after(demo, workdir, output)
    assert demo.returncode == 130, output
    assert "interrupted" in output
    assert len(seen) >= 6
    assert alive == [], f"processes left behind after Ctrl-C: {alive}"
    assert "network namespace" in output
    assert namespaces == []


def test_the_demo_runs_each_party_on_its_own_host(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The whole demo, as each party's commands on its own network-namespace host."""
    from sandbox.ops.netns import netns_unavailable

    if (reason := netns_unavailable()) is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    workdir = tmp_path / "ws"
    argv = _demo_argv(workdir, tiny_bert_dir, "--nodes", "2", "--rounds", "2", "--hosts", "netns")
    demo = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    try:
        output, _ = demo.communicate(timeout=900)
        namespaces = _our_namespaces(output)
    finally:
        _tidy_after(demo, workdir, output)
    result = demo
    # Exit 1 is the demo's verdict that not every node improved (a tiny random model need
    # not); anything else is a failure.
    assert result.returncode in (0, 1), output
    assert "node improved on held-out" in output
    assert "198.51.100.1" in output
    assert "network namespace" in output
    assert "[provider] round 2/2 aggregated" in output
    assert "on-prem inference" in output
    assert "provider stopped: no process of it is left" in output
    assert output.count("node stopped: no process of it is left") == 2
    assert len(re.findall(r"\(ark-[0-9a-f]{6}-", output)) == 3  # the provider's, two nodes'
    assert namespaces == []


def test_causal_lm_round_on_a_tiny_llama(resumed_run: ResumedRun) -> None:
    """Read from the resumed run: its job is a causal LM on a tiny Llama."""
    run = resumed_run
    assert run.spec.task == TASK_CAUSAL_LM
    assert run.outcome.ok, run.outcome.details
    results = json.loads((run.out / "results.json").read_text(encoding="utf-8"))
    assert results["metrics"] == ["perplexity", "loss"]
    for entry in results["rounds"]:
        assert len(entry["nodes"]) == 2
        for metrics in entry["nodes"].values():
            assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    assert (run.out / "adapter" / "adapter_config.json").is_file()


def test_supernode_with_an_unregistered_key_is_refused(troubled_run: TroubledRun) -> None:
    run = troubled_run
    # Flower names the refusal (exit code 305, "[code: 2004]") and then exits non-zero.
    assert run.stranger_returncode is not None, "an unregistered SuperNode kept running"
    assert run.stranger_returncode != 0
    assert "[code: 2004]" in run.stranger_log
    assert run.registered_alive
    # Only the registered keys are known: the four members', never the stranger's.
    assert len(run.listed_nodes) == len(run.configs) - 1, "only the registered keys are known"


def test_a_node_does_not_run_an_app_it_did_not_approve(troubled_run: TroubledRun) -> None:
    """The node launcher checks the FAB digest before Flower installs the app."""
    run = troubled_run
    assert run.outcome.ok, run.outcome.details
    refusing = run.refusing
    approving = next(n for n in run.configs if n not in (run.victim, refusing, run.stranger))

    refused = _journal(run.configs[refusing])
    assert refused, "the refusing node journalled nothing"
    assert {e["kind"] for e in refused} == {"app_refused"}
    assert {e["app_sha256"] for e in refused} == {app_digest()}
    # The app was never unpacked on the refusing node, so none of its code ran there.
    apps = run.workdir / "nodes" / refusing / ".flwr" / "apps"
    assert not apps.exists() or not any(apps.iterdir())
    approving_kinds = [e["kind"] for e in _journal(run.configs[approving])]
    assert approving_kinds.count("app_approved") >= 3
    assert "train" in approving_kinds
    assert run.spec.output_dir is not None
    served = JsonlEventSink(run.spec.output_dir / "events.jsonl").read()
    refusals = [e for e in served if e["kind"] == "node_refused"]
    assert refusals, "the ServerApp recorded no refusal"
    # The node says why with a fixed code only (sandbox/reasons.py), never its own text.
    assert {e["reason"] for e in refusals} == {"app-not-approved"}, refusals


@dataclass(frozen=True)
class RestartedRun:
    """A three-round sealed run on two nodes: one node's sandbox is killed (SIGKILL) while
    it trains in round 1 and restarted by the operator; the other node's SuperNode is
    killed and restarted after round 1 while its sandbox keeps running."""

    configs: dict[str, Path]
    spec: RunSpec
    outcome: RunOutcome
    crashed: str  # whose sandbox was killed
    bounced: str  # whose SuperNode was killed
    run_id: int
    # The bounced node's sandbox: its pid and the runs it held a channel for, before and
    # after its SuperNode's restart, and the key broker's key releases by then.
    sandbox_before: tuple[int, list[int]]
    sandbox_after: tuple[int, list[int]]
    releases_before: int
    releases_after: int
    round_when_crashed: int


def _sandbox_status(config: Path) -> tuple[int, list[int]]:
    from clients.shuttle import sandbox_client

    with sandbox_client(NodeConfig.load(config)) as sandbox:
        status = sandbox.status()
    return status.pid, list(status.runs)


def _trained_rounds(config: Path, run_id: int) -> list[int]:
    return [
        e["round"]
        for e in _journal(config)
        if e["kind"] == "train" and str(e["run_id"]) == str(run_id)
    ]


def _restart_supernode(federation: Federation, name: str, config: Path) -> None:
    """Kill the node's SuperNode and start it again, as an operator would, until Flower
    activates it: the SuperLink refuses (exit code 305) while it still counts the killed
    SuperNode online."""
    federation.kill_supernode(name)
    deadline = time.monotonic() + 180
    while True:
        federation.start_supernode(name, config, auth_key=node_auth_key(config.parent))
        try:
            federation.wait_until_online([name], timeout=60)
            return
        except FederationError:
            assert time.monotonic() < deadline, "the SuperNode was never activated again"
            time.sleep(3)


@pytest.fixture(scope="module")
def restarted_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> RestartedRun:
    tmp_path = tmp_path_factory.mktemp("restarted-run")
    data = write_demo_data(tmp_path / "data", 2, rows_per_node=40, seed=3)
    deployment = provision_loopback(
        tmp_path, model_dir=tiny_bert_dir, node_data=data, key_broker_port=free_port(), threads=1
    )
    configs = deployment.node_configs
    crashed, bounced = sorted(configs)
    events = JsonlEventSink(deployment.provider.events)

    def releases() -> int:
        return sum(e["kind"] == "key_released" for e in events.read())

    # Each round waits (at most its timeout) for both nodes, so the restarted SuperNode,
    # which Flower activates only once it counts the killed one offline, is waited for.
    spec = _spec(tmp_path, tiny_bert_dir, 2, num_rounds=3, round_timeout=120.0, min_nodes=1)
    with checked_federation(tmp_path) as federation:
        _launch(federation, configs)
        federation.wait_until_online(configs)
        run_id = _submit(federation, spec, tmp_path)
        assert spec.output_dir is not None
        state_file = spec.output_dir / "checkpoints" / "state.json"

        def finished_round() -> int:
            return int(json.loads(state_file.read_text())["round"]) if state_file.exists() else 0

        # (a) The crashed node's sandbox dies while its training ClientApp forwards to it.
        deadline = time.monotonic() + 300
        while not (
            any(e["kind"] == "hello" for e in _journal(configs[crashed]))
            and _clientapp_running(federation.supernodes[crashed].pid)
        ):
            assert time.monotonic() < deadline, "the node never started training"
            time.sleep(0.1)
        round_when_crashed = finished_round() + 1
        federation.kill_sandbox(crashed)
        federation.start_sandbox(crashed, configs[crashed])

        # (b) After round 1, the other node's SuperNode dies while its round-2 ClientApp
        # forwards to the sandbox (so the round-2 instruction is spent, whatever the
        # machine's load); its sandbox does not die.
        while finished_round() < 1 or not _clientapp_running(federation.supernodes[bounced].pid):
            assert time.monotonic() < deadline, "round 2 never reached the bounced node"
            time.sleep(0.05)
        sandbox_before, releases_before = _sandbox_status(configs[bounced]), releases()
        _restart_supernode(federation, bounced, configs[bounced])
        outcome = federation.wait(run_id, timeout=600)
        sandbox_after, releases_after = _sandbox_status(configs[bounced]), releases()
    return RestartedRun(
        configs=configs,
        spec=spec,
        outcome=outcome,
        crashed=crashed,
        bounced=bounced,
        run_id=run_id,
        sandbox_before=sandbox_before,
        sandbox_after=sandbox_after,
        releases_before=releases_before,
        releases_after=releases_after,
        round_when_crashed=round_when_crashed,
    )


def test_a_restarted_sandbox_misses_at_most_the_round_in_flight(
    restarted_run: RestartedRun,
) -> None:
    run = restarted_run
    assert run.outcome.ok, run.outcome.details
    assert run.round_when_crashed == 1
    trained = _trained_rounds(run.configs[run.crashed], run.run_id)
    assert 1 not in trained, "the crashed sandbox answered the round it died in"
    assert trained == [2, 3], "the restarted sandbox did not take part again at once"
    journal = _journal(run.configs[run.crashed])
    # It shook hands again: a new process holds no channel key of the old one.
    hellos = [e for e in journal if e["kind"] == "hello" and str(e["run_id"]) == str(run.run_id)]
    assert [e["round"] for e in hellos] == [1, 2]


def test_a_restarted_supernode_finds_its_sandbox_as_it_left_it(
    restarted_run: RestartedRun,
) -> None:
    run = restarted_run
    assert run.outcome.ok, run.outcome.details
    before_pid, before_runs = run.sandbox_before
    after_pid, after_runs = run.sandbox_after
    assert after_pid == before_pid, "the sandbox was restarted with its SuperNode"
    assert run.run_id in before_runs
    assert run.run_id in after_runs
    assert run.releases_after == run.releases_before, "the sandbox attested for its key again"
    # Round 2's instruction went to the killed SuperNode; the restarted one takes part
    # again (after a new handshake: the ServerApp forgot the node when it dropped out).
    assert _trained_rounds(run.configs[run.bounced], run.run_id) == [1, 3]
