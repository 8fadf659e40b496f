"""Canary test: private data and base weights never leave, on the wire or in provider files.

Unique canary strings go into every node's training rows and a canary byte pattern into
the base weights. A full run on real processes is captured with tcpdump on loopback;
then every TCP stream and every file the provider side wrote (its workspace with the
SuperLink's ``--database`` and its WAL, the SuperLink and key broker logs, the sealed
distribution) is searched for the canaries, plainly and in base64.

The negative control shows the scan can fail: TLS, envelopes and the egress guard off,
and a ClientApp that echoes a training row and a slice of the weights. The scan must
then find both kinds of canary.

The protected run (tests/scenarios.py) is also the two-node, two-round run whose
training, attestation, gateway and audit tests/test_e2e.py checks: one run, read twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sandbox.config import PROTECTION_OFF
from sandbox.launcher import fab_digest
from sandbox.ops.apps import build_fab
from sandbox.ops.federation import Federation, write_run_config
from sandbox.ops.provision import init_unprotected_nodes
from tests.canary import LoopbackCapture, files_under, find_canaries
from tests.conftest import APP_DIR
from tests.scenarios import WEIGHTS, ProtectedRun, canary_spec, captured, plant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _provider_files(workdir: Path) -> list[Path]:
    """Everything the provider side wrote during and after the run."""
    roots = [
        workdir / "provider",  # keys, policy, superlink.db (+ -wal, -shm), job outputs
        workdir / "distribution",  # the sealed package the provider shipped
        workdir / "logs" / "superlink.log",
        workdir / "logs" / "key-broker.log",
    ]
    files = list(files_under(roots))
    names = {p.name for p in files}
    assert "superlink.db" in names, "the SuperLink kept no database"
    return files


def test_no_canary_leaves_a_protected_run(protected_run: ProtectedRun) -> None:
    """The run (tests/scenarios.py) is captured from the first process to the last."""
    assert protected_run.outcome.ok, protected_run.outcome.details
    files = _provider_files(protected_run.workdir)
    leaks = find_canaries(protected_run.canaries, files, protected_run.streams)
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
    model, data, canaries = plant(tmp_path, tiny_bert_dir)
    app = _leaky_app(tmp_path)
    digest = fab_digest(build_fab(app, tmp_path / "fab").read_bytes())
    configs = init_unprotected_nodes(tmp_path, data, approved_apps=(digest,))
    spec = canary_spec(tmp_path, model, protection=PROTECTION_OFF)
    run_config = write_run_config(tmp_path / "run.toml", spec.to_run_config())
    federation.tls_on = False
    federation.node_auth = False

    with LoopbackCapture(tmp_path / "capture.pcap") as capture:
        federation.start_superlink()
        federation.start_nodes(configs)
        outcome = federation.wait(federation.submit(app, run_config), timeout=600)
        assert outcome.ok, outcome.details
        federation.stop()
    streams = captured(capture)

    on_the_wire = find_canaries(canaries, [], streams)
    in_provider_files = find_canaries(canaries, _provider_files(tmp_path))
    for found in (on_the_wire, in_provider_files):
        assert WEIGHTS in found, f"the weight canary went unseen: {found}"
        assert set(found) - {WEIGHTS}, f"no training-row canary was seen: {found}"
    places = [where for found in in_provider_files.values() for where in found]
    assert any("superlink.db" in where for where in places), places
