"""The worker's calls as tasks (:class:`~anyserve.call_tasks.CallTasks`),
over a real socketpair in this process: what a task group gave them, kept
without one anyio task per call. The dispatcher going away still waits for a
sync handler's thread; an error escaping a call still stops the worker."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from anyserve import AnyServe, Context, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.proto import ModelInferRequest
from anyserve.replica.worker import WorkerServer
from tests.support import eventually

pytestmark = pytest.mark.anyio

PAYLOAD = ModelInferRequest().SerializeToString()


def call(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, call=wpb.Call())


@asynccontextmanager
async def dispatcher_end() -> AsyncIterator[
    tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """Both ends of a socketpair as streams: the dispatcher's, then the worker's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
    try:
        yield reader, writer, w_reader, w_writer
    finally:
        writer.close()
        w_writer.close()


def blocking_app() -> tuple[AnyServe, threading.Event, threading.Event]:
    """An app whose sync handler ``block`` sets ``started``, then waits for
    ``release`` (at most 10 s) before answering."""
    started, release = threading.Event(), threading.Event()
    app = AnyServe("blocking")

    @app.capability(type="block")
    def block(request: ModelInferRequest, context: Context) -> str:
        started.set()
        release.wait(10)
        return "done"

    return app, started, release


async def test_the_worker_waits_for_a_sync_thread_when_the_dispatcher_goes() -> None:
    app, started, release = blocking_app()
    async with dispatcher_end() as (_, writer, w_reader, w_writer):
        server = WorkerServer(app.handler("block"), w_reader, w_writer)
        served = anyio.Event()

        async def serve() -> None:
            await server.serve()
            served.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            wire.write_frame(writer, call(1), PAYLOAD)
            await anyio.to_thread.run_sync(started.wait, 5)
            writer.close()  # the replica is gone: the worker cancels the call...
            await eventually(lambda: server.calls[1].scope.cancel_called, timeout=5)
            assert not served.is_set()  # ...but a thread cannot be stopped: it waits
            release.set()
            with anyio.fail_after(5):
                await served.wait()
        assert server.calls == {}


async def test_a_sync_call_cancelled_while_its_thread_runs_answers_only_the_cancel() -> None:
    # The thread's result comes back with the thread (no stream.send); once
    # the call is cancelled it must still not be sent.
    app, started, release = blocking_app()
    async with dispatcher_end() as (reader, writer, w_reader, w_writer):
        server = WorkerServer(app.handler("block"), w_reader, w_writer)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            wire.write_frame(writer, call(1), PAYLOAD)
            await anyio.to_thread.run_sync(started.wait, 5)
            wire.write_frame(writer, wpb.Header(call_id=1, cancel=wpb.Cancel()))
            await eventually(lambda: server.calls[1].scope.cancel_called, timeout=5)
            release.set()
            with anyio.fail_after(5):
                header, payload = await wire.read_frame(reader)
            assert (header.call_id, header.WhichOneof("kind"), payload) == (1, "cancel", b"")
            wire.write_frame(writer, call(2), PAYLOAD)  # the next frame is call 2's answer
            with anyio.fail_after(5):
                header, _ = await wire.read_frame(reader)
            assert (header.call_id, header.WhichOneof("kind")) == (2, "end")
            tg.cancel_scope.cancel()


class BrokenWriter:
    """A worker's writer whose socket broke under it: every write raises."""

    def writelines(self, pieces: list[bytes]) -> None:
        raise RuntimeError("the transport is broken")

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        pass


async def test_an_error_escaping_a_call_stops_the_worker() -> None:
    app = AnyServe("plain")

    @app.capability(type="echo")
    async def echo(request: ModelInferRequest, context: Context) -> str:
        return "hi"

    async with dispatcher_end() as (_, writer, w_reader, _w):
        broken = BrokenWriter()
        server = WorkerServer(app.handler("echo"), w_reader, broken)  # type: ignore[arg-type]
        wire.write_frame(writer, call(1), PAYLOAD)
        # The answer cannot be written, nor can the error that reports it.
        with anyio.fail_after(5), pytest.raises(ExceptionGroup) as failed:
            await server.serve()
    assert failed.group_contains(RuntimeError, match="broken")
