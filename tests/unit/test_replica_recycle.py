"""Recycling workers, piece by piece: the worker confirming cancelled calls
(over a real socketpair, in this process), the slot remembering unconfirmed
cancels, the watchdog's decisions (fake clock and memory), the supervisor
restarting a recycled worker without counting a crash, and the
``max_memory_mib`` option."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import anyio
import pytest

from anyserve import AnyServe, Context, rpc, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.app import HandlerInfo
from anyserve.proto import ModelInferRequest
from anyserve.replica.processes import WorkerConfig
from anyserve.replica.recycling import Watchdog, resident_mib
from anyserve.replica.slot import Slot, State
from anyserve.replica.supervisor import Supervisor
from anyserve.replica.worker import WorkerServer
from tests.support import eventually
from tests.unit.replica_fakes import FakeWriter, as_writer, handler, ready_slot

pytestmark = pytest.mark.anyio

MAX_FRAME = wire.DEFAULT_MAX_FRAME


@dataclass
class Blocking:
    """A sync handler that blocks its thread until released, ignoring cancellation."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    runs: int = 0

    def app(self) -> AnyServe:
        app = AnyServe("blocking")

        @app.capability(type="block")
        def block(request: ModelInferRequest, context: Context) -> str:
            self.runs += 1
            self.started.set()
            self.release.wait(10)
            return "done"

        return app


