"""A comparison job (1+N): the same fine-tuning, one model after another, on one federation.

``ark compare run`` takes models from the provider's signed catalog and a run config,
and for each model submits one Flower run on the running SuperLink: the same data,
rounds, steps and seed, only ``model-id`` and ``model-path`` differ. Before the first
run it logs ``comparison_started`` (which models, by manifest digest), after the last
``comparison_finished`` (which run scored which model): with them the auditor can tell a
scorecard that is missing from one that was never due. The nodes' sandboxes, the
SuperLink, the gateway and the key broker start once for all of them.

Each node's sandbox commits to its held-out set and signs a scorecard per model (see
``clients/scoring.py``); the ServerApp logs both. At the end the scorecards are read
back from the jobs' event files, opened (their signatures checked), and written with the
catalog's figures as ``comparison.json``, ``comparison.html`` and ``comparison.png``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.catalog import Catalog, CatalogEntry, load_catalog
from sandbox.config import LOCAL_MODEL, TASK_CLASSIFICATION, RunSpec
from sandbox.errors import ConfigError, FederationError, ScorecardError
from sandbox.events import (
    JOB_EVENTS_FILE,
    ComparedModel,
    ComparisonFinished,
    ComparisonStarted,
    EventSink,
    JsonlEventSink,
    ScorecardLogged,
)
from sandbox.files import write_atomic
from sandbox.ops.comparison import (
    COMPARISON_FILE,
    COMPARISON_FORMAT,
    comparison_from_json,
    write_report,
)
from sandbox.ops.federation import read_run_config, write_run_config
from sandbox.ops.provision import ProviderWorkspace, catalog_sources
from sandbox.ops.translog.audit import certified_signers, decode
from sandbox.scorecard import Scorecard, open_scorecard
from sandbox.translog.store import LogStore

Say = Callable[[str], Any]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_comparison_id(now: dt.datetime) -> str:
    """A fresh comparison id from the time (UTC), readable in a folder listing."""
    return "cmp-" + now.strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True)
class ComparisonPlan:
    """What a comparison will run: its id, the base run config, the catalog's entries to
    compare (in order) and the provider's plaintext copy of each (the ServerApp builds
    each run's initial adapter from it)."""

    comparison: str
    base: RunSpec
    catalog: Catalog
    models: tuple[CatalogEntry, ...]
    sources: dict[str, Path]
    # Whether each node's own model (the "1") is fine-tuned and scored too, last.
    with_local: bool = False

    @property
    def job_ids(self) -> dict[str, str]:
        ids = [m.model_id for m in self.models] + ([LOCAL_MODEL] if self.with_local else [])
        return {model_id: f"{self.comparison}-{model_id}" for model_id in ids}


def plan_comparison(
    workdir: Path,
    catalog_folder: Path,
    run_config: Path,
    *,
    models: Sequence[str] = (),
    comparison: str | None = None,
    with_local: bool = False,
    now: dt.datetime | None = None,
) -> ComparisonPlan:
    """Check everything a comparison needs before anything runs: the catalog verifies
    with this provider's key, each model is in it and fits the run's task, and the
    provider holds each one's plaintext model folder."""
    ws = ProviderWorkspace(workdir.resolve()).require()
    base = read_run_config(run_config)
    name = comparison or new_comparison_id(now or dt.datetime.now(dt.UTC))
    if not _NAME.fullmatch(name):
        raise ConfigError(f"comparison id {name!r} must be a plain name (letters, digits, . _ -)")
    catalog = load_catalog(catalog_folder, [ws.signer().public_key()])
    chosen = list(models) or [m.model_id for m in catalog.models if base.task in m.tasks]
    if not chosen:
        raise ConfigError(f"no model in the catalog is for task {base.task!r}", path=catalog_folder)
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"a model is named twice: {chosen}")
    entries = tuple(catalog.entry(model_id) for model_id in chosen)
    for entry in entries:
        if base.task not in entry.tasks:
            raise ConfigError(
                f"model {entry.model_id!r} is listed for {list(entry.tasks)}, not {base.task!r}",
                path=catalog_folder,
            )
    known = catalog_sources(ws)
    missing = [e.model_id for e in entries if e.model_id not in known]
    if missing:
        raise ConfigError(
            f"no plaintext model folder recorded for {missing}: seal them with "
            "`ark provider seal` in this workspace",
            path=ws.root,
        )
    return ComparisonPlan(
        name,
        base,
        catalog,
        entries,
        {e.model_id: known[e.model_id] for e in entries},
        with_local,
    )


