"""``ark provider``: identities, sealed models, the key broker, run results."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sandbox.config import TASK_CLASSIFICATION, TASKS
from sandbox.errors import ArkError
from sandbox.events.members import listed_count
from sandbox.ops.cli.base import (
    console,
    fail,
    party_command,
    plain,
    provider_app,
    read_json,
    stop_on_signals,
    stop_side,
)

if TYPE_CHECKING:
    from sandbox.catalog import Price


@provider_app.command("check-model")
def check_model(
    model_dir: Path,
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")] = TASK_CLASSIFICATION,
) -> None:
    """Check that a local model directory can serve as a base model for TASK."""
    from sandbox.models import inspect_model_dir

    try:
        info = inspect_model_dir(model_dir, task)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(
        f"ok: {info.model_type} for {task}; weights: {', '.join(p.name for p in info.weight_files)}"
    )


@provider_app.command("results")
def show_results(job_dir: Path) -> None:
    """Print the before/after table of a finished job directory."""
    from server.results import RESULTS_FILE, render_table

    results = read_json(job_dir / RESULTS_FILE)
    console.print(render_table(results, results.get("node_names")))


Workdir = Annotated[Path, typer.Option(help="The provider workspace.")]


@provider_app.command("init")
def provider_init(
    workdir: Workdir = Path("provider"),
    trust_root: Annotated[
        list[Path] | None,
        typer.Option(help="Manufacturer root certificate (PEM) to trust for stub TEEs."),
    ] = None,
    allow_stub: Annotated[
        bool, typer.Option(help="Accept stub evidence (development only).")
    ] = True,
    manufacturer: Annotated[
        Path | None,
        typer.Option(help="Development manufacturer folder that certifies the aggregator."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(help="A name or IP address nodes reach this host at (repeatable)."),
    ] = None,
) -> None:
    """Create the provider's identities, TLS material, trusted roots and appraisal policy."""
    from sandbox.ops.provision import init_aggregator, init_provider

    try:
        ws = init_provider(
            workdir, trust_roots=trust_root or [], allow_stub=allow_stub, hosts=host or []
        )
        if manufacturer is not None:
            console.print(f"aggregator identity: {init_aggregator(ws, manufacturer)}")
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"provider workspace ready: {ws.root}")
    console.print(f"give nodes this folder out of band: {ws.public}")
    console.print(f"appraisal policy: {ws.policy} (code measurement of this checkout included)")


@provider_app.command("trust-root")
def provider_trust_root(
    pem: Path,
    workdir: Workdir = Path("provider"),
    tee: Annotated[str, typer.Option(help="TEE kind this root vouches for.")] = "stub",
) -> None:
    """Trust a manufacturer root certificate for one TEE kind."""
    from sandbox.ops.provision import ProviderWorkspace, add_trust_root

    try:
        target = add_trust_root(ProviderWorkspace(workdir).require(), pem, tee=tee, name=pem.stem)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"trusted for {tee}: {target}")


@provider_app.command("allow-node")
def provider_allow_node(ueid: str, workdir: Workdir = Path("provider")) -> None:
    """Add a node's attested identity (its ueid) to the policy's allowlist."""
    from sandbox.ops.provision import ProviderWorkspace, allow_node

    try:
        policy = allow_node(ProviderWorkspace(workdir).require(), ueid)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"allowed nodes: {', '.join(sorted(policy.allowed_nodes or ()))}")


@provider_app.command("seal")
def provider_seal(
    model_dir: Path,
    out: Annotated[Path, typer.Option(help="Directory to write the sealed package to.")],
    workdir: Workdir = Path("provider"),
    model_id: Annotated[str | None, typer.Option(help="Model id (default: dir name).")] = None,
) -> None:
    """Seal a model directory: encrypted weights, signed manifest, key kept in the keystore."""
    from sandbox.models import inspect_model_config
    from sandbox.ops.provision import ProviderWorkspace, seal_model

    try:
        inspect_model_config(model_dir, TASK_CLASSIFICATION)
        manifest = seal_model(
            ProviderWorkspace(workdir), model_dir, out, model_id=model_id or model_dir.name
        )
    except ArkError as exc:
        raise fail(exc) from exc
    sealed = [f["name"] for f in manifest["files"] if "sealed" in f]
    console.print(
        f"sealed {manifest['model_id']} as key {manifest['key_id']} into {out}: "
        f"{len(manifest['files'])} files, encrypted: {', '.join(sealed)}"
    )


