"""Canary test: private data and base weights never leave, on the wire or in provider files.

Unique canary strings go into every node's training rows and a canary byte pattern into
the base weights. A full run on real processes is captured with tcpdump on loopback;
then every TCP stream and every file the provider side wrote (its workspace with the
SuperLink's ``--database`` and its WAL, the SuperLink and key broker logs, the sealed
distribution) is searched for the canaries, plainly and in base64.

The negative control shows the scan can fail: TLS, envelopes and the egress guard off,
and a ClientApp that echoes a training row and a slice of the weights. The scan must
then find both kinds of canary.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from sandbox.config import PROTECTION_OFF, RunSpec
from sandbox.launcher import fab_digest
from sandbox.ops.apps import approve, build_fab
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.federation import Federation, free_port, write_run_config
from sandbox.ops.provision import init_unprotected_nodes, provision_loopback
from tests.canary import (
    LoopbackCapture,
    Streams,
    files_under,
    find_canaries,
    plant_text_canaries,
    plant_weight_canary,
    read_pcap,
)
from tests.conftest import APP_DIR, app_digest, make_spec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NODES = 2
WEIGHTS = "weights"


def _planted(tmp_path: Path, tiny_bert_dir: Path) -> tuple[Path, dict[str, Path], dict[str, bytes]]:
    """A canaried copy of the model, canaried node data, and every canary by name."""
    model = tmp_path / "model"
    weight_canary = plant_weight_canary(tiny_bert_dir, model)
    data = write_demo_data(tmp_path / "data", NODES, rows_per_node=30, seed=5)
    canaries = plant_text_canaries(data)
    canaries[WEIGHTS] = weight_canary
    # The scan finds every canary where it was planted, so a clean scan later means something.
    found = find_canaries(canaries, [model / "model.safetensors", *data.values()])
    assert set(found) == set(canaries), found
    return model, data, canaries


def _spec(tmp_path: Path, model: Path, **overrides: Any) -> RunSpec:
    values: dict[str, Any] = {
        "job_id": "canary",
        "num_rounds": 1,
        "batch_size": 8,
        "max_length": 48,
        "round_timeout": 120.0,
        "expected_nodes": NODES,
        "output_dir": tmp_path / "provider" / "job",
        "labels": tuple(sorted(DEMO_LABELS)),
        **overrides,
    }
    return make_spec(model, **values)


def _provider_files(tmp_path: Path) -> list[Path]:
    """Everything the provider side wrote during and after the run."""
    roots = [
        tmp_path / "provider",  # keys, policy, superlink.db (+ -wal, -shm), job outputs
        tmp_path / "distribution",  # the sealed package the provider shipped
        tmp_path / "logs" / "superlink.log",
        tmp_path / "logs" / "key-broker.log",
    ]
    files = list(files_under(roots))
    names = {p.name for p in files}
    assert "superlink.db" in names, "the SuperLink kept no database"
    return files


def _run(federation: Federation, configs: dict[str, Path], run_config: Path, app: Path) -> None:
    federation.start_superlink()
    federation.start_nodes(configs)
    outcome = federation.wait(federation.submit(app, run_config), timeout=600)
    assert outcome.ok, outcome.details


def _captured(capture: LoopbackCapture) -> Streams:
    assert capture.dropped == 0, "tcpdump dropped packets; the scan would be incomplete"
    streams = read_pcap(capture.path)
    assert streams.total_bytes > 100_000, "the capture saw almost no traffic"
    return streams


def test_no_canary_leaves_a_protected_run(
    tmp_path: Path, tiny_bert_dir: Path, federation: Federation
) -> None:
    model, data, canaries = _planted(tmp_path, tiny_bert_dir)
    deployment = provision_loopback(
        tmp_path, model_dir=model, node_data=data, key_broker_port=free_port(), threads=1
    )
    for config in deployment.node_configs.values():
        approve(config, app_digest())
    spec = _spec(
        tmp_path,
        model,
        aggregator_dir=deployment.provider.aggregator,
        log_db=deployment.provider.log_db,
    )
    run_config = write_run_config(tmp_path / "run.toml", spec.to_run_config())

    with LoopbackCapture(tmp_path / "capture.pcap") as capture:
        federation.start_key_broker(int(deployment.key_broker.rsplit(":", 1)[1]))
        _run(federation, deployment.node_configs, run_config, APP_DIR)
        federation.stop()
    streams = _captured(capture)

    leaks = find_canaries(canaries, _provider_files(tmp_path), streams)
    assert leaks == {}, f"canaries left the nodes: {leaks}"


def _leaky_app(tmp_path: Path) -> Path:
    """A copy of this app whose ClientApp is ``tests/leaky_clientapp.py``."""
    app = tmp_path / "leaky-app"
    for package in ("sandbox", "server", "clients", "protos"):
        shutil.copytree(
            APP_DIR / package, app / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    leaky_module = Path(__file__).with_name("leaky_clientapp.py")
    shutil.copyfile(leaky_module, app / "clients" / "canary_leak.py")
    pyproject = (APP_DIR / "pyproject.toml").read_text(encoding="utf-8")
    leaky = pyproject.replace(
        'clientapp = "clients.app:app"', 'clientapp = "clients.canary_leak:app"'
    )
    assert leaky != pyproject
    (app / "pyproject.toml").write_text(leaky, encoding="utf-8")
    return app


def test_the_scan_finds_both_canaries_when_protections_are_off(
    tmp_path: Path, tiny_bert_dir: Path, federation: Federation
) -> None:
    model, data, canaries = _planted(tmp_path, tiny_bert_dir)
    app = _leaky_app(tmp_path)
    digest = fab_digest(build_fab(app, tmp_path / "fab").read_bytes())
    configs = init_unprotected_nodes(tmp_path, data, approved_apps=(digest,))
    spec = _spec(tmp_path, model, protection=PROTECTION_OFF)
    run_config = write_run_config(tmp_path / "run.toml", spec.to_run_config())
    federation.tls_on = False
    federation.node_auth = False

    with LoopbackCapture(tmp_path / "capture.pcap") as capture:
        _run(federation, configs, run_config, app)
        federation.stop()
    streams = _captured(capture)

    on_the_wire = find_canaries(canaries, [], streams)
    in_provider_files = find_canaries(canaries, _provider_files(tmp_path))
    for found in (on_the_wire, in_provider_files):
        assert WEIGHTS in found, f"the weight canary went unseen: {found}"
        assert set(found) - {WEIGHTS}, f"no training-row canary was seen: {found}"
    places = [where for found in in_provider_files.values() for where in found]
    assert any("superlink.db" in where for where in places), places
