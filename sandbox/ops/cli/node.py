"""``ark node``: the enterprise node operator's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sandbox.config import TASK_CLASSIFICATION, TASKS
from sandbox.errors import ArkError
from sandbox.ops.cli.base import (
    console,
    fail,
    node_app,
    party_command,
    plain,
    shorten,
    stop_on_signals,
    stop_side,
)

Superlink = Annotated[str, typer.Option(help="The provider's node-facing gateway, host:port.")]


@node_app.command("check-data")
def check_data(
    data_file: Path,
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")] = TASK_CLASSIFICATION,
    labels: Annotated[str | None, typer.Option(help="Comma-separated allowed labels.")] = None,
) -> None:
    """Validate a private data file locally; nothing leaves this machine."""
    from clients.data import load_examples, split_examples

    try:
        allowed = [x.strip() for x in labels.split(",")] if labels else None
        examples = load_examples(data_file, task, labels=allowed)
        split = split_examples(examples, source=data_file)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(
        f"ok: {len(examples)} rows ({len(split.train)} train, {len(split.heldout)} held out)"
    )


@node_app.command("init")
def node_init(
    workdir: Annotated[Path, typer.Option(help="The node workspace.")],
    name: Annotated[str, typer.Option(help="Node name (the operator's own).")],
    data: Annotated[Path, typer.Option(help="The private data file.")],
    provider_public: Annotated[
        Path, typer.Option(help="The provider's public folder (ca.crt, signing.pub, result.pub).")
    ],
    key_broker: Annotated[str, typer.Option(help="Key broker host:port.")],
    package: Annotated[Path, typer.Option(help="The sealed model package on this node.")],
    manufacturer: Annotated[
        Path, typer.Option(help="Development manufacturer folder (created if missing).")
    ],
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="A provider's signed model catalog folder; trust its key with trust-catalog."
        ),
    ] = None,
    local_model: Annotated[
        Path | None,
        typer.Option(
            help="Your own model (a plain Hugging Face folder) that a comparison may "
            "fine-tune and score here beside the catalog's; it never leaves this node."
        ),
    ] = None,
) -> None:
    """Create the node's stub attestation identity and node.toml."""
    from sandbox.config import NodeConfig
    from sandbox.ops.provision import init_node

    try:
        path = init_node(
            workdir,
            name=name,
            data_path=data,
            manufacturer=manufacturer,
            provider_public=provider_public,
            key_broker=key_broker,
            package=package,
            catalog=catalog,
            local_model=local_model,
        )
        node = NodeConfig.load(path)
    except ArkError as exc:
        raise fail(exc) from exc
    assert node.sandbox is not None  # init_node always writes [node.sandbox]
    console.print(f"node config: {path}")
    console.print(f"attested identity (ueid): {node.sandbox.ueid}")
    console.print(
        f"the provider allows it with: ark provider allow-node {node.sandbox.ueid}; "
        f"and trusts the root: {manufacturer / 'root.crt'}"
    )


@node_app.command("catalog")
def node_catalog(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
) -> None:
    """Check the node's catalog as its sandbox will: the signature against the keys this
    operator trusts, and every entry's sealed package against its manifest digest (no
    key is asked for, nothing is unsealed). Lists the models; exits with the failure's
    code (51 untrusted signer, 52 a package not matching its entry, 53 malformed)."""
    from rich.table import Table
    from rich.text import Text

    from sandbox.catalog import load_catalog, package_for
    from sandbox.config import NodeConfig
    from sandbox.errors import CatalogError, ConfigError
    from sandbox.keyfiles import load_ed25519_public

    try:
        node = NodeConfig.load(config)
        sandbox = node.require_sandbox()
        if sandbox.catalog is None:
            raise ConfigError("this node has no catalog", path=config, key="node.sandbox.catalog")
        keys = [load_ed25519_public(path) for path in sandbox.catalog_keys]
        catalog = load_catalog(sandbox.catalog, keys)
        assert catalog.signer is not None  # load_catalog sets the key that verified it
        for entry in catalog.models:
            package_for(sandbox.catalog, entry, catalog.signer)
    except CatalogError as exc:
        raise fail(exc, exc.exit_code) from exc
    except ArkError as exc:
        raise fail(exc) from exc
    # The provider's strings (ids, licences) are printed as text, never read as markup.
    table = Table(title=Text(f"catalog of {catalog.provider}, issued {catalog.issued}"))
    for column in ("model", "architecture", "layers", "parameters", "licence", "per 1k train"):
        table.add_column(column)
    for entry in catalog.models:
        table.add_row(
            Text(entry.model_id),
            Text(entry.architecture),
            str(entry.layers),
            f"{entry.parameters:,}",
            Text(entry.licence),
            Text(f"{entry.price.per_1k_training_examples:g} {entry.price.currency}"),
        )
    console.print(table)
    plain(f"signature and every package verified ({len(catalog.models)} models)")