def _pairs(flag: str, values: list[str] | None, models: dict[str, str] | None) -> dict[str, str]:
    """``ID=VALUE`` flag values by id; a ConfigError names the flag and the value that is
    malformed, repeats an id, or (``models`` given) names a model no --model lists."""
    from sandbox.errors import ConfigError

    pairs: dict[str, str] = {}
    for value in values or []:
        model_id, sep, rest = value.partition("=")
        if not sep or not model_id or not rest:
            raise ConfigError(f"{flag} {value!r}: expected ID=VALUE")
        if model_id in pairs:
            raise ConfigError(f"{flag} {value!r}: model {model_id!r} is given twice")
        if models is not None and model_id not in models:
            raise ConfigError(f"{flag} {value!r}: no --model names {model_id!r}")
        pairs[model_id] = rest
    return pairs


def _price(model_id: str, value: str, currency: str) -> Price:
    """``--price ID=TRAIN,INFER`` (per 1k training examples, per 1k inferences) in
    ``currency`` as a Price; a ConfigError names the flag and the value."""
    from sandbox.catalog import Price
    from sandbox.errors import CatalogInvalid, ConfigError

    parts = value.split(",")
    flag = f"--price {model_id}={value}"
    try:
        if len(parts) != 2:
            raise ValueError("not two numbers")
        return Price(currency, float(parts[0]), float(parts[1]))
    except ValueError as exc:
        raise ConfigError(f"{flag}: expected TRAIN,INFER (two prices): {exc}") from exc
    except CatalogInvalid as exc:
        if exc.key == "currency":
            raise ConfigError(f"--currency {currency!r}: {exc.problem}") from exc
        raise ConfigError(f"{flag}: {exc.key} {exc.problem}") from exc


def _package_name(folder: Path, value: str) -> str:
    """The package folder's name in ``folder``: ``value`` is that name, or a path to it."""
    from sandbox.errors import ConfigError

    path = Path(value)
    if len(path.parts) == 1:
        return value
    if path.resolve().parent != folder.resolve():
        raise ConfigError(f"{value!r} is not a package folder directly inside {folder}")
    return path.name


@provider_app.command("catalog")
def provider_catalog(
    folder: Path,
    model: Annotated[
        list[str],
        typer.Option(help="ID=PACKAGE: a model sealed into FOLDER/PACKAGE (repeatable)."),
    ],
    licence: Annotated[
        list[str], typer.Option(help="ID=TEXT: the model's licence (one per model).")
    ],
    price: Annotated[
        list[str],
        typer.Option(help="ID=TRAIN,INFER: price per 1k training examples, per 1k inferences."),
    ],
    task: Annotated[
        list[str] | None,
        typer.Option(
            help=f"ID=TASK[,TASK]: among {', '.join(TASKS)} (default: {TASK_CLASSIFICATION})."
        ),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(help="ID=DIR: the plaintext model it was sealed from (default: recorded)."),
    ] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 currency of every price.")] = "EUR",
    provider: Annotated[
        str | None, typer.Option(help="Provider name in the catalog (default: workdir name).")
    ] = None,
    workdir: Workdir = Path("provider"),
) -> None:
    """Sign a catalog of models already sealed into FOLDER (catalog.json + catalog.sig),
    and log one model_published per model.

    Each entry's architecture, layers and hidden size come from the package's signed
    manifest, its parameter count from the plaintext model's safetensors headers.
    """
    from sandbox.errors import ConfigError
    from sandbox.ops.provision import ProviderWorkspace, describe_package, publish_catalog

    ws = ProviderWorkspace(workdir)
    try:
        ws.require()
        models = _pairs("--model", model, None)
        licences = _pairs("--licence", licence, models)
        prices = _pairs("--price", price, models)
        tasks = _pairs("--task", task, models)
        sources = _pairs("--source", source, models)
        entries = []
        for model_id, package in models.items():
            for flag, given in (("--licence", licences), ("--price", prices)):
                if model_id not in given:
                    raise ConfigError(f"{flag}: missing for model {model_id!r}")
            cost = _price(model_id, prices[model_id], currency)
            try:
                entry = describe_package(
                    ws,
                    folder,
                    _package_name(folder, package),
                    licence=licences[model_id],
                    price=cost,
                    tasks=tasks.get(model_id, TASK_CLASSIFICATION).split(","),
                    model_dir=Path(sources[model_id]) if model_id in sources else None,
                )
            except ArkError as exc:
                raise ConfigError(f"--model {model_id}={package}: {exc}") from exc
            if entry.model_id != model_id:
                raise ConfigError(
                    f"--model {model_id}={package}: the package is sealed as model "
                    f"{entry.model_id!r}"
                )
            entries.append(entry)
        path = publish_catalog(ws, folder, entries, provider=provider or ws.root.resolve().name)
    except ArkError as exc:
        raise fail(exc) from exc
    for entry in entries:
        console.print(
            f"{entry.model_id}: {entry.architecture}, {entry.layers} layers, "
            f"{entry.parameters:,} parameters; {entry.licence}; {entry.price.currency} "
            f"{entry.price.per_1k_training_examples:g} per 1k training examples, "
            f"{entry.price.per_1k_inferences:g} per 1k inferences"
        )
    console.print(f"catalog signed: {path} ({len(entries)} models)")


