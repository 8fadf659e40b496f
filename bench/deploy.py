"""Deployment across hosts (issue 15): what running each party on its own host costs.

Two figures, from the parties' own commands on test hosts (:mod:`sandbox.ops.netns`: a
network namespace per party on 198.51.100.0/24, or every party on loopback):

* **The demo's job on separate hosts against loopback.** ``ark demo --hosts netns`` and
  ``ark demo --hosts loopback`` (the real demo: MiniLM, 3 nodes, 2 rounds), alternated
  in pairs whose order flips each pair (netns first, then loopback first, …) so a drift
  in the machine's load falls on both sides. Each run's job time is from the provider's
  ``run N submitted`` line to its ``run N finished`` line as they reach the caller (the
  ServerApp, every round, the final evaluation); the whole command's wall time and the
  demo's own printed one are kept beside it.
* **``ark node start`` to attested and connected.** A provider started with ``ark
  provider start`` on its host; one node started with ``ark node start`` on its own and
  stopped with ``ark node stop``, again and again. The command returns once its sandbox
  has attested (key released, model unsealed) and its SuperNode is connected; the lines
  it prints on the way split that time (stamped as they arrive; the command looks at its
  processes' logs every 0.2 s).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.node_sandbox import NODES, ROUNDS, run_demo
from bench.timed import TimedOutput, run_timed
from sandbox.ops.demo_data import write_demo_data
from sandbox.ops.deployment import PartyCommands
from sandbox.ops.federation import free_port
from sandbox.ops.netns import Topology, netns_unavailable
from sandbox.ops.parties import ProviderAddresses
from sandbox.ops.provision import provision_loopback

DEMO_PAIRS = 3
NODE_STARTS = 5
HOSTS = ("netns", "loopback")
# What ``ark node start`` prints on the way (sandbox/ops/parties.py start_node).
_SANDBOX_STARTING = r"^sandbox starting"
_ATTESTED = r"^sandbox attested"
_CONNECTED = r"^SuperNode connected"
_REFUSED = r"the SuperLink refused this SuperNode"


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min and max of the values that were measured, and the values."""
    found = [v for v in values if v is not None]
    if not found:
        return {"median": None, "min": None, "max": None, "values": list(values)}
    return {
        "median": statistics.median(found),
        "min": min(found),
        "max": max(found),
        "values": list(values),
    }


def demo_side_by_side(pairs: int, *, rounds: int = ROUNDS, nodes: int = NODES) -> dict[str, Any]:
    """``pairs`` runs of ``ark demo`` on each kind of host, interleaved; medians and the
    netns / loopback ratios. Each run has a workdir of its own, removed after it."""
    runs: dict[str, list[dict[str, Any]]] = {hosts: [] for hosts in HOSTS}
    for pair in range(pairs):
        for hosts in HOSTS if pair % 2 == 0 else HOSTS[::-1]:
            with tempfile.TemporaryDirectory(prefix=f"ark-bench-deploy-{hosts}-") as tmp:
                run = run_demo(Path(tmp) / "demo", rounds, nodes, hosts=hosts)
            if run["ran_on"] != hosts:
                raise RuntimeError(f"ark demo --hosts {hosts} ran on {run['ran_on']}")
            if run["job_seconds"] is None or run["printed_wall_seconds"] is None:
                raise RuntimeError(
                    f"ark demo --hosts {hosts}: no 'run N submitted' / 'run N finished' "
                    "lines or no printed wall time in its output"
                )
            runs[hosts].append({"pair": pair, **run})
            print(
                f"demo --hosts {hosts} (pair {pair + 1}/{pairs}): job "
                f"{run['job_seconds']:.1f} s, command {run['wall_seconds']:.1f} s",
                flush=True,
            )
    measures = ("job_seconds", "wall_seconds", "printed_wall_seconds")
    medians = {
        hosts: {m: _spread([r[m] for r in runs[hosts]]) for m in measures} for hosts in HOSTS
    }
    return {
        "rounds": rounds,
        "nodes": nodes,
        "pairs": pairs,
        "order": "pairs alternate which runs first: netns then loopback, then the reverse",
        "job_measure": "provider's 'run N submitted' line to its 'run N finished' line, "
        "relayed by the demo, stamped as they reached the caller",
        "medians": medians,
        "netns_over_loopback": {
            m: medians["netns"][m]["median"] / medians["loopback"][m]["median"] for m in measures
        },
        "runs": runs,
    }


