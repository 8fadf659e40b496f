"""Secure aggregation on real processes: flower-superlink behind the gateway, the key
broker, and three flower-supernodes with their node sandboxes over TLS on loopback,
running a two-round ``ffa+secagg`` job (tests/test_secure_job.py drives the same stages
in one process).

Dropout: once round 1's shares are routed (the job logs its ``secagg_stage`` "share"),
one node's host goes down (its SuperNode, ClientApps and sandbox, SIGKILL). The mask
stage waits out the round timeout for it; the survivors then reveal its masking key's
shares and their own seeds' shares, the masks come off the sum of the two masked inputs,
and both rounds commit. The auditor's log check and the survivors' journals agree.

One run, read by every test here: a federation of real processes costs most of a test.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from click.testing import Result
from typer.testing import CliRunner

from sandbox import events
from sandbox.config import MODE_FFA_SECAGG, NodeConfig
from sandbox.events import Hello, JournalEntry, NodeEvent
from sandbox.events.members import inline
from sandbox.events.node import SecaggRevealed
from sandbox.journal import read_journal
from sandbox.ops.cli import app as cli
from sandbox.ops.demo_data import write_demo_data
from sandbox.ops.federation import EventsTail, Federation, RunOutcome, free_port
from sandbox.ops.processes import still_running
from sandbox.ops.provision import LoopbackDeployment, provision_loopback
from sandbox.secagg import STAGE_CHECK, STAGE_MASK, STAGE_SHARE
from tests.conftest import checked_federation
from tests.sandboxgrid import listed
from tests.test_e2e import _launch, _spec, _submit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NODES = 3
# The mask stage waits this long for the node that is gone (the SuperLink counts it
# offline only after two missed 30 s heartbeats). Each stage has this long too: round 1's
# keys, which a node sends once its sandbox has opened the instruction and set up
# training, took 25 s on a busy 2-core machine.
ROUND_TIMEOUT = 40.0

E = TypeVar("E", bound=events.Event)


@dataclass(frozen=True)
class DropoutRun:
    """A finished two-round secure run on three nodes, one of which (``victim``) was
    killed as soon as round 1's shares were routed."""

    run_id: int
    outcome: RunOutcome
    victim: str
    node_ids: dict[str, int]  # Flower's node id of each node, from its journal's hello
    served: list[events.Event]  # the job's events (the ServerApp's)
    # What the job had logged of round 1 when the victim was killed.
    logged_at_kill: list[events.Event]
    journals: dict[str, list[NodeEvent]]  # the survivors'
    verified: Result
    crosschecked: Result
    started: set[str]  # the name of every process the federation started
    seen: int  # how many processes it started, children included
    left_running: list[int]

    @property
    def survivors(self) -> list[str]:
        return sorted(n for n in self.node_ids if n != self.victim)

    @property
    def victim_id(self) -> int:
        return self.node_ids[self.victim]

    def survivor_ids(self) -> list[int]:
        return sorted(self.node_ids[n] for n in self.survivors)

    def of(self, kind: type[E], rnd: int | None = None) -> list[E]:
        """The job's events of ``kind`` (of round ``rnd`` when given), in order."""
        found = [e for e in self.served if isinstance(e, kind)]
        return [e for e in found if rnd is None or getattr(e, "round", None) == rnd]


def _journal_path(config: Path) -> Path:
    path = NodeConfig.load(config).journal_path
    assert path is not None
    return path


def _entries(config: Path) -> list[NodeEvent]:
    """A node's journal entries, each parsed strictly as its typed event."""
    return [JournalEntry.from_json(entry).event for entry in read_journal(_journal_path(config))]


def _node_id(config: Path, run_id: int) -> int:
    """The id Flower gave the node, as its sandbox journalled it at the run's hello."""
    (hello,) = [e for e in _entries(config) if isinstance(e, Hello) and e.run_id == run_id]
    return hello.node_id


