"""The caller's side of the local lane (:mod:`anyserve.lane_server`):
inference calls to a server on this host over its Unix socket, not gRPC (the
API server to a replica; a worker's ``context.call`` to the API server).

One :class:`Lane` per server, opened on first use and checked by the
server's ``Hello`` before any call is sent on it. A call is a ``Call``
frame with the request; its answer (``End``, ``Error``, or ``Chunk`` frames
then ``End`` for a stream) is handed to the waiting request by call id. A
request that stops waiting (its client went away, its deadline passed) sends
``Cancel``: unlike cancelling a gRPC call, this costs nothing and leaks
nothing (see abandoned.py). A lane that breaks fails its calls at once with
Unavailable; the next request opens a new one or goes over gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, cast

import anyio

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import (
    DeadlineExceeded,
    HandlerError,
    PayloadTooLarge,
    Unavailable,
    from_frame,
)

_CANCEL = wpb.Cancel()
# What gRPC's client says when a call's deadline passes (errors.from_grpc):
# the same words whichever way the call went.
_DEADLINE = "Deadline Exceeded"
# Credit goes back once half the window (responses or bytes) has been taken.
_CREDIT_COUNT = wire.LANE_WINDOW // 2
_CREDIT_BYTES = wire.LANE_WINDOW_BYTES // 2
# A call that may gather (Lane.unary) waits for company only while this many
# calls are in flight on the lane and the last such call left less than
# _GATHER_GAP seconds ago: company is then due within wire.WAIT_LIMIT. With
# 2, calls at 3 to 6 in flight (a closed loop of few clients, whose next calls
# wait on these answers) ran up to 10% slower; 4 lost nothing measurable.
_GATHER_BUSY = 4
_GATHER_GAP = 0.001


class Refused(Exception):
    """The call was not run: the server refused it (it is stopping), or the
    lane was lost before it could be sent."""


class Lane(asyncio.Protocol):
    """One Unix-socket connection to a server's local lane."""

    def __init__(self, name: str, what: str) -> None:
        self.name = name  # what the server's Hello must say
        self.what = what  # the server, in messages ("replica r1")
        self._loop = asyncio.get_running_loop()
        self._frames = wire.FrameBuffer()
        self._hello: asyncio.Future[wpb.Hello] = self._loop.create_future()
        self._unary: dict[int, asyncio.Future[bytes]] = {}
        self._streams: dict[int, LaneStream] = {}
        self._last_id = 0
        self._last_gathered = 0.0  # time.perf_counter() of the last gathering call
        self._transport: asyncio.Transport | None = None
        self._out: wire.FrameQueue | None = None

    @classmethod
    async def open(cls, path: str, name: str, within: float, what: str = "") -> Lane:
        """Connect to the lane at ``path`` and wait for its ``Hello``. Raises
        OSError (no such socket, refused, not allowed), TimeoutError, or
        ValueError when the socket's Hello does not say ``name`` (``what``
        names the server in errors; default ``replica <name>``)."""
        loop = asyncio.get_running_loop()
        lane: Lane | None = None
        try:
            with anyio.fail_after(within):
                _, lane = await loop.create_unix_connection(
                    lambda: cls(name, what or f"replica {name}"), path
                )
                hello = await lane._hello
        except BaseException:
            if lane is not None:
                lane.close()
            raise
        if hello.worker_id != name:
            lane.close()
            raise ValueError(f"the socket answered as {hello.worker_id!r}, not {name!r}")
        return lane

    @property
    def usable(self) -> bool:
        """Whether calls may be sent (the connection is open)."""
        return self._transport is not None and not self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- calls ---------------------------------------------------------------

    async def unary(
        self,
        body: bytes,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        *,
        gather: bool = False,
    ) -> bytes:
        """Send one ``ModelInfer`` request and return the replica's answer.

        With ``gather``, a call sent while the lane is busy may wait up to
        ``wire.WAIT_LIMIT`` for the next ones, to leave in one write with them
        (for callers whose calls come one per loop iteration; see
        :meth:`_may_wait`).

        Raises the server's error, DeadlineExceeded once ``timeout`` seconds
        have passed (None: no deadline), Unavailable when the lane breaks,
        Refused when the call was not sent or not taken. Cancelled, it tells
        the server to cancel the call.
        """
        call_id = self._send_call(body, metadata, timeout, stream=False, gather=gather)
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._unary[call_id] = future
        timer = None if timeout is None else self._loop.call_later(timeout, self._expire, call_id)
        try:
            return await future
        except asyncio.CancelledError:
            if self._unary.pop(call_id, None) is not None:
                self._send(wpb.Header(call_id=call_id, cancel=_CANCEL))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def stream(
        self,
        body: bytes,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        target: Any = None,
    ) -> LaneStream:
        """Send one ``ModelStreamInfer`` request; its responses come through
        the returned stream (its :meth:`LaneStream.stop` cancels the call).
        Raises Refused when the lane is lost already (nothing was sent)."""
        call_id = self._send_call(body, metadata, timeout, stream=True)
        stream = self._streams[call_id] = LaneStream(self, call_id, target)
        if timeout is not None:
            stream.timer = self._loop.call_later(timeout, self._expire, call_id)
        return stream

    def _send_call(
        self,
        body: bytes,
        metadata: list[tuple[str, str]],
        timeout: float | None,
        *,
        stream: bool,
        gather: bool = False,
    ) -> int:
        if not self.usable:  # lost since it was chosen: nothing is sent
            raise Refused()
        self._last_id += 1
        header = wire.call_header(self._last_id, stream=stream, timeout=timeout, metadata=metadata)
        self._send(header, body, wait=gather and self._may_wait())
        return self._last_id

    def _may_wait(self) -> bool:
        """Whether a gathering call may wait for company.

        A grpc.aio server hands over one new call per loop iteration, so each
        would leave in a write of its own, and the replica and its worker
        would wake once per call. Under load that costs them about twice the
        CPU per call of calls that arrive together (HTTP requests read in
        one go). Waiting is worth it only while calls keep coming: many in
        flight here, and the previous one a moment ago. A slow handler's
        calls, or a lone client's, go at once.
        """
        now = time.perf_counter()
        recent = now - self._last_gathered < _GATHER_GAP
        self._last_gathered = now
        return recent and len(self._unary) >= _GATHER_BUSY

    def _send(self, header: wpb.Header, payload: bytes = b"", *, wait: bool = False) -> None:
        if self._out is not None:
            self._out.write(header, payload, wait=wait)

    def _expire(self, call_id: int) -> None:
        future = self._unary.pop(call_id, None)
        if future is not None and not future.done():
            future.set_exception(DeadlineExceeded(_DEADLINE))
        stream = self._streams.pop(call_id, None)
        if stream is not None:
            stream.finish(DeadlineExceeded(_DEADLINE))
        if future is not None or stream is not None:
            self._send(wpb.Header(call_id=call_id, cancel=_CANCEL))

    def forget(self, call_id: int, credit: int) -> None:
        """A stream's reader took ``credit`` more responses (call_id still
        running), or stopped reading (``credit`` < 0: cancel the call)."""
        if credit < 0:
            if self._streams.pop(call_id, None) is not None:
                self._send(wpb.Header(call_id=call_id, cancel=_CANCEL))
        elif call_id in self._streams:
            self._send(wpb.Header(call_id=call_id, credit=wpb.Credit(chunks=credit)))

    # -- the protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        # The calls sent in one loop iteration leave in one write.
        self._out = wire.FrameQueue(self._transport, lambda exc: self.close())

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except PayloadTooLarge as exc:
            self._fail(f"{self.what} sent an unreadable frame ({exc})")
            return
        for header, payload in frames:
            call_id = header.call_id
            kind = header.WhichOneof("kind")
            future = self._unary.pop(call_id, None)
            if future is not None:
                # Done already when its waiter was cancelled a moment ago.
                if not future.done():
                    if kind == "end":
                        future.set_result(payload)
                    else:
                        future.set_exception(_ended(kind, header, self.what))
                continue
            stream = self._streams.get(call_id)
            if stream is not None:
                if kind == "chunk":
                    stream.put(payload)
                else:
                    del self._streams[call_id]
                    stream.finish(None if kind == "end" else _ended(kind, header, self.what))
            elif kind == "hello" and not self._hello.done():
                self._hello.set_result(header.hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"the connection to {self.what} was lost")

    def _fail(self, why: str) -> None:
        self.close()
        if not self._hello.done():
            self._hello.set_exception(ConnectionError(why))
        unary, self._unary = self._unary, {}
        streams, self._streams = self._streams, {}
        # A call still queued here (waiting for company) never reached the
        # server: Refused, so that the caller may send it elsewhere.
        unsent = [] if self._out is None else self._out.unsent()
        never_sent = {header.call_id for header in unsent if header.HasField("call")}
        for call_id, future in unary.items():
            if not future.done():
                future.set_exception(Refused() if call_id in never_sent else Unavailable(why))
        for stream in streams.values():
            stream.finish(Unavailable(why))