@provider_app.command("check-package")
def provider_check_package(package: Path, workdir: Workdir = Path("provider")) -> None:
    """Decrypt a sealed package with the provider's keystore and verify every digest.

    Refuses a package that ships any file but config and tokenizer files in plain.
    """
    from sandbox.ops.provision import ProviderWorkspace, check_package

    try:
        opened = check_package(ProviderWorkspace(workdir), package)
    except ArkError as exc:
        raise fail(exc) from exc
    for entry in opened.manifest["files"]:
        kind = "decrypted" if "sealed" in entry else "plain"
        console.print(f"ok  {entry['name']:<28} {entry['size']:>12,} bytes  {kind}, sha256 matches")
    console.print(
        f"package {opened.manifest['model_id']} (key {opened.manifest['key_id']}): "
        "signature and every digest verified"
    )


@provider_app.command("serve")
def provider_serve(
    workdir: Workdir = Path("provider"),
    address: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:8100",
) -> None:
    """Run the key broker and the transparency log (gRPC over TLS) until interrupted.

    Both services share one port. The broker appends every appraisal, release and
    denial to the log; a checkpoint is signed whenever a reader asks and the log grew,
    and once more on the way out so the database holds a current one for offline audits.
    """
    import logging

    from sandbox.attestation.verifier import AppraisalPolicy
    from sandbox.ops.keybroker.service import serve
    from sandbox.ops.provision import ProviderWorkspace, build_broker
    from sandbox.ops.translog.service import add_log_service
    from sandbox.translog.store import LogStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ws = ProviderWorkspace(workdir)
    try:
        store = LogStore(ws.require().log_db)
        signer = ws.log_signer()
        broker = build_broker(ws, ws.event_sink(store))
        server, port = serve(
            broker,
            address=address,
            cert=ws.tls / "server.crt",
            key=ws.tls / "server.key",
            services=[lambda grpc_server: add_log_service(grpc_server, store, signer)],
        )
    except (ArkError, OSError) as exc:
        raise fail(exc) from exc
    stop = stop_on_signals()
    console.print(
        f"key broker listening on {address.rsplit(':', 1)[0]}:{port} (TLS); "
        f"policy {broker.policy.policy_id}; events to {ws.events} and the transparency "
        f"log {ws.log_db} (origin {signer.name})"
    )

    # `ark provider allow-node` and policy edits apply without a restart; a policy file
    # that no longer loads is reported and the last good policy stays in force.
    def version() -> tuple[int, int, int]:
        info = ws.policy.stat()
        return info.st_ino, info.st_size, info.st_mtime_ns

    seen = version()
    while not stop.wait(1.0):
        try:
            current = version()
        except OSError:
            continue
        if current == seen:
            continue
        try:
            broker.policy = AppraisalPolicy.load(ws.policy)
        except ArkError as exc:
            logging.getLogger("ark.keybroker").error("policy not reloaded: %s", exc)
            continue  # retried on the next tick; the last good policy stays in force
        seen = current
        logging.getLogger("ark.keybroker").info("policy reloaded: %s", broker.policy.policy_id)
    server.stop(grace=2).wait()
    broker.flush()  # the open windows' rate-limit summaries reach the log before it closes
    store.sign_checkpoint(signer)
    store.close()
    console.print("key broker and log stopped")


