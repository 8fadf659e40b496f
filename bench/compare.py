"""The model catalog (issue 16): comparing N models on one federation against N single runs.

**One comparison against three single runs**, side by side in one run of the bench. The
three models are the default catalog's (MiniLM-L6, -L3, -L1, built offline from the
installed MiniLM), the data is the demo's (3 nodes), the budget the demo's (2 rounds of
12 local steps). Each side runs on fresh test hosts (a network namespace per party where
the machine allows it, else loopback) with each party's own commands:

* a **single run** of model M: ``ark provider start``, ``register-node``, ``ark node
  start`` on every node host (each node's sandbox attests and unseals M), ``ark provider
  submit`` of one job, then every party's stop;
* the **comparison**: the same start (the sandboxes unseal the catalog's first model),
  ``ark compare run`` of the three models one after another on that federation (each run
  attests and unseals its model in every sandbox), then every party's stop.

Each is timed from the provider's start to the last stop, so the federation, the
gateway and the sandboxes starting (once for the comparison, three times for the single
runs) are in the figures; sealing and provisioning, which both sides do once per model,
are not. The ratio is the comparison's wall time over the sum of the three single runs'
(goal: at most 1.0). Repeats alternate which side runs first, and medians are reported.

The scorecard figure (1,000 scorecards verified by the auditor in under 2 s) is measured
with the log's other figures in ``bench/translog.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.config import TASK_CLASSIFICATION, RunSpec
from sandbox.ops.apps import approve_app_dir, project_root
from sandbox.ops.catalog_models import DEFAULT_MODELS, build_default_models, publish_default_catalog
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.deployment import PartyCommands
from sandbox.ops.federation import free_port, write_job_config
from sandbox.ops.netns import Topology, netns_unavailable
from sandbox.ops.parties import ProviderAddresses
from sandbox.ops.provision import LoopbackDeployment, ProviderWorkspace, provision_loopback

NODES = 3
ROUNDS = 2
REPEATS = 1
JOB_TIMEOUT = 1800.0

Say = Callable[[str], Any]


def _run_config(path: Path, model_dir: Path, job_id: str, rounds: int, nodes: int) -> Path:
    """A job's run config as a provider writes it (its workspace fills in the rest)."""
    spec = RunSpec(
        job_id=job_id,
        task=TASK_CLASSIFICATION,
        model_path=model_dir,
        labels=tuple(sorted(DEMO_LABELS)),
        num_rounds=rounds,
        min_nodes=2,
        expected_nodes=nodes,
        round_timeout=600.0,
    )
    return write_job_config(path, spec)


def _session(
    root: Path,
    data: dict[str, Path],
    model_dir: Path,
    catalog: Callable[[ProviderWorkspace, Path], Path] | None,
    work: Callable[[PartyCommands, LoopbackDeployment], None],
) -> float:
    """Provision (untimed), then time one federation's life on fresh test hosts: the
    parties start, ``work`` runs, every party stops. Raises if anything is left."""
    names = list(data)
    with Topology.create(names, loopback=netns_unavailable() is not None) as topology:
        addresses = (
            ProviderAddresses(topology.provider.address, free_port(), free_port(), free_port())
            if topology.loopback
            else ProviderAddresses(topology.provider.address)
        )
        deployment = provision_loopback(
            root,
            model_dir=model_dir,
            node_data=data,
            key_broker_port=addresses.broker_port,
            model_id=model_dir.name,
            threads=1,
            provider_host=addresses.host,
            catalog=catalog,
        )
        approve_app_dir(project_root(), list(deployment.node_configs.values()), root / "fab")
        cmds = PartyCommands(topology, deployment.provider.root, deployment.node_configs, addresses)
        started = time.monotonic()
        try:
            cmds.start_provider()
            cmds.register_nodes()
            cmds.start_nodes()
            work(cmds, deployment)
        finally:
            survivors = cmds.stop_all()
        seconds = time.monotonic() - started
    if survivors:
        raise RuntimeError(f"processes left after stopping every party: {survivors}")
    return seconds


def single_run(models: dict[str, Path], model_id: str, rounds: int, nodes: int) -> float:
    """One model's job on a federation of its own (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix=f"ark-bench-single-{model_id}-") as tmp:
        root = Path(tmp)
        data = write_demo_data(root / "data", nodes)
        config = _run_config(
            root / "job.toml", models[model_id], f"single-{model_id}", rounds, nodes
        )

        def submit(cmds: PartyCommands, _: LoopbackDeployment) -> None:
            cmds.submit(config, timeout=JOB_TIMEOUT)

        return _session(root, data, models[model_id], None, submit)


def comparison_run(models: dict[str, Path], rounds: int, nodes: int) -> float:
    """The three models compared on one federation (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="ark-bench-compare-") as tmp:
        root = Path(tmp)
        data = write_demo_data(root / "data", nodes)
        first = next(iter(models))
        config = _run_config(root / "base.toml", models[first], "compare", rounds, nodes)

        def catalog(ws: ProviderWorkspace, folder: Path) -> Path:
            return publish_default_catalog(ws, folder, root / "models", build=lambda _: models)

        def compare(cmds: PartyCommands, deployment: LoopbackDeployment) -> None:
            assert deployment.catalog is not None
            cmds.compare(
                deployment.catalog,
                config,
                comparison="bench",
                timeout=JOB_TIMEOUT,
                models=len(models),
            )

        return _session(root, data, models[first], catalog, compare)


def compare_bench(
    repeats: int = REPEATS, rounds: int = ROUNDS, nodes: int = NODES, say: Say = print
) -> dict[str, Any]:
    """``repeats`` comparisons and as many sets of three single runs, alternating which
    side goes first; medians and the ratio of the medians."""
    with tempfile.TemporaryDirectory(prefix="ark-bench-catalog-models-") as tmp:
        models = build_default_models(Path(tmp))
        comparisons: list[float] = []
        singles: list[dict[str, float]] = []

        def singles_side() -> None:
            times = {}
            for model_id in models:
                times[model_id] = single_run(models, model_id, rounds, nodes)
                say(f"single run of {model_id}: {times[model_id]:.1f} s")
            singles.append(times)

        def comparison_side() -> None:
            comparisons.append(comparison_run(models, rounds, nodes))
            say(f"comparison of {len(models)} models: {comparisons[-1]:.1f} s")

        for repeat in range(repeats):
            sides = (comparison_side, singles_side)
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                side()
    sums = [sum(s.values()) for s in singles]
    median_comparison = statistics.median(comparisons)
    median_sum = statistics.median(sums)
    return {
        "models": {m: DEFAULT_MODELS[m].description for m in models},
        "nodes": nodes,
        "rounds": rounds,
        "local_steps": RunSpec.local_steps,
        "repeats": repeats,
        "hosts": "loopback" if netns_unavailable() else "netns",
        "measure": "provider start to the last party's stop (provisioning and sealing, done "
        "once per model on both sides, excluded)",
        "comparison_seconds": comparisons,
        "single_seconds": singles,
        "median_comparison_seconds": median_comparison,
        "median_single_sum_seconds": median_sum,
        "median_single_seconds": {m: statistics.median(s[m] for s in singles) for m in models},
        "comparison_over_singles": median_comparison / median_sum,
    }
