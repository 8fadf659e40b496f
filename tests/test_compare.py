"""A comparison (1+N) on real processes: the provider's signed catalog of three models,
``ark compare run`` on one federation, the auditor's verdict, and a node that scores one
model on another held-out set than the one it committed to.

The three models are derived from a tiny 6-layer BERT by the same code that derives the
default catalog from MiniLM (its 6, 3 and 1 first layers). Every party runs its own
commands on loopback (`ark provider start`, `ark node start`, `ark compare run`,
`ark audit verify`), as in a deployment; one deployment carries both comparisons.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.config import NodeConfig
from sandbox.errors import ScorecardRootMismatch
from sandbox.ops.apps import approve
from sandbox.ops.catalog_models import build_default_models, publish_default_catalog
from sandbox.ops.comparison import load_comparison, recommend
from sandbox.ops.comparison_job import comparison_dir
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.deployment import PartyCommands
from sandbox.ops.federation import free_port, write_job_config
from sandbox.ops.netns import Topology
from sandbox.ops.parties import SANDBOX, ProviderAddresses
from sandbox.ops.provision import LoopbackDeployment, ProviderWorkspace, provision_loopback
from sandbox.ops.registry import ProcessRecord
from sandbox.scorecard import open_commitment, open_scorecard
from sandbox.translog.store import LogStore
from tests.conftest import app_digest, make_spec, save_tiny_bert

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

MODELS = ("minilm-l6", "minilm-l3", "minilm-l1")
CLEAN, MOVED = "cmp-clean", "cmp-moved"


@dataclass
class Comparisons:
    """What the deployment did in a clean comparison and in one whose node moved its
    held-out set between two models."""

    deployment: LoopbackDeployment
    clean_output: str = ""
    clean_verify: subprocess.CompletedProcess[str] | None = None
    clean_crosscheck: subprocess.CompletedProcess[str] | None = None
    results_output: subprocess.CompletedProcess[str] | None = None
    sandboxes_before: dict[str, int] = field(default_factory=dict)
    sandboxes_after: dict[str, int] = field(default_factory=dict)
    moved_output: str = ""
    moved_verify: subprocess.CompletedProcess[str] | None = None
    survivors: list[int] = field(default_factory=list)

    @property
    def provider(self) -> Path:
        return self.deployment.provider.root

    def log(self) -> list[dict[str, Any]]:
        store = LogStore(self.deployment.provider.log_db)
        return [json.loads(entry) for entry in store.entries(0, store.size())]


def _sandbox_pids(configs: dict[str, Path]) -> dict[str, int]:
    pids = {}
    for name, config in configs.items():
        live = ProcessRecord(config.parent).live()
        pids[name] = live[SANDBOX][1].pid
    return pids


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _finished(events: Path) -> bool:
    """Whether a job's event file records its run's end."""
    if not events.exists():
        return False
    lines = events.read_text(encoding="utf-8").splitlines()
    return any(json.loads(line)["kind"] == "run_finished" for line in lines if line.strip())


def _wait(condition: Any, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory: pytest.TempPathFactory) -> Comparisons:
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny6").mkdir()
    models = build_default_models(root / "models", source=save_tiny_bert(root / "tiny6", layers=6))
    data = write_demo_data(root / "data", 2, rows_per_node=40, seed=5)
    topology = Topology.create(sorted(data), loopback=True)
    addresses = ProviderAddresses(topology.provider.address, free_port(), free_port(), free_port())

    def catalog(ws: ProviderWorkspace, folder: Path) -> Path:
        return publish_default_catalog(ws, folder, root / "models", build=lambda out: models)

    deployment = provision_loopback(
        root,
        model_dir=models["minilm-l6"],
        node_data=data,
        key_broker_port=addresses.broker_port,
        threads=1,
        provider_host=addresses.host,
        catalog=catalog,
        # The first node's operator keeps a model of its own: the "1" of 1+N.
        local_models={sorted(data)[0]: models["minilm-l1"]},
    )
    assert deployment.catalog is not None
    configs = deployment.node_configs
    for config in configs.values():
        approve(config, app_digest())
    spec = make_spec(
        models["minilm-l6"],
        job_id="compare",
        labels=tuple(sorted(DEMO_LABELS)),
        num_rounds=1,
        local_steps=2,
        batch_size=8,
        max_length=48,
        round_timeout=150.0,
        expected_nodes=2,
        min_nodes=2,
    )
    run_config = write_job_config(root / "base.toml", spec)
    log: list[str] = []
    cmds = PartyCommands(topology, deployment.provider.root, configs, addresses, say=log.append)
    run = Comparisons(deployment)
    first = next(iter(topology.nodes.values()))
    audit = [
        "--log",
        addresses.broker,
        "--key",
        str(deployment.provider.log_vkey),
        "--state",
        str(root / "auditor"),
    ]
    try:
        cmds.start_provider()
        cmds.register_nodes()
        cmds.start_nodes()
        run.sandboxes_before = _sandbox_pids(configs)

        run.clean_output = cmds.compare(
            deployment.catalog,
            run_config,
            comparison=CLEAN,
            timeout=600,
            models=len(MODELS),
            with_local=True,
        )
        run.sandboxes_after = _sandbox_pids(configs)
        run.clean_verify = _run(cmds.argv(first, "audit", "verify", *audit))
        journals: list[str] = []
        for config in configs.values():
            journal = config.parent / "journal.jsonl"
            journals += ["--journal", str(journal), "--journal-key", f"{journal}.pub"]
        run.clean_crosscheck = _run(cmds.argv(first, "audit", "crosscheck", *audit, *journals))
        run.results_output = _run(
            cmds.argv(
                topology.provider, "compare", "results", str(comparison_dir(run.provider, CLEAN))
            )
        )

        # The attack: between two models of one comparison, the second node's held-out
        # set changes (rows appended to its data move the split). Its sandbox commits
        # honestly to the set it scores on, so the second model names another root.
        moving = sorted(configs)[1]
        data_path = NodeConfig.load(configs[moving]).data_path
        events = run.provider / "jobs" / f"{MOVED}-minilm-l3" / "events.jsonl"
        proc = subprocess.Popen(
            cmds.argv(
                topology.provider,
                "compare",
                "run",
                str(deployment.catalog),
                str(run_config),
                "--workdir",
                str(run.provider),
                "--comparison",
                MOVED,
                "--model",
                "minilm-l3",
                "--model",
                "minilm-l1",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait(lambda: _finished(events), "the first model's job finished")
            rows = data_path.read_text(encoding="utf-8")
            data_path.write_text(rows + rows.splitlines(keepends=True)[0] * 7, encoding="utf-8")
            run.moved_output, _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        run.moved_verify = _run(cmds.argv(first, "audit", "verify", *audit))
    finally:
        run.survivors = cmds.stop_all()
        topology.close()
    return run


def test_every_model_was_scored_by_every_node_on_one_federation(
    comparisons: Comparisons,
) -> None:
    result = load_comparison(comparison_dir(comparisons.provider, CLEAN))
    own = f"local:{sorted(n.name for n in result.nodes)[0]}"
    assert [m.model_id for m in result.models] == [*MODELS, own]
    assert [m.local for m in result.models] == [False, False, False, True]
    assert len({m.run for m in result.models}) == len(MODELS) + 1
    assert len(result.nodes) == 2
    # Every node scored every catalog model; only the node that keeps a model of its own
    # scored that one (the other declined the local-model run).
    assert sorted((c.model_id, c.node) for c in result.scorecards) == sorted(
        [(model, node.name) for model in MODELS for node in result.nodes]
        + [(own, own.removeprefix("local:"))]
    )
    assert result.missing == ()
    # The nodes' sandboxes started once, for all three models.
    assert comparisons.sandboxes_after == comparisons.sandboxes_before
    assert recommend(result).model_id in [m.model_id for m in result.models]
    html = comparison_dir(comparisons.provider, CLEAN) / "comparison.html"
    assert all(model in html.read_text(encoding="utf-8") for model in MODELS)


def test_every_scorecard_names_its_nodes_committed_root(comparisons: Comparisons) -> None:
    log = comparisons.log()
    roots: dict[str, set[str]] = {}
    for event in log:
        if event["kind"] == "heldout_committed" and event["comparison"] == CLEAN:
            commitment, _ = open_commitment(event["commitment"])
            roots.setdefault(commitment.ueid, set()).add(commitment.root)
    assert len(roots) == 2
    assert all(len(r) == 1 for r in roots.values())
    cards = [
        open_scorecard(e["scorecard"])[0]
        for e in log
        if e["kind"] == "scorecard_logged" and e["comparison"] == CLEAN
    ]
    assert len(cards) == 2 * len(MODELS) + 1
    assert all({card.heldout_root} == roots[card.ueid] for card in cards)
    started = [e for e in log if e["kind"] == "comparison_started" and e["comparison"] == CLEAN]
    assert [m["model_id"] for m in started[0]["models"]] == list(MODELS)


def test_the_audit_passes_and_the_journals_agree(comparisons: Comparisons) -> None:
    verify, crosscheck = comparisons.clean_verify, comparisons.clean_crosscheck
    assert verify is not None
    assert crosscheck is not None
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert crosscheck.returncode == 0, crosscheck.stdout + crosscheck.stderr


def test_compare_results_prints_each_model_and_the_recommendation(
    comparisons: Comparisons,
) -> None:
    results = comparisons.results_output
    assert results is not None
    assert results.returncode == 0, results
    assert all(model in results.stdout for model in MODELS)
    assert "Recommended: " in results.stdout


def test_a_node_scoring_on_another_heldout_set_fails_the_audit(
    comparisons: Comparisons,
) -> None:
    verify = comparisons.moved_verify
    assert verify is not None
    assert verify.returncode == ScorecardRootMismatch.exit_code, verify.stdout + verify.stderr
    assert "held-out" in (verify.stdout + verify.stderr)
    log = comparisons.log()
    roots = {
        open_commitment(e["commitment"])[0].root
        for e in log
        if e["kind"] == "heldout_committed" and e["comparison"] == MOVED
    }
    assert len(roots) == 3  # one node's, and the other's before and after its data moved


def test_nothing_is_left_running(comparisons: Comparisons) -> None:
    assert comparisons.survivors == []