def _ended(kind: str | None, header: wpb.Header, what: str) -> Exception:
    """The exception for a call's last frame that is not a clean ``End``."""
    if kind == "error":
        return from_frame(header.error)
    if kind == "cancel":
        return Refused()
    return HandlerError(f"{what} ended a call with a {kind} frame")


class LaneStream:
    """The responses of one stream request sent over a lane, as
    :class:`~anyserve.api_server.channels.ReplicaStream` gives them."""

    def __init__(self, lane: Lane, call_id: int, target: Any) -> None:
        self.replica = target  # what the router chose (its ReplicaEntry), if anything
        self.timer: asyncio.TimerHandle | None = None
        self._lane = lane
        self._id = call_id
        self._ready: collections.deque[bytes] = collections.deque()
        self._end: tuple[Exception | None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._owed = 0  # responses taken since credit was last sent
        self._owed_bytes = 0

    # Told by the lane.
    def put(self, payload: bytes) -> None:
        self._ready.append(payload)
        self._wake()

    def finish(self, error: Exception | None) -> None:
        if self._end is None:
            if isinstance(error, Refused):
                error = Unavailable(f"{self._lane.what} is stopping")
            self._end = (error,)
            if self.timer is not None:
                self.timer.cancel()
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        while not self._ready and self._end is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _took(self, count: int, size: int) -> None:
        self._owed += count
        self._owed_bytes += size
        if self._owed >= _CREDIT_COUNT or self._owed_bytes >= _CREDIT_BYTES:
            self._lane.forget(self._id, self._owed)
            self._owed = self._owed_bytes = 0

    def _ended(self) -> None:
        assert self._end is not None
        error = self._end[0]
        if error is not None:
            raise error

    # Read by the request.
    async def read(self) -> bytes | None:
        """The next serialized ModelStreamInferResponse, or None at the clean
        end. Raises the error the call ended with."""
        await self._wait()
        if self._ready:
            message = self._ready.popleft()
            self._took(1, len(message))
            return message
        self._ended()
        return None

    async def read_batch(self) -> list[bytes] | None:
        """Every response that has arrived (at least one), or None at the
        clean end. Raises like :meth:`read`."""
        await self._wait()
        if self._ready:
            batch = list(self._ready)
            self._ready.clear()
            self._took(len(batch), sum(map(len, batch)))
            return batch
        self._ended()
        return None

    def stop(self) -> None:
        """Nobody reads any more: a call still running is cancelled."""
        if self._end is None:
            self._lane.forget(self._id, -1)
            self.finish(Unavailable("the stream was stopped"))
        self._ready.clear()
