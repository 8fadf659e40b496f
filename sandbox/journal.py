"""The node's own append-only journal: one JSON line per thing it received, sent or refused.

The ClientApp, its egress guard and the node's launcher all write here; an auditor
cross-checks it against the provider's log. Entries hold digests and reasons, never data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from sandbox.config import NodeConfig


def append_journal(node: NodeConfig, entry: Mapping[str, Any]) -> None:
    """Append ``entry`` (with the time and the node's name) if the node keeps a journal."""
    if node.journal_path is None:
        return
    node.journal_path.parent.mkdir(parents=True, exist_ok=True)
    line = {"time": time.time(), "node": node.name, **entry}
    with node.journal_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")
