"""``ark``: the command line over all three sides (provider, node, auditor) and the demo.

Commands import ``server`` and ``clients`` inside their bodies: the CLI is the one
place allowed to reach across trust boundaries.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the groups.
from sandbox.ops.cli import audit, compare, demo, node, provider  # noqa: F401
from sandbox.ops.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
