"""Bad input to ``ark``: a clear message naming the path or value, non-zero exit, no processes."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import ConfigError
from sandbox.ops.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_processes_left() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after - before == set(), "the command left processes behind"


def _demo(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path / "ws"), *args])
    return result.exit_code, result.output


def test_model_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    code, output = _demo(tmp_path, "--model", str(missing))
    assert code == 2
    assert str(missing) in output.replace("\n", "")
    assert "does not exist" in output


def test_model_dir_without_weights(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    code, output = _demo(tmp_path, "--model", str(model))
    assert code == 2
    assert "no *.safetensors weights" in output


def test_unsupported_architecture(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "not-a-model"
    (model / "config.json").write_text(json.dumps(config))
    code, output = _demo(tmp_path, "--model", str(model))
    assert code == 2
    assert "unsupported architecture 'not-a-model'" in output


def test_bad_data_file_names_file_and_row(tmp_path: Path, tiny_bert_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "alpha.jsonl").write_text('{"text": "pole down", "label": "line"}\n', encoding="utf-8")
    (data / "beta.jsonl").write_text(
        '{"text": "meter broken", "label": "meter"}\n{"text": "x", "colour": "red"}\n',
        encoding="utf-8",
    )
    code, output = _demo(
        tmp_path, "--model", str(tiny_bert_dir), "--data-dir", str(data), "--nodes", "2"
    )
    assert code == 2
    flat = output.replace("\n", "")
    assert "beta.jsonl" in flat
    assert "row 2" in flat


def test_port_already_taken(tmp_path: Path, tiny_bert_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = _demo(
            tmp_path, "--model", str(tiny_bert_dir), "--port", str(port), "--hosts", "loopback"
        )
    assert code == 2
    assert f"port {port}" in output
    assert "already in use" in output


def test_unknown_hosts_mode_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    code, output = _demo(tmp_path, "--model", str(tiny_bert_dir), "--hosts", "cloud")
    assert code == 2
    assert "--hosts must be one of auto, netns, loopback, got 'cloud'" in output


def test_node_count_below_minimum(tmp_path: Path) -> None:
    code, output = _demo(tmp_path, "--nodes", "1")
    assert code == 2
    assert "--nodes 1 is below the minimum of 2" in output


def test_check_data_reports_counts(tmp_path: Path) -> None:
    path = tmp_path / "node.jsonl"
    rows = [{"text": f"ticket {i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["node", "check-data", str(path)])
    assert result.exit_code == 0, result.output
    assert "10 rows (8 train, 2 held out)" in result.output


def test_run_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"key 'mode'.*'fedprox'"):
        RunSpec.from_run_config({"model-path": "/m", "labels": '["a","b"]', "mode": "fedprox"})
    with pytest.raises(ConfigError, match=r"key 'labels'"):
        RunSpec.from_run_config({"model-path": "/m", "labels": "a,b"})
    with pytest.raises(ConfigError, match=r"key 'num-rounds'.*at least 1"):
        RunSpec.from_run_config({"model-path": "/m", "labels": '["a","b"]', "num-rounds": 0})


def test_run_config_round_trip() -> None:
    spec = RunSpec.from_run_config(
        {"model-path": "/m", "labels": '["a","b"]', "mode": "ffa", "lora-target-modules": "q,v"}
    )
    assert RunSpec.from_run_config(spec.to_run_config()) == spec


def test_node_config_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "a"\ndata-path = "d.jsonl"\nthreads = "two"\n')
    with pytest.raises(ConfigError, match=r"node\.toml: key 'threads'.*'two'"):
        NodeConfig.load(path)
    path.write_text('[node]\nname = "a"\ndata-path = "d.jsonl"\ncolour = 1\n')
    with pytest.raises(ConfigError, match=r"key 'node\.colour'"):
        NodeConfig.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        NodeConfig.load(tmp_path / "missing.toml")


def test_node_config_round_trip(tmp_path: Path) -> None:
    config = NodeConfig(
        name="alpine", data_path=tmp_path / "d.jsonl", threads=2, journal_path=tmp_path / "j.jsonl"
    )
    path = tmp_path / "node.toml"
    path.write_text(config.to_toml())
    loaded = NodeConfig.load(path)
    assert loaded == NodeConfig(**{**config.__dict__, "source": path})


def test_audit_checkpoints_detects_a_tampered_adapter(tmp_path: Path) -> None:
    import numpy as np

    from server.checkpoint import CheckpointStore, JobState

    store = CheckpointStore(tmp_path / "job" / "checkpoints")
    state = JobState(fingerprint="f" * 64, round=1)
    state.history.round(0).held_out["1"] = {"accuracy": 0.5}  # final at round 1: archived
    store.save(state, {"w": np.ones((2, 2), dtype=np.float32)})
    result = runner.invoke(app, ["audit", "checkpoints", str(tmp_path / "job")])
    assert result.exit_code == 0, result.output
    assert "round 1 adapter (1 tensors) matches its digest" in result.output
    assert "the records of 1 archived round(s) match theirs" in result.output

    records = store.history_path(0)
    records.write_text(records.read_text().replace("0.5", "0.9"))
    result = runner.invoke(app, ["audit", "checkpoints", str(tmp_path / "job")])
    assert result.exit_code == 2
    assert "history-0000.json: digest does not match" in " ".join(result.output.split())
    records.unlink()

    adapter = store.adapter_path(1)
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01
    adapter.write_bytes(bytes(data))
    result = runner.invoke(app, ["audit", "checkpoints", str(tmp_path / "job")])
    assert result.exit_code == 2
    assert "digest does not match" in result.output


def test_provider_results_names_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["provider", "results", str(tmp_path)])
    assert result.exit_code == 2
    assert str(tmp_path / "results.json") in result.output


def test_node_install_launcher_writes_the_shim_first_on_path(tmp_path: Path) -> None:
    result = runner.invoke(app, ["node", "install-launcher", "--bin", str(tmp_path / "bin")])
    assert result.exit_code == 0, result.output
    launcher = tmp_path / "bin" / "flwr-clientapp"
    assert launcher.stat().st_mode & 0o111
    first = launcher.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#!")
    assert first.endswith(" -IS")
