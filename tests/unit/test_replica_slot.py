"""Slot: its state transitions and the bookkeeping of the calls in flight on it."""

from __future__ import annotations

import asyncio

import pytest

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import Unavailable
from anyserve.replica.slot import Slot, State
from tests.unit.replica_fakes import FakeWriter, as_writer, handler, ready_slot

pytestmark = pytest.mark.anyio

INFO = handler("echo")


def state(slot: Slot) -> State:
    """The slot's state, read afresh (mypy would narrow ``slot.state`` across calls)."""
    return slot.state


def open_one(slot: Slot) -> int:
    call_id, _sink = slot.open_call(b"payload", stream=False, metadata={}, timeout=1.0)
    return call_id


# -- state transitions ------------------------------------------------------------


def test_a_new_slot_is_stopped_and_settled() -> None:
    slot = Slot("echo-0", INFO)
    assert state(slot) is State.STOPPED and not slot.wanted and slot.pid is None
    assert slot.ready.is_set() and slot.stopped.is_set() and slot.idle.is_set()
    assert not slot.holds_resources and slot.inflight == 0


def test_start_wants_a_worker_and_resets_the_events() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    previous_stop = slot.stop_requested
    slot.request_stop()
    slot.mark_failed("boom")
    slot.supervision_ended()

    slot.start()
    assert state(slot) is State.STARTING and slot.wanted
    assert slot.failure == ""
    assert not slot.ready.is_set() and not slot.stopped.is_set()
    assert slot.stop_requested is not previous_stop and not slot.stop_requested.is_set()
    assert slot.holds_resources


def test_spawned_connect_and_disconnect() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    slot.spawned(4242)
    assert slot.pid == 4242 and state(slot) is State.STARTING
    slot.connect(as_writer(FakeWriter()))
    assert state(slot) is State.READY and slot.ready.is_set()
    slot.disconnect()
    assert state(slot) is State.DRAINING and not slot.ready.is_set()


def test_disconnect_while_starting_stays_starting() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    slot.disconnect()
    assert state(slot) is State.STARTING


def test_restarting_counts_and_waits_for_the_next_hello() -> None:
    slot, _ = ready_slot(INFO)
    slot.disconnect()
    slot.restarting()
    assert state(slot) is State.STARTING and not slot.ready.is_set()
    assert slot.restarts == 1 and slot.wanted
    slot.restarting()
    assert slot.restarts == 2


def test_mark_failed_keeps_failed_after_supervision_ends() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    slot.spawned(7)
    slot.mark_failed("crashed 5 times")
    assert state(slot) is State.FAILED and not slot.wanted
    assert slot.failure == "crashed 5 times" and slot.ready.is_set()
    slot.supervision_ended()
    assert state(slot) is State.FAILED and slot.pid is None and slot.stopped.is_set()
    assert not slot.holds_resources


@pytest.mark.parametrize("connected", [True, False])
def test_begin_drain_leaves_the_registration_but_holds_resources(connected: bool) -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    if connected:
        slot.connect(as_writer(FakeWriter()))
    slot.begin_drain()
    assert state(slot) is State.DRAINING and not slot.wanted
    assert slot.holds_resources  # until the process has exited
    assert not slot.stop_requested.is_set()
    slot.request_stop()
    assert slot.stop_requested.is_set()
    slot.supervision_ended()
    assert state(slot) is State.STOPPED and slot.stopped.is_set() and slot.ready.is_set()
    assert not slot.holds_resources


def test_begin_drain_of_a_failed_slot_stays_failed() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    slot.mark_failed("boom")
    slot.begin_drain()
    assert state(slot) is State.FAILED


def test_shutdown_and_wake() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    slot.shutdown()
    assert not slot.wanted and state(slot) is State.STARTING
    assert not slot.ready.is_set()
    slot.wake()
    assert slot.ready.is_set()


# -- calls ------------------------------------------------------------------------


