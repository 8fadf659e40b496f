"""``ark demo``: the whole job, each party running its own commands on its own test host."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from sandbox.config import (
    MIN_FEDERATED_NODES,
    RUN_MODES,
    TASK_CLASSIFICATION,
    TASKS,
    PrivacyBudget,
    RunSpec,
)
from sandbox.errors import ArkError, FederationError
from sandbox.events import Key
from sandbox.journal import journal_public_path, read_journal
from sandbox.ops.cli.base import (
    app,
    console,
    err_console,
    fail,
    plain,
    shorten,
    sigterm_as_interrupt,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandbox.ops.deployment import PartyCommands
    from sandbox.ops.netns import Topology
    from sandbox.ops.provision import LoopbackDeployment, ProviderWorkspace

DEMO_START_SECONDS = 300.0
# Held-out tickets per node the demo classifies through the node's inference API.
DEMO_TICKETS = 4


def _collect_data(data_dir: Path | None, nodes: int, scratch: Path, task: str) -> dict[str, Path]:
    from sandbox.ops.demo_data import write_demo_data

    if data_dir is None:
        return write_demo_data(scratch, nodes, task=task)
    if not data_dir.is_dir():
        raise ArkError(f"{data_dir}: --data-dir is not a directory")
    files = sorted(p for p in data_dir.iterdir() if p.suffix in (".jsonl", ".csv"))
    if len(files) < nodes:
        raise ArkError(
            f"{data_dir}: needs one <node>.jsonl per node; found {len(files)} for --nodes {nodes}"
        )
    return {p.stem: p for p in files[:nodes]}


def _node_names(journals: list[Path]) -> dict[str, str]:
    names: dict[str, str] = {}
    for journal in journals:
        if not journal.exists():
            continue
        for entry in read_journal(journal):
            if Key.NODE_ID in entry:  # the launcher's entries come before Flower names the node
                names[str(entry[Key.NODE_ID])] = str(entry[Key.NODE])
    return names


HOSTS = ("auto", "netns", "loopback")


@dataclass
class _Stage:
    """What the demo has set up so far, for cleanup on any exit."""

    topology: Topology | None = None
    commands: PartyCommands | None = None
    leftovers: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Every party stops its side, then the test hosts go; a second Ctrl-C or SIGTERM
        meanwhile does not cut that short."""
        from sandbox.ops.processes import signals_held

        with signals_held():
            if self.commands is not None:
                self.leftovers = self.commands.stop_all()
                self.commands = None
            if self.topology is not None:
                self.topology.close()
                self.topology = None


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Workspace to keep (default: a temp dir).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Directory of <node>.jsonl files.")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = RunSpec.num_rounds,
    nodes: Annotated[int, typer.Option(help="Number of enterprise nodes.")] = 3,
    model: Annotated[Path | None, typer.Option(help="Base model dir (default: MiniLM).")] = None,
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")] = TASK_CLASSIFICATION,
    mode: Annotated[
        str,
        typer.Option(
            help=f"Aggregation: {', '.join(RUN_MODES)} (secagg: the aggregator sees only "
            "the sum of the nodes' updates)."
        ),
    ] = "fedavg",
    local_steps: Annotated[
        int, typer.Option(min=1, help="Local steps per round.")
    ] = RunSpec.local_steps,
    port: Annotated[int | None, typer.Option(help="SuperLink port (default: a free one).")] = None,
    round_timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds a round waits for nodes.")
    ] = 300.0,
    hosts: Annotated[
        str,
        typer.Option(
            help="Where the parties run: netns (a network namespace each, joined on "
            "198.51.100.0/24; needs root and iproute2), loopback, or auto (netns where "
            "this machine allows it, else loopback)."
        ),
    ] = "auto",
    dp_epsilon: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Record-level differential privacy: each node's privacy budget epsilon "
            "(delta 1e-5) in its node.toml, and what the run asks each node to spend at "
            "most. 0: off.",
        ),
    ] = 0.0,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Compare the default catalog's three models (MiniLM-L6, -L3, -L1) on the "
            "same federation instead of fine-tuning one: scorecards, report, recommendation.",
        ),
    ] = False,
) -> None:
    """Run the whole federated LoRA job: each party's own commands (ark provider start,
    ark node start, ark provider submit, the auditor's, the nodes' inference), each on
    its own test host. With --compare, the provider's catalog models one after another
    (ark compare run), and the nodes use the recommended one."""
    started = time.monotonic()
    temp = None if workdir is not None else Path(tempfile.mkdtemp(prefix="ark-demo-"))
    root = (workdir or temp or Path()).resolve()
    stage = _Stage()
    try:
        with sigterm_as_interrupt():
            try:
                spec, deployment = _prepare_demo(
                    root,
                    data_dir,
                    nodes,
                    model,
                    task,
                    mode,
                    rounds,
                    local_steps,
                    port,
                    round_timeout,
                    hosts,
                    stage,
                    compare=compare,
                    dp_epsilon=dp_epsilon,
                )
                if compare:
                    folder = _run_comparison(stage, spec, deployment)
                else:
                    results = _run_demo(stage, spec, deployment)
            finally:
                stage.close()
        if stage.leftovers:
            err_console.print(f"[yellow]warning:[/] processes still alive: {stage.leftovers}")
        if compare:
            _print_comparison_verdict(folder, time.monotonic() - started, kept=temp is None)
        else:
            _print_verdict(results, time.monotonic() - started, dp_epsilon)
            if temp is None:
                assert spec.output_dir is not None  # set by _prepare_demo
                console.print(
                    f"results: {spec.output_dir / 'results.json'}\n"
                    f"plot:    {spec.output_dir / 'metrics.png'}\n"
                    f"adapter: {spec.output_dir / 'adapter'} (stock PEFT format)\n"
                    f"audit:   {root / 'audit-report.html'} (ark audit report)"
                )
            else:
                console.print("temporary workspace removed; pass --workdir DIR to keep the outputs")
    except KeyboardInterrupt:
        if stage.leftovers:
            err_console.print(f"[red]interrupted:[/] processes still alive: {stage.leftovers}")
        else:
            err_console.print("[yellow]interrupted:[/] every process the demo started was stopped")
        raise typer.Exit(130) from None
    except ArkError as exc:
        raise fail(exc) from exc
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _topology(hosts: str, names: list[str]) -> Topology:
    """The demo's test hosts: a network namespace per party where this machine allows
    it (``auto``, ``netns``), else every party on loopback, saying why."""
    from sandbox.ops.netns import Topology, netns_unavailable

    if hosts not in HOSTS:
        raise ArkError(f"--hosts must be one of {', '.join(HOSTS)}, got {hosts!r}")
    reason = None if hosts == "loopback" else netns_unavailable()
    if hosts == "netns" and reason is not None:
        raise ArkError(f"--hosts netns: network namespaces cannot be made here: {reason}")
    if hosts == "loopback" or reason is not None:
        console.print(
            f"running every party on loopback: {reason or 'asked for with --hosts loopback'}"
        )
        return Topology.create(names, loopback=True)
    topology = Topology.create(names)
    console.print(
        "running each party on its own test host (a network namespace, 198.51.100.0/24): "
        + ", ".join(f"{h.name} {h.address} ({h.netns})" for h in topology.hosts)
    )
    return topology


