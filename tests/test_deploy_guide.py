"""docs/deploy.md as a newcomer runs it: the provider and one node, each on its own host.

The guide's marker scheme, read here:

- a fenced block right after ``<!-- host: provider -->``, ``<!-- host: node -->`` or
  ``<!-- host: courier -->`` is a step of the two-host walk-through, run in the order
  the guide gives;
- ``<!-- host: H, needs 2+ nodes -->`` marks a step that needs a federation of two nodes
  or more (submitting a job): parsed and counted, not run here;
- unmarked blocks (installation, firewall, systemd) are root's, by hand: not run.

Every walk-through block runs with ``bash -euo pipefail -c`` on its host: the provider's
and the node's each in a network namespace of its own (sandbox/ops/netns.py), the
courier's in the root namespace, where both workspaces are folders on the shared disk
(the guide's ``COPY="cp -r"``). A block runs after its host's first block, the one that
sets the variables, as the guide says of a new shell; the environment gives each host
only its own variables (addresses, workspaces, the tiny test model as ``MODEL_DIR``).

While the deployment is up, before the guide's stop blocks, the provider's perimeter is
checked from the node's host: only the gateway and the key broker answer there, and the
gateway refuses everything but the Fleet API (tests/gateway_probe.py). The stop blocks
must then leave no process and the topology no namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import string
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
from markdown_it import MarkdownIt

from sandbox.config import MIN_FEDERATED_NODES, RunSpec
from sandbox.ops.demo_data import DEMO_LABELS
from sandbox.ops.deployment import PartyCommands
from sandbox.ops.netns import (
    PROVIDER_ADDRESS,
    Host,
    Topology,
    listening_ports,
    netns_unavailable,
    reachable,
)
from sandbox.ops.parties import BROKER_PORT, FLEET_PORT, SUPERLINK_PORT, ProviderAddresses
from sandbox.ops.registry import ProcessRecord
from tests.ark_cli import parse_with_cli
from tests.conftest import APP_DIR
from tests.gateway_probe import PROBES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

GUIDE = APP_DIR / "docs" / "deploy.md"
HOSTS = ("provider", "node", "courier")
NEEDS_FEDERATION = "needs 2+ nodes"
MARKER = re.compile(r"<!--\s*host:\s*(?P<host>[a-z]+)\s*(?:,\s*(?P<needs>[^>]*?)\s*)?-->")
STOP_SECTION = re.compile(r"\d+\.\s*Stop")
NODE = "alpine"  # the guide's node
BLOCK_TIMEOUT = 600.0
UNAVAILABLE = netns_unavailable()


class GuideError(ValueError):
    """The guide's markers do not follow its own scheme (line numbers from 1)."""


@dataclass(frozen=True)
class Block:
    """One marked shell block of the guide."""

    host: str
    needs: str  # "" for the two-host walk-through, else what the step needs
    section: str  # the heading it stands under
    line: int
    code: str


def guide_blocks(text: str) -> list[Block]:
    """Every marked block of ``text`` in order; GuideError for a marker naming no known
    host or another need, or one not directly followed by a fenced block."""
    blocks: list[Block] = []
    section = ""
    marker: tuple[re.Match[str], int] | None = None
    tokens = MarkdownIt("commonmark").parse(text)
    for index, token in enumerate(tokens):
        line = token.map[0] + 1 if token.map else 0
        if marker is not None:
            pending, at = marker
            if token.type != "fence":
                raise GuideError(f"line {at}: {pending.group(0)} is not followed by a code block")
            host, needs = pending["host"], pending["needs"] or ""
            blocks.append(Block(host, needs, section, line, token.content))
            marker = None
        elif token.type == "heading_open":
            section = tokens[index + 1].content
        elif token.type == "html_block" and (found := MARKER.search(token.content)):
            if found["host"] not in HOSTS:
                raise GuideError(f"line {line}: unknown host {found['host']!r} (not in {HOSTS})")
            if found["needs"] not in (None, NEEDS_FEDERATION):
                raise GuideError(f"line {line}: unknown need {found['needs']!r}")
            marker = (found, line)
    if marker is not None:
        raise GuideError(f"line {marker[1]}: {marker[0].group(0)} ends the guide")
    return blocks


def walkthrough(text: str) -> list[Block]:
    """The blocks the two-host walk-through runs, in order."""
    return [block for block in guide_blocks(text) if not block.needs]


