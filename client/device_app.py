"""The ClientApp that deployed devices run: a light forwarder to the device worker.

Flower starts a fresh process for every message; this module imports only Flower and the
standard library, so that process starts in about a second. The work happens in the device's
long-lived worker (``client.worker``), which keeps the model loaded between messages and runs
``client.app``'s ClientApp on the message, whatever its type (train, evaluate, the secure
aggregation stages, ...). The message and the node's ``Context`` travel to the worker as Flower's
own protobufs; the reply and the updated ``Context.state`` (which stage-to-stage protocols such as
secure aggregation keep there) travel back.

A SuperNode started without a worker (no ``worker-socket`` in its node config, e.g. a plain
``flower-supernode``) runs ``client.app`` in this process instead: correct, only slower.
"""

from __future__ import annotations

import time

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.worker import WorkerError, call, pack, unpack

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


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def forward(msg: Message, context: Context) -> Message:
    """Run ``msg`` in the device worker (or, without one, in this process)."""
    socket_path = context.node_config.get("worker-socket")
    if not socket_path:
        from client.app import app as inline

        return inline(msg, context)

    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    timeout = _timeout(context)
    body = pack(
        message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()
    )
    header = {
        "op": "message",
        "message_type": msg.metadata.message_type,
        "deadline": time.time() + timeout,
    }
    try:
        reply, out = call(str(socket_path), header, body, timeout=timeout)
    except WorkerError as exc:
        return _error(msg, str(exc))
    if not reply.get("ok"):
        return _error(msg, str(reply.get("error") or "device worker failed without a reason"))
    reply_bytes, context_bytes = unpack(out)
    # Stage-to-stage state (e.g. secure aggregation's) goes back to the SuperNode with the context.
    context.state = context_from_proto(ProtoContext.FromString(context_bytes)).state
    return message_from_proto(ProtoMessage.FromString(reply_bytes))


class ForwardingClientApp(ClientApp):
    """Every message, whatever its type, goes to ``forward``; the worker's ClientApp routes it."""

    def __call__(self, message: Message, context: Context) -> Message:
        return forward(message, context)


app = ForwardingClientApp()