def _addresses(topology: Topology) -> ProviderAddresses:
    """Where the provider listens: the well-known ports on a host of its own; free ports
    on loopback, where every party shares one host (as ``ark demo`` does)."""
    if topology.loopback:
        return ProviderAddresses(topology.provider.address, free_port(), free_port(), free_port())
    return ProviderAddresses(topology.provider.address)


def _start_figures(start: TimedOutput, stop: TimedOutput) -> dict[str, Any]:
    """One ``ark node start`` split at its lines, and the ``ark node stop`` after it."""
    attested = start.first(_ATTESTED)
    return {
        "seconds": start.wall_seconds,
        "command_to_sandbox_starting": start.first(_SANDBOX_STARTING),
        "to_attested": attested,
        "attested_to_connected": start.between(_ATTESTED, _CONNECTED),
        "connected_to_exit": (
            None
            if (connected := start.first(_CONNECTED)) is None
            else start.wall_seconds - connected
        ),
        "refused_retries": sum(1 for _, line in start.lines if _REFUSED in line),
        "stop_seconds": stop.wall_seconds,
    }


def node_starts(loopback: bool, starts: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Provision a provider and one node (MiniLM sealed), start the provider's services on
    their host, then time ``ark node start`` / ``ark node stop`` ``starts`` times on the
    node's host. Everything started is stopped, and the test hosts removed, on any exit."""
    from sandbox.models import default_model_dir

    with tempfile.TemporaryDirectory(prefix="ark-bench-node-start-") as tmp:
        root = Path(tmp)
        data = write_demo_data(root / "data", 1)
        name = next(iter(data))
        with Topology.create(list(data), loopback=loopback) as topology:
            addresses = _addresses(topology)
            deployment = provision_loopback(
                root,
                model_dir=default_model_dir(),
                node_data=data,
                key_broker_port=addresses.broker_port,
                model_id="all-MiniLM-L6-v2",
                threads=1,
                provider_host=addresses.host,
            )
            cmds = PartyCommands(
                topology, deployment.provider.root, deployment.node_configs, addresses
            )
            rows = []
            try:
                cmds.start_provider()
                cmds.register_nodes()
                stop_argv = cmds.argv(
                    topology.nodes[name],
                    "node",
                    "stop",
                    "--config",
                    str(deployment.node_configs[name]),
                )
                for _ in range(starts):
                    start = run_timed(cmds.node_start_argv(name), timeout=900).require_success()
                    stop = run_timed(stop_argv, timeout=300).require_success()
                    rows.append(_start_figures(start, stop))
                    say(
                        f"node start on {'loopback' if loopback else 'netns'}: "
                        f"{rows[-1]['seconds']:.1f} s (attested at "
                        f"{rows[-1]['to_attested']:.1f} s), stop {stop.wall_seconds:.1f} s"
                    )
            finally:
                survivors = cmds.stop_all()
    if survivors:
        raise RuntimeError(f"processes left after stopping every party: {survivors}")
    keys = [k for k in rows[0] if k != "refused_retries"] if rows else []
    return {
        "starts": starts,
        "node": name,
        "node_address": topology.nodes[name].address,
        "superlink": addresses.fleet,
        "refused_retries": sum(r["refused_retries"] for r in rows),
        **{k: _spread([r[k] for r in rows]) for k in keys},
    }


def deploy_bench(pairs: int = DEMO_PAIRS, starts: int = NODE_STARTS) -> dict[str, Any]:
    """Both figures; the side-by-side only where network namespaces can be made, and
    ``ark node start`` on each kind of host that can."""
    reason = netns_unavailable()
    load = os.getloadavg()[0]
    demo: dict[str, Any] = (
        {"skipped": f"network namespaces cannot be made here: {reason}"}
        if reason
        else demo_side_by_side(pairs)
    )
    kinds = [True] if reason else [False, True]
    node_start = {
        "loopback" if loopback else "netns": node_starts(loopback, starts) for loopback in kinds
    }
    return {
        "netns_unavailable": reason,
        "demo": demo,
        "node_start": node_start,
        # This machine is shared: the 1-minute load average before and after the bench.
        "load_average": [load, os.getloadavg()[0]],
    }
