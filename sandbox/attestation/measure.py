"""Measurements: digests of the code that actually runs and of the effective config.

The code measurement hashes the Python sources of the packages as they are imported in
this process (from the installed FAB or from a checkout alike), so a modified file
changes it. A real TEE measures at load time in hardware; the stub measures in software
from inside the process it describes, which is what the README's trust table states.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import rfc8785

from sandbox.digests import sha256_file, sha256_hex

# What runs inside a node sandbox: the ClientApp, the trust core it uses, and the protos.
NODE_PACKAGES = ("clients", "sandbox", "protos")
# What runs inside the aggregator sandbox: the ServerApp, the trust core, the protos.
AGGREGATOR_PACKAGES = ("server", "sandbox", "protos")
CODE = "code"
CONFIG = "config"


def source_files(packages: Iterable[str]) -> list[tuple[str, Path]]:
    """``(package-relative name, path)`` of every ``.py`` file of the imported packages."""
    files: list[tuple[str, Path]] = []
    for package in packages:
        module = importlib.import_module(package)
        for root in (Path(p) for p in module.__path__):
            files += [
                (f"{package}/{path.relative_to(root).as_posix()}", path)
                for path in root.rglob("*.py")
                if "__pycache__" not in path.parts
            ]
    return sorted(files)


def code_measurement(packages: Iterable[str] = NODE_PACKAGES) -> str:
    """Hex SHA-256 over the JCS list of ``[name, sha256(file)]`` for the packages' sources."""
    listing = [[name, sha256_file(path)[0]] for name, path in source_files(packages)]
    return sha256_hex(rfc8785.dumps(listing))


def config_measurement(effective: Mapping[str, Any]) -> str:
    """Hex SHA-256 over the JCS form of a node's effective configuration."""
    return sha256_hex(rfc8785.dumps(dict(effective)))