def _prepare_demo(
    root: Path,
    data_dir: Path | None,
    nodes: int,
    model: Path | None,
    task: str,
    mode: str,
    rounds: int,
    local_steps: int,
    port: int | None,
    round_timeout: float,
    hosts: str,
    stage: _Stage,
    *,
    compare: bool = False,
    dp_epsilon: float = 0.0,
) -> tuple[RunSpec, LoopbackDeployment]:
    """Validate every input, make the test hosts (``stage.topology``), then lay out the
    provider's and the nodes' workspaces and the run config."""
    from clients.data import derive_labels, load_examples
    from sandbox.lora import target_modules
    from sandbox.models import default_model_dir, inspect_model_dir
    from sandbox.ops.deployment import PartyCommands
    from sandbox.ops.federation import check_port_free, free_port
    from sandbox.ops.parties import ProviderAddresses
    from sandbox.ops.provision import provision_loopback

    if nodes < MIN_FEDERATED_NODES:
        raise ArkError(f"--nodes {nodes} is below the minimum of {MIN_FEDERATED_NODES}")
    if task not in TASKS or mode not in RUN_MODES:
        raise ArkError(f"--task must be one of {TASKS} and --mode one of {RUN_MODES}")
    if port is not None and not 0 < port < 65536:
        raise ArkError(f"--port {port} is not a TCP port")
    if compare and (model is not None or task != TASK_CLASSIFICATION):
        raise ArkError("--compare compares the default catalog's models: no --model, no --task")
    if compare and dp_epsilon > 0:
        raise ArkError(
            "--dp-epsilon with --compare: a comparison's local-model run trains the node's own "
            "model without differential privacy; run the two separately"
        )
    info = inspect_model_dir((model or default_model_dir()).resolve(), task)
    root.mkdir(parents=True, exist_ok=True)
    sources = _collect_data(data_dir, nodes, root / "generated-data", task)
    labels: tuple[str, ...] = ()
    if task == TASK_CLASSIFICATION:
        labels = tuple(derive_labels(list(sources.values())))
    rows = [len(load_examples(source, task, labels=labels or None)) for source in sources.values()]
    job_id = time.strftime("demo-%Y%m%d-%H%M%S")
    spec = RunSpec(
        job_id=job_id,
        task=task,
        model_path=info.path,
        labels=labels,
        num_rounds=rounds,
        mode=mode,
        min_nodes=MIN_FEDERATED_NODES,
        expected_nodes=len(sources),
        round_timeout=round_timeout,
        local_steps=local_steps,
        # The parties agree the weight cap up front; here: the largest node's row count,
        # so a node that lies about its count weighs no more than the largest honest one.
        max_examples_per_update=max(rows),
        output_dir=root / "provider" / "jobs" / job_id,
        dp_epsilon=dp_epsilon,
    )
    # The apps read the run config back through the same validation; fail here, not there.
    RunSpec.from_run_config(spec.to_run_config())
    target_modules(spec.lora, info.model_type)
    _reset_provisioning(root)
    private: dict[str, Path] = {}
    for name, source in sources.items():
        node_dir = root / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        private[name] = node_dir / f"private{source.suffix}"
        shutil.copyfile(source, private[name])
    topology = stage.topology = _topology(hosts, list(sources))
    if topology.loopback:  # one host for all: free ports, checked (the SuperLink's too)
        if port is not None:
            check_port_free(port)
        ports = (free_port(), free_port(), port or free_port())
    else:  # a fresh host each: the well-known ports are free there
        ports = (ProviderAddresses.fleet_port, ProviderAddresses.broker_port, port or 9093)
    addresses = ProviderAddresses(topology.provider.address, *ports)
    deployment = provision_loopback(
        root,
        model_dir=info.path,
        node_data=private,
        key_broker_port=addresses.broker_port,
        model_id=info.path.name if model else "all-MiniLM-L6-v2",
        threads=1,
        provider_host=addresses.host,
        catalog=None if not compare else _default_catalog(root),
        local_models=None if not compare else {min(sources): _own_model(root)},
        privacy=PrivacyBudget(epsilon=dp_epsilon) if dp_epsilon > 0 else None,
    )
    stage.commands = PartyCommands(
        topology, deployment.provider.root, deployment.node_configs, addresses, say=plain
    )
    spec = dataclasses.replace(
        spec,
        model_id=deployment.model_id,
        aggregator_dir=deployment.provider.aggregator,
        log_db=deployment.provider.log_db,
    )
    node_files = deployment.node_configs
    console.print(
        f"provider sealed {deployment.model_id} into {deployment.package} "
        f"(key {deployment.provider.keys}); {len(node_files)} nodes attest for it"
    )
    privacy = f" · DP epsilon {dp_epsilon:g} per node" if dp_epsilon > 0 else ""
    console.print(
        f"[bold]Ark Sandbox demo[/] · {len(node_files)} nodes · {rounds} rounds · "
        f"{mode}{privacy} · model {info.model_type} at {info.path}"
    )
    console.print(f"workspace: {root}")
    return spec, deployment


