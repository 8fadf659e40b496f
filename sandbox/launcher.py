"""The node's own ClientApp launcher: no app code runs unless the node approved its FAB.

Flower's SuperExec starts ``flwr-clientapp`` from ``PATH`` for every message. A node
puts this launcher first on its SuperNode's ``PATH`` under that name
(:func:`install_launcher`). It runs Flower's own ClientApp runtime unchanged except for
one step: before the FAB is installed, its SHA-256 is checked against the node config's
``approved-apps`` (``ark node approve``). An unapproved app is never unpacked, imported
or run; the refusal goes into the node's journal, and its error reply says only
``app-not-approved``. Every error reply leaving through the launcher is a fixed code from
``sandbox/reasons.py``: Flower's runtime builds some itself, quoting an app's exception.

This code is the node operator's (installed with Ark Sandbox on the node), not part of
the app a provider ships, so the provider cannot switch it off from inside the app.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import Any

from sandbox.config import NodeConfig
from sandbox.errors import AppNotApproved
from sandbox.events import AppApproved, AppRefused
from sandbox.journal import append_journal
from sandbox.reasons import NodeReason

NODE_CONFIG_ENV = "ARK_NODE_CONFIG"
LAUNCHER_NAME = "flwr-clientapp"


def fab_digest(content: bytes) -> str:
    """Hex SHA-256 of a FAB's bytes: what Flower calls the run's fab hash."""
    return hashlib.sha256(content).hexdigest()


def check_app(node: NodeConfig, content: bytes) -> str:
    """Return the FAB's digest if this node approved it; AppNotApproved otherwise."""
    digest = fab_digest(content)
    if digest not in node.approved_apps:
        raise AppNotApproved(
            f"app {digest} is not approved on node {node.name!r} "
            f"({len(node.approved_apps)} approved; see `ark node approve`)"
        )
    return digest


class ApprovalGate:
    """Wraps steps of Flower's ClientApp runtime: pulling the task, installing its FAB
    and (given ``push``) pushing the reply.

    The pull is only watched (the hash the SuperLink claims for the FAB is kept); the
    install refuses unless the FAB's own SHA-256 is approved on this node *and* equals
    that claimed hash, under which Flower then looks the installed app up. Raising at the
    install (not the pull) lets Flower still send the node's error reply, which the push
    turns into a fixed code.
    """

    def __init__(self, node: NodeConfig, pull: Any, install: Any, push: Any = None):
        self.node = node
        self._pull = pull
        self._install = install
        self._push = push
        self.claimed: str | None = None
        self.run_id: int | None = None
        self.refused = False

    def pull(self, *args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = self._pull(*args, **kwargs)
        self.claimed = str(fab.hash_str)
        self.run_id = getattr(run, "run_id", None)
        return message, context, run, fab

    def install(self, fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = fab_digest(content)
        try:
            check_app(self.node, content)
            if self.claimed != digest:
                raise AppNotApproved(
                    f"the run names app {self.claimed} but ships {digest}; refusing both"
                )
        except AppNotApproved as exc:
            self.refused = True
            append_journal(self.node, AppRefused(app_sha256=digest, run_id=self.run_id))
            raise AppNotApproved(f"node launcher refused to run the app: {exc}") from None
        append_journal(self.node, AppApproved(app_sha256=digest, run_id=self.run_id))
        # The bytes that were checked are the bytes installed.
        return self._install(content, *args, **kwargs)

    def push(self, client: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        """Push the reply; an error leaves as a fixed code (the refusal, or what Flower's
        code maps to), never with the reason text Flower's runtime gave it."""
        if self._push is None:
            raise RuntimeError("this gate was not given the runtime's push step")
        if message.has_error():
            reason = NodeReason.APP_NOT_APPROVED if self.refused else NodeReason.of(message.error)
            message.error = reason.error()
        return self._push(client, message, *args, **kwargs)


def main() -> None:
    """``flwr-clientapp`` with the node's approval gate around the app install."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    path = os.environ.get(NODE_CONFIG_ENV, "")
    if not path:
        sys.exit(f"{LAUNCHER_NAME} (ark launcher): {NODE_CONFIG_ENV} is not set; refusing")
    node = NodeConfig.load(Path(path))
    gate = ApprovalGate(
        node,
        runtime.pull_task_input,
        runtime.install_from_fab,  # type: ignore[attr-defined]
        runtime.push_message,
    )
    runtime.pull_task_input = gate.pull
    runtime.install_from_fab = gate.install  # type: ignore[attr-defined]
    runtime.push_message = gate.push
    flwr_clientapp()


def install_launcher(bin_dir: Path) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``bin_dir`` (put it first on PATH): the
    shim of ``sandbox/launcher_shim.py``, run by this Python with ``-IS``. It hands each
    start to the node's launcher pool (``sandbox/warmstart.py``) when one is named in its
    environment, and runs :func:`main` in its own process otherwise."""
    from sandbox import launcher_shim

    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / LAUNCHER_NAME
    source = Path(launcher_shim.__file__).read_text(encoding="utf-8")
    launcher.write_text(
        f"#!{sys.executable} -IS\n"
        "# Ark Sandbox node launcher: checks the app's digest before Flower installs it.\n"
        + source,
        encoding="utf-8",
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher
