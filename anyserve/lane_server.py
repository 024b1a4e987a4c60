"""The local lane's server: inference calls from another process on this host
over a Unix socket, as the frames of :mod:`anyserve.wire`, instead of gRPC.

gRPC is most of the CPU a small call costs each end. Where two anyserve
processes run on one host (the same boot and ``/dev/shm``: ``shm.host_id``),
``ModelInfer`` and ``ModelStreamInfer`` cross such a socket instead. A
replica serves one to the API server (``anyserve.replica.lane``), and the
API server one to the workers' ``context.call`` (``api_server/grpc_entry``),
one connection per caller:

* caller -> server: ``Call`` (stream or not, seconds left, the metadata gRPC
  would carry) with the serialized request as payload; ``Cancel`` (its caller
  went away: the call is cancelled, nothing more is sent); ``Credit`` (a
  stream's flow control, as between dispatcher and worker).
* server -> caller: ``Hello`` first (the server's name); then per call a
  ``Chunk`` per stream response, and ``End`` (a unary call's answer as
  payload) or ``Error``; ``Cancel`` for a call refused without running (the
  server is stopping: the caller may send it elsewhere).

Everything else stays on gRPC. The socket is in a new directory only this
user may enter, and the caller checks the ``Hello`` before it sends anything
(:mod:`anyserve.lane_client`); a caller that cannot use the lane (another
user, another mount namespace) uses gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

import anyio
import anyio.abc

from anyserve import rpc, shm, tracing, tracing_servers, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.call_tasks import CallTasks
from anyserve.errors import AnyServeError, HandlerError, PayloadTooLarge, to_frame

log = logging.getLogger("anyserve.lane")

#: The socket's name in its directory.
SOCKET_NAME = "lane.sock"

Send = Callable[[list[bytes]], Awaitable[None]]
#: ``(request, metadata, seconds left or None)`` -> the serialized answer.
#: ``metadata`` is the Call frame's own map, not a copy: read, never changed.
Unary = Callable[[bytes, Mapping[str, str], float | None], Awaitable[bytes]]
#: ``(request, metadata, seconds left or None, send)``: responses go to ``send``,
#: a failure in-band (the call then ends cleanly).
Streaming = Callable[[bytes, Mapping[str, str], float | None, Send], Awaitable[None]]
#: The directory's name: this, the server's ``<pid>-<start time>``, a random part.
PREFIX = "anyserve-lane-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-[^/]+")

_END = wpb.End()
_CHUNK = wpb.Chunk()
_CANCEL = wpb.Cancel()
_NO_SPAN = contextlib.nullcontext()


class _Call:
    """One call in flight. A plain slotted class: one is built per call, and a
    unary call needs only its task (a stream's credit state is made by
    :func:`_sender`).

    A call ends by cancelling its asyncio task, not through an anyio cancel
    scope: entering and leaving a scope was a tenth of the replica's CPU per
    call with a trivial handler, and nothing a call runs shields itself from
    cancellation or runs a thread that a scope would wait for."""

    __slots__ = ("cancelled", "more", "started", "task", "unacked", "unacked_bytes")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.cancelled = False
        # Sizes of the stream's responses sent and not yet credited, their sum,
        # and what wakes the sender when credit comes.
        self.unacked: collections.deque[int] = collections.deque()
        self.unacked_bytes = 0
        self.more: asyncio.Event | None = None

    def cancel(self) -> None:
        """End the call: its caller went away, or the server stops."""
        self.cancelled = True
        # A task cancelled before its first step never runs its coroutine, so
        # _serve's clean-up would not run: one not started yet sees the flag.
        if self.started and self.task is not None:
            self.task.cancel()


def sweep_stale(parent: str) -> list[str]:
    """Delete the lane directories in ``parent`` that this user's servers
    left when they were killed (their process no longer runs); return them.
    Never raises."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        found = _NAME.fullmatch(entry.name)
        try:
            if found is None or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not shm.owner_alive(int(found[1]), int(found[2])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


class LaneServer:
    """Serves the lane's calls through ``unary`` and ``stream``.

    Use inside a task group: ``path = await tg.start(lane.run)``; only
    :meth:`stop` ends it (shielded, like the manager, so calls can drain).
    """

    def __init__(
        self,
        name: str,
        unary: Unary,
        stream: Streaming,
        max_frame: int,
        spans: tuple[str, str] = ("ModelInfer", "ModelStreamInfer"),
    ) -> None:
        self.name = name  # what Hello says: callers check it
        self.unary = unary
        self.stream = stream
        self.max_frame = max_frame
        self.spans = spans  # the server spans' names (unary, stream)
        #: Calls taken so far (for tests and operators).
        self.taken = 0
        self._calls = CallTasks(on_error=self._failed)
        self._serving = False
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._stopping = asyncio.Event()
        self._refusing = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[str | None]) -> None:
        """Listen on a socket in a new private directory, report started with
        its path, and serve until :meth:`stop`; the directory goes with it.
        Reports None at once when no socket can be made (calls keep coming
        over gRPC)."""
        directory = ""
        try:
            sweep_stale(tempfile.gettempdir())
            directory = tempfile.mkdtemp(prefix=f"{PREFIX}{shm.owner_tag()}-")  # mode 0700
            path = os.path.join(directory, SOCKET_NAME)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: _Peer(self), path)
        except OSError as exc:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            log.warning("%s: no local lane (%s); calls come over gRPC only", self.name, exc)
            task_status.started(None)
            return
        try:
            with anyio.CancelScope(shield=True):
                self._serving = True
                task_status.started(path)
                try:
                    await self._stopping.wait()
                finally:
                    self._serving = False
                    self._server.close()
                    for peer in list(self._peers):
                        peer.close()
                        for state in peer.calls.values():  # what the drain left
                            state.cancel()
                    await self._calls.wait()
            self._calls.raise_errors()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _failed(self) -> None:
        # A call's task raised past _serve's handlers (a bug): stop serving;
        # run() raises it once the other calls have ended, as a task group would.
        self._refusing = True
        self._stopping.set()

    async def stop(self, grace: float) -> None:
        """Refuse new calls (the API server sends them elsewhere), wait up to
        ``grace`` seconds for the running ones, then end :meth:`run`."""
        self._refusing = True
        if self._server is not None:
            self._server.close()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        self._stopping.set()

    def start_call(self, peer: _Peer, call_id: int, call: wpb.Call, payload: bytes) -> None:
        if self._refusing or not self._serving:
            peer.send(wpb.Header(call_id=call_id, cancel=_CANCEL))
            return
        state = _Call()
        peer.calls[call_id] = state
        self.taken += 1
        self._running += 1
        self._idle.clear()
        state.task = self._calls.start(self._serve(peer, call_id, call, payload, state))

    async def _serve(
        self, peer: _Peer, call_id: int, call: wpb.Call, payload: bytes, state: _Call
    ) -> None:
        state.started = True
        try:
            if state.cancelled:  # before it started: nothing runs, nothing is sent
                return
            # Not copied: each server reads what it needs of it in one pass.
            metadata = call.metadata
            timeout = call.timeout if call.timeout > 0 else None
            # No span, not even the context manager's generator, when not tracing.
            span: contextlib.AbstractContextManager[None] = _NO_SPAN
            if tracing.ENABLED:
                name = self.spans[1] if call.stream else self.spans[0]
                span = tracing_servers.lane_span(name, metadata)
            try:
                with span:
                    if call.stream:
                        send = _sender(peer, call_id, state)
                        await self.stream(payload, metadata, timeout, send)
                        peer.send(wpb.Header(call_id=call_id, end=_END))
                    else:
                        answer = await self.unary(payload, metadata, timeout)
                        _check_size(len(answer))
                        peer.send(wpb.Header(call_id=call_id, end=_END), answer)
            except AnyServeError as exc:
                peer.send(wpb.Header(call_id=call_id, error=to_frame(exc)))
            except Exception as exc:  # a bug here must not end the lane's other calls
                log.exception("%s: lane call failed", self.name)
                error = HandlerError(f"{self.name} failed: {type(exc).__name__}: {exc}")
                peer.send(wpb.Header(call_id=call_id, error=to_frame(error)))
        finally:
            peer.calls.pop(call_id, None)
            self._running -= 1
            if not self._running:
                self._idle.set()