def _default_catalog(root: Path) -> Callable[[ProviderWorkspace, Path], Path]:
    """How the demo's provider publishes its catalog: the default models, built once
    under ``root/catalog-models`` from the installed MiniLM, sealed and signed."""
    from sandbox.ops.catalog_models import publish_default_catalog

    def publish(ws: ProviderWorkspace, folder: Path) -> Path:
        console.print(f"provider builds and seals its catalog (MiniLM-L6, -L3, -L1) into {folder}")
        return publish_default_catalog(ws, folder, root / "catalog-models")

    return publish


def _own_model(root: Path) -> Path:
    """The demo's first node's own model (the "1" of 1+N): a plain folder on that node
    only, here MiniLM's first three layers as the catalog builds them."""
    return root / "catalog-models" / "minilm-l3"


# What a demo run provisions afresh; earlier jobs under provider/jobs are kept.
_PROVISIONED = (
    "provider/identity",
    "provider/tls",
    "provider/public",
    "provider/roots",
    "provider/keys",
    "provider/policy.toml",
    "provider/run",
    "provider/events.jsonl",
    "provider/translog.db",
    "provider/translog.db-wal",
    "provider/translog.db-shm",
    "auditor",
    "provider/aggregator",
    "nodes",
    "fab",
    "distribution",
    "dev-manufacturer",
)


