"""The ClientApp that deployed devices run: a light forwarder to the device worker.

Flower starts a fresh process for every message; this module imports only Flower and the
standard library, so that process starts in about a second. The work happens in the device's
long-lived worker (``client.worker``), which keeps the model loaded between messages.

A SuperNode started without a worker (no ``worker-socket`` in its node config, e.g. a plain
``flower-supernode``) runs ``client.app`` in this process instead: correct, only slower.
"""

from __future__ import annotations

import time

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.worker import WorkerError, call

DEFAULT_TIMEOUT = 900.0


def _timeout(context: Context) -> float:
    for source, key in (
        (context.node_config, "worker-timeout"),
        (context.run_config, "round-timeout"),
    ):
        value = source.get(key)
        if value not in (None, "", 0, 0.0):
            return float(value)
    return DEFAULT_TIMEOUT


def _forward(msg: Message, context: Context, op: str) -> Message:
    socket_path = context.node_config.get("worker-socket")
    if not socket_path:
        from client.app import app as inline

        return inline(msg, context)

    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    body = recorddict_to_proto(msg.content).SerializeToString()
    timeout = _timeout(context)
    header = {
        "op": op,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "run_id": context.run_id,
        "deadline": time.time() + timeout,
    }
    try:
        reply, out = call(str(socket_path), header, body, timeout=timeout)
    except WorkerError as exc:
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg
        )
    if not reply.get("ok"):
        reason = str(reply.get("error") or "device worker failed without a reason")
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(out)), reply_to=msg)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _forward(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _forward(msg, context, "evaluate")