def ark_commands(code: str) -> list[list[str]]:
    """The words of each ``ark`` command line of a shell block (continuations joined,
    comments dropped; variables and substitutions stay as written)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("ark ")]


@dataclass
class Shells:
    """Runs the guide's blocks, each host's in a fresh shell on that host after the
    host's first block (its variables)."""

    hosts: dict[str, Host]
    env: dict[str, dict[str, str]]
    first: dict[str, Block] = field(default_factory=dict)

    def run(self, block: Block) -> str:
        first = self.first.setdefault(block.host, block)
        script = block.code if first is block else f"{first.code}\n{block.code}"
        argv = self.hosts[block.host].argv(["bash", "-euo", "pipefail", "-c", script])
        done = subprocess.run(
            argv,
            env=self.env[block.host],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"the {block.host} block at docs/deploy.md:{block.line} ({block.section}) "
                f"exited {done.returncode}:\n{block.code}\n--- its output ---\n{done.stdout}"
            )
        return done.stdout


@dataclass
class GuideRun:
    """What the walk-through did, and what the node's host saw of the provider."""

    node_status: str = ""
    provider_status: str = ""
    provider_listeners: set[tuple[str, int]] = field(default_factory=set)
    reached_from_node: set[int] = field(default_factory=set)
    node_listeners: set[tuple[str, int]] = field(default_factory=set)
    probes: list[list[object]] = field(default_factory=list)
    stop_outputs: list[str] = field(default_factory=list)
    still_recorded: dict[str, list[str]] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    namespaces_left: list[str] = field(default_factory=list)


def _environments(root: Path, topology: Topology, model_dir: Path) -> dict[str, dict[str, str]]:
    """Each host's environment: this machine's, the venv first on PATH, and the
    variables the guide's first block of that host reads."""
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    base |= {"SRC": str(APP_DIR), "PROVIDER_HOST": topology.provider.address, "NODE_NAME": NODE}
    return {
        "provider": {**base, "W": str(root / "provider"), "MODEL_DIR": str(model_dir)},
        "node": {**base, "N": str(root / "node")},
        "courier": {
            **base,
            "NODE_HOST": topology.nodes[NODE].address,
            "PROVIDER_AT": str(root / "provider"),
            "NODE_AT": str(root / "node"),
            "COPY": "cp -r",
            "COURIER_DIR": str(root / "courier"),
        },
    }


def _probe(node: Host, ca_cert: Path) -> list[list[object]]:
    """Every gateway probe, sent from the node's host with the CA the node was given."""
    fleet = f"{PROVIDER_ADDRESS}:{FLEET_PORT}"
    argv = node.argv([sys.executable, "-m", "tests.gateway_probe", fleet, str(ca_cert)])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=APP_DIR, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    answers: list[list[object]] = json.loads(done.stdout)
    return answers


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> GuideRun:
    if UNAVAILABLE is not None:
        pytest.skip(f"network namespaces cannot be made here: {UNAVAILABLE}")
    blocks = walkthrough(GUIDE.read_text(encoding="utf-8"))
    stops = [b for b in blocks if STOP_SECTION.fullmatch(b.section)]
    root = tmp_path_factory.mktemp("deploy-guide")
    topology = Topology.create([NODE])
    node = topology.nodes[NODE]
    shells = Shells(
        {"provider": topology.provider, "node": node, "courier": Host("courier", "", None)},
        _environments(root, topology, tiny_bert_dir),
    )
    provider_dir, config = root / "provider", root / "node" / "node.toml"
    cmds = PartyCommands(
        topology, provider_dir, {NODE: config}, ProviderAddresses(topology.provider.address)
    )
    run = GuideRun()
    stopped = False
    try:
        for block in blocks[: blocks.index(stops[0])]:
            shells.run(block)
        # As the guide checks it, and so every recorded process and its children are
        # known before the stop blocks run.
        run.node_status = cmds.ark(node, "node", "status", "--config", str(config))
        run.provider_status = cmds.ark(
            topology.provider, "provider", "status", "--workdir", str(provider_dir)
        )
        run.provider_listeners = listening_ports(topology.provider)
        ports = {port for _, port in run.provider_listeners} | {SUPERLINK_PORT}
        run.reached_from_node = {p for p in ports if reachable(node, PROVIDER_ADDRESS, p)}
        run.node_listeners = listening_ports(node)
        run.probes = _probe(node, root / "node" / "provider" / "ca.crt")
        run.stop_outputs = [shells.run(block) for block in stops]
        stopped = True
    finally:
        if not stopped:
            cmds.stop_all()
        run.survivors = cmds.survivors()
        topology.close()
    for workspace in (provider_dir, config.parent):
        run.still_recorded[str(workspace)] = sorted(ProcessRecord(workspace).live())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    run.namespaces_left = [n for n in listed.stdout.split() if f"ark-{topology.tag}-" in n]
    return run


