"""One worker position of a handler (a *slot*) and the calls in flight on it.

A slot is what the manager keeps alive: it survives restarts of its worker
process (the id stays, the pid changes). It owns the connection to the current
process and routes each frame the worker sends to the call it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.app import HandlerInfo
from anyserve.errors import AnyServeError, Unavailable

# Frames read from a worker before the reader lets other tasks run.
YIELD_EVERY = 16


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class CallSink:
    """Frames of one call, from the connection reader to the waiting dispatcher."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[wpb.Header, bytes] | AnyServeError] = asyncio.Queue()

    async def next(self) -> tuple[wpb.Header, bytes]:
        """The next frame; raises the error that ended the call instead."""
        item = await self.queue.get()
        if isinstance(item, AnyServeError):
            raise item
        return item

    def take_ready(self) -> tuple[wpb.Header, bytes] | None:
        """The next frame if one is already here, else None (never waits);
        raises the error that ended the call instead."""
        try:
            item = self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, AnyServeError):
            raise item
        return item


class Slot:
    """One worker process position of a handler, kept alive by the supervisor."""

    def __init__(self, worker_id: str, handler: HandlerInfo) -> None:
        self.id = worker_id
        self.handler = handler
        self.state = State.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str = ""
        self.failure: str = ""
        self.wanted = False
        # Set while the slot is READY, FAILED or STOPPED: waiters re-check state.
        self.ready = asyncio.Event()
        self.ready.set()
        # Set once the supervisor has let go of the slot (stopped or failed).
        self.stopped = asyncio.Event()
        self.stopped.set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.crashes: deque[float] = deque()
        # Set by a stop; the supervisor watches it (and a backoff ends early).
        self.stop_requested = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._calls: dict[int, CallSink] = {}
        self._next_call = 1

    @property
    def inflight(self) -> int:
        """Calls sent to this worker and not finished yet."""
        return len(self._calls)

    @property
    def holds_resources(self) -> bool:
        """Wanted, or its process has not exited yet (still draining)."""
        return self.wanted or not self.stopped.is_set()

    def describe(self) -> dict[str, Any]:
        """A JSON-able row for /registry and ``anyserve workers list``."""
        return {
            "id": self.id,
            "handler": self.handler.name,
            "capability": self.handler.capability.to_dict(),
            "pid": self.pid,
            "state": self.state.value,
            "inflight": self.inflight,
            "restarts": self.restarts,
            "error": self.failure or None,
        }

    # -- calls -------------------------------------------------------------

    def open_call(
        self, payload: bytes, *, stream: bool, metadata: Mapping[str, str], timeout: float
    ) -> tuple[int, CallSink]:
        """Send a Call frame; raises Unavailable when the worker is not ready."""
        writer = self._writer
        if writer is None or self.state is not State.READY:
            raise Unavailable(f"worker {self.id} is {self.state.value}")
        call_id = self._next_call
        self._next_call += 1
        sink = CallSink()
        self._calls[call_id] = sink
        self.idle.clear()
        call = wpb.Call(stream=stream, timeout=timeout, metadata=metadata)
        wire.write_frame(writer, wpb.Header(call_id=call_id, call=call), payload)
        return call_id, sink

    async def drain_writer(self) -> None:
        """Wait while the socket buffer to the worker is full (backpressure)."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    def grant(self, call_id: int, chunks: int) -> None:
        """Let the worker send ``chunks`` more responses of a stream call."""
        writer = self._writer
        if writer is not None and not writer.is_closing() and call_id in self._calls:
            credit = wpb.Credit(chunks=chunks)
            wire.write_frame(writer, wpb.Header(call_id=call_id, credit=credit))

    def close_call(self, call_id: int, *, cancel: bool) -> None:
        """Forget a call; tell the worker to cancel it when it has not finished."""
        if self._calls.pop(call_id, None) is None:
            return
        if not self._calls:
            self.idle.set()
        writer = self._writer
        if cancel and writer is not None and not writer.is_closing():
            wire.write_frame(writer, wpb.Header(call_id=call_id, cancel=wpb.Cancel()))

    # -- the connection (driven by the manager's supervisor) -------------------

    def connect(self, writer: asyncio.StreamWriter) -> None:
        """The worker said hello: calls may go to it now."""
        self._writer = writer
        self.state = State.READY
        self.ready.set()

    async def serve(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        """Hand each frame from the worker to its call until the connection ends
        (raises wire.ConnectionClosed then)."""
        unyielded = 0
        while True:
            header, payload = await wire.read_frame(reader, max_frame)
            sink = self._calls.get(header.call_id)
            if sink is not None:
                sink.queue.put_nowait((header, payload))
            # read_frame does not suspend while frames are buffered, so a worker
            # flooding a stream would keep the callers from running until the
            # socket is drained (the first token waits for the last): let them
            # run every few frames.
            unyielded += 1
            if unyielded >= YIELD_EVERY:
                unyielded = 0
                await asyncio.sleep(0)

    def disconnect(self) -> None:
        """The connection ended: no new calls go to this worker."""
        self._writer = None
        if self.state is State.READY:
            self.state = State.DRAINING
            self.ready.clear()

    def fail_calls(self, error: AnyServeError) -> None:
        """The process is gone: fail every call still in flight with ``error``."""
        for sink in self._calls.values():
            sink.queue.put_nowait(error)
        self._calls.clear()
        self.idle.set()