def _reset_provisioning(root: Path) -> None:
    """Remove identities and keys of an earlier demo run: each run provisions its own.
    Whatever that run's parties left running (it was killed, say) is stopped first, by
    their records, which go with the workspaces."""
    from sandbox.ops.parties import NODE_STOP, PROVIDER_STOP, stop_party

    for workspace, order in [
        *((node, NODE_STOP) for node in sorted((root / "nodes").glob("*"))),
        (root / "provider", PROVIDER_STOP),
    ]:
        if (workspace / "run").is_dir() and stop_party(workspace, order):
            raise ArkError(f"processes of an earlier demo in {workspace} would not stop")
    for name in _PROVISIONED:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _start_parties(stage: _Stage, deployment: LoopbackDeployment) -> PartyCommands:
    """The nodes approve the app, the provider starts its services and registers the
    nodes' keys, and every node starts, each with its own commands on its own host."""
    from sandbox.ops.apps import approve_app_dir, project_root

    assert stage.commands is not None
    cmds = stage.commands
    node_files = deployment.node_configs
    # A demo starts from a clean SuperLink state: no runs left pending by an earlier one.
    database = deployment.provider.root / "superlink.db"
    for stale in database.parent.glob(f"{database.name}*"):
        stale.unlink()
    # Each node's operator approves the app it reviewed (here: this checkout's FAB).
    digest = approve_app_dir(
        project_root(), list(node_files.values()), cmds.provider_dir.parent / "fab"
    )
    console.print(f"nodes approved app {digest[:16]}… (flwr build of this checkout)")
    cmds.start_provider()
    cmds.register_nodes()
    cmds.start_nodes()
    return cmds


