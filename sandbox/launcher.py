"""The node's own ClientApp launcher: no app code runs unless the node approved its FAB.

Flower's SuperExec starts ``flwr-clientapp`` from ``PATH`` for every message. A node
puts this launcher first on its SuperNode's ``PATH`` under that name
(:func:`install_launcher`). It runs Flower's own ClientApp runtime unchanged except for
one step: before the FAB is installed, its SHA-256 is checked against the node config's
``approved-apps`` (``ark node approve``). An unapproved app is never unpacked, imported
or run; the node's error reply names the digest and the refusal goes into its journal.

This code is the node operator's (installed with Ark Sandbox on the node), not part of
the app a provider ships, so the provider cannot switch it off from inside the app.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from sandbox.apps import check_app, fab_digest
from sandbox.config import NodeConfig
from sandbox.errors import AppNotApproved

NODE_CONFIG_ENV = "ARK_NODE_CONFIG"
LAUNCHER_NAME = "flwr-clientapp"


def _journal(node: NodeConfig, entry: dict[str, Any]) -> None:
    if node.journal_path is None:
        return
    node.journal_path.parent.mkdir(parents=True, exist_ok=True)
    with node.journal_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": time.time(), "node": node.name, **entry}) + "\n")


def approved_installer(node: NodeConfig, install: Any) -> Any:
    """Flower's ``install_from_fab``, preceded by the node's approval check."""

    def install_if_approved(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            digest = check_app(node, content)
        except AppNotApproved as exc:
            _journal(node, {"kind": "app_refused", "app_sha256": fab_digest(content)})
            raise AppNotApproved(f"node launcher refused to run the app: {exc}") from None
        _journal(node, {"kind": "app_approved", "app_sha256": digest})
        return install(fab_file, *args, **kwargs)

    return install_if_approved


def main() -> None:
    """``flwr-clientapp`` with the node's approval check in front of the app install."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    path = os.environ.get(NODE_CONFIG_ENV, "")
    if not path:
        sys.exit(f"{LAUNCHER_NAME} (ark launcher): {NODE_CONFIG_ENV} is not set; refusing")
    node = NodeConfig.load(Path(path))
    runtime.install_from_fab = approved_installer(node, runtime.install_from_fab)  # type: ignore[attr-defined]
    flwr_clientapp()


def install_launcher(bin_dir: Path) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / LAUNCHER_NAME
    launcher.write_text(
        f"#!{sys.executable}\n"
        "# Ark Sandbox node launcher: checks the app's digest before Flower installs it.\n"
        "from sandbox.launcher import main\n"
        "main()\n",
        encoding="utf-8",
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher
