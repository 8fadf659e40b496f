"""Real-process runs that several tests read: each runs once, the tests only look.

Starting a federation of real Flower processes costs most of an end-to-end test, so a
run whose outcome several properties can be read from is shared instead of repeated:
the protected canary run (tests/test_canary.py) is also the two-node, two-round run
over TLS whose training, attestation, gateway and audit tests/test_e2e.py checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from sandbox.config import NodeConfig, RunSpec
from sandbox.ops.apps import approve
from sandbox.ops.cli import app as cli
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.federation import RunOutcome, free_port, write_run_config
from sandbox.ops.provision import LoopbackDeployment, provision_loopback
from tests.canary import (
    LoopbackCapture,
    Streams,
    find_canaries,
    plant_text_canaries,
    plant_weight_canary,
    read_pcap,
)
from tests.conftest import APP_DIR, app_digest, checked_federation, make_spec

CANARY_NODES = 2
WEIGHTS = "weights"


def plant(workdir: Path, model_dir: Path) -> tuple[Path, dict[str, Path], dict[str, bytes]]:
    """A canaried copy of the model, canaried node data, and every canary by name."""
    model = workdir / "model"
    weight_canary = plant_weight_canary(model_dir, model)
    data = write_demo_data(workdir / "data", CANARY_NODES, rows_per_node=30, seed=5)
    canaries = plant_text_canaries(data)
    canaries[WEIGHTS] = weight_canary
    # The scan finds every canary where it was planted, so a clean scan later means something.
    found = find_canaries(canaries, [model / "model.safetensors", *data.values()])
    assert set(found) == set(canaries), found
    return model, data, canaries


def canary_spec(workdir: Path, model: Path, **overrides: Any) -> RunSpec:
    """The canary runs' job: one round on every node unless ``overrides`` say otherwise."""
    values: dict[str, Any] = {
        "job_id": "canary",
        "num_rounds": 1,
        "batch_size": 8,
        "max_length": 48,
        "round_timeout": 120.0,
        "expected_nodes": CANARY_NODES,
        "output_dir": workdir / "provider" / "job",
        "labels": tuple(sorted(DEMO_LABELS)),
        **overrides,
    }
    return make_spec(model, **values)


def captured(capture: LoopbackCapture) -> Streams:
    """The capture's TCP streams, once it is known to be complete and not empty."""
    assert capture.dropped == 0, "tcpdump dropped packets; the scan would be incomplete"
    streams = read_pcap(capture.path)
    assert streams.total_bytes > 100_000, "the capture saw almost no traffic"
    return streams


@dataclass(frozen=True)
class Audit:
    """What the auditor's three commands said about a run, while its log was served."""

    verified: Result
    crosschecked: Result
    written: Result
    report: Path


@dataclass(frozen=True)
class ProtectedRun:
    """A finished two-node, two-round sealed run over TLS, captured on loopback, with
    canaries planted in the node data and the base weights."""

    workdir: Path
    model: Path
    canaries: dict[str, bytes]
    deployment: LoopbackDeployment
    spec: RunSpec
    outcome: RunOutcome
    node_address: str
    supernode_argv: dict[str, list[str]]
    audit: Audit
    streams: Streams

    @property
    def configs(self) -> dict[str, Path]:
        return self.deployment.node_configs

    @property
    def provider_home(self) -> Path:
        return self.workdir / "provider"


def _audit(workdir: Path, deployment: LoopbackDeployment) -> Audit:
    """``ark audit verify``, ``crosscheck`` (both node journals) and ``report`` against the
    log served beside the key broker, as an auditor runs them after the job."""
    runner = CliRunner()
    log = deployment.key_broker  # the log is served beside the key broker
    key = deployment.provider.log_vkey
    verified = runner.invoke(
        cli, ["audit", "verify", "--log", log, "--key", str(key), "--state", str(workdir / "a")]
    )
    journals = [str(NodeConfig.load(c).journal_path) for c in deployment.node_configs.values()]
    crosschecked = runner.invoke(
        cli,
        ["audit", "crosscheck", "--log", log, "--key", str(key)]
        + [arg for path in journals for arg in ("--journal", path)],
    )
    report = workdir / "report.html"
    written = runner.invoke(
        cli, ["audit", "report", "--log", log, "--key", str(key), "--html", str(report)]
    )
    return Audit(verified, crosschecked, written, report)


def run_protected(workdir: Path, model_dir: Path) -> ProtectedRun:
    """Plant canaries, provision, and run two rounds on two nodes under ``tcpdump``; the
    auditor checks the log before everything stops (the capture covers the shutdown)."""
    model, data, canaries = plant(workdir, model_dir)
    deployment = provision_loopback(
        workdir, model_dir=model, node_data=data, key_broker_port=free_port(), threads=1
    )
    for config in deployment.node_configs.values():
        approve(config, app_digest())
    spec = canary_spec(
        workdir,
        model,
        num_rounds=2,
        aggregator_dir=deployment.provider.aggregator,
        log_db=deployment.provider.log_db,
    )
    run_config = write_run_config(workdir / "run.toml", spec.to_run_config())
    with (
        LoopbackCapture(workdir / "capture.pcap") as capture,
        checked_federation(workdir) as federation,
    ):
        federation.start_key_broker(int(deployment.key_broker.rsplit(":", 1)[1]))
        federation.start_superlink()
        federation.start_nodes(deployment.node_configs)
        outcome = federation.wait(federation.submit(APP_DIR, run_config), timeout=600)
        assert outcome.ok, outcome.details
        argv = {
            name: [str(arg) for arg in proc.popen.args]  # type: ignore[union-attr]
            for name, proc in federation.supernodes.items()
        }
        audit = _audit(workdir, deployment)
        node_address = federation.node_address
    return ProtectedRun(
        workdir=workdir,
        model=model,
        canaries=canaries,
        deployment=deployment,
        spec=spec,
        outcome=outcome,
        node_address=node_address,
        supernode_argv=argv,
        audit=audit,
        streams=captured(capture),
    )