def _run_demo(stage: _Stage, spec: RunSpec, deployment: LoopbackDeployment) -> dict[str, Any]:
    """Each party's commands on its host: the provider starts its services and registers
    the nodes' keys, the nodes start, the provider submits the job and follows it, the
    auditor checks the log, each node classifies a few of its own tickets; then every
    party stops its side. Returns the job's named results."""
    from sandbox.ops.federation import write_run_config
    from server.results import RESULTS_FILE, plot_metrics, render_table

    assert spec.output_dir is not None
    node_files = deployment.node_configs
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(out_dir / "run-config.toml", spec.to_run_config())
    cmds = _start_parties(stage, deployment)
    budget = DEMO_START_SECONDS + (spec.num_rounds + 1) * spec.round_timeout
    cmds.submit(run_config, timeout=budget)
    _audit_demo(cmds, deployment)
    inference = _inference_table(cmds, spec, deployment)
    stage.close()
    results: dict[str, Any] = json.loads((out_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    names = _node_names([f.parent / "journal.jsonl" for f in node_files.values()])
    results["node_names"] = names
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot_metrics(results, out_dir / "metrics.png", names)
    console.print(render_table(results, names))
    if inference is not None:
        console.print(inference)
    return results


def _run_comparison(stage: _Stage, spec: RunSpec, deployment: LoopbackDeployment) -> Path:
    """As :func:`_run_demo`, but the provider runs ``ark compare run`` over its catalog:
    one job per model on the same federation. Then the auditor checks the log (every
    scorecard), and each node classifies a few of its tickets with the model the
    comparison recommends. Returns the comparison's folder."""
    from sandbox.ops.catalog_models import DEFAULT_MODELS
    from sandbox.ops.comparison import load_comparison, recommend
    from sandbox.ops.comparison_job import comparison_dir
    from sandbox.ops.federation import write_run_config

    assert deployment.catalog is not None
    comparison = "cmp-" + spec.job_id.removeprefix("demo-")
    folder = comparison_dir(deployment.provider.root, comparison)
    folder.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(folder / "base-run-config.toml", spec.to_run_config())
    cmds = _start_parties(stage, deployment)
    models = len(DEFAULT_MODELS)  # the demo's provider publishes the default catalog
    budget = DEMO_START_SECONDS + (spec.num_rounds + 1) * spec.round_timeout
    own = min(deployment.node_configs)
    console.print(
        f"{own}'s operator also keeps a model of its own ({_own_model(cmds.provider_dir.parent)}"
        "); the comparison fine-tunes and scores it on that node only, and nothing of it leaves"
    )
    cmds.compare(
        deployment.catalog,
        run_config,
        comparison=comparison,
        timeout=budget,
        models=models,
        with_local=True,
        show=False,  # the demo prints the tables at its end
    )
    _audit_demo(cmds, deployment)
    result = load_comparison(folder)
    chosen = recommend(result).model_id
    runs = {m.model_id: m.run for m in result.models if not m.local}
    inference = None
    if chosen is not None and chosen not in runs:
        console.print(f"the recommended model is {chosen}, a node's own: it stays on that node")
    elif chosen is not None:
        console.print(f"each node now uses the recommended model, {chosen} (run {runs[chosen]})")
        inference = _inference_table(cmds, spec, deployment, run_id=runs[chosen])
    stage.close()
    if inference is not None:
        console.print(inference)
    return folder


def _print_comparison_verdict(folder: Path, elapsed: float, *, kept: bool) -> None:
    """The comparison's tables, notes and recommendation, and where its report is."""
    from sandbox.ops.comparison import load_comparison, notes, recommend, render_tables

    result = load_comparison(folder)
    for table in render_tables(result):
        console.print(table)
    for note in notes(result):
        plain(note)
    advice = recommend(result)
    pairs = [(c.model_id, c.node) for c in result.scorecards]
    plain(
        f"compared {len(result.models)} models on {len(result.nodes)} nodes: "
        f"{len(pairs)} signed scorecards, audit passed · {elapsed:.0f}s wall time"
    )
    if advice.model_id is None:
        plain(f"No model recommended: {advice.reason}.")
    else:
        plain(f"Recommended: {advice.model_id} ({advice.reason}).")
    plain(advice.rule)
    if kept:
        console.print(
            f"report: {folder / 'comparison.html'}\n"
            f"plot:   {folder / 'comparison.png'}\n"
            f"data:   {folder / 'comparison.json'} (ark compare results {folder})"
        )
    else:
        console.print("temporary workspace removed; pass --workdir DIR to keep the report")


def _audit_demo(cmds: PartyCommands, deployment: LoopbackDeployment) -> None:
    """What an auditor would do next, from a node's host (the log's port is published):
    verify the log over TLS, hold each node's journal against it, and write the HTML
    report. Any failure fails the demo."""
    root = cmds.provider_dir.parent
    host = next(iter(cmds.topology.nodes.values()))
    log, key = cmds.addresses.broker, str(deployment.provider.log_vkey)
    state = ["--state", str(root / "auditor")]
    console.print(
        f"[bold]audit[/] of the transparency log at {log} (key {key}), from {host.name}'s host"
    )
    journals: list[str] = []
    for config in deployment.node_configs.values():
        journal = config.parent / "journal.jsonl"
        journals += ["--journal", str(journal), "--journal-key", str(journal_public_path(journal))]
    try:
        cmds.ark(host, "audit", "verify", "--log", log, "--key", key, *state)
        cmds.ark(host, "audit", "crosscheck", "--log", log, "--key", key, *journals, *state)
        cmds.ark(
            host,
            "audit",
            "report",
            "--log",
            log,
            "--key",
            key,
            "--html",
            str(root / "audit-report.html"),
            *state,
        )
    except FederationError as exc:
        raise ArkError(f"the audit failed: {exc}") from None


def _inference_table(
    cmds: PartyCommands, spec: RunSpec, deployment: LoopbackDeployment, *, run_id: int | None = None
) -> Table | None:
    """What each node's operator can do next: classify a few of its own held-out tickets
    with the run's adapters, inside its own sandbox (`ark node infer` on its host, through
    its loopback inference API), before (baseline) and after (final) the run. The demo
    plays every operator, so it may read each node's data."""
    from clients.sandbox import load_split
    from sandbox.config import NodeConfig

    if spec.task != TASK_CLASSIFICATION:
        return None
    table = Table(title="on-prem inference in each node's sandbox: held-out tickets")
    for column in ("node", "ticket", "true", "before (baseline)", "after (final)"):
        table.add_column(column)
    for name, config in deployment.node_configs.items():
        node = NodeConfig.load(config)
        tickets = load_split(spec, node).heldout[:DEMO_TICKETS]
        inputs = config.parent / "demo-tickets.jsonl"
        inputs.write_text(
            "".join(json.dumps({"text": t.text}) + "\n" for t in tickets), encoding="utf-8"
        )
        answers = {}
        for adapter in ("baseline", "final"):
            out = cmds.ark(
                cmds.topology.nodes[name],
                "node",
                "infer",
                str(inputs),
                "--config",
                str(config),
                "--adapter",
                adapter,
                *(() if run_id is None else ("--run-id", str(run_id))),
                "--json",
                relay=False,
            )
            answers[adapter] = json.loads(out.strip().splitlines()[-1])["predictions"]
        for ticket, old, new in zip(tickets, answers["baseline"], answers["final"], strict=True):
            table.add_row(
                name,
                shorten(ticket.text, 48),
                ticket.target,
                _guess(old, ticket.target),
                _guess(new, ticket.target),
            )
    return table


def _guess(prediction: dict[str, Any], truth: str) -> str:
    label = prediction["label"]
    mark = "[green]✓[/]" if label == truth else "[red]✗[/]"
    return f"{mark} {label} {prediction['scores'][label]:.2f}"


def _print_verdict(results: dict[str, Any], elapsed: float, dp_epsilon: float = 0.0) -> None:
    headline = results["metrics"][0]
    first, last = results["rounds"][0]["nodes"], results["rounds"][-1]["nodes"]
    better_is_lower = headline in ("perplexity", "loss")
    improved = [
        n
        for n in first
        if n in last
        and (
            last[n][headline] < first[n][headline]
            if better_is_lower
            else last[n][headline] > first[n][headline]
        )
    ]
    ok = len(improved) == len(first) and len(first) > 0
    verdict = "[green]every node improved[/]" if ok else "[red]not every node improved[/]"
    console.print(
        f"{verdict} on held-out {headline} ({len(improved)}/{len(first)}) · "
        f"{elapsed:.0f}s wall time"
    )
    if not ok and dp_epsilon > 0:
        # The run, its privacy accounting and the audit succeeded; the noise that bounds
        # each record's influence cost the accuracy. That is the finding, not a failure.
        console.print(
            f"[yellow]with differential privacy at epsilon {dp_epsilon:g} per node[/], the "
            "noise DP-SGD adds outweighs what these few rows per node teach in this many "
            "steps (README, 'Differential privacy', has the accuracy at each epsilon)"
        )
        return
    if not ok:
        raise typer.Exit(1)
