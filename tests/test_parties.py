"""Each party's own side, without a federation: the PID record, the provider's
certificate for its hosts, node names, and what `ark provider submit` fills in.

The deployment itself (every command on real processes across test hosts, and its
faults) is in test_deploy.py.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from cryptography import x509

from sandbox.errors import ArkError, ConfigError
from sandbox.keyfiles import write_openssh_keypair
from sandbox.ops.federation import write_run_config
from sandbox.ops.parties import (
    NODE_STOP,
    ProviderAddresses,
    complete_run_config,
    register_node,
    start_provider,
    stop_party,
)
from sandbox.ops.processes import start_process
from sandbox.ops.provision import init_provider
from sandbox.ops.registry import ProcessRecord
from sandbox.ops.tls import issue_loopback_tls
from tests.conftest import make_spec

# A process that starts a child and both sleep: a party's service and its helper.
_PARENT_AND_CHILD = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
    "time.sleep(300)"
)


def _started(record: ProcessRecord, role: str, tmp_path: Path) -> psutil.Process:
    proc = start_process(
        role,
        [sys.executable, "-c", _PARENT_AND_CHILD],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "logs" / f"{role}.log",
    )
    record.add(role, proc)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 20
    while not parent.children():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return parent


def test_stop_by_record_stops_each_process_and_its_children(tmp_path: Path) -> None:
    record = ProcessRecord(tmp_path)
    parents = [_started(record, role, tmp_path) for role in ("supernode", "sandbox")]
    everything = [p for parent in parents for p in (parent, *parent.children(recursive=True))]
    assert set(record.live()) == {"supernode", "sandbox"}
    assert stop_party(tmp_path, NODE_STOP) == []
    _, alive = psutil.wait_procs(everything, timeout=10)
    assert alive == []
    assert record.load() == {}


def test_a_record_whose_pid_now_names_another_process_is_left_alone(tmp_path: Path) -> None:
    record = ProcessRecord(tmp_path)
    parent = _started(record, "sandbox", tmp_path)
    # The same PID, recorded with another start time (clock ticks since boot): after a
    # crash or a reboot, the PID may belong to a stranger. It is not live, and stopping
    # never signals it.
    document = json.loads(record.path.read_text())
    document["processes"]["sandbox"]["ticks"] -= 100
    record.path.write_text(json.dumps(document))
    assert record.live() == {}
    children = parent.children(recursive=True)
    try:
        assert stop_party(tmp_path, NODE_STOP) == []
        assert parent.is_running()
        assert all(child.is_running() for child in children)  # nor its session
    finally:
        for proc in (parent, *children):
            proc.kill()
        psutil.wait_procs([parent, *children], timeout=10)


def test_what_a_crashed_process_left_in_its_session_is_stopped(tmp_path: Path) -> None:
    record = ProcessRecord(tmp_path)
    parent = _started(record, "supernode", tmp_path)
    children = parent.children(recursive=True)
    parent.kill()  # a crash: its child is orphaned, still in the session it led
    psutil.wait_procs([parent], timeout=10)
    assert record.live() == {}
    assert all(child.is_running() for child in children)
    assert stop_party(tmp_path, NODE_STOP) == []
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


@pytest.mark.parametrize(
    "content",
    ["not json", '{"processes": {"sandbox": {"pid": "x"}}}', '{"processes": []}', "[]"],
)
def test_a_malformed_record_is_a_config_error_naming_the_file(tmp_path: Path, content: str) -> None:
    record = ProcessRecord(tmp_path)
    record.folder.mkdir()
    record.path.write_text(content)
    with pytest.raises(ConfigError, match=r"processes\.json"):
        record.load()


def test_the_provider_certificate_names_the_hosts_nodes_use(tmp_path: Path) -> None:
    tls = issue_loopback_tls(tmp_path, hosts=["198.51.100.1", "provider.example"])
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.51.100.1") in names.get_values_for_type(x509.IPAddress)
    assert "provider.example" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)  # always: Flower needs it
    for bad in ("bad host", "-dash.example", "a..b", "", "198.51.100.300", "x" * 254):
        with pytest.raises(ValueError, match="not a host name or IP address"):
            issue_loopback_tls(tmp_path / "bad", hosts=[bad])


def test_provider_init_refuses_a_bad_host_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--host.*'no spaces allowed'"):
        init_provider(tmp_path / "provider", hosts=["no spaces allowed"])


def test_start_needs_a_provider_workspace(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ark provider init"):
        start_provider(tmp_path, ProviderAddresses("127.0.0.1"), say=lambda line: None)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "../up", "a/b"])
def test_a_bad_node_name_is_refused_before_flower_sees_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="node name"):
        register_node(tmp_path, name, tmp_path / "node-auth.pub")


def test_a_name_registered_already_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "run" / "nodes.json").write_text(json.dumps({"alpine": "7"}))
    key = tmp_path / "node-auth.pub"
    write_openssh_keypair(tmp_path / "node-auth")
    with pytest.raises(ConfigError, match=r"'alpine' is registered already.*node id 7"):
        register_node(tmp_path, "alpine", key)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== me\n",  # Flower refuses Ed25519
        b"ecdsa-sha2-nistp256 AAAA\n",  # too short to be a key
        b"ecdsa-sha2-nistp256 " + b"A" * 140 + b"\n--name evil\n",  # a second line
        b"x" * 5000,
    ],
)
def test_a_file_that_is_not_a_supernode_public_key_is_refused(
    tmp_path: Path, content: bytes
) -> None:
    key = tmp_path / "node-auth.pub"
    key.write_bytes(content)
    with pytest.raises(ConfigError, match=r"node-auth\.pub"):
        register_node(tmp_path, "alpine", key)
    assert not (tmp_path / "run" / "nodes.json").exists()


def test_a_public_key_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    write_openssh_keypair(tmp_path / "node-auth")
    (tmp_path / "link.pub").symlink_to(tmp_path / "node-auth.pub")
    with pytest.raises(ConfigError, match=r"link\.pub"):
        register_node(tmp_path, "alpine", tmp_path / "link.pub")


def test_a_record_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symbolic link"):
        ProcessRecord(tmp_path / "ws").load()
    with pytest.raises(ConfigError, match="symbolic link"):
        stop_party(tmp_path / "ws", NODE_STOP)


def test_start_refuses_a_host_its_certificate_does_not_name(tmp_path: Path) -> None:
    init_provider(tmp_path / "provider", hosts=["198.51.100.1"])
    with pytest.raises(ConfigError, match=r"does not name '198\.51\.100\.7'.*--host 198"):
        start_provider(
            tmp_path / "provider", ProviderAddresses("198.51.100.7"), say=lambda line: None
        )
    assert ProcessRecord(tmp_path / "provider").load() == {}


def test_submit_fills_in_what_only_the_provider_workspace_knows(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    ws = init_provider(tmp_path / "provider")
    spec = make_spec(tiny_bert_dir, job_id="tickets")
    written = {
        k: v
        for k, v in spec.to_run_config().items()
        if k not in ("output-dir", "aggregator-dir", "log-db")
    }
    config = write_run_config(tmp_path / "run.toml", written)
    completed = complete_run_config(ws.root, config)
    assert completed.aggregator_dir == ws.aggregator
    assert completed.log_db == ws.log_db
    assert completed.output_dir == ws.root / "jobs" / "tickets"
    # What the file says is kept.
    mine = write_run_config(tmp_path / "mine.toml", {**written, "output-dir": str(tmp_path / "o")})
    assert complete_run_config(ws.root, mine).output_dir == tmp_path / "o"


def test_a_bad_run_config_names_the_file_and_key(tmp_path: Path, tiny_bert_dir: Path) -> None:
    ws = init_provider(tmp_path / "provider")
    broken = tmp_path / "run.toml"
    broken.write_text("num-rounds = [")
    with pytest.raises(ConfigError, match=r"run\.toml"):
        complete_run_config(ws.root, broken)
    spec = make_spec(tiny_bert_dir)
    bad = write_run_config(tmp_path / "bad.toml", {**spec.to_run_config(), "num-rounds": 0})
    with pytest.raises(ArkError, match="num-rounds"):
        complete_run_config(ws.root, bad)
    assert tomllib.loads(bad.read_text())["num-rounds"] == 0


def test_the_stop_command_with_nothing_recorded_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ark"), "provider", "stop", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no process of it is left" in result.stdout


@pytest.mark.parametrize("address", ["host", "host:0", "host:99999", "host:92a", ":9092"])
def test_a_bad_superlink_address_is_refused_before_anything_starts(
    tmp_path: Path, tiny_bert_dir: Path, address: str
) -> None:
    from sandbox.errors import GatewayError
    from sandbox.ops.demo_data import write_demo_data
    from sandbox.ops.parties import start_node
    from sandbox.ops.provision import provision_loopback

    data = write_demo_data(tmp_path / "data", 1, rows_per_node=12, seed=2)
    config = next(
        iter(
            provision_loopback(
                tmp_path, model_dir=tiny_bert_dir, node_data=data, key_broker_port=1
            ).node_configs.values()
        )
    )
    with pytest.raises(GatewayError, match="is not host:port"):
        start_node(config, address, say=lambda line: None)
    assert ProcessRecord(config.parent).load() == {}


def test_a_nodes_refusal_text_is_printed_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    """A node's refusal reason quotes evidence it chose; rich markup in it must neither
    crash the provider's follow command nor be swallowed."""
    from sandbox.ops.cli.provider import JobProgress

    JobProgress(2, {"7": "alpine"}).show(
        [{"kind": "node_refused", "node": 7, "reason": "node '[/x][bold]evil' not allowed"}]
    )
    assert "node alpine refused: node '[/x][bold]evil' not allowed" in capsys.readouterr().out
