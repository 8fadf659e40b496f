"""A node's ClientApp in a process of its own, with every file it opens recorded.

``python -m tests.clientapp_audit NODE_CONFIG`` imports the ClientApp (``clients/app.py``)
first and reports which heavy or private modules that import loaded, then installs an
audit hook (``sys.addaudithook``) and answers requests on stdin, one JSON line each:
the message type, the run id and config, and the instruction's content (a pickled
RecordDict, base64). It runs
the real ClientApp object on it, mods included, and writes one JSON line back: the
reply's content (pickled, base64) or its error code, and every path the call opened or
listed. tests/test_node_sandbox.py drives it against a real sandbox.
"""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import RecordDict

# What a ciphertext shuttle has no use for: the model stack and the sandbox's own code.
FORBIDDEN = (
    "torch",
    "transformers",
    "peft",
    "clients.training",
    "clients.model",
    "clients.data",
    "clients.sandbox",
)
RUN_ID, NODE_ID = 41, 9  # as tests/test_node_sandbox.py's RUN and NODE
# The audit events that touch the file system by a path.
PATH_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob", "os.chmod", "os.rename"})


def encode_records(records: RecordDict) -> str:
    """A RecordDict in Flower's own wire format, base64 (for a JSON line)."""
    from flwr.common.serde import recorddict_to_proto

    return base64.b64encode(recorddict_to_proto(records).SerializeToString()).decode("ascii")


def decode_records(text: str) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    return recorddict_from_proto(RecordDictProto.FromString(base64.b64decode(text)))


def loaded_forbidden() -> list[str]:
    return [name for name in FORBIDDEN if name in sys.modules]


def main() -> None:
    from clients.app import app  # first: what importing the ClientApp loads is the point

    imported = loaded_forbidden()

    import json
    from typing import Any

    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from sandbox.protocol import NODE_CONFIG_KEY

    # The process identity Flower sets in a ClientApp process.
    TaskIdentity._task_id = 2
    TaskIdentity._run_id = RUN_ID
    TaskIdentity._node_id = NODE_ID

    touched: list[str] = []
    recording = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if recording[0] and event in PATH_EVENTS and args and args[0] is not None:
            path = args[0]
            touched.append(path if isinstance(path, str) else repr(path))

    sys.addaudithook(hook)
    print(json.dumps({"imported": imported}), flush=True)
    for number, line in enumerate(sys.stdin, 1):
        request = json.loads(line)
        content: RecordDict = decode_records(request["content"])
        msg = Message(
            content,
            dst_node_id=NODE_ID,
            message_type=request["type"],
            group_id=str(request.get("round", 1)),
        )
        msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        msg.metadata.__dict__["_message_id"] = f"instruction-{number}"
        context = Context(
            request["run_id"],
            NODE_ID,
            {NODE_CONFIG_KEY: sys.argv[1]},
            RecordDict(),
            request["run_config"],
        )
        touched.clear()
        recording[0] = True
        try:
            reply = app(msg, context)
        finally:
            recording[0] = False
        answer: dict[str, Any] = {"opened": list(touched), "imported": loaded_forbidden()}
        if reply.has_error():
            answer["error"] = reply.error.code
        else:
            answer["content"] = encode_records(reply.content)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
