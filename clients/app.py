"""The enterprise node's ClientApp: a ciphertext shuttle to the node's sandbox.

Flower starts one ClientApp process per message. This one holds no key, opens no
private file and imports no torch: it forwards the instruction (the aggregator's
evidence and the global adapter sealed to the node's channel key) to the node's
long-lived sandbox process over its Unix socket (``clients/shuttle.py``), and the
sandbox's reply (the update sealed to the attested aggregator, allowlisted scalar
metrics) back. The sandbox (``clients/sandbox.py``) does the work and decides what
leaves; the egress guard (``clients/egress.py``) checks every reply again on its way
out.

Under Flower's simulation engine a virtual node has no sandbox process of its own: the
same handlers reach its sandbox in this process instead (``clients/simulated.py``), as
:func:`~clients.shuttle.node_sandbox` chooses.
"""

from __future__ import annotations

import psutil
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.egress import egress_guard
from clients.shuttle import (
    evaluate_content,
    hello_content,
    instruction,
    node_config,
    node_sandbox,
    run_context,
    secagg_content,
    secagg_request,
    train_content,
)
from sandbox.protocol import SECAGG_ACTION, round_of

app = ClientApp(mods=[egress_guard])


def _started() -> float:
    """When this ClientApp process started (the node's journal measures the fixed cost
    of a message from it)."""
    return float(psutil.Process().create_time())


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Forward the aggregator's handshake; the sandbox opens the run's channel."""
    with node_sandbox(context, node_config(context)) as sandbox:
        reply = sandbox.hello(run_context(context), round_of(msg.content))
    return Message(hello_content(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Forward a training instruction; reply with the sandbox's sealed update."""
    with node_sandbox(context, node_config(context)) as sandbox:
        reply = sandbox.train(instruction(msg, context, _started()))
    return Message(train_content(reply), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Forward the final evaluation; reply with the sandbox's held-out metrics."""
    with node_sandbox(context, node_config(context)) as sandbox:
        reply = sandbox.evaluate(instruction(msg, context, _started()))
    return Message(evaluate_content(reply), reply_to=msg)


@app.query(SECAGG_ACTION)
def secure_aggregation(msg: Message, context: Context) -> Message:
    """Forward a secure-aggregation stage (share, mask, unmask); reply with the sandbox's
    sealed shares, sealed masked input or revealed shares."""
    with node_sandbox(context, node_config(context)) as sandbox:
        reply = sandbox.secagg(secagg_request(msg, context, _started()))
    return Message(secagg_content(reply), reply_to=msg)
