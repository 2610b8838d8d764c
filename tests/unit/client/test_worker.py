"""The device worker and the forwarding ClientApp: the wire between them, errors and timeouts
that come back as error replies, and the same update as the in-process ClientApp computes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from client.worker import (
    Worker,
    WorkerConfig,
    WorkerError,
    call,
    default_handler,
    pack,
    recv_frame,
    send_frame,
    socket_path,
    unpack,
)

Handler = Callable[[str, dict[str, Any], bytes], bytes]


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Callable[[Handler], Path]]:
    workers: list[tuple[Worker, threading.Thread]] = []

    def start(handler: Handler) -> Path:
        path = tmp_path / f"w{len(workers)}.sock"
        w = Worker(WorkerConfig(socket=path, io_timeout=60), handler)
        w.listen()
        t = threading.Thread(target=w.serve_forever, daemon=True)
        t.start()
        workers.append((w, t))
        return path

    yield start
    for w, t in workers:
        w.stop.set()
        t.join(timeout=60)
        assert not t.is_alive()


def test_frames_round_trip_and_reject_garbage() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {"op": "train", "x": [1, 2]}, b"\x00\x01payload")
        assert recv_frame(b) == ({"op": "train", "x": [1, 2]}, b"\x00\x01payload")
        a.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        with pytest.raises(WorkerError, match="not a fedtune worker frame"):
            recv_frame(b)


def test_replies_errors_and_pings(serve: Callable[[Handler], Path]) -> None:
    def handler(op: str, header: dict[str, Any], body: bytes) -> bytes:
        if header["node_config"].get("fail"):
            raise ValueError("data path /x does not exist")
        return body[::-1]

    path = serve(handler)
    reply, out = call(path, {"op": "message", "node_config": {}}, b"abc", timeout=60)
    assert reply["ok"] is True and out == b"cba" and reply["seconds"] >= 0
    reply, out = call(path, {"op": "message", "node_config": {"fail": 1}}, b"abc", timeout=60)
    assert reply == {"ok": False, "error": "ValueError: data path /x does not exist",
                     "seconds": reply["seconds"]}  # fmt: skip
    assert out == b""
    reply, _ = call(path, {"op": "ping"}, b"", timeout=60)
    assert reply["ok"] is True and reply["served"] == 1  # the failed call does not count
    reply, _ = call(path, {"op": "rm -rf"}, b"", timeout=60)
    assert reply["ok"] is False and reply["error"] == "unknown worker operation 'rm -rf'"
    # A request whose sender has already given up is not computed.
    reply, _ = call(
        path, {"op": "message", "node_config": {}, "deadline": time.time() - 1}, b"x", 60
    )
    assert reply["ok"] is False
    assert reply["error"] == "request expired before the device worker reached it"
    reply, _ = call(path, {"op": "ping"}, b"", timeout=60)
    assert reply["served"] == 1


def test_socket_is_private(serve: Callable[[Handler], Path]) -> None:
    path = serve(lambda op, h, b: b)
    assert path.stat().st_mode & 0o777 == 0o600


def test_missing_and_slow_workers_are_bounded(
    serve: Callable[[Handler], Path], tmp_path: Path
) -> None:
    with pytest.raises(WorkerError, match="device worker is not running"):
        call(tmp_path / "nobody.sock", {"op": "ping"}, b"", timeout=1)

    answer = threading.Event()

    def slow(op: str, header: dict[str, Any], body: bytes) -> bytes:
        answer.wait(120)  # answers only after the caller has given up
        return b""

    path = serve(slow)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"device worker gave no reply within 0\.5s"):
        call(path, {"op": "message"}, b"", timeout=0.5)
    # The caller gave up long before the worker would have answered (bound far above jitter).
    assert time.monotonic() - t0 < 60
    answer.set()


def test_long_state_dirs_get_a_short_socket_path(tmp_path: Path) -> None:
    short = socket_path(tmp_path / "s")
    assert short == tmp_path / "s" / "worker.sock"
    deep = tmp_path / ("x" * 120)
    long_path = socket_path(deep)
    assert len(str(long_path)) < 100 and long_path == socket_path(deep)
    assert long_path != socket_path(tmp_path / ("y" * 120))


def test_memory_limit_turns_an_oversized_allocation_into_an_error() -> None:
    code = (
        "from client.worker import apply_memory_limit, _reason\n"
        "import numpy as np\n"
        "apply_memory_limit(512 * 2**20)\n"
        "try:\n"
        "    np.ones(2**31, dtype=np.uint8)\n"
        "except MemoryError as exc:\n"
        "    print(_reason(exc, 512 * 2**20))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.startswith("device memory limit max-memory=512MiB exceeded (MemoryError")


# ------------------------------------------------------------------ the real handler, tiny model


def _context(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run_config)  # fmt: skip


def _message(content: RecordDict, kind: str) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content=content, dst_node_id=7, message_type=kind, group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _wire(msg: Message, ctx: Context) -> bytes:
    return pack(
        message_to_proto(msg).SerializeToString(), context_to_proto(ctx).SerializeToString()
    )


def _unwire(out: bytes) -> tuple[Message, Context]:
    m, c = unpack(out)
    return message_from_proto(ProtoMessage.FromString(m)), context_from_proto(
        ProtoContext.FromString(c)
    )


def test_pack_round_trip_and_truncation() -> None:
    assert unpack(pack(b"", b"abc", b"\x00" * 9)) == [b"", b"abc", b"\x00" * 9]
    with pytest.raises(WorkerError, match="truncated body"):
        unpack(pack(b"abcdef")[:-1])


def test_worker_computes_what_the_clientapp_computes(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path, serve: Callable[[Handler], Path]
) -> None:
    from client.app import app as client_app
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model
    from coordinator.config import RunConfig
    from protocol.adapter import AdapterSpec
    from protocol.messages import decode_update, encode_train_instruction

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            f'{{"instruction": "Say {i}", "response": "The number is {i}."}}\n' for i in range(20)
        )
    )
    cfg = RunConfig.from_mapping(
        {
            "model": str(tiny_model_dir),
            "quantization": "none",
            "local-steps": 2,
            "seq-len": 64,
            "lora-rank": 2,
            "cache-dir": str(model_cache),
        }
    )
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    adapter = get_adapter(attach_lora(base.model, cfg.lora, seed=0))
    spec = AdapterSpec.of(adapter)
    content = encode_train_instruction(cfg.train_instruction(1), adapter)
    node_config = {"data-path": str(data), "cache-dir": str(model_cache),
                   "state-dir": str(tmp_path / "state")}  # fmt: skip
    direct = client_app(
        _message(content, MessageType.TRAIN), _context(node_config, cfg.to_mapping())
    )

    path = serve(default_handler())
    # The coordinator's own paths in the run config must not leak into the device's settings.
    remote_run_config = {**cfg.to_mapping(), "cache-dir": "/coordinator/only/cache"}
    msg = _message(content, MessageType.TRAIN)
    reply, out = call(
        path, {"op": "message"}, _wire(msg, _context(node_config, remote_run_config)), timeout=120
    )
    assert reply["ok"], reply
    via_worker, _ = _unwire(out)
    assert via_worker.metadata.reply_to_message_id == msg.metadata.message_id
    a, b = (
        decode_update(direct.content, spec, rnd=1),
        decode_update(via_worker.content, spec, rnd=1),
    )
    assert a.num_examples == b.num_examples > 0
    for k in a.delta:
        np.testing.assert_array_equal(a.delta[k], b.delta[k])
        assert np.abs(a.delta[k]).sum() > 0


# ------------------------------------------------------------------ the forwarding ClientApp


def test_device_app_forwards_any_message_type_and_the_context_state(
    serve: Callable[[Handler], Path], tmp_path: Path
) -> None:
    from flwr.app import ConfigRecord

    from client.device_app import app

    seen: list[str] = []

    def handler(op: str, header: dict[str, Any], body: bytes) -> bytes:
        msg, ctx = _unwire(body)
        seen.append(msg.metadata.message_type)
        if msg.metadata.message_type == MessageType.EVALUATE:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        ctx.state["stage"] = ConfigRecord({"n": len(seen)})  # e.g. secure aggregation's state
        reply = RecordDict({"echo": ConfigRecord({"x": msg.content["config"]["x"]})})
        return _wire(Message(reply, reply_to=msg), ctx)

    path = serve(handler)
    content = RecordDict({"config": ConfigRecord({"x": 3})})
    ctx = _context({"worker-socket": str(path), "data-path": "/data"}, {"round-timeout": 5.0})

    for kind in (MessageType.TRAIN, "train.secagg_setup"):
        reply = app(_message(content, kind), ctx)
        assert not reply.has_error() and reply.content["echo"]["x"] == 3
    assert seen == ["train", "train.secagg_setup"]
    assert ctx.state["stage"]["n"] == 2  # the worker's context state came back

    reply = app(_message(content, MessageType.EVALUATE), ctx)
    assert reply.has_error()
    assert reply.error.reason == "RuntimeError: DefaultCPUAllocator: can't allocate memory"

    gone = _context({"worker-socket": str(tmp_path / "gone.sock")}, {"round-timeout": 5.0})
    reply = app(_message(content, MessageType.TRAIN), gone)
    assert reply.has_error() and "device worker is not running" in reply.error.reason


@pytest.mark.integration
def test_worker_process_prepares_the_model_then_serves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`python -m client.worker` as `fedtune client start` runs it: it listens at once, builds
    the device's model cache in a child process, then answers."""
    from client.processes import stop_tree

    cache = tmp_path / "cache"
    sock = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.worker", "--socket", str(sock),
         "--prepare-first", str(tiny_model_dir), "int8", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert sock.exists(), "the worker must listen before the slow work"
        reply, _ = call(sock, {"op": "ping"}, b"", timeout=300)  # waits out the preparation
        assert reply["ok"] is True and reply["served"] == 0
        assert list(cache.glob("models/*/int8/config.json")), "the int8 cache entry was built"
    finally:
        stop_tree(proc, timeout=10)
    out = proc.stdout.read() if proc.stdout else ""
    assert "is cached in" in out and "ready on" in out
    assert not sock.exists(), "the socket is removed on shutdown"
