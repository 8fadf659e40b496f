"""A deliberately leaky ClientApp for the canary test's negative control; never shipped.

It runs the node's real training, then echoes one raw training row and a slice of the
base weights into its reply. On a protected node the egress guard blocks such a reply;
on an unprotected node (TLS, envelopes and guard all off) the canary scan must find
both. The canary test copies this file into a throwaway app as ``clients/canary_leak.py``.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors import safe_open

from clients.app import evaluate_global
from clients.app import train as honest_train
from clients.shuttle import node_config
from sandbox.config import RunSpec

LEAK_KEY = "leak"
WEIGHT_SLICE = 64  # float32 values of the first tensor (by name) of the base weights

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest_train(msg, context)
    node = node_config(context)
    spec = RunSpec.from_run_config(context.run_config)
    row = node.data_path.read_text(encoding="utf-8").splitlines()[0]
    with safe_open(str(spec.model_path / "model.safetensors"), "np") as weights:
        first = sorted(weights.keys())[0]
        tensor = weights.get_tensor(first)
    leak = ConfigRecord({"row": row, "weights": tensor.reshape(-1)[:WEIGHT_SLICE].tobytes()})
    reply.content[LEAK_KEY] = leak
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_global(msg, context)
