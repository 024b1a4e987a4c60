"""The lane server's Cancel frames (anyserve/lane_server.py): a cancelled call
runs no further and answers nothing, whether its task had started or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import anyio
import pytest

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.lane_server import LaneServer, Send
from tests.support import eventually

pytestmark = pytest.mark.anyio


class _Handler:
    """A unary function that waits until released, counting its runs."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> bytes:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"answer:" + payload

    async def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None, send: Send
    ) -> None:
        raise AssertionError("no stream calls here")


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = wire.FrameBuffer()

    def send(self, *headers: wpb.Header) -> None:
        for header in headers:
            wire.write_frame(self.writer, header, b"x" if header.HasField("call") else b"")

    async def next(self) -> tuple[wpb.Header, bytes]:
        return await wire.read_frame(self.reader)


@pytest.fixture
async def served() -> AsyncIterator[tuple[LaneServer, _Handler, _Client]]:
    handler = _Handler()
    server = LaneServer("lane-test", handler.unary, handler.stream, wire.DEFAULT_MAX_FRAME)
    async with anyio.create_task_group() as tg:
        path = await tg.start(server.run)
        reader, writer = await asyncio.open_unix_connection(path)
        client = _Client(reader, writer)
        hello, _ = await client.next()
        assert hello.hello.worker_id == "lane-test"
        try:
            yield server, handler, client
        finally:
            writer.close()
            await server.stop(1.0)


def _call(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, call=wpb.Call(metadata={"x-request-id": f"r{call_id}"}))


def _cancel(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, cancel=wpb.Cancel())


async def test_a_call_cancelled_in_the_same_read_never_runs(
    served: tuple[LaneServer, _Handler, _Client],
) -> None:
    server, handler, client = served
    client.send(_call(1), _cancel(1), _call(2))  # all sent before the server reads: one read
    handler.release.set()
    header, payload = await client.next()
    assert (header.call_id, header.WhichOneof("kind"), payload) == (2, "end", b"answer:x")
    await eventually(lambda: server._idle.is_set())
    assert (server.taken, handler.started) == (2, 1)


async def test_a_running_call_cancelled_answers_nothing_and_is_forgotten(
    served: tuple[LaneServer, _Handler, _Client],
) -> None:
    server, handler, client = served
    client.send(_call(1))
    await eventually(lambda: handler.started == 1)
    client.send(_cancel(1))
    await eventually(lambda: handler.cancelled == 1)
    await eventually(lambda: server._idle.is_set())
    handler.release.set()
    client.send(_call(2))  # the next call's answer is the next frame: nothing for call 1
    header, _ = await client.next()
    assert (header.call_id, header.WhichOneof("kind")) == (2, "end")