def _remember(federation: Federation, seen: dict[int, psutil.Process], names: set[str]) -> None:
    """Add every process of the federation running now, and its children, to ``seen``, and
    the names of the federation's own processes to ``names``."""
    for proc in federation.all_processes():
        names.add(proc.name)
        proc.remember_descendants()
        seen.update(proc.seen)
        if proc.alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                seen.setdefault(proc.pid, psutil.Process(proc.pid))


def _audit(deployment: LoopbackDeployment, state: Path, journals: list[Path]) -> list[Result]:
    """``ark audit verify`` and ``ark audit crosscheck`` (of ``journals``, each pinned to its
    node's journal key) against the log served beside the key broker."""
    runner = CliRunner()
    log = ["--log", deployment.key_broker, "--key", str(deployment.provider.log_vkey)]
    pinned = [arg for j in journals for arg in ("--journal", str(j), "--journal-key", f"{j}.pub")]
    verified = runner.invoke(cli, ["audit", "verify", *log, "--state", str(state)])
    crosschecked = runner.invoke(cli, ["audit", "crosscheck", *log, *pinned])
    return [verified, crosschecked]


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> DropoutRun:
    tmp_path = tmp_path_factory.mktemp("secure-dropout")
    data = write_demo_data(tmp_path / "data", NODES, rows_per_node=40, seed=3)
    deployment = provision_loopback(
        tmp_path, model_dir=tiny_bert_dir, node_data=data, key_broker_port=free_port(), threads=1
    )
    configs = deployment.node_configs
    victim = sorted(configs)[-1]
    # Every node is online before the run starts, so no round waits for a count of nodes.
    spec = _spec(
        tmp_path,
        tiny_bert_dir,
        0,
        mode=MODE_FFA_SECAGG,
        min_nodes=2,
        round_timeout=ROUND_TIMEOUT,
    )
    seen: dict[int, psutil.Process] = {}
    names: set[str] = set()
    with checked_federation(tmp_path) as federation:
        _launch(federation, configs)
        federation.wait_until_online(configs)
        run_id = _submit(federation, spec, tmp_path)
        tail = EventsTail(federation.run_events[run_id])
        logged: list[events.Event] = []
        deadline = time.monotonic() + 300

        def shared() -> bool:
            return any(
                isinstance(e, events.SecaggStage) and e.round == 1 and e.stage == STAGE_SHARE
                for e in logged
            )

        # Polled tightly: the mask requests go out right after this event is written, and
        # the victim must not have answered its own before it dies.
        while not shared():
            assert time.monotonic() < deadline, "round 1's shares were never routed"
            logged += [events.Event.from_json(record) for record in tail.read()]
            # Fail now, not at the deadline, when a node is out before the kill (e.g. the
            # key broker refused its channel: the sources changed since provisioning).
            out = [e for e in logged if isinstance(e, events.NodeRefused | events.NodeDeclined)]
            assert not out, f"a node was out of round 1 before the kill: {out}"
            time.sleep(0.02)
        _remember(federation, seen, names)
        federation.kill_supernode(victim)
        federation.kill_sandbox(victim)
        node_ids = {name: _node_id(config, run_id) for name, config in configs.items()}

        outcome = federation.wait(
            run_id, timeout=600, on_tick=lambda: _remember(federation, seen, names)
        )
        served_path = federation.run_events[run_id]
        journals = [_journal_path(configs[n]) for n in sorted(configs) if n != victim]
        verified, crosschecked = _audit(deployment, tmp_path / "auditor", journals)
        _remember(federation, seen, names)
    left_running = [p.pid for p in seen.values() if still_running(p)]
    served = inline(events.Event.from_json(record) for record in EventsTail(served_path).read())
    return DropoutRun(
        run_id=run_id,
        outcome=outcome,
        victim=victim,
        node_ids=node_ids,
        served=served,
        logged_at_kill=inline(logged),
        journals={n: _entries(configs[n]) for n in sorted(configs) if n != victim},
        verified=verified,
        crosschecked=crosschecked,
        started=names,
        seen=len(seen),
        left_running=left_running,
    )


