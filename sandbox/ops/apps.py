"""Code approval: which Flower apps (FABs) a node lets run on its data.

The app a provider ships is the code that touches the enterprise's data, so the node's
operator approves it by digest ahead of time (``ark node approve``). ``flwr build`` is
deterministic, so the operator can build the reviewed source and approve its SHA-256;
the FAB a run carries has the same digest. The check itself (``check_app``) runs in the
node's launcher (``sandbox/launcher.py``), outside the provider's app, before any app
code is installed; the launcher runs in the node's sandbox process, so it is measured.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from sandbox.config import NodeConfig
from sandbox.errors import ConfigError
from sandbox.files import write_atomic
from sandbox.launcher import fab_digest

DIGEST = re.compile(r"^[0-9a-f]{64}$")


def project_root() -> Path:
    """The Flower app directory (holding pyproject.toml) that ``flwr run`` builds: this
    checkout (the folder holding the ``sandbox``, ``server`` and ``clients`` packages)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            f"cannot find the app's pyproject.toml next to {root}; install ark-sandbox "
            "from a source checkout (pip install -e .)"
        )
    return root


def build_fab(app_dir: Path, out_dir: Path) -> Path:
    """``flwr build`` the app in ``app_dir`` into ``out_dir``; return the .fab's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.fab"))
    flwr = Path(sys.executable).parent / "flwr"
    done = subprocess.run(
        [str(flwr), "build", "--app", str(app_dir.resolve())],
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    built = sorted(set(out_dir.glob("*.fab")) - before) or sorted(out_dir.glob("*.fab"))
    if done.returncode != 0 or not built:
        output = (done.stdout + done.stderr)[-800:]
        raise ConfigError(f"flwr build failed: {output}", path=app_dir)
    return built[-1]


def approve(config_path: Path, digest: str) -> NodeConfig:
    """Add ``digest`` to the node config's ``approved-apps`` and rewrite the file."""
    digest = digest.strip().lower()
    if not DIGEST.match(digest):
        raise ConfigError(f"not a hex SHA-256 digest: {digest!r}", key="approved-apps")
    node = NodeConfig.load(config_path)
    if digest in node.approved_apps:
        return node
    approved = dataclasses.replace(node, approved_apps=tuple(sorted({*node.approved_apps, digest})))
    write_atomic(config_path, approved.to_toml().encode("utf-8"))
    return NodeConfig.load(config_path)


def approve_app_dir(app_dir: Path, configs: list[Path], build_dir: Path) -> str:
    """Build ``app_dir``'s FAB once and approve its digest on every node config given."""
    digest = fab_digest(build_fab(app_dir, build_dir).read_bytes())
    for config in configs:
        approve(config, digest)
    return digest