@node_app.command("trust-catalog")
def node_trust_catalog(
    key: Annotated[Path, typer.Argument(help="A provider's Ed25519 public key (PEM).")],
    workdir: Annotated[Path, typer.Option(help="The node workspace (holds node.toml).")],
) -> None:
    """Trust a provider's key to sign model catalogs: the key is copied into the node
    workspace and listed in node.toml. Refuses a symlink, a key that is not Ed25519, and
    a key already trusted."""
    from sandbox.ops.provision import trust_catalog_key

    try:
        target = trust_catalog_key(workdir / "node.toml", key)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(f"catalog key trusted: {target} (fingerprint {target.stem})")


@node_app.command("attest")
def node_attest(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
) -> None:
    """Attest to the key broker and print the result; the model is not loaded."""
    from clients.model import attest_for_key
    from sandbox.config import NodeConfig
    from sandbox.keyfiles import load_ed25519_public
    from sandbox.seal.package import read_manifest

    try:
        node = NodeConfig.load(config)
        sandbox = node.require_sandbox()
        manifest = read_manifest(sandbox.package, load_ed25519_public(sandbox.manifest_key))
        released = attest_for_key(node, manifest["key_id"])
    except ArkError as exc:
        raise fail(exc) from exc
    result = released.result
    submod = result.submod
    stub = " (STUB TEE: no hardware isolation)" if result.is_stub else ""
    console.print(f"status: {result.status}{stub}")
    console.print(f"policy: {submod['ear.appraisal-policy-id']}")
    console.print(f"node: {result.ueid} · session {result.session_id}")
    console.print(f"trustworthiness: {submod['ear.trustworthiness-vector']}")
    console.print(f"measurements: {submod.get('ark.measurements')}")
    console.print(
        f"key {released.key_id} for model {released.model_id} released and opened; "
        "discarded without loading the model"
    )


@node_app.command("approve")
def node_approve(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
    digest: Annotated[
        str | None, typer.Option(help="The app's FAB SHA-256 (hex), as reviewed.")
    ] = None,
    fab: Annotated[Path | None, typer.Option(help="A .fab file to approve.")] = None,
    app_dir: Annotated[
        Path | None, typer.Option(help="Reviewed app source: flwr build it, approve the FAB.")
    ] = None,
) -> None:
    """Approve an app (by its FAB digest) to run on this node; nothing else will."""
    import tempfile

    from sandbox.launcher import fab_digest
    from sandbox.ops.apps import approve, build_fab

    if sum(x is not None for x in (digest, fab, app_dir)) != 1:
        raise fail(ValueError("give exactly one of --digest, --fab, --app-dir"))
    try:
        if app_dir is not None:
            with tempfile.TemporaryDirectory() as out:
                digest = fab_digest(build_fab(app_dir, Path(out)).read_bytes())
        elif fab is not None:
            digest = fab_digest(fab.read_bytes())
        assert digest is not None
        node = approve(config, digest)
    except (ArkError, OSError) as exc:
        raise fail(exc) from exc
    console.print(f"approved app {digest.strip().lower()} on node {node.name}")
    console.print(f"{len(node.approved_apps)} app(s) approved in {config}")


@node_app.command("sandbox")
def node_sandbox(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
    broker_wait: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds to keep trying an unreachable key broker."),
    ] = 0.0,
) -> None:
    """Run the node's sandbox in the foreground until SIGTERM or Ctrl-C: attest, unseal the
    model into memory, and serve the node's ClientApps on its private Unix socket."""
    import logging

    from clients.service import serve
    from sandbox.config import NodeConfig
    from sandbox.protocol import SANDBOX_READY

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = stop_on_signals()
    try:
        node = NodeConfig.load(config)
        serve(
            node,
            stop,
            on_ready=lambda path: console.print(f"{SANDBOX_READY} {path}"),
            broker_wait=broker_wait,
        )
    except ArkError as exc:
        if stop.is_set():  # told to stop before it could serve (waiting for the key broker)
            console.print("sandbox stopped before it served")
            return
        raise fail(exc) from exc


@node_app.command("status")
def node_status(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
) -> None:
    """The node's processes, whether its sandbox is attested, whether its SuperNode is
    connected, and which runs it serves. Exit 1 when the sandbox does not answer."""
    from clients.shuttle import sandbox_client
    from sandbox.config import NodeConfig
    from sandbox.ops.federation import node_home
    from sandbox.ops.parties import connected
    from sandbox.ops.registry import ProcessRecord

    try:
        node = NodeConfig.load(config)
        live = ProcessRecord(node_home(config.resolve())).live()
    except ArkError as exc:
        raise fail(exc) from exc
    for role, (record, _) in sorted(live.items()):
        console.print(f"{role:<11} running  pid {record.pid:<8} log {record.log}")
    online = connected(config)
    if live:
        console.print(f"SuperNode: {'connected: ' + online if online else 'not connected'}")
    try:
        with sandbox_client(node) as client:
            status = client.status()
    except ArkError as exc:
        raise fail(exc, code=1) from exc
    stub = " (STUB TEE)" if status.stub else ""
    attested = (
        f"attested{stub}, result {status.result_sha256[:16]}…"
        if status.attested
        else "not attested"
    )
    console.print(f"sandbox pid {status.pid}: {attested}")
    console.print(f"runs served (with a channel): {list(status.runs) or 'none'}")
    console.print(f"stored adapters: {list(status.adapters) or 'none'}")
    if status.inference_url:
        console.print(f"inference: {status.inference_url}")


