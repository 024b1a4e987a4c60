"""The bare chain: anyserve's shape with no features, the yardstick of issue 15.

Three processes, each one event loop (uvloop), started as one server (start/stop
protocol in :mod:`benchmarks.procs`)::

    python -m benchmarks.bare_chain            # gateway; starts the replica itself
    python -m benchmarks.bare_chain replica    # started by the gateway; starts the worker
    python -m benchmarks.bare_chain worker FD  # started by the replica over a socketpair

* gateway: a raw ASGI app on uvicorn (uvloop + httptools). ``POST`` any path:
  reads the body (a KServe-v2-like JSON document) and sends the raw bytes over
  ONE persistent grpc.aio channel (generic unary method, bytes in / bytes out,
  nothing parsed); the answer is the HTTP body;
* replica: a grpc.aio server relaying each call's bytes to the worker over a
  Unix socketpair as a frame ``!II`` (payload length, call id) + payload; one
  reader task resolves the waiting call by its id, so calls run concurrently;
* worker: reads frames and answers each with the same call id; its handler
  echoes the payload.

The gateway announces ``URL REPLICA_PGID``: the replica and its worker run in
their own process group. Every process stops when its stdin closes (the gateway's parent, or the
gateway/replica above it, exited) or, for the worker, when the socket closes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import grpc
import grpc.aio
import uvicorn

from anyserve import rpc
from benchmarks import procs

METHOD = f"/{rpc.SERVICE}/ModelInfer"
FRAME = struct.Struct("!II")  # payload length, call id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- worker ---------------------------------------------------------------------


def handler(payload: bytes) -> bytes:
    """The user's handler: echo."""
    return payload


async def worker(fd: int) -> None:
    """Answer every frame on socket ``fd`` with ``handler``'s result under the
    same call id; return when the replica closes the socket."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        while True:
            try:
                size, call_id = FRAME.unpack(await reader.readexactly(FRAME.size))
                payload = await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return
            answer = handler(payload)
            # One write per frame (header and payload joined): one syscall.
            writer.write(FRAME.pack(len(answer), call_id) + answer)
    finally:
        writer.close()


# -- replica ----------------------------------------------------------------------


class WorkerLink:
    """Calls to one worker over a socketpair, multiplexed by call id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[bytes]] = {}

    async def call(self, payload: bytes) -> bytes:
        """The worker's answer to ``payload``. Raises ConnectionError when the
        worker went away."""
        self._next_id = call_id = (self._next_id + 1) & 0xFFFFFFFF
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self._writer.write(FRAME.pack(len(payload), call_id) + payload)
            return await future
        finally:
            self._waiting.pop(call_id, None)

    def close(self) -> None:
        """Close the socket: the worker reads end of file and exits."""
        self._writer.close()

    async def read_answers(self) -> None:
        """Resolve waiting calls until the worker closes its end; then fail the rest."""
        try:
            while True:
                size, call_id = FRAME.unpack(await self._reader.readexactly(FRAME.size))
                payload = await self._reader.readexactly(size)
                future = self._waiting.get(call_id)
                if future is not None and not future.done():
                    future.set_result(payload)
        except asyncio.IncompleteReadError:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the worker closed its socket"))


async def replica() -> None:
    """Serve ``METHOD`` on a grpc.aio server, relaying to one worker process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.bare_chain", "worker", str(theirs.fileno())),
        cwd=procs.ROOT,
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
    )
    theirs.close()
    link = WorkerLink(*await asyncio.open_unix_connection(sock=ours))

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await link.call(request)

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)}
    server = grpc.aio.server(options=rpc.grpc_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(rpc.SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(link.read_answers)
            procs.announce(f"127.0.0.1:{port}")
            await procs.wait_for_exit()
            tg.cancel_scope.cancel()
    finally:
        await server.stop(0)
        # Through the transport: uvloop holds its own duplicate of the socket's fd.
        link.close()  # the worker sees end of file and exits
        with anyio.move_on_after(5):
            await child.wait()
        if child.returncode is None:
            child.kill()
            await child.wait()


# -- gateway ----------------------------------------------------------------------


def build_app(call: Callable[[bytes], Awaitable[bytes]]) -> Callable[..., Awaitable[None]]:
    """A raw ASGI app: every HTTP request's body goes through ``call``; the
    answer is the body of a 200 ``application/json`` response."""
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json")],
    }

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        answer = await call(b"".join(chunks))
        await send(start)
        await send({"type": "http.response.body", "body": answer})

    return app


def _listen() -> socket.socket:
    # As bare_http and the API server: IPPROTO_TCP so asyncio sets TCP_NODELAY.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def gateway() -> None:
    """Start the replica (and through it the worker), then serve HTTP."""
    with procs.ServerProcess("benchmarks.bare_chain", "replica") as replica_proc:
        async with grpc.aio.insecure_channel(
            replica_proc.endpoint, options=rpc.grpc_options()
        ) as channel:
            # Built once: the per-request path is one call on a persistent channel.
            model_infer = channel.unary_unary(METHOD)
            sock = _listen()
            server = uvicorn.Server(
                uvicorn.Config(
                    build_app(model_infer),
                    http="httptools",
                    lifespan="off",
                    log_config=None,
                    access_log=False,
                    ws="none",
                    timeout_graceful_shutdown=1,
                )
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(server._serve, [sock])
                while not server.started:  # noqa: ASYNC110 - uvicorn has no "listening" event
                    await anyio.sleep(0.005)
                # The replica runs in its own session (process group): the
                # parent needs its group id to count its and the worker's CPU.
                procs.announce(f"http://127.0.0.1:{sock.getsockname()[1]} {replica_proc.pid}")
                await procs.wait_for_exit()
                server.should_exit = True


def main(argv: list[str]) -> None:
    """Run the form named by ``argv`` (see the module docstring)."""
    if not argv:
        procs.run_child(gateway)
    elif argv[0] == "replica":
        procs.run_child(replica)
    elif argv[0] == "worker" and len(argv) == 2:
        anyio.run(worker, int(argv[1]), backend_options=procs.event_loop_options())
    else:
        raise SystemExit(
            f"usage: python -m benchmarks.bare_chain [replica | worker FD], not {argv}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