def test_open_call_needs_a_ready_worker() -> None:
    slot = Slot("echo-0", INFO)
    slot.start()
    with pytest.raises(Unavailable, match="worker echo-0 is starting"):
        open_one(slot)
    slot.connect(as_writer(FakeWriter()))
    slot.begin_drain()
    with pytest.raises(Unavailable, match="is draining"):
        open_one(slot)


def test_open_and_close_calls() -> None:
    slot, writer = ready_slot(INFO)
    first, second = open_one(slot), open_one(slot)
    assert (first, second) == (1, 2)
    assert slot.inflight == 2 and not slot.idle.is_set()
    header, payload = writer.frames[0]
    assert header.WhichOneof("kind") == "call" and payload == b"payload"
    assert header.call.timeout == 1.0 and not header.call.stream

    slot.close_call(first, cancel=False)  # it finished: nothing to tell the worker
    assert slot.inflight == 1 and not slot.idle.is_set()
    slot.close_call(second, cancel=True)  # given up: the worker cancels it
    assert slot.inflight == 0 and slot.idle.is_set()
    assert writer.kinds() == [(1, "call"), (2, "call"), (2, "cancel")]

    slot.close_call(second, cancel=True)  # already gone: nothing happens
    assert len(writer.frames) == 3


def test_grant_only_for_open_calls_on_an_open_connection() -> None:
    slot, writer = ready_slot(INFO)
    call_id = open_one(slot)
    slot.grant(call_id, 5)
    slot.grant(call_id + 1, 5)
    assert writer.kinds() == [(1, "call"), (1, "credit")]
    assert writer.frames[1][0].credit.chunks == 5
    writer.closing = True
    slot.grant(call_id, 1)
    slot.close_call(call_id, cancel=True)
    assert len(writer.frames) == 2


async def test_fail_calls_fails_every_call_in_flight() -> None:
    slot, _ = ready_slot(INFO)
    sinks = [slot.open_call(b"", stream=True, metadata={}, timeout=1.0)[1] for _ in range(3)]
    error = Unavailable("worker echo-0 (pid 7) was killed by SIGKILL (exit code -9)")
    slot.fail_calls(error)
    assert slot.inflight == 0 and slot.idle.is_set()
    for sink in sinks:
        with pytest.raises(Unavailable) as info:
            await sink.next()
        assert info.value is error


async def test_drain_writer_waits_on_the_connection() -> None:
    slot = Slot("echo-0", INFO)
    await slot.drain_writer()  # no connection: nothing to wait for
    slot, writer = ready_slot(INFO)
    await slot.drain_writer()
    assert writer.drains == 1


async def test_serve_routes_frames_to_their_calls() -> None:
    slot, _ = ready_slot(INFO)
    call_id, sink = slot.open_call(b"", stream=True, metadata={}, timeout=1.0)
    reader = asyncio.StreamReader()
    for header, payload in [
        (wpb.Header(call_id=call_id, chunk=wpb.Chunk()), b"one"),
        (wpb.Header(call_id=99, chunk=wpb.Chunk()), b"nobody's"),
        (wpb.Header(call_id=call_id, end=wpb.End()), b"two"),
    ]:
        reader.feed_data(b"".join(wire.encode_frame(header, payload)))
    reader.feed_eof()
    with pytest.raises(wire.ConnectionClosed):
        await slot.serve(reader, wire.DEFAULT_MAX_FRAME)
    assert (await sink.next())[1] == b"one"
    ready = sink.take_ready()
    assert ready is not None and ready[1] == b"two"
    assert sink.take_ready() is None


def test_take_ready_raises_the_error_that_ended_the_call() -> None:
    slot, _ = ready_slot(INFO)
    _, sink = slot.open_call(b"", stream=True, metadata={}, timeout=1.0)
    slot.fail_calls(Unavailable("gone"))
    with pytest.raises(Unavailable, match="gone"):
        sink.take_ready()