@provider_app.command("gateway")
def provider_gateway(
    workdir: Workdir = Path("provider"),
    listen: Annotated[
        str, typer.Option(help="host:port nodes connect to (the node-facing address).")
    ] = "127.0.0.1:9092",
    superlink: Annotated[
        str, typer.Option(help="The SuperLink's own host:port, on loopback.")
    ] = "127.0.0.1:9093",
    insecure: Annotated[
        bool,
        typer.Option(help="Plaintext on both sides, without node authentication (tests only)."),
    ] = False,
    nginx: Annotated[str | None, typer.Option(help="The nginx binary.")] = None,
) -> None:
    """Run the node-facing gateway (nginx) in front of the SuperLink until interrupted.

    It terminates TLS with the provider's certificate and forwards only the Fleet API
    calls a SuperNode makes; the Control and Runtime APIs stay on the provider's host.
    """
    from sandbox.ops.gateway import GatewaySpec, start_gateway
    from sandbox.ops.processes import stop_processes
    from sandbox.ops.provision import ProviderWorkspace
    from sandbox.ops.tls import TlsFiles

    ws = ProviderWorkspace(workdir)
    tls = None
    if not insecure:
        tls = TlsFiles.in_dir(ws.tls)
        if missing := tls.missing():
            named = ", ".join(map(str, missing))
            raise fail(ArkError(f"TLS material missing: {named} (ark provider init)"))
    try:
        spec = GatewaySpec(
            listen=listen,
            superlink=superlink,
            state_dir=workdir / "gateway",
            tls=tls,
            node_auth=not insecure,
        )
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        proc = start_gateway(spec, nginx=nginx, log_path=spec.state_dir / "nginx.out")
    except (ArkError, OSError) as exc:
        raise fail(exc) from exc
    stop = stop_on_signals()
    console.print(
        f"gateway pid {proc.pid} listening on {listen} ({'plaintext' if insecure else 'TLS'}); "
        f"forwards {len(spec.routes)} Fleet API calls to {superlink}; config {spec.config_path}"
    )
    while not stop.wait(0.5):
        if not proc.alive():
            break
    exited = not proc.alive()
    leftovers = stop_processes([[proc]])
    if leftovers:
        raise fail(ArkError(f"gateway processes still running: {leftovers}"), code=1)
    if exited:
        raise fail(ArkError(f"nginx exited on its own; see {spec.error_log}"), code=1)


# -- the provider's own side on its host: start, stop, status, nodes, jobs -------------------


@provider_app.command("superlink")
def provider_superlink(
    workdir: Workdir = Path("provider"),
    port: Annotated[int, typer.Option(help="Loopback port of the SuperLink.")] = 9093,
) -> None:
    """Run the SuperLink in the foreground (it replaces this process): loopback only, TLS
    with the workspace's certificate, SuperNode authentication on, state in superlink.db.
    Also writes the `flwr` CLI's connection under the workspace (its HOME)."""
    import os

    from sandbox.ops.federation import HOST, _flower_env, superlink_argv, write_cli_config
    from sandbox.ops.provision import ProviderWorkspace
    from sandbox.ops.tls import TlsFiles

    try:
        ws = ProviderWorkspace(workdir.resolve()).require()
        tls = TlsFiles.in_dir(ws.tls)
        if missing := tls.missing():
            raise ArkError(f"TLS material missing: {', '.join(map(str, missing))}")
        write_cli_config(ws.root, f"{HOST}:{port}", tls.ca_cert)
        argv = superlink_argv(ws.root / "superlink.db", port, tls, node_auth=True)
        # The service manager (or `ark provider start`) holds this PID: exec, no child.
        os.execve(argv[0], argv, _flower_env(ws.root))  # noqa: S606 (argv is ours, no shell)
    except (ArkError, OSError) as exc:
        raise fail(exc) from exc


