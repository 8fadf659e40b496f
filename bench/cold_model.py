"""One cold node process: import the ClientApp's model loader, then attest, unseal, load.

``python -m bench.cold_model NODE_TOML`` prints JSON timings; ``bench.sealing`` runs it
in fresh processes, the way Flower starts a ClientApp process for each message.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()

from clients.model import load_base_model  # noqa: E402  (the import is what is timed)
from sandbox.config import TASK_CLASSIFICATION, NodeConfig, RunSpec  # noqa: E402
from sandbox.models import default_model_dir  # noqa: E402


def main(config: Path) -> None:
    imported = time.perf_counter()
    spec = RunSpec(
        job_id="bench",
        task=TASK_CLASSIFICATION,
        model_path=default_model_dir(),
        labels=("a", "b", "c", "d", "e"),
    )
    load_base_model(spec, NodeConfig.load(config))
    loaded = time.perf_counter()
    print(json.dumps({"import_s": imported - started, "model_s": loaded - imported}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
