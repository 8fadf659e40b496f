"""``ark demo``: the whole job on real Flower processes on loopback."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from sandbox.config import (
    MIN_FEDERATED_NODES,
    MODES,
    TASK_CLASSIFICATION,
    TASKS,
    RunSpec,
)
from sandbox.errors import ArkError, FederationError
from sandbox.events import Key
from sandbox.journal import journal_public_path, read_journal
from sandbox.ops.cli.base import app, console, err_console, fail, shorten

if TYPE_CHECKING:
    from sandbox.ops.federation import Federation
    from sandbox.ops.provision import LoopbackDeployment

DEMO_START_SECONDS = 300.0
# Held-out tickets per node the demo classifies through the node's inference API.
DEMO_TICKETS = 4


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs the same way as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _project_root() -> Path:
    """The Flower app directory (holding pyproject.toml) that ``flwr run`` builds."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FederationError(
            f"cannot find the app's pyproject.toml next to {root}; install ark-sandbox "
            "from a source checkout (pip install -e .)"
        )
    return root


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
    mode: Annotated[str, typer.Option(help=f"Aggregation: {', '.join(MODES)}.")] = "fedavg",
    local_steps: Annotated[
        int, typer.Option(min=1, help="Local steps per round.")
    ] = RunSpec.local_steps,
    port: Annotated[int | None, typer.Option(help="SuperLink port (default: a free one).")] = None,
    round_timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds a round waits for nodes.")
    ] = 300.0,
) -> None:
    """Run the whole federated LoRA job on real Flower processes on loopback."""
    from sandbox.ops.federation import Federation

    started = time.monotonic()
    temp = None if workdir is not None else Path(tempfile.mkdtemp(prefix="ark-demo-"))
    root = (workdir or temp or Path()).resolve()
    fed = Federation(root, port=port)
    try:
        with _sigterm_as_interrupt():
            spec, deployment = _prepare_demo(
                root, data_dir, nodes, model, task, mode, rounds, local_steps, port, round_timeout
            )
            results = _run_demo(fed, spec, deployment, started)
        _print_verdict(results, time.monotonic() - started)
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
        if fed.leftovers:
            err_console.print(f"[red]interrupted:[/] processes still alive: {fed.leftovers}")
        else:
            err_console.print("[yellow]interrupted:[/] every process the demo started was stopped")
        raise typer.Exit(130) from None
    except ArkError as exc:
        raise fail(exc) from exc
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


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
) -> tuple[RunSpec, LoopbackDeployment]:
    """Validate every input, then lay out node workspaces and the run config."""
    from clients.data import derive_labels, load_examples
    from sandbox.lora import target_modules
    from sandbox.models import default_model_dir, inspect_model_dir
    from sandbox.ops.federation import check_port_free, free_port
    from sandbox.ops.provision import provision_loopback

    if nodes < MIN_FEDERATED_NODES:
        raise ArkError(f"--nodes {nodes} is below the minimum of {MIN_FEDERATED_NODES}")
    if task not in TASKS or mode not in MODES:
        raise ArkError(f"--task must be one of {TASKS} and --mode one of {MODES}")
    if port is not None:
        check_port_free(port)
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
    deployment = provision_loopback(
        root,
        model_dir=info.path,
        node_data=private,
        key_broker_port=free_port(),
        model_id=info.path.name if model else "all-MiniLM-L6-v2",
        threads=1,
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
    console.print(
        f"[bold]Ark Sandbox demo[/] · {len(node_files)} nodes · {rounds} rounds · "
        f"{mode} · model {info.model_type} at {info.path}"
    )
    console.print(f"workspace: {root}")
    return spec, deployment


# What a demo run provisions afresh; earlier jobs under provider/jobs are kept.
_PROVISIONED = (
    "provider/identity",
    "provider/tls",
    "provider/public",
    "provider/roots",
    "provider/keys",
    "provider/policy.toml",
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
    """Remove identities and keys of an earlier demo run: each run provisions its own."""
    for name in _PROVISIONED:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _run_demo(
    fed: Federation, spec: RunSpec, deployment: LoopbackDeployment, started: float
) -> dict[str, Any]:
    """Start the federation, run the job, stop everything; return the named results."""
    from sandbox.ops.apps import approve_app_dir
    from sandbox.ops.federation import write_run_config
    from server.results import RESULTS_FILE, plot_metrics, render_table

    assert spec.output_dir is not None  # set by _prepare_demo
    node_files = deployment.node_configs
    out_dir = spec.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(out_dir / "run-config.toml", spec.to_run_config())
    # A demo starts from a clean SuperLink state: no runs left pending by an earlier one.
    for stale in fed.database.parent.glob(f"{fed.database.name}*"):
        stale.unlink()
    # Each node's operator approves the app it reviewed (here: this checkout's FAB).
    digest = approve_app_dir(_project_root(), list(node_files.values()), fed.workdir / "fab")
    console.print(f"nodes approved app {digest[:16]}… (flwr build of this checkout)")
    with fed:
        broker_port = int(deployment.key_broker.rsplit(":", 1)[1])
        fed.start_key_broker(broker_port)
        console.print(f"key broker up on 127.0.0.1:{broker_port} (TLS, attestation-gated)")
        fed.start_superlink()
        console.print(
            f"SuperLink up on 127.0.0.1:{fed.port} (loopback only, TLS, database {fed.database})"
        )
        console.print(
            f"gateway up on {fed.node_address} (nginx, TLS): nodes reach the Fleet API only"
        )
        fed.start_nodes(node_files)
        console.print(
            f"SuperNodes up: {', '.join(node_files)} (each key registered with the SuperLink)"
        )
        run_id = fed.submit(_project_root(), run_config)
        console.print(f"run {run_id} submitted")
        progress = _Progress(out_dir, spec.num_rounds, started)
        with console.status("ServerApp starting") as status:
            progress.status = status
            budget = DEMO_START_SECONDS + (spec.num_rounds + 1) * spec.round_timeout
            outcome = fed.wait(run_id, timeout=budget, on_tick=progress.tick)
        if not outcome.ok:
            raise FederationError(
                f"run {run_id} ended {outcome.status}; ServerApp log:\n{fed.run_log(run_id)}"
            )
        _audit_demo(fed.workdir, deployment, f"127.0.0.1:{broker_port}")
        inference = _inference_table(spec, deployment)
        leftovers = fed.stop()
    if leftovers:
        err_console.print(f"[yellow]warning:[/] processes still alive: {leftovers}")
    results: dict[str, Any] = json.loads((out_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    names = _node_names([f.parent / "journal.jsonl" for f in node_files.values()])
    results["node_names"] = names
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot_metrics(results, out_dir / "metrics.png", names)
    console.print(render_table(results, names))
    if inference is not None:
        console.print(inference)
    return results


def _audit_demo(root: Path, deployment: LoopbackDeployment, log: str) -> None:
    """What an auditor would do next: verify the log over TLS, hold each node's journal
    against it, and write the HTML report. Any failure fails the demo."""
    from sandbox.ops.cli.audit import audit_crosscheck, audit_report, audit_verify

    key = deployment.provider.log_vkey
    journals = [path.parent / "journal.jsonl" for path in deployment.node_configs.values()]
    console.print(f"[bold]audit[/] of the transparency log at {log} (key {key})")
    try:
        audit_verify(log=log, key=key, state=root / "auditor", ca=None, origin=None)
        audit_crosscheck(
            log=log,
            key=key,
            journal=journals,
            journal_key=[journal_public_path(path) for path in journals],
            state=root / "auditor",
            ca=None,
            origin=None,
        )
        audit_report(
            log=log,
            key=key,
            html=root / "audit-report.html",
            state=root / "auditor",
            ca=None,
            origin=None,
        )
    except typer.Exit as exc:
        if exc.exit_code:
            raise ArkError(f"the audit failed (exit code {exc.exit_code}); see above") from None


def _inference_table(spec: RunSpec, deployment: LoopbackDeployment) -> Table | None:
    """What each node's operator can do next: classify a few of its own held-out tickets
    with the run's adapters, inside its own sandbox (its loopback inference API), before
    (baseline) and after (final) the run; shown once the sandboxes have stopped. The demo
    plays every operator, so it may read each node's data."""
    from clients.sandbox import load_split
    from sandbox.config import NodeConfig
    from sandbox.ops.inference_client import InferenceClient

    if spec.task != TASK_CLASSIFICATION:
        return None
    table = Table(title="on-prem inference in each node's sandbox: held-out tickets")
    for column in ("node", "ticket", "true", "before (baseline)", "after (final)"):
        table.add_column(column)
    for name, config in deployment.node_configs.items():
        node = NodeConfig.load(config)
        tickets = load_split(spec, node).heldout[:DEMO_TICKETS]
        texts = [ticket.text for ticket in tickets]
        with InferenceClient.for_node(node) as client:
            before = client.classify(texts, "baseline")["predictions"]
            after = client.classify(texts, "final")["predictions"]
        for ticket, old, new in zip(tickets, before, after, strict=True):
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


class _Progress:
    """Prints a line per finished round (for logs) and updates a spinner (for terminals)."""

    def __init__(self, out_dir: Path, rounds: int, started: float):
        self.state = out_dir / "checkpoints" / "state.json"
        self.rounds = rounds
        self.started = started
        self.reported = -1
        self.status: Any = None

    def tick(self) -> None:
        if not self.state.exists():
            return
        done = int(json.loads(self.state.read_text(encoding="utf-8"))["round"])
        elapsed = time.monotonic() - self.started
        if done != self.reported:
            self.reported = done
            what = "initial adapter ready" if done == 0 else "aggregated"
            console.print(f"round {done}/{self.rounds} {what} · {elapsed:.0f}s")
        phase = "final evaluation" if done >= self.rounds else f"round {done + 1}"
        if self.status is not None:
            self.status.update(f"{phase} running on the nodes · {elapsed:.0f}s")


def _print_verdict(results: dict[str, Any], elapsed: float) -> None:
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
    if not ok:
        raise typer.Exit(1)
