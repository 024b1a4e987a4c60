"""One worker position of a handler (a *slot*) and the calls in flight on it.

A slot is what the manager keeps alive: it survives restarts of its worker
process (the id stays, the pid changes). It owns the connection to the current
process and routes each frame the worker sends to the call it belongs to.

Its state changes only through methods named for what happened; everything
else reads ``state``, ``wanted``, ``pid``, ``failure`` and ``restarts`` and
waits on its events:

* :meth:`Slot.start` - wanted again: STARTING (a command, a request, preload);
* :meth:`Slot.spawned` - its process started (the pid is known);
* :meth:`Slot.connect` - the worker said hello: READY;
* :meth:`Slot.disconnect` - the connection ended: a READY slot is DRAINING;
* :meth:`Slot.restarting` - the process crashed and will be restarted: STARTING;
* :meth:`Slot.mark_failed` - it crash-looped: FAILED, no longer wanted;
* :meth:`Slot.begin_drain` - a stop: no longer wanted, out of the registration;
* :meth:`Slot.begin_recycle` - a stuck call or too much memory: DRAINING but
  still wanted, so the process is replaced once its calls end;
* :meth:`Slot.recycled` - the recycled process ended: STARTING its replacement;
* :meth:`Slot.request_stop` - the drain is over: the supervisor lets the process go;
* :meth:`Slot.supervision_ended` - the supervisor let go: STOPPED (or FAILED);
* :meth:`Slot.shutdown`, :meth:`Slot.wake` - the replica is shutting down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from anyserve import rpc, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.app import HandlerInfo
from anyserve.errors import AnyServeError, Unavailable
from anyserve.replica.call_sink import CallSink

if TYPE_CHECKING:
    from anyserve.metrics.replica import SlotObserver

# Frames read from a worker before the reader lets other tasks run.
YIELD_EVERY = 16


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Cancelled:
    """A call cancelled by the dispatcher that the worker has not confirmed
    ended yet (see :meth:`Slot.close_call`)."""

    call_id: int
    request_id: str
    since: float  # time.monotonic() of the cancel


class Slot:
    """One worker process position of a handler, kept alive by the supervisor."""

    def __init__(self, worker_id: str, handler: HandlerInfo) -> None:
        self.id = worker_id
        self.handler = handler
        self._state = State.STOPPED
        self._pid: int | None = None
        self._restarts = 0
        self._failure = ""
        self._wanted = False
        # Set while the slot is READY, FAILED or STOPPED: waiters re-check state.
        self.ready = asyncio.Event()
        self.ready.set()
        # Set once the supervisor has let go of the slot (stopped or failed).
        self.stopped = asyncio.Event()
        self.stopped.set()
        # Set while no call is in flight.
        self.idle = asyncio.Event()
        self.idle.set()
        self._stop_requested = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._out: wire.FrameQueue | None = None  # frames out: one write per loop iteration
        self._max_frame: int | None = None
        self._calls: dict[int, CallSink] = {}
        self._next_call = 1
        # Cancelled calls the worker has not confirmed ended, oldest first.
        self._cancelled: dict[int, Cancelled] = {}
        self._recycles = 0
        self._last_recycle = ""
        # Set from begin_recycle() until recycled(): the process is being replaced.
        self._recycling = False
        self._stuck = False
        self.observer: SlotObserver | None = None  # metrics, set by the manager
        self.starts = 0  # worker processes that said hello in this slot
        self._spawned_at = 0.0

    # -- what others read ------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def wanted(self) -> bool:
        """Whether the slot should have a running worker (its supervisor restarts it)."""
        return self._wanted

    @property
    def pid(self) -> int | None:
        """The current worker process's pid, None while there is none."""
        return self._pid

    @property
    def restarts(self) -> int:
        """Restarts after crashes (not reset when the slot is started again)."""
        return self._restarts

    @property
    def failure(self) -> str:
        """Why the slot failed (crash loop), "" unless it did."""
        return self._failure

    @property
    def recycles(self) -> int:
        """Workers replaced on purpose (a stuck call, too much memory); not crashes."""
        return self._recycles

    @property
    def last_recycle(self) -> str:
        """Why the worker was last recycled, "" if never."""
        return self._last_recycle

    @property
    def recycling(self) -> bool:
        """Whether the current process is being replaced (between
        :meth:`begin_recycle` and :meth:`recycled`)."""
        return self._recycling

    @property
    def stuck(self) -> bool:
        """Whether the current process is being replaced because a call would
        not end: it cannot exit by itself, so it is not waited for long."""
        return self._stuck

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set once the current stop's drain is over; the supervisor watches it
        (a restart backoff ends early too)."""
        return self._stop_requested

    @property
    def inflight(self) -> int:
        """Calls sent to this worker and not finished yet."""
        return len(self._calls)

    @property
    def holds_resources(self) -> bool:
        """Wanted, or its process has not exited yet (still draining)."""
        return self._wanted or not self.stopped.is_set()

    # -- lifecycle (driven by the manager and the supervisor) -------------------

    def start(self) -> None:
        """Wanted again: STARTING, its last failure forgotten, every event reset
        for a new supervision run (started by the caller)."""
        self._wanted = True
        self._failure = ""
        self._state = State.STARTING
        self.ready.clear()
        self.stopped.clear()
        self._stop_requested = asyncio.Event()

    def spawned(self, pid: int) -> None:
        """A worker process started for this slot."""
        self._pid = pid
        self._spawned_at = time.monotonic()

    def restarting(self) -> None:
        """The worker crashed and will be started again after a backoff."""
        self._state = State.STARTING
        self.ready.clear()
        self._restarts += 1
        if self.observer is not None:
            self.observer.worker_crashed(self.handler.name)

    def mark_failed(self, reason: str) -> None:
        """The worker crash-looped: FAILED with ``reason`` and no longer wanted
        until :meth:`start` tries again."""
        self._state = State.FAILED
        self._wanted = False
        self._failure = reason
        if self.observer is not None:
            self.observer.worker_crashed(self.handler.name)
        self.ready.set()

    def begin_drain(self) -> None:
        """A stop: no longer wanted, and out of the registration at once (DRAINING)
        while in-flight calls finish."""
        self._wanted = False
        if self._state in (State.READY, State.STARTING):
            self._state = State.DRAINING

    def begin_recycle(self, reason: str, *, stuck: bool = False) -> bool:
        """Replace a READY worker (``reason`` says why; ``stuck``: a call in it
        does not end): DRAINING at once, so it takes no new calls, while it
        stays wanted, so the supervisor starts a new process once this one
        ends (not counted as a crash). Returns False, doing nothing, unless
        the slot is READY and wanted."""
        if self._state is not State.READY or not self._wanted:
            return False
        self._state = State.DRAINING
        self.ready.clear()
        self._recycles += 1
        self._last_recycle = reason
        self._recycling = True
        self._stuck = stuck
        return True

    def recycled(self) -> None:
        """The recycled process ended: STARTING its replacement, with a fresh
        stop request for the new run."""
        self._recycling = False
        self._stuck = False
        self._state = State.STARTING
        self.ready.clear()
        self._stop_requested = asyncio.Event()

    def request_stop(self) -> None:
        """The drain is over (or skipped): the supervisor closes the connection."""
        self._stop_requested.set()

    def supervision_ended(self) -> None:
        """The supervisor let go of the slot: STOPPED (unless FAILED), no process,
        every waiter woken."""
        if self._state is not State.FAILED:
            self._state = State.STOPPED
        self._pid = None
        self._recycling = False
        self._stuck = False
        self.ready.set()
        self.stopped.set()

    def shutdown(self) -> None:
        """The replica is shutting down: the worker is not restarted once its
        process ends."""
        self._wanted = False

    def wake(self) -> None:
        """Wake everyone waiting for the slot to settle (replica shutdown); they
        re-check its state."""
        self.ready.set()

    # -- calls -------------------------------------------------------------

    def open_call(
        self, payload: bytes, *, stream: bool, metadata: Mapping[str, str], timeout: float | None
    ) -> tuple[int, CallSink]:
        """Send a Call frame; raises Unavailable when the worker is not ready,
        PayloadTooLarge (nothing sent) when the frame is over the limit."""
        out = self._out
        if out is None or self._state is not State.READY:
            raise Unavailable(f"worker {self.id} is {self._state.value}")
        call_id = self._next_call
        # A passed deadline never gets this far: None (or 0) is "no deadline".
        header = wire.call_header(
            call_id, stream=stream, timeout=timeout, metadata=metadata.items()
        )
        out.write(header, payload, self._max_frame)
        self._next_call += 1
        sink = CallSink(metadata)
        self._calls[call_id] = sink
        self.idle.clear()
        return call_id, sink

    async def drain_writer(self) -> None:
        """Wait while the socket buffer to the worker is full (backpressure)."""
        writer = self._writer
        if writer is not None:
            # Not contextlib.suppress: an object and two calls less per call.
            try:
                await writer.drain()
            except ConnectionError:
                return  # the connection's reader reports it lost

    def grant(self, call_id: int, chunks: int) -> None:
        """Let the worker send ``chunks`` more responses of a stream call."""
        out = self._out
        if out is not None and call_id in self._calls:
            out.write(wpb.Header(call_id=call_id, credit=wpb.Credit(chunks=chunks)))

    def close_call(self, call_id: int, *, cancel: bool) -> None:
        """Forget a call; tell the worker to cancel it when it has not finished.

        A cancelled call is remembered until the worker answers the Cancel
        (it does once the call has really ended there, at once if it already
        had): :meth:`oldest_cancelled` is how long a handler has ignored its
        cancellation."""
        sink = self._calls.pop(call_id, None)
        if sink is None:
            return
        if not self._calls:
            self.idle.set()
        out = self._out
        if cancel and self.observer is not None:
            self.observer.calls_ended(self.handler.name, "cancelled")
        if cancel and out is not None and not out.closing:
            out.write(wpb.Header(call_id=call_id, cancel=wpb.Cancel()))
            request_id = sink.metadata.get(rpc.REQUEST_ID, "")
            self._cancelled[call_id] = Cancelled(call_id, request_id, time.monotonic())

    def oldest_cancelled(self) -> Cancelled | None:
        """The call cancelled longest ago that the worker still runs, or None."""
        return next(iter(self._cancelled.values()), None)

    # -- the connection (driven by the supervisor's process runner) -------------

    def connect(self, writer: asyncio.StreamWriter, max_frame: int | None = None) -> None:
        """The worker said hello: calls may go to it now (READY). A call whose
        frame would be over ``max_frame`` is refused (PayloadTooLarge) before
        anything is written."""
        self._writer = writer
        self._out = wire.FrameQueue(writer, on_error=lambda exc: None)
        self._max_frame = max_frame
        self._cancelled.clear()
        self._state = State.READY
        self.ready.set()
        self.starts += 1
        if self.observer is not None:
            self.observer.worker_started(self.handler.name, time.monotonic() - self._spawned_at)

    async def serve(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        """Hand each frame from the worker to its call until the connection ends
        (raises wire.ConnectionClosed then)."""
        unyielded = 0
        frames = wire.FrameBuffer(max_frame)
        while True:
            for header, payload in await wire.read_frames(reader, frames):
                sink = self._calls.get(header.call_id)
                if sink is not None:
                    sink.put((header, payload))
                    # Only a call's last frame carries stats.
                    if self.observer is not None and header.HasField("stats"):
                        self.observer.call_ended(self.handler.name, header)
                elif header.WhichOneof("kind") == "cancel":
                    # The worker confirms a cancelled call has ended.
                    self._cancelled.pop(header.call_id, None)
                # Reading does not suspend while bytes are buffered, so a worker
                # flooding a stream would keep the callers from running until the
                # socket is drained (the first token waits for the last): let
                # them run every few frames.
                unyielded += 1
                if unyielded >= YIELD_EVERY:
                    unyielded = 0
                    await asyncio.sleep(0)

    def disconnect(self) -> None:
        """The connection ended: no new calls go to this worker."""
        self._writer = self._out = None
        self._cancelled.clear()
        if self._state is State.READY:
            self._state = State.DRAINING
            self.ready.clear()

    def fail_calls(self, error: AnyServeError) -> None:
        """The process is gone: fail every call still in flight with ``error``."""
        if self.observer is not None:
            self.observer.calls_ended(self.handler.name, error.error_type, len(self._calls))
        for sink in self._calls.values():
            sink.put(error)
        self._calls.clear()
        self.idle.set()