@provider_app.command("start")
def provider_start(
    workdir: Workdir = Path("provider"),
    host: Annotated[
        str, typer.Option(help="The address nodes reach this host at (in its certificate).")
    ] = "127.0.0.1",
    fleet_port: Annotated[int, typer.Option(help="Node-facing gateway port.")] = 9092,
    broker_port: Annotated[int, typer.Option(help="Key broker and log port.")] = 9100,
    superlink_port: Annotated[int, typer.Option(help="SuperLink port (loopback).")] = 9093,
    timeout: Annotated[float, typer.Option(help="Seconds each service may take.")] = 60.0,
    listen: Annotated[
        str | None,
        typer.Option(help="Local address to bind the published ports (default: --host)."),
    ] = None,
) -> None:
    """Start the provider's services on this host, detached: the SuperLink (loopback), the
    node-facing gateway and the key broker with the transparency log. Each is recorded
    by PID in WORKDIR/run; `ark provider stop` stops them."""
    from sandbox.ops.parties import ProviderAddresses, start_provider

    addresses = ProviderAddresses(host, fleet_port, broker_port, superlink_port, listen or "")
    with party_command():
        start_provider(workdir, addresses, timeout=timeout, say=plain)
    console.print(
        f"provider up: nodes connect to {addresses.fleet} (Fleet API) and attest at "
        f"{addresses.broker} (key broker and log)"
    )


@provider_app.command("stop")
def provider_stop(workdir: Workdir = Path("provider")) -> None:
    """Stop every service `ark provider start` recorded, by PID, with its children."""
    from sandbox.ops.parties import PROVIDER_STOP

    stop_side(workdir.resolve(), PROVIDER_STOP, "provider")


@provider_app.command("status")
def provider_status(workdir: Workdir = Path("provider")) -> None:
    """The provider's services (running or not, where), its registered nodes as the
    SuperLink sees them, and its jobs. Exit 1 when a service is not running."""
    from sandbox.ops.parties import PROVIDER_STOP, node_names, node_states
    from sandbox.ops.registry import ProcessRecord

    root = workdir.resolve()
    try:
        recorded = ProcessRecord(root).load()
        live = ProcessRecord(root).live()
        names = node_names(root)
    except ArkError as exc:
        raise fail(exc) from exc
    down = []
    for (role,) in reversed(PROVIDER_STOP):
        if role in live:
            rec = live[role][0]
            console.print(f"{role:<11} running  pid {rec.pid:<8} {rec.address}  log {rec.log}")
        else:
            down.append(role)
            was = f" (recorded pid {recorded[role].pid} is gone)" if role in recorded else ""
            console.print(f"{role:<11} stopped{was}")
    if "superlink" in live:
        try:
            for node in node_states(root):
                name = names.get(str(node["node-id"]), "?")
                console.print(f"node {name} (id {node['node-id']}): {node['status']}")
        except ArkError as exc:
            console.print(f"nodes: unknown ({exc})")
    jobs = sorted((root / "jobs").glob("*/checkpoints/state.json"))
    for state in jobs:
        progress = read_json(state)
        done = "finished" if progress.get("finished") else "in progress"
        console.print(f"job {state.parent.parent.name}: round {progress.get('round')} ({done})")
    if down:
        raise typer.Exit(1)


@provider_app.command("register-node")
def provider_register_node(
    name: str, public_key: Path, workdir: Workdir = Path("provider")
) -> None:
    """Register a node's SuperNode public key (its flower/node-auth.pub) under NAME."""
    from sandbox.ops.parties import register_node

    try:
        node_id = register_node(workdir.resolve(), name, public_key)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"node {name} registered: SuperNode id {node_id}")


@provider_app.command("remove-node")
def provider_remove_node(name: str, workdir: Workdir = Path("provider")) -> None:
    """Unregister the SuperNode key registered under NAME: that node can no longer connect."""
    from sandbox.ops.parties import remove_node

    try:
        node_id = remove_node(workdir.resolve(), name)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"node {name} (SuperNode id {node_id}) removed")