@node_app.command("supernode")
def node_supernode(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
    superlink: Superlink = "127.0.0.1:9092",
) -> None:
    """Run the node's SuperNode in the foreground (it replaces this process), with the
    node's launcher first on PATH, its SuperNode key and the provider's CA."""
    import os

    from sandbox.ops.parties import supernode_exec

    try:
        argv, env = supernode_exec(config, superlink)
        # The service manager (or `ark node start`) holds this PID: exec, no child.
        os.execve(argv[0], argv, env)  # noqa: S606 (argv is ours, no shell)
    except (ArkError, OSError) as exc:
        raise fail(exc) from exc


@node_app.command("start")
def node_start(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
    superlink: Superlink = "127.0.0.1:9092",
    broker_wait: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds the sandbox keeps trying an unreachable key broker."),
    ] = 300.0,
) -> None:
    """Start the node's sandbox, launch pool and SuperNode on this host, detached; return
    once the sandbox attested and the SuperNode is connected. Each is recorded by PID in
    the node's run/ folder; `ark node stop` stops them."""
    from sandbox.ops.parties import start_node

    with party_command():
        start_node(config, superlink, broker_wait=broker_wait, say=plain)
    console.print(f"node up: attested, connected to {superlink}")


@node_app.command("stop")
def node_stop(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
) -> None:
    """Stop the node's SuperNode, launch pool and sandbox (by their recorded PIDs)."""
    from sandbox.ops.federation import node_home
    from sandbox.ops.parties import NODE_STOP

    stop_side(node_home(config.resolve()), NODE_STOP, "node")


@node_app.command("infer")
def node_infer(
    file: Annotated[
        Path,
        typer.Argument(
            help='JSONL, one object per line: {"text": ...} to classify or {"prompt": ...} '
            'to complete (a node data file works as it is; a "label" is shown as expected).'
        ),
    ],
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
    adapter: Annotated[
        str, typer.Option(help="Which stored adapter: final or baseline.")
    ] = "final",
    run_id: Annotated[
        int | None, typer.Option(help="The run (default: the last with a final adapter).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the sandbox's answer as one JSON line.")
    ] = False,
) -> None:
    """Run the node's fine-tuned adapter on local texts, inside the node's own sandbox
    (its loopback inference API); nothing leaves this machine."""
    from rich.table import Table

    from sandbox.config import NodeConfig
    from sandbox.ops.inference_client import InferenceClient, read_inputs

    try:
        node = NodeConfig.load(config)
        inputs = read_inputs(file, limit=node.max_row_bytes)
        with InferenceClient.for_node(node) as client:
            texts = [item.text for item in inputs]
            if inputs[0].prompt:
                answer = client.complete(texts, adapter, run_id)
                outcomes = [(a["completion"], "") for a in answer["completions"]]
            else:
                answer = client.classify(texts, adapter, run_id)
                outcomes = [
                    (p["label"], f"{p['scores'][p['label']]:.2f}") for p in answer["predictions"]
                ]
    except ArkError as exc:
        raise fail(exc) from exc
    if as_json:
        console.print(json.dumps(answer), markup=False)
        return
    table = Table(title=f"run {answer['run_id']}, {answer['adapter']} adapter ({node.name})")
    table.add_column("text")
    table.add_column("expected")
    table.add_column("answer")
    table.add_column("score", justify="right")
    for item, (result, score) in zip(inputs, outcomes, strict=True):
        table.add_row(shorten(item.text), item.expected, result, score)
    console.print(table)


@node_app.command("launch-pool")
def node_launch_pool(
    config: Annotated[Path, typer.Option(help="The node's node.toml.")] = Path("node.toml"),
) -> None:
    """Run the node's ClientApp launcher pool in the foreground until SIGTERM or Ctrl-C:
    Flower's per-message ClientApp processes start forked from it, already imported.
    Start it with the SuperNode's environment, and give the SuperNode ARK_LAUNCH_POOL."""
    import logging

    from sandbox.warmstart import POOL_READY, LaunchPool, pool_socket

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = stop_on_signals()
    try:
        pool = LaunchPool(pool_socket(config))
        pool.serve(stop, on_ready=lambda path: console.print(f"{POOL_READY} {path}"))
    except ArkError as exc:
        raise fail(exc) from exc


@node_app.command("install-launcher")
def node_install_launcher(
    bin_dir: Annotated[Path, typer.Option("--bin", help="Folder to put first on PATH.")],
) -> None:
    """Write the node's `flwr-clientapp` (the approval-gate launcher's shim) into a folder
    that goes first on the SuperNode's PATH."""
    from sandbox.launcher import install_launcher

    console.print(f"launcher: {install_launcher(bin_dir)}")