def test_the_guide_has_every_step_of_both_hosts_and_the_courier() -> None:
    blocks = guide_blocks(GUIDE.read_text(encoding="utf-8"))
    walk = Counter(block.host for block in blocks if not block.needs)
    # Variables, set-up, start (and, on the node, attest), check, stop; the courier's
    # variables and one trip each way.
    assert walk == {"provider": 5, "node": 5, "courier": 3}, walk
    assert Counter(b.host for b in blocks if b.needs) == {"provider": 1, "node": 1}
    stops = [(b.host, b.code.strip()) for b in blocks if STOP_SECTION.fullmatch(b.section)]
    assert stops == [
        ("node", 'ark node stop --config "$N/node.toml"'),
        ("provider", 'ark provider stop --workdir "$W"'),
    ]
    # Each host's first block sets its variables, each only where it is not set yet.
    for host in HOSTS:
        first = next(b for b in blocks if b.host == host)
        assert "1. Variables" in first.section, first


def test_every_ark_command_of_the_guide_parses_with_the_cli() -> None:
    """The blocks the two-host run skips (a job) too: a renamed command or option fails
    here, without a deployment."""
    seen = set()
    for block in guide_blocks(GUIDE.read_text(encoding="utf-8")):
        for argv in ark_commands(block.code):
            try:
                command, _ = parse_with_cli(argv[1:])
            except click.ClickException as exc:
                pytest.fail(f"docs/deploy.md:{block.line}: `{shlex.join(argv)}`: {exc}")
            seen.add(command)
    assert {"ark provider submit", "ark node infer", "ark audit crosscheck"} <= seen, seen


def test_the_guides_job_is_a_valid_run_config(tmp_path: Path) -> None:
    """The run config the guide writes (its heredoc, with the model folder filled in)
    validates, asks for a federation and names the labels of the data the guide makes."""
    job = next(b for b in guide_blocks(GUIDE.read_text(encoding="utf-8")) if b.needs)
    heredoc = re.search(r"<<EOF\n(.*?\n)EOF\n", job.code, re.S)
    assert heredoc is not None, job.code
    text = string.Template(heredoc[1]).substitute(MODEL_DIR=tmp_path)
    spec = RunSpec.from_run_config(tomllib.loads(text), source="docs/deploy.md")
    assert spec.labels == DEMO_LABELS
    assert spec.min_nodes >= MIN_FEDERATED_NODES


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<!-- host: provider -->\n\nsome prose\n", "not followed by a code block"),
        ("<!-- host: auditor -->\n```bash\ntrue\n```\n", "unknown host 'auditor'"),
        ("<!-- host: node, needs a GPU -->\n```bash\ntrue\n```\n", "unknown need"),
        ("text\n\n<!-- host: node -->\n", "ends the guide"),
    ],
)
def test_a_marker_that_breaks_the_scheme_is_refused(text: str, error: str) -> None:
    with pytest.raises(GuideError, match=error):
        guide_blocks(text)


def test_the_node_is_attested_and_connected(guide_run: GuideRun) -> None:
    assert re.search(r"sandbox pid \d+: attested \(STUB TEE\)", guide_run.node_status), (
        guide_run.node_status
    )
    assert "SuperNode: connected" in guide_run.node_status, guide_run.node_status
    for role in ("superlink", "gateway", "key-broker"):
        assert re.search(rf"^{role}\s+running", guide_run.provider_status, re.M), (
            guide_run.provider_status
        )
    assert re.search(rf"^node {NODE} \(id \d+\): online", guide_run.provider_status, re.M), (
        guide_run.provider_status
    )


def test_from_a_node_host_only_the_published_ports_answer(guide_run: GuideRun) -> None:
    listening = {port for _, port in guide_run.provider_listeners}
    assert SUPERLINK_PORT in listening, guide_run.provider_listeners
    assert guide_run.reached_from_node == {FLEET_PORT, BROKER_PORT}, guide_run.provider_listeners
    # A node opens nothing to the network: its listeners are all on loopback.
    exposed = {(a, p) for a, p in guide_run.node_listeners if a not in ("127.0.0.1", "::1")}
    assert not exposed, guide_run.node_listeners


def test_from_a_node_host_the_gateway_forwards_only_the_fleet_api(guide_run: GuideRun) -> None:
    expected = [[p.method, p.path, p.status] for p in PROBES]
    assert guide_run.probes == expected


def test_the_guides_stop_blocks_leave_no_process_and_no_namespace(guide_run: GuideRun) -> None:
    assert "node stopped: no process of it is left" in guide_run.stop_outputs[0]
    assert "provider stopped: no process of it is left" in guide_run.stop_outputs[1]
    assert all(not roles for roles in guide_run.still_recorded.values()), guide_run.still_recorded
    assert guide_run.survivors == []
    assert guide_run.namespaces_left == []