@provider_app.command("submit")
def provider_submit(
    run_config: Path,
    workdir: Workdir = Path("provider"),
    app_dir: Annotated[
        Path | None, typer.Option(help="The Flower app to run (default: this checkout).")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Follow the job to its end.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow it at most.")] = 3600.0,
) -> None:
    """Submit a job from a run-config TOML and follow it: rounds, nodes admitted, accepted
    updates; then say where the results are. The workspace fills in what the file leaves
    out: the aggregator's identity, the log and the job folder (jobs/<job-id>)."""
    from sandbox.ops.apps import project_root
    from sandbox.ops.parties import follow_job, node_names, submit_job
    from server.results import RESULTS_FILE

    root = workdir.resolve()
    try:
        job = submit_job(root, run_config, app_dir or project_root(), say=plain)
        console.print(f"run {job.run_id} submitted: job {job.spec.job_id} in {job.output_dir}")
        if not follow:
            return
        progress = JobProgress(job.spec.num_rounds, node_names(root))
        outcome = follow_job(root, job, timeout=timeout, on_events=progress.show)
    except KeyboardInterrupt:
        raise fail(
            ArkError("stopped following; the job goes on (ark provider status shows it)"), 130
        ) from None
    except ArkError as exc:
        raise fail(exc) from exc
    if not outcome.ok:
        raise fail(ArkError(f"run {job.run_id} ended {outcome.status}: {outcome.details}"), 1)
    console.print(
        f"run {job.run_id} finished\n"
        f"results: {job.output_dir / RESULTS_FILE}\n"
        f"adapter: {job.output_dir / 'adapter'} (stock PEFT format)\n"
        f"events:  {job.events}"
    )


class JobProgress:
    """Prints a job's progress from its ServerApp's events, one line each."""

    def __init__(self, rounds: int, names: dict[str, str]):
        self.rounds = rounds
        self.names = names  # node name by Flower node id, as registered here
        self.accepted: dict[Any, int] = {}

    def node(self, event: dict[str, Any]) -> str:
        node = str(event.get("node"))
        return self.names.get(node, f"id {node}")

    def show(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind, rnd = event.get("kind"), event.get("round")
            if kind == "run_started":
                resumed = event.get("resumed_after_round")
                after = f", resuming after round {resumed}" if resumed else ""
                plain(f"run started: {self.rounds} rounds{after}")
            elif kind == "node_admitted":
                plain(f"node {self.node(event)} admitted (attested channel)")
            elif kind == "node_refused" or kind == "node_declined":
                plain(f"node {self.node(event)} {kind[5:]}: {event.get('reason')}")
            elif kind == "round_started":
                count = listed_count(event, "participants")
                plain(f"round {rnd} {event.get('stage')}: {count} nodes")
            elif kind == "update_accepted":
                self.accepted[rnd] = self.accepted.get(rnd, 0) + 1
                plain(f"round {rnd}: update from node {self.node(event)} accepted")
            elif kind == "update_rejected":
                plain(
                    f"round {rnd}: update from node {self.node(event)} rejected "
                    f"({event.get('reason')})"
                )
            elif kind == "heldout_committed":
                root = _body(event.get("commitment")).get("root", "?")
                plain(f"node {self.node(event)} committed to its held-out set ({str(root)[:16]}…)")
            elif kind == "scorecard_logged":
                model = _body(event.get("scorecard")).get("model_id", "?")
                plain(f"node {self.node(event)} signed its scorecard of {model}")
            elif kind == "secagg_advertised":
                count = listed_count(event, "nodes")
                plain(f"round {rnd}: {count} nodes advertised signed masking keys")
            elif kind == "secagg_stage":
                count = listed_count(event, "nodes")
                what = (
                    "sealed their shares" if event.get("stage") == "share" else "sent masked inputs"
                )
                plain(f"round {rnd}: {count} nodes {what}")
            elif kind == "secagg_unmasked":
                survivors = listed_count(event, "survivors")
                plain(
                    f"round {rnd}: sum unmasked from {survivors} inputs "
                    f"({listed_count(event, 'dropped')} dropped); no input was seen alone"
                )
                self.accepted[rnd] = survivors
            elif kind == "dp_spent":
                plain(
                    f"round {rnd}: node {self.node(event)} spent epsilon "
                    f"{_number(event.get('epsilon'))} of its records on this run (total "
                    f"{_number(event.get('epsilon_total'))} of budget "
                    f"{_number(event.get('budget'))}, delta {_number(event.get('delta'))})"
                )
            elif kind == "dp_aggregate":
                plain(
                    f"round {rnd}: client-level noise on the sum of {event.get('nodes')} "
                    f"updates; epsilon {_number(event.get('epsilon'))} so far"
                )
            elif kind == "aggregate_committed":
                plain(
                    f"round {rnd}/{self.rounds} aggregated from {self.accepted.get(rnd, 0)} "
                    f"updates: {event.get('metrics')}"
                )


def _number(value: Any) -> str:
    """A number from an event (another party's: any type) for a progress line."""
    return f"{value:.3g}" if isinstance(value, int | float) else "?"


def _body(record: Any) -> dict[str, Any]:
    """The body of a signed record as an event carries it (another party's: any shape)."""
    body = record.get("body") if isinstance(record, dict) else None
    return body if isinstance(body, dict) else {}
