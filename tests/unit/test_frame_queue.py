"""wire.FrameQueue: frames queued in one loop iteration go out in one write,
byte for byte what write_frame writes; big frames, a closed peer and a failed
write; frames that wait for company. A fake writer records each writelines
call (no socket)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from tests.support import eventually

pytestmark = pytest.mark.anyio


class Recorder:
    """The part of StreamWriter a FrameQueue uses; one entry per writelines call."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.fail: Exception | None = None

    def writelines(self, pieces: list[bytes]) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(b"".join(pieces))

    def is_closing(self) -> bool:
        return self.closing

    async def drain(self) -> None:
        pass


def queue_on(recorder: Recorder, errors: list[Exception], flush_at: int = 1024) -> wire.FrameQueue:
    return wire.FrameQueue(
        cast(asyncio.StreamWriter, recorder), on_error=errors.append, flush_at=flush_at
    )


def end(call_id: int) -> wpb.Header:
    return wpb.Header(call_id=call_id, end=wpb.End())


async def next_iteration() -> None:
    # The queue flushes with call_soon: one trip round the loop lets it run.
    await asyncio.sleep(0)


async def test_frames_of_one_iteration_go_out_in_one_write_in_order() -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors)
    queue.write(end(1), b"one")
    queue.write(end(2))
    queue.write(end(3), b"three")
    assert recorder.writes == []  # not yet: the rest of the iteration may add more
    await next_iteration()
    expected = b"".join(
        b"".join(wire.encode_frame(h, p))
        for h, p in ((end(1), b"one"), (end(2), b""), (end(3), b"three"))
    )
    assert recorder.writes == [expected]
    assert errors == []


async def test_a_frame_of_flush_at_bytes_goes_at_once_behind_those_queued() -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors, flush_at=1024)
    queue.write(end(1))
    queue.write(end(2), b"x" * 1024)
    small, big = (
        b"".join(wire.encode_frame(end(1))),
        b"".join(wire.encode_frame(end(2), b"x" * 1024)),
    )
    assert recorder.writes == [small + big]
    await next_iteration()
    assert recorder.writes == [small + big]  # the scheduled flush found nothing left


async def test_flush_writes_what_is_queued_now() -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors)
    queue.write(end(1))
    queue.flush()
    assert recorder.writes == [b"".join(wire.encode_frame(end(1)))]


async def test_nothing_is_written_once_the_peer_is_gone() -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors)
    queue.write(end(1))
    recorder.closing = True
    await next_iteration()
    assert recorder.writes == [] and errors == []


async def test_a_failed_write_goes_to_on_error_once_and_later_frames_are_dropped() -> None:
    recorder, errors = Recorder(), list[Exception]()
    broken = recorder.fail = RuntimeError("the transport is broken")
    queue = queue_on(recorder, errors)
    queue.write(end(1))
    await next_iteration()
    assert errors == [broken]
    recorder.fail = None  # a later write would go through: the queue does not try
    queue.write(end(2))
    await next_iteration()
    assert recorder.writes == [] and errors == [broken]


async def test_waiting_frames_leave_together_when_their_time_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors)
    monkeypatch.setattr(wire, "WAIT_LIMIT", 0.05)
    queue.write(end(1), wait=True)
    for i in range(3):
        await next_iteration()
        queue.write(end(2 + i), wait=True)  # company, a loop iteration apart
    assert recorder.writes == []  # still waiting: their time is not up
    await eventually(lambda: recorder.writes, timeout=5.0, interval=0.005)
    assert recorder.writes == [b"".join(b"".join(wire.encode_frame(end(i))) for i in range(1, 5))]
    assert errors == []


async def test_a_frame_that_may_not_wait_takes_the_waiting_ones_along(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors)
    monkeypatch.setattr(wire, "WAIT_LIMIT", 3600.0)  # never, in this test
    queue.write(end(1), wait=True)
    await next_iteration()
    assert recorder.writes == []
    queue.write(end(2))  # e.g. a Cancel: it goes at the end of this iteration
    queue.write(end(3), wait=True)  # queued behind it, it leaves with it
    await next_iteration()
    assert recorder.writes == [b"".join(b"".join(wire.encode_frame(end(i))) for i in (1, 2, 3))]
    queue.write(end(4), wait=True)  # waits again: the timer it sets is a new one
    await next_iteration()
    assert len(recorder.writes) == 1
    queue.flush()
    assert recorder.writes[1] == b"".join(wire.encode_frame(end(4)))


async def test_waiting_frames_of_flush_at_bytes_go_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder, errors = Recorder(), list[Exception]()
    queue = queue_on(recorder, errors, flush_at=1024)
    monkeypatch.setattr(wire, "WAIT_LIMIT", 3600.0)
    queue.write(end(1), b"x" * 600, wait=True)
    assert recorder.writes == []
    queue.write(end(2), b"y" * 600, wait=True)
    assert len(recorder.writes) == 1  # 1,200 bytes queued: no reason to wait