def _check_size(size: int) -> None:
    """PayloadTooLarge for an answer the caller would not read: the limit
    of gRPC channels, which lane callers apply to frames too."""
    if size > rpc.DEFAULT_MAX_MESSAGE:
        raise PayloadTooLarge(
            f"an answer of {size} bytes is larger than the caller's"
            f" {rpc.DEFAULT_MAX_MESSAGE}-byte message limit"
        )


def _sender(peer: _Peer, call_id: int, state: _Call) -> Callable[[list[bytes]], Awaitable[None]]:
    """``send`` of one stream call: its responses as ``Chunk`` frames in one
    write, then waiting while its credit or the socket says so."""
    chunk = wpb.Header(call_id=call_id, chunk=_CHUNK)
    more = state.more = asyncio.Event()

    async def send(batch: list[bytes]) -> None:
        for response in batch:
            _check_size(len(response))
        peer.send_many(chunk, batch)
        for response in batch:
            state.unacked.append(len(response))
            state.unacked_bytes += len(response)
        unacked = state.unacked
        while len(unacked) >= wire.LANE_WINDOW or state.unacked_bytes >= wire.LANE_WINDOW_BYTES:
            more.clear()
            await more.wait()
        if peer.paused:
            await peer.drained()

    return send


class _Peer(asyncio.Protocol):
    """One caller's connection."""

    def __init__(self, server: LaneServer) -> None:
        self.server = server
        self.calls: dict[int, _Call] = {}
        self.paused = False
        self._frames = wire.FrameBuffer(server.max_frame)
        self._transport: asyncio.Transport | None = None
        self._out: wire.FrameQueue | None = None
        self._resumed: asyncio.Event | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        # What calls answer in one loop iteration leaves in one write.
        self._out = wire.FrameQueue(self._transport, lambda exc: self.close())
        self.server._peers.add(self)
        hello = wpb.Hello(worker_id=self.server.name, pid=os.getpid())
        self.send(wpb.Header(hello=hello))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except PayloadTooLarge as exc:
            log.warning("%s: lane connection closed: %s", self.server.name, exc)
            self.close()
            return
        for header, payload in frames:
            kind = header.WhichOneof("kind")
            if kind == "call":
                self.server.start_call(self, header.call_id, header.call, payload)
            elif kind == "cancel":
                state = self.calls.get(header.call_id)
                if state is not None:
                    state.cancel()
            elif kind == "credit":
                state = self.calls.get(header.call_id)
                if state is not None:
                    unacked = state.unacked
                    for _ in range(min(header.credit.chunks, len(unacked))):
                        state.unacked_bytes -= unacked.popleft()
                    if state.more is not None:
                        state.more.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._peers.discard(self)
        for state in self.calls.values():  # nobody is left to answer
            state.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    async def drained(self) -> None:
        if self.paused:
            self._resumed = self._resumed or asyncio.Event()
            await self._resumed.wait()

    def send(self, header: wpb.Header, payload: bytes = b"") -> None:
        if self._out is not None:
            self._out.write(header, payload)

    def send_many(self, header: wpb.Header, payloads: list[bytes]) -> None:
        """One frame per payload, all with ``header``."""
        if self._out is not None:
            self._out.write_many(header, payloads)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
