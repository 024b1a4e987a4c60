"""Lane._may_wait: a gathering call waits for company only while the lane is
busy and such calls keep coming (a fake clock); a call still waiting when the
lane breaks is refused as never sent (a real Unix socket)."""

from __future__ import annotations

import asyncio
import math
import types
from pathlib import Path

import anyio
import pytest

from anyserve import lane_client, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import Unavailable
from anyserve.lane_client import Lane, Refused
from tests.support import eventually

pytestmark = pytest.mark.anyio


async def test_a_gathering_call_waits_only_on_a_busy_lane_with_calls_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(lane_client, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    lane = Lane("r1", "replica r1")
    loop = asyncio.get_running_loop()
    assert not lane._may_wait()  # the first call: nothing came before it
    for call_id in range(lane_client._GATHER_BUSY - 1):
        lane._unary[call_id] = loop.create_future()
    now[0] += lane_client._GATHER_GAP / 10
    assert not lane._may_wait()  # calls keep coming, but too few are in flight
    lane._unary[99] = loop.create_future()
    now[0] += lane_client._GATHER_GAP / 10
    assert lane._may_wait()  # busy, and the last call left a moment ago
    now[0] += lane_client._GATHER_GAP * 2
    assert not lane._may_wait()  # busy, but the calls come slowly (a slow handler)
    now[0] += lane_client._GATHER_GAP / 10
    assert lane._may_wait()


async def test_a_call_still_waiting_when_the_lane_breaks_is_refused_as_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real Unix socket and a server that reads calls and never answers.
    monkeypatch.setattr(wire, "WAIT_LIMIT", 3600.0)  # the waiting call stays queued
    monkeypatch.setattr(lane_client, "_GATHER_GAP", math.inf)
    received: list[wpb.Header] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        wire.write_frame(writer, wpb.Header(hello=wpb.Hello(worker_id="r1")))
        frames = wire.FrameBuffer()
        while data := await reader.read(65536):
            received.extend(header for header, _ in frames.feed(data))

    path = str(tmp_path / "lane")
    server = await asyncio.start_unix_server(serve, path=path)
    async with server:
        lane = await Lane.open(path, "r1", 5.0)
        ended: dict[int, type[BaseException]] = {}

        async def call(i: int, gather: bool) -> None:
            try:
                await lane.unary(b"request", [], 10.0, gather=gather)
            except Exception as exc:
                ended[i] = type(exc)

        async with anyio.create_task_group() as tg:
            for i in range(lane_client._GATHER_BUSY):
                tg.start_soon(call, i, False)
            await eventually(lambda: len(received) == lane_client._GATHER_BUSY)
            tg.start_soon(call, 99, True)  # the lane is busy: it waits for company
            await eventually(lambda: len(lane._unary) == lane_client._GATHER_BUSY + 1)
            writers[0].close()  # the server goes away
    assert len(received) == lane_client._GATHER_BUSY  # the waiting call never left
    assert ended == {**dict.fromkeys(range(lane_client._GATHER_BUSY), Unavailable), 99: Refused}
