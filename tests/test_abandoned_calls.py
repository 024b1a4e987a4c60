"""A client that goes away ends its replica call through the replica's Cancel
RPC, not a gRPC cancellation (which leaks native memory in grpcio: see
anyserve/api_server/abandoned.py), or through the local lane's Cancel frame.
A replica without Cancel still has the call cancelled:
tests/test_api_server.py's fakes have none."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import grpc
import grpc.aio
import httpx
import pytest

from anyserve import rpc
from anyserve.api_server.abandoned import Abandoned
from anyserve.api_server.channels import ReplicaStream
from anyserve.api_server.server import ApiServer
from anyserve.errors import Unavailable
from anyserve.replica.in_flight import CancelledByCaller, InFlight
from anyserve.testing import start_replica
from tests.api_calls import text_body
from tests.fake_replica import running_api
from tests.support import eventually, sse_events

pytestmark = pytest.mark.anyio

APP = "tests.apps.forms_app:app"


# --------------------------------------------------------------------------- InFlight


async def test_cancel_by_id_ends_the_call_with_cancelled_by_caller() -> None:
    in_flight = InFlight()
    started = asyncio.Event()

    async def handler() -> str:
        started.set()
        await asyncio.sleep(30)
        return "never"

    task = asyncio.ensure_future(in_flight.run("c1", handler()))
    await started.wait()
    assert len(in_flight) == 1
    assert in_flight.cancel("c1") is True
    with pytest.raises(CancelledByCaller):
        await task
    assert task.cancelling() == 0  # the cancellation was consumed, nothing else pending
    assert len(in_flight) == 0
    assert in_flight.cancel("c1") is False  # ended: nothing to cancel


async def test_other_cancellations_and_calls_without_an_id_pass_through() -> None:
    in_flight = InFlight()
    started = asyncio.Event()

    async def handler() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.ensure_future(in_flight.run("c2", handler()))
    await started.wait()
    task.cancel()  # gRPC's own cancellation, say
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(in_flight) == 0

    async def answer() -> str:
        return "ok"

    assert await in_flight.run(None, answer()) == "ok"
    assert len(in_flight) == 0


async def test_a_cancel_that_overtakes_its_call_refuses_it_on_arrival() -> None:
    in_flight = InFlight()
    assert in_flight.cancel("early") is False

    async def handler() -> str:
        raise AssertionError("a call cancelled before it arrived must not run")

    with pytest.raises(CancelledByCaller):
        await in_flight.run("early", handler())
    assert await in_flight.run("early", asyncio.sleep(0, "ran")) == "ran"  # forgotten once used


async def test_one_cancel_rpc_names_several_calls() -> None:
    in_flight = InFlight()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((in_flight.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        tasks = [
            asyncio.ensure_future(in_flight.run(name, asyncio.sleep(30))) for name in ("a", "b")
        ]
        await eventually(lambda: len(in_flight) == 2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await channel.unary_unary(rpc.CANCEL)(b"a\nb\ngone", timeout=5)
        assert answer == b"2"  # "gone" was not running
        for task in tasks:
            with pytest.raises(CancelledByCaller):
                await task
    finally:
        await server.stop(None)


# --------------------------------------------------------------------------- read-ahead


class _CancelledUnderneath:
    """A stream call that grpc.aio cancelled locally: read() raises a stray
    CancelledError, as grpc.aio does."""

    def __init__(self) -> None:
        self.reads = 0

    async def read(self) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return b"first"
        raise asyncio.CancelledError()

    def done(self) -> bool:
        return True


async def test_a_stream_cancelled_underneath_ends_its_reader_not_the_shared_group() -> None:
    abandoned = Abandoned()
    async with anyio.create_task_group() as tg:
        tg.start_soon(abandoned.run)

        async def noop() -> None:
            pass

        await eventually(lambda: abandoned.spawn(noop), what="Abandoned runs")
        stream = ReplicaStream(_CancelledUnderneath(), replica=None, spawn=abandoned.spawn)  # type: ignore[arg-type]
        with anyio.fail_after(5):  # a lost read-ahead would leave these waiting
            assert await stream.read() == b"first"
            with pytest.raises(Unavailable, match="cancelled"):
                await stream.read()
            with pytest.raises(Unavailable):  # and again: the end is remembered
                await stream.read()
        # The group every read-ahead shares is still alive.
        ran = anyio.Event()

        async def probe() -> None:
            ran.set()

        assert abandoned.spawn(probe)
        with anyio.fail_after(5):
            await ran.wait()
        tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- end to end


async def _leave_unary(api: ApiServer, marker: Path) -> None:
    body = text_body("text_input", str(marker))
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: http.post("/infer", headers={"X-Capability-Type": "hang"}, json=body))
        await eventually(marker.exists, timeout=10)  # the handler runs
        tg.cancel_scope.cancel()  # the client gives up: its connection closes


# lane=False: the call goes over gRPC and ends through the Cancel RPC;
# lane=True: over the local lane (anyserve.replica.lane), whose Cancel frame
# ends it without Abandoned at all.
LANES = [pytest.param(False, id="grpc"), pytest.param(True, id="lane")]


@pytest.mark.parametrize("lane", LANES)
async def test_a_unary_call_left_by_its_client_is_ended_by_cancel(
    tmp_path: Path, lane: bool
) -> None:
    async with running_api() as api, start_replica(APP, api_server=api.url, lane=lane) as replica:
        abandoned = api.state.router.abandoned
        marker = tmp_path / "hang"
        await _leave_unary(api, marker)
        await eventually(marker.with_suffix(".stopped").exists, timeout=1.0)
        assert marker.with_suffix(".stopped").read_text() == "cancelled"
        assert (api.state.pool.get(replica.endpoint).lane is not None) is lane
        if not lane:
            await eventually(lambda: abandoned.ended == 1, what="the call ended after Cancel")
        assert abandoned.ended == (0 if lane else 1)
        assert abandoned.cancelled == 0  # never cancelled in gRPC


@pytest.mark.parametrize("lane", LANES)
async def test_a_stream_left_by_its_client_is_ended_by_cancel(tmp_path: Path, lane: bool) -> None:
    async with (
        running_api() as api,
        start_replica(APP, api_server=api.url, lane=lane) as replica,
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
    ):
        abandoned = api.state.router.abandoned
        for n, form in enumerate(["async", "sync"], start=1):
            marker = tmp_path / f"ticker-{form}"
            headers = {"X-Capability-Type": "ticker", "X-Capability-Form": form}
            body = text_body("text_input", str(marker))
            with anyio.fail_after(15):
                async with http.stream("POST", "/infer/stream", headers=headers, json=body) as r:
                    assert r.status_code == 200
                    events = sse_events(r)
                    await anext(events)
                    await anext(events)
                    await events.aclose()
            stopped = marker.with_suffix(".stopped")
            await eventually(stopped.exists, timeout=1.0)
            assert stopped.read_text() == form

            def stream_ended(n: int = n) -> bool:
                return abandoned.ended == n

            if not lane:
                await eventually(stream_ended, what="the stream ended")
        assert (api.state.pool.get(replica.endpoint).lane is not None) is lane
        assert abandoned.ended == (0 if lane else 2)
        assert abandoned.cancelled == 0
