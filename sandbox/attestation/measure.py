"""Measurements: digests of the code that actually runs and of the effective config.

The code measurement hashes the Python sources of the packages as they are imported in
this process (from the installed FAB or from a checkout alike), so a modified file
changes it. A real TEE measures at load time in hardware; the stub measures in software
from inside the process it describes, which is what the trust table in docs/attestation.md states.

What is measured is exactly the code that runs inside a sandbox, the same files the FAB
carries: ``SANDBOX_CODE`` is the one definition of that scope, written as the gitignore-
style patterns of pyproject's ``fab-include``/``fab-exclude`` (a test checks they agree).
Operator tooling and the provider's services (``sandbox/ops/``) are outside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pathspec

from sandbox import canonical
from sandbox.digests import sha256_file, sha256_hex


@dataclass(frozen=True)
class CodeScope:
    """Which source files count as sandbox code: ``include`` minus ``exclude``, matched as
    `flwr build` matches a FAB's patterns (paths relative to the project root)."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @cached_property
    def _included(self) -> pathspec.PathSpec[pathspec.pattern.Pattern]:
        return pathspec.PathSpec.from_lines("gitignore", self.include)

    @cached_property
    def _excluded(self) -> pathspec.PathSpec[pathspec.pattern.Pattern]:
        return pathspec.PathSpec.from_lines("gitignore", self.exclude)

    def covers(self, name: str) -> bool:
        return self._included.match_file(name) and not self._excluded.match_file(name)


SANDBOX_CODE = CodeScope(
    include=("sandbox/**/*.py", "server/**/*.py", "clients/**/*.py", "protos/**/*.py"),
    exclude=("sandbox/ops/", "protos/ark/v1/translog_pb2*.py"),
)
# What runs inside a node sandbox: the ClientApp, the trust core it uses, and the protos.
NODE_PACKAGES = ("clients", "sandbox", "protos")
# What runs inside the aggregator sandbox: the ServerApp, the trust core, the protos.
AGGREGATOR_PACKAGES = ("server", "sandbox", "protos")
CODE = "code"
CONFIG = "config"


def source_files(
    packages: Iterable[str], scope: CodeScope = SANDBOX_CODE
) -> list[tuple[str, Path]]:
    """``(package-relative name, path)`` of every ``.py`` file of the imported packages
    that ``scope`` covers."""
    files: list[tuple[str, Path]] = []
    for package in packages:
        module = importlib.import_module(package)
        for root in (Path(p) for p in module.__path__):
            for path in root.rglob("*.py"):
                name = f"{package}/{path.relative_to(root).as_posix()}"
                if "__pycache__" not in path.parts and scope.covers(name):
                    files.append((name, path))
    return sorted(files)


def code_measurement(
    packages: Iterable[str] = NODE_PACKAGES, scope: CodeScope = SANDBOX_CODE
) -> str:
    """Hex SHA-256 over the JCS list of ``[name, sha256(file)]`` for the packages' sources
    in ``scope``."""
    listing = [[name, sha256_file(path)[0]] for name, path in source_files(packages, scope)]
    return sha256_hex(canonical.dumps(listing))


def config_measurement(effective: Mapping[str, Any]) -> str:
    """Hex SHA-256 over the JCS form of a node's effective configuration."""
    return sha256_hex(canonical.dumps(dict(effective)))
