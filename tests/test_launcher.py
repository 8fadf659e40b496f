"""The node's launcher and app approval: no unapproved FAB is ever installed.

The end-to-end check (a real SuperNode refusing a real run's app) is in test_e2e.py;
here the gate is driven directly with stand-ins for Flower's pull and install steps.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from sandbox.config import EgressPolicy, NodeConfig
from sandbox.errors import AppNotApproved, ConfigError
from sandbox.journal import read_journal
from sandbox.launcher import NODE_CONFIG_ENV, ApprovalGate, fab_digest, install_launcher
from sandbox.ops.apps import approve
from sandbox.ops.cli import app as cli

FAB = b"PK\x03\x04 a flower app bundle"
OTHER = b"PK\x03\x04 another app"


def _node(tmp_path: Path, approved: tuple[str, ...] = ()) -> NodeConfig:
    node = NodeConfig(
        name="alpine",
        data_path=tmp_path / "d.jsonl",
        journal_path=tmp_path / "journal.jsonl",
        approved_apps=approved,
        egress=EgressPolicy(frozenset({"num-examples"}), 4096),
    )
    (tmp_path / "node.toml").write_text(node.to_toml(), encoding="utf-8")
    return NodeConfig.load(tmp_path / "node.toml")


class Runtime:
    """Stand-ins for Flower's ``pull_task_input`` and ``install_from_fab``."""

    def __init__(self, content: bytes, claimed: str):
        self.fab = SimpleNamespace(content=content, hash_str=claimed)
        self.installed: list[bytes] = []

    def pull(self, client: Any) -> tuple[Any, Any, Any, Any]:
        return "message", "context", SimpleNamespace(run_id=5), self.fab

    def install(self, fab_file: bytes, **kwargs: Any) -> Path:
        self.installed.append(fab_file)
        return Path("/installed")


def _journal(tmp_path: Path) -> list[str]:
    return [entry["kind"] for entry in read_journal(tmp_path / "journal.jsonl")]


def _run(gate: ApprovalGate, runtime: Runtime) -> None:
    _, _, _, fab = gate.pull(object())
    gate.install(fab.content, skip_prompt=True)


def test_an_approved_app_is_installed(tmp_path: Path) -> None:
    runtime = Runtime(FAB, fab_digest(FAB))
    gate = ApprovalGate(_node(tmp_path, (fab_digest(FAB),)), runtime.pull, runtime.install)
    _run(gate, runtime)
    assert runtime.installed == [FAB]
    assert _journal(tmp_path) == ["app_approved"]


def test_an_unapproved_app_is_never_installed(tmp_path: Path) -> None:
    runtime = Runtime(OTHER, fab_digest(OTHER))
    gate = ApprovalGate(_node(tmp_path, (fab_digest(FAB),)), runtime.pull, runtime.install)
    with pytest.raises(AppNotApproved, match=fab_digest(OTHER)):
        _run(gate, runtime)
    assert runtime.installed == []
    assert _journal(tmp_path) == ["app_refused"]


def test_approved_bytes_under_another_apps_name_are_refused(tmp_path: Path) -> None:
    """Flower looks the installed app up by the hash the run claims, not the bytes'."""
    runtime = Runtime(FAB, fab_digest(OTHER))
    gate = ApprovalGate(_node(tmp_path, (fab_digest(FAB),)), runtime.pull, runtime.install)
    with pytest.raises(AppNotApproved, match="names app"):
        _run(gate, runtime)
    assert runtime.installed == []


def test_approve_keeps_the_rest_of_the_node_config(tmp_path: Path) -> None:
    node = _node(tmp_path)
    approved = approve(tmp_path / "node.toml", fab_digest(FAB).upper())
    assert approved.approved_apps == (fab_digest(FAB),)
    assert approved.egress == node.egress
    with pytest.raises(ConfigError, match="approved-apps"):
        approve(tmp_path / "node.toml", "not-a-digest")


def test_ark_node_approve_from_a_fab_file(tmp_path: Path) -> None:
    _node(tmp_path)
    fab = tmp_path / "app.fab"
    fab.write_bytes(FAB)
    config = str(tmp_path / "node.toml")
    done = CliRunner().invoke(cli, ["node", "approve", "--config", config, "--fab", str(fab)])
    assert done.exit_code == 0, done.output
    assert fab_digest(FAB) in done.output
    assert NodeConfig.load(tmp_path / "node.toml").approved_apps == (fab_digest(FAB),)
    both = ["node", "approve", "--config", config, "--fab", str(fab), "--digest", "ab" * 32]
    assert CliRunner().invoke(cli, both).exit_code != 0


def test_the_launcher_answers_to_flower_s_name(tmp_path: Path) -> None:
    launcher = install_launcher(tmp_path / "bin")
    assert launcher.name == "flwr-clientapp"
    assert launcher.stat().st_mode & 0o111
    assert "from sandbox.launcher import main" in launcher.read_text(encoding="utf-8")


def test_the_installed_launcher_refuses_to_start_without_a_node_config(tmp_path: Path) -> None:
    launcher = install_launcher(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k != NODE_CONFIG_ENV}
    done = subprocess.run(
        [str(launcher), "--clientappio-api-address", "127.0.0.1:1", "--token", "t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert f"{NODE_CONFIG_ENV} is not set" in done.stderr