def comparison_dir(workdir: Path, comparison: str) -> Path:
    return workdir.resolve() / "comparisons" / comparison


def model_run_config(plan: ComparisonPlan, model_id: str, folder: Path) -> Path:
    """The run config of ``model_id``'s run: the base one with only the model, its job id
    and the comparison changed. The local-model run keeps the base model path, which no
    one reads (each node fine-tunes its own model)."""
    spec = dataclasses.replace(
        plan.base,
        model_id=model_id,
        model_path=plan.sources.get(model_id, plan.base.model_path),
        job_id=plan.job_ids[model_id],
        comparison=plan.comparison,
        output_dir=None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_run_config(folder / f"{model_id}.toml", spec.to_run_config())


Submit = Callable[[Path], tuple[int, Path]]


@dataclass(frozen=True)
class ModelJob:
    """Where one model's run of the comparison went: its Flower run and job folder."""

    run_id: int
    job_dir: Path


def run_comparison(
    plan: ComparisonPlan,
    folder: Path,
    events: EventSink,
    submit: Submit,
    *,
    say: Say = print,
) -> dict[str, ModelJob]:
    """Log the comparison's start, run each model's job in turn with ``submit`` (which
    submits a run config, follows it to its end and returns its Flower run id and job
    folder; it raises when the run fails), then log its end."""
    events.emit(
        ComparisonStarted(
            time=dt.datetime.now(dt.UTC),
            comparison=plan.comparison,
            task=plan.base.task,
            models=[
                ComparedModel(model_id=m.model_id, manifest_sha256=m.manifest_sha256)
                for m in plan.models
            ],
        )
    )
    jobs: dict[str, ModelJob] = {}
    order = list(plan.job_ids)
    for number, model_id in enumerate(order, 1):
        what = "each node's own model" if model_id == LOCAL_MODEL else model_id
        say(f"model {number}/{len(order)}: {what}")
        run_id, job_dir = submit(model_run_config(plan, model_id, folder / "run-configs"))
        jobs[model_id] = ModelJob(run_id, job_dir)
        record = {k: {"run": v.run_id, "job_dir": str(v.job_dir)} for k, v in jobs.items()}
        write_atomic(folder / "runs.json", json.dumps(record, indent=2).encode())
    events.emit(
        ComparisonFinished(
            time=dt.datetime.now(dt.UTC),
            comparison=plan.comparison,
            runs={model_id: job.run_id for model_id, job in jobs.items()},
        )
    )
    return jobs


def _job_events(job_dir: Path) -> list[dict[str, Any]]:
    sink = JsonlEventSink(job_dir / JOB_EVENTS_FILE)
    if not sink.path.is_file():
        raise FederationError(f"{sink.path}: the job's events are missing")
    return sink.read()


def collect_scorecards(
    plan: ComparisonPlan,
    jobs: dict[str, ModelJob],
    names: dict[str, str],
    signers: set[tuple[str, ...]],
    *,
    max_price: float | None = None,
    say: Say = print,
) -> dict[str, Any]:
    """The comparison as ``comparison.json`` holds it: the catalog's figures of each
    model, each node, and every scorecard the jobs logged that verifies, is signed by a
    key in ``signers`` (ueid, key SHA-256: certified for that node's attested sandbox)
    and names this comparison and its job's run. One that does not is left out and said
    (a node can sign with a key of its own; the audit reports it too)."""
    scorecards: list[dict[str, Any]] = []
    nodes: dict[str, dict[str, Any]] = {}
    locals_: list[dict[str, Any]] = []
    for model_id, job in jobs.items():
        for event in _job_events(job.job_dir):
            if event.get("kind") != ScorecardLogged.kind:
                continue
            node = str(event.get("node"))
            try:
                card, signer = open_scorecard(event.get("scorecard"))
                if card.model_id != model_id:
                    raise ScorecardError(f"it scores {card.model_id!r}")
                if (card.comparison, card.run) != (plan.comparison, job.run_id):
                    raise ScorecardError("it names another comparison or run")
                if (card.ueid, signer) not in signers:
                    raise ScorecardError("its key is not certified for that node's sandbox")
            except (ScorecardError, TypeError, ValueError) as exc:
                say(f"scorecard of {model_id} from node {node} left out: {exc}")
                continue
            name = names.get(node, card.ueid)
            nodes.setdefault(
                name, {"name": name, "ueid": card.ueid, "examples": card.heldout_count}
            )
            scored = model_id
            if model_id == LOCAL_MODEL:  # each node's own model is a model of its own
                scored = f"{LOCAL_MODEL}:{name}"
                locals_.append(_local_model(scored, card, job))
            scorecards.append(
                {
                    "model_id": scored,
                    "node": name,
                    "before": dict(card.before),
                    "after": dict(card.after),
                    "cost": card.cost.to_json(),
                }
            )
    base = plan.base
    pairs = {(card["model_id"], card["node"]) for card in scorecards}
    # Every node is expected to score every catalog model; its own model is optional.
    missing = [
        {"model_id": m.model_id, "node": name}
        for m in plan.models
        for name in sorted(nodes)
        if (m.model_id, name) not in pairs
    ]
    for pair in missing:
        say(f"no scorecard of {pair['model_id']} from node {pair['node']}")
    return {
        "format": COMPARISON_FORMAT,
        "comparison": plan.comparison,
        "task": base.task,
        "metric": "accuracy" if base.task == TASK_CLASSIFICATION else "perplexity",
        "rule": {"max_price_per_1k_training_examples": max_price},
        "budget": {
            "rounds": base.num_rounds,
            "local_steps": base.local_steps,
            "batch_size": base.batch_size,
        },
        "models": [
            *(
                {
                    "model_id": m.model_id,
                    "manifest_sha256": m.manifest_sha256,
                    "architecture": m.architecture,
                    "layers": m.layers,
                    "hidden_size": m.hidden_size,
                    "parameters": m.parameters,
                    "licence": m.licence,
                    "price": dataclasses.asdict(m.price),
                    "job": plan.job_ids[m.model_id],
                    "run": jobs[m.model_id].run_id,
                    "local": False,
                }
                for m in plan.models
            ),
            *locals_,
        ],
        "nodes": sorted(nodes.values(), key=lambda n: n["name"]),
        "scorecards": scorecards,
        "missing": missing,
    }


def _local_model(model_id: str, card: Scorecard, job: ModelJob) -> dict[str, Any]:
    """A node's own model as ``comparison.json`` lists it: named by its weights digest
    only (the provider's comparison knows nothing else of it), with no price."""
    return {
        "model_id": model_id,
        "manifest_sha256": card.manifest_sha256,
        "architecture": None,
        "layers": None,
        "hidden_size": None,
        "parameters": None,
        "licence": None,
        "price": None,
        "job": card.job,
        "run": job.run_id,
        "local": True,
    }


def finish_comparison(
    plan: ComparisonPlan,
    folder: Path,
    jobs: dict[str, ModelJob],
    names: dict[str, str],
    log_db: Path,
    *,
    max_price: float | None = None,
    say: Say = print,
) -> Path:
    """Write ``comparison.json`` from the jobs' scorecards, checked as any reader checks
    it, and the HTML and PNG report beside it; the path of ``comparison.json``."""
    log = LogStore(log_db, readonly=True)
    try:
        signers = certified_signers(decode(log.entries(0, log.size())))
    finally:
        log.close()
    document = collect_scorecards(plan, jobs, names, signers, max_price=max_price, say=say)
    path = folder / COMPARISON_FILE
    comparison = comparison_from_json(document, source=path)
    write_atomic(path, json.dumps(document, indent=2).encode())
    html, png = write_report(comparison, folder)
    say(f"comparison written: {path}, {html}, {png}")
    return path