def _revealed(run: DropoutRun, name: str, rnd: int) -> list[SecaggRevealed]:
    return [
        e
        for e in run.journals[name]
        if isinstance(e, SecaggRevealed) and e.run_id == run.run_id and e.round == rnd
    ]


def test_the_run_finishes_without_the_node_killed_after_sharing(dropout_run: DropoutRun) -> None:
    run = dropout_run
    assert run.outcome.ok, run.outcome.details
    assert len(set(run.node_ids.values())) == NODES
    # The victim shared its keys, and was killed before the job logged its masked input.
    (share,) = [e for e in run.logged_at_kill if isinstance(e, events.SecaggStage)]
    assert (share.round, share.stage) == (1, STAGE_SHARE)
    assert share.nodes == sorted(run.node_ids.values())
    (advertised,) = run.of(events.SecaggAdvertised, 1)
    assert sorted(n.node for n in listed(advertised.nodes)) == sorted(run.node_ids.values())
    stages = {e.stage: e.nodes for e in run.of(events.SecaggStage, 1)}
    assert stages[STAGE_SHARE] == sorted(run.node_ids.values())
    assert stages[STAGE_MASK] == run.survivor_ids()
    assert stages[STAGE_CHECK] == run.survivor_ids()


def test_round_1_unmasks_the_survivors_and_rebuilds_the_victims_mask(
    dropout_run: DropoutRun,
) -> None:
    run = dropout_run
    (unmasked,) = run.of(events.SecaggUnmasked, 1)
    assert unmasked.dropped == [run.victim_id]
    assert sorted(listed(unmasked.survivors)) == run.survivor_ids()
    assert unmasked.revealed_by == run.survivor_ids()
    # Round 2 runs on the two left: the victim never advertised keys for it.
    (advertised,) = run.of(events.SecaggAdvertised, 2)
    assert sorted(n.node for n in listed(advertised.nodes)) == run.survivor_ids()
    (unmasked2,) = run.of(events.SecaggUnmasked, 2)
    assert sorted(listed(unmasked2.survivors)) == run.survivor_ids()
    assert unmasked2.dropped == []


def test_both_rounds_commit_the_masked_inputs_and_no_update_in_the_clear(
    dropout_run: DropoutRun,
) -> None:
    run = dropout_run
    committed = run.of(events.AggregateCommitted)
    assert [e.round for e in committed] == [1, 2]
    for commit in committed:
        (masked,) = [e for e in run.of(events.SecaggStage, commit.round) if e.stage == STAGE_MASK]
        assert masked.envelopes is not None
        assert sorted(listed(commit.updates)) == sorted(masked.envelopes)
        assert len(listed(commit.updates)) == 2
    assert run.of(events.UpdateAccepted) == []
    assert run.of(events.RunFinished)


def test_the_survivors_revealed_the_victims_key_and_only_their_seeds(
    dropout_run: DropoutRun,
) -> None:
    run = dropout_run
    for name in run.survivors:
        (revealed,) = _revealed(run, name, 1)
        assert revealed.node_id == run.node_ids[name]
        assert revealed.keys_of == [run.victim_id]
        assert run.victim_id not in revealed.seeds_of
        assert revealed.seeds_of == run.survivor_ids()
        (second,) = _revealed(run, name, 2)
        assert second.keys_of == []


def test_the_audit_passes_and_the_survivors_journals_agree(dropout_run: DropoutRun) -> None:
    run = dropout_run
    assert run.verified.exit_code == 0, run.verified.output
    assert "ok: Policy across events" in run.verified.output
    assert run.crosschecked.exit_code == 0, run.crosschecked.output
    assert run.crosschecked.output.count(" 0 missing from the log") == NODES - 1


def test_every_process_started_is_stopped(dropout_run: DropoutRun) -> None:
    run = dropout_run
    nodes = [
        f"{kind}[{name}]" for name in run.node_ids for kind in ("flower-supernode", "ark-sandbox")
    ]
    assert {"SuperLink", "gateway", "key broker", *nodes} <= run.started
    assert run.seen > len(run.started)  # their children (ClientApps, nginx's workers) too
    assert run.left_running == []