Pipe = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def worker_on_socketpair(
    blocking: Blocking, before: Sequence[wpb.Header] = ()
) -> AsyncIterator[Pipe]:
    """A WorkerServer serving ``blocking``'s handler in this process; yields the
    dispatcher's end. ``before``: frames already waiting when it starts reading."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    for header in before:
        wire.write_frame(writer, header, ModelInferRequest().SerializeToString())
    await writer.drain()
    w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
    server = WorkerServer(blocking.app().handler("block"), w_reader, w_writer)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        try:
            yield reader, writer
        finally:
            blocking.release.set()
            writer.close()
    w_writer.close()


def call(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, call=wpb.Call())


def cancel(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, cancel=wpb.Cancel())


async def next_kind(reader: asyncio.StreamReader) -> tuple[int, str]:
    with anyio.fail_after(5):
        header, _ = await wire.read_frame(reader, MAX_FRAME)
    return header.call_id, str(header.WhichOneof("kind"))


# -- the worker ------------------------------------------------------------------------


async def test_a_cancel_right_behind_its_call_cancels_it_before_the_handler_runs() -> None:
    blocking = Blocking()
    async with worker_on_socketpair(blocking, [call(1), cancel(1)]) as (reader, _):
        # The only answer is the confirmation: no End, and the handler never ran.
        assert await next_kind(reader) == (1, "cancel")
    assert blocking.runs == 0


async def test_the_worker_confirms_a_cancel_only_once_the_sync_thread_has_returned() -> None:
    blocking = Blocking()
    async with worker_on_socketpair(blocking) as (reader, writer):
        wire.write_frame(writer, call(1), ModelInferRequest().SerializeToString())
        await anyio.to_thread.run_sync(blocking.started.wait, 5)
        wire.write_frame(writer, cancel(1))
        # A cancel for a call it does not run (any more) is confirmed at once:
        # coming first proves call 1 was not confirmed while its thread runs.
        wire.write_frame(writer, cancel(99))
        assert await next_kind(reader) == (99, "cancel")
        blocking.release.set()
        assert await next_kind(reader) == (1, "cancel")


# -- the slot, against a real worker ------------------------------------------------


async def test_the_slot_remembers_a_cancel_until_the_worker_confirms_it() -> None:
    blocking = Blocking()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    w_reader, w_writer = await asyncio.open_unix_connection(sock=theirs)
    server = WorkerServer(blocking.app().handler("block"), w_reader, w_writer)
    slot = Slot("block-0", handler("block"))
    slot.start()
    slot.connect(writer, MAX_FRAME)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        tg.start_soon(slot.serve, reader, MAX_FRAME)
        payload = ModelInferRequest().SerializeToString()
        call_id, _ = slot.open_call(
            payload, stream=False, metadata={rpc.REQUEST_ID: "req-7"}, timeout=None
        )
        await anyio.to_thread.run_sync(blocking.started.wait, 5)
        slot.close_call(call_id, cancel=True)
        stuck = slot.oldest_cancelled()
        assert stuck is not None and (stuck.call_id, stuck.request_id) == (call_id, "req-7")
        assert slot.inflight == 0 and slot.idle.is_set()  # the caller is gone already
        blocking.release.set()
        await eventually(lambda: slot.oldest_cancelled() is None, timeout=5)
        writer.close()
        w_writer.close()
        tg.cancel_scope.cancel()


# -- the watchdog ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.recycled: list[tuple[str, str, bool]] = []

    def recycle(self, slot: Slot, reason: str, *, stuck: bool = False) -> None:
        self.recycled.append((slot.id, reason, stuck))
        slot.begin_recycle(reason, stuck=stuck)


def watchdog(
    slots: list[Slot], recorder: Recorder, *, later: float, used: float | None = None
) -> Watchdog:
    return Watchdog(
        lambda: slots,
        recorder,
        stuck_call_grace=30.0,
        limit_for=lambda slot: slot.handler.max_memory_mib,
        interval=1.0,
        clock=lambda: time.monotonic() + later,
        memory=lambda pid: used,
    )


def cancelled_call(slot: Slot) -> None:
    call_id, _ = slot.open_call(b"", stream=False, metadata={rpc.REQUEST_ID: "r1"}, timeout=1.0)
    slot.close_call(call_id, cancel=True)


async def test_a_cancelled_call_running_past_the_grace_recycles_its_worker() -> None:
    slot, writer = ready_slot(handler("chat"))
    cancelled_call(slot)
    await asyncio.sleep(0)  # the slot writes a loop iteration's frames at its end
    assert writer.kinds() == [(1, "call"), (1, "cancel")]
    recorder = Recorder()
    watchdog([slot], recorder, later=29.0).check()
    assert recorder.recycled == []  # within the grace
    watchdog([slot], recorder, later=31.0).check()
    ((worker, reason, stuck),) = recorder.recycled
    assert worker == "chat-0" and stuck
    assert "call 1 (request r1) of handler chat still running 31" in reason
    assert slot.state is State.DRAINING and slot.wanted and slot.recycling
    assert slot.recycles == 1 and slot.last_recycle == reason and slot.restarts == 0


async def test_a_worker_over_its_memory_limit_is_recycled_and_one_under_it_is_not() -> None:
    info = replace(handler("big"), max_memory_mib=256.0)
    slot, _ = ready_slot(info)
    slot.spawned(1234)
    recorder = Recorder()
    watchdog([slot], recorder, later=0, used=200.0).check()
    watchdog([slot], recorder, later=0, used=None).check()  # unreadable: left alone
    assert recorder.recycled == []
    watchdog([slot], recorder, later=0, used=300.4).check()
    assert recorder.recycled == [
        ("big-0", "resident memory 300 MiB over the limit of 256 MiB of handler big", False)
    ]
    # Draining already: not recycled twice.
    watchdog([slot], recorder, later=0, used=900.0).check()
    assert len(recorder.recycled) == 1


def test_resident_memory_of_this_process_and_of_none() -> None:
    mine = resident_mib(os.getpid())
    assert mine is not None and mine > 1
    assert resident_mib(2**22 + 12345) is None


def test_a_handlers_memory_limit_wins_over_the_replicas() -> None:
    config = WorkerConfig(app="x", max_memory_mib=512.0)
    own = replace(handler("own"), max_memory_mib=64.0)
    assert config.max_memory_for(own) == 64.0
    assert config.max_memory_for(handler("other")) == 512.0
    assert WorkerConfig(app="x").max_memory_for(handler("other")) is None


# -- the supervisor ----------------------------------------------------------------


async def test_a_recycled_worker_restarts_at_once_and_is_no_crash() -> None:
    runs: list[int] = []
    delays: list[float] = []

    async def run_worker(slot: Slot) -> str:
        runs.append(len(runs))
        slot.spawned(100 + len(runs))
        if len(runs) == 1:
            slot.connect(as_writer(FakeWriter()))
            assert slot.begin_recycle("too big")
            slot.request_stop()
            return "exited with code 0"
        assert slot.state is State.STARTING and not slot.stop_requested.is_set()
        slot.begin_drain()
        return "stopped"

    async def backoff(slot: Slot, delay: float) -> None:
        delays.append(delay)

    slot = Slot("w-0", handler("w"))
    slot.start()
    with anyio.fail_after(1):
        await Supervisor(run_worker, on_change=lambda: None, backoff=backoff).supervise(slot)
    assert len(runs) == 2 and delays == []
    assert slot.restarts == 0 and slot.recycles == 1 and slot.last_recycle == "too big"
    assert slot.state is State.STOPPED and not slot.recycling


async def test_a_runner_that_raises_is_a_crash_not_the_end_of_the_manager() -> None:
    runs: list[int] = []

    async def run_worker(slot: Slot) -> str:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("no fds")
        slot.begin_drain()
        return "stopped"

    async def backoff(slot: Slot, delay: float) -> None:
        pass

    slot = Slot("w-0", handler("w"))
    slot.start()
    with anyio.fail_after(1):
        await Supervisor(run_worker, on_change=lambda: None, backoff=backoff).supervise(slot)
    assert len(runs) == 2 and slot.restarts == 1


# -- the option ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, "512", True, float("nan")])
def test_max_memory_mib_must_be_a_positive_number(bad: object) -> None:
    app = AnyServe()
    with pytest.raises(ValueError, match="max_memory_mib must be MiB > 0"):
        app.capability(type="x", max_memory_mib=bad)  # type: ignore[arg-type]


def test_max_memory_mib_reaches_the_handler_info_and_its_json() -> None:
    app = AnyServe()

    @app.capability(type="x", max_memory_mib=512)
    def x(request: ModelInferRequest, context: Context) -> str:
        return ""

    info = app.handler("x").info
    assert info.max_memory_mib == 512.0
    assert HandlerInfo.from_dict(info.to_dict()).max_memory_mib == 512.0
    assert HandlerInfo.from_dict({**info.to_dict(), "max_memory_mib": None}).max_memory_mib is None
