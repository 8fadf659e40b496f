"""The node's ClientApp launcher pool and its shim, as real processes.

The pool (``ark node launch-pool``) forks a child per start request; the shim (the
node's ``bin/flwr-clientapp``) hands over its arguments and standard streams and exits
with the child's status. These tests run both for real: what the child writes reaches
the shim's own stderr, its exit status comes back, a hostile request forks nothing, a
shim that dies takes its child with it, and a shim with no pool runs the cold launcher.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sandbox.errors import ConfigError, ProtocolError
from sandbox.launcher import NODE_CONFIG_ENV, install_launcher
from sandbox.launcher_shim import POOL_ENV
from sandbox.localsocket import prepare_socket
from sandbox.warmstart import POOL_READY, check_argv, pool_socket

ARK = str(Path(sys.executable).parent / "ark")
FORKED = re.compile(r"ClientApp start forked as pid (\d+)")
# A start as Flower's SubprocessExecutor makes one: no Runtime API listens on port 9, so
# Flower's runtime in the child keeps retrying until it is stopped.
FLOWER_ARGV = ["--runtime-api-address", "127.0.0.1:9", "--token", "t0k3n", "--insecure"]


@dataclass
class Pool:
    proc: subprocess.Popen[bytes]
    log: Path
    socket: Path
    shim: Path
    env: dict[str, str]

    def forked(self) -> list[int]:
        return [int(pid) for pid in FORKED.findall(self.log.read_text(encoding="utf-8"))]

    def run_shim(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.shim), *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _node(tmp_path: Path) -> Path:
    config = tmp_path / "node" / "node.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[node]\nname = "pool"\ndata-path = "d.jsonl"\n', encoding="utf-8")
    return config


@contextmanager
def _running_pool(tmp_path: Path, node_config_env: Path | None) -> Iterator[Pool]:
    """A real launch pool; its children get ``node_config_env`` as the node config (as
    the SuperNode's environment names it), or none."""
    config = _node(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in (NODE_CONFIG_ENV, POOL_ENV)}
    if node_config_env is not None:
        env[NODE_CONFIG_ENV] = str(node_config_env)
    log = tmp_path / "pool.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ARK, "node", "launch-pool", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    path = pool_socket(config)
    shim_env = {**env, POOL_ENV: str(path)}
    pool = Pool(proc, log, path, install_launcher(tmp_path / "bin"), shim_env)
    try:
        deadline = time.monotonic() + 120
        while POOL_READY not in log.read_text(encoding="utf-8"):
            assert proc.poll() is None, log.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, "the pool never served"
            time.sleep(0.1)
        yield pool
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not path.exists(), "the pool left its socket behind"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    """A pool whose environment names no node config, so its children stop in the node
    launcher's first check (quickly, with a message on stderr)."""
    with _running_pool(tmp_path, None) as running:
        yield running


def test_flowers_arguments_pass_and_nothing_else_does() -> None:
    assert check_argv(FLOWER_ARGV) == FLOWER_ARGV
    assert check_argv([*FLOWER_ARGV, "--parent-pid", "12"]) == [*FLOWER_ARGV, "--parent-pid", "12"]
    for bad in (
        [*FLOWER_ARGV, "--exec", "sh"],
        ["--token"],
        ["-c", "import os"],
        "--insecure",
        [1, 2],
    ):
        with pytest.raises(ProtocolError):
            check_argv(bad)


def test_the_socket_is_the_node_users_only(pool: Pool) -> None:
    assert pool.socket.stat().st_mode & 0o777 == 0o600
    assert pool.socket.parent.stat().st_mode & 0o777 == 0o700


def test_a_start_runs_the_node_launcher_in_a_forked_child_on_the_shims_streams(
    pool: Pool,
) -> None:
    result = pool.run_shim(*FLOWER_ARGV)
    # The node launcher refused (no node config in its environment): its message came
    # out on the shim's own stderr, and its exit status is the shim's.
    assert result.returncode == 1, result
    assert f"{NODE_CONFIG_ENV} is not set" in result.stderr
    assert len(pool.forked()) == 1


def test_a_hostile_start_request_forks_nothing(pool: Pool) -> None:
    for request in (b"not json\n", b'{"argv": ["--exec", "sh"]}\n', b'{"argv": [], "x": 1}\n'):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(pool.socket))
        fds = [0, 1, 2] if request.startswith(b"{") else []
        socket.send_fds(conn, [request], fds)
        assert conn.recv(16) == b"", "the pool answered a refused request"
        conn.close()
    time.sleep(0.5)
    log = pool.log.read_text(encoding="utf-8")
    assert log.count("start request refused") == 3, log
    assert pool.forked() == []
    # Still serving: a well-formed start after them is forked.
    assert pool.run_shim(*FLOWER_ARGV).returncode == 1
    assert len(pool.forked()) == 1


def test_a_shim_that_dies_takes_its_child_with_it(tmp_path: Path) -> None:
    """With a node config, the child gets past the launcher's checks into Flower's
    runtime, which keeps retrying a Runtime API that is not there, until its shim (as
    when its SuperNode is killed) disappears."""
    with _running_pool(tmp_path, _node(tmp_path / "other")) as pool:
        _kill_the_shim_midway(pool)


def _kill_the_shim_midway(pool: Pool) -> None:
    shim = subprocess.Popen(
        [str(pool.shim), *FLOWER_ARGV],
        env=pool.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not pool.forked():
            assert time.monotonic() < deadline, "the pool never forked"
            time.sleep(0.1)
        (child,) = pool.forked()
        assert psutil.Process(child).ppid() == pool.proc.pid
        time.sleep(1.0)
        assert psutil.pid_exists(child), "the child ended before its shim"
        shim.kill()
        shim.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its shim"
            time.sleep(0.1)
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_with_no_pool_the_shim_runs_the_cold_launcher(tmp_path: Path) -> None:
    shim = install_launcher(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k != NODE_CONFIG_ENV}
    env[POOL_ENV] = str(tmp_path / "nobody-listens.sock")
    result = subprocess.run(
        [str(shim), *FLOWER_ARGV], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"{NODE_CONFIG_ENV} is not set" in result.stderr


def test_a_client_that_sends_nothing_holds_no_start_up(pool: Pool) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(pool.socket))
    try:
        started = time.monotonic()
        assert pool.run_shim(*FLOWER_ARGV, timeout=30).returncode == 1
        assert time.monotonic() - started < 20
        assert len(pool.forked()) == 1
    finally:
        silent.close()


def test_a_socket_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(ConfigError, match="symbolic link"):
        prepare_socket(tmp_path / "link" / "api.sock", "node.sandbox-socket")
