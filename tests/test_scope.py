"""What ships is what is measured: the FAB and both code measurements cover exactly the
code that runs inside a node or aggregator sandbox, never the operator tooling."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from sandbox.attestation.measure import SANDBOX_CODE
from sandbox.launcher import fab_digest
from sandbox.ops.apps import build_fab

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sandbox", "server", "clients", "protos")
MEASURE = (
    "import json; from sandbox.attestation.measure import AGGREGATOR_PACKAGES, "
    "NODE_PACKAGES, code_measurement; print(json.dumps([code_measurement(NODE_PACKAGES), "
    "code_measurement(AGGREGATOR_PACKAGES)]))"
)


def test_pyproject_fab_patterns_are_the_measured_scope() -> None:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]
    assert tuple(app["app"]["fab-include"]) == SANDBOX_CODE.include
    assert tuple(app["app"]["fab-exclude"]) == SANDBOX_CODE.exclude


def test_the_apps_import_only_sandbox_code() -> None:
    """Every module the ClientApp, the ServerApp and the node's ``flwr-clientapp``
    launcher (the process the ClientApp runs in) load from this project is in scope:
    nothing a sandbox runs lives in the operator tooling."""
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; import clients.app, server.app, sandbox.launcher; "
            "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded = json.loads(listing.stdout.splitlines()[-1])
    ours = {
        Path(path).resolve().relative_to(ROOT).as_posix()
        for name, path in loaded.items()
        if path and name.split(".")[0] in PACKAGES and Path(path).resolve().is_relative_to(ROOT)
    }
    assert "clients/app.py" in ours
    assert "server/app.py" in ours
    assert "sandbox/launcher.py" in ours
    assert sorted(name for name in ours if not SANDBOX_CODE.covers(name)) == []
    assert not any(name.startswith("sandbox.ops") for name in loaded)


def _fingerprint(project: Path, out: Path) -> tuple[str, str, str]:
    """(FAB digest, node code measurement, aggregator code measurement) of a project copy."""
    fab = fab_digest(build_fab(project, out).read_bytes())
    for old in out.glob("*.fab"):
        old.unlink()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE],
        cwd=project,
        env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    node, aggregator = json.loads(done.stdout)
    return fab, node, aggregator


def test_tooling_edits_change_nothing_nodes_approved_and_sandbox_edits_change_all(
    tmp_path: Path,
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "fab"
    before = _fingerprint(project, out)

    # Operator tooling: the audit report's styling, the CLI, the key broker's service.
    for tooling in ("sandbox/ops/translog/report.py", "sandbox/ops/cli/demo.py"):
        with (project / tooling).open("a", encoding="utf-8") as handle:
            handle.write("# restyled\n")
    assert _fingerprint(project, out) == before

    # Sandbox code: the streaming AEAD both sides run.
    with (project / "sandbox/seal/stream.py").open("a", encoding="utf-8") as handle:
        handle.write("# changed\n")
    after = _fingerprint(project, out)
    assert [a != b for a, b in zip(after, before, strict=True)] == [True, True, True]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_layout_rules_hold() -> None:
    """DESIGN.md's rules: sandbox code imports neither server, clients nor the tooling;
    server and clients never import each other; only the CLI reaches across."""
    broken = []
    for package in PACKAGES[:3]:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            tops = {module.split(".")[0] for module in _imports(path)}
            reaches_tooling = any(m.startswith("sandbox.ops") for m in _imports(path))
            if name.startswith("sandbox/ops/cli/"):
                continue
            if name.startswith("sandbox/") and tops & {"server", "clients"}:
                broken.append(name)
            if SANDBOX_CODE.covers(name) and reaches_tooling:
                broken.append(name)
            if name.startswith("server/") and "clients" in tops:
                broken.append(name)
            if name.startswith("clients/") and "server" in tops:
                broken.append(name)
    assert broken == []
