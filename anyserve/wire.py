"""Length-prefixed frames between the dispatcher and a worker (Unix socket).

A frame is ``u32 header_len | u32 payload_len | Header | payload`` (big-endian
lengths). The header is a small ``anyserve.worker.Header`` protobuf; the payload
is opaque bytes (a serialized KServe message) and is never parsed here, so large
tensors cross the socket with no re-encoding.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable

from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import PayloadTooLarge

PREFIX = struct.Struct(">II")
# Headers are tiny; a large one means a corrupt or hostile stream.
MAX_HEADER = 1024 * 1024
# Frames are this much larger than the gRPC message limit, so every message
# gRPC let through (and its header) fits in one frame.
FRAME_HEADROOM = MAX_HEADER
# Default ceiling on header + payload: the default gRPC message limit plus headroom.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024 + FRAME_HEADROOM
# What a replica may send of one stream ahead of the reader's credit on the
# local lane (anyserve.lane_server): this many responses and, past the first
# one, this many bytes. The reader gives credit back once it has taken half
# of either, so a token stream costs one credit frame per 128 tokens and a
# stream of big tensors holds at most a few MiB in the API server.
LANE_WINDOW = 256
LANE_WINDOW_BYTES = 4 * 1024 * 1024
# A worker's answers stay this much under the gRPC message limit, so one still
# fits a gRPC message once the replica wraps or batches it.
ANSWER_MARGIN = 1024


def answer_limit(max_frame: int) -> int:
    """The largest answer a worker may send with frames of ``max_frame`` bytes."""
    return max_frame - FRAME_HEADROOM - ANSWER_MARGIN


Header = wpb.Header


class ConnectionClosed(Exception):
    """The peer closed the socket (cleanly or by dying)."""


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[wpb.Header, bytes]:
    """Read one frame. Raises ConnectionClosed at end of stream and
    PayloadTooLarge when the announced size is over ``max_frame``."""
    try:
        prefix = await reader.readexactly(PREFIX.size)
        header_len, payload_len = PREFIX.unpack(prefix)
        if header_len > MAX_HEADER or header_len + payload_len > max_frame:
            raise PayloadTooLarge(
                f"frame of {header_len + payload_len} bytes is over the {max_frame}-byte limit"
            )
        header = wpb.Header.FromString(await reader.readexactly(header_len))
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ConnectionClosed(str(exc) or "connection closed") from None
    return header, payload


# Most bytes one read takes from a stream reader: whatever it holds, so every
# frame that arrived together is cut in one go.
READ_SIZE = 1 << 20


async def read_frames(
    reader: asyncio.StreamReader, frames: FrameBuffer
) -> list[tuple[wpb.Header, bytes]]:
    """Every frame completed by what ``reader`` holds next: at least one, in
    order (it waits for them). One await for a batch, where :func:`read_frame`
    takes three per frame. Raises ConnectionClosed at end of stream (a partly
    received frame is lost with the peer) and PayloadTooLarge as
    :meth:`FrameBuffer.feed`."""
    while True:
        try:
            data = await reader.read(READ_SIZE)
        except ConnectionError as exc:
            raise ConnectionClosed(str(exc) or "connection closed") from None
        if not data:
            raise ConnectionClosed("connection closed")
        got = frames.feed(data)
        if got:
            return got


def call_header(
    call_id: int, *, stream: bool, timeout: float | None, metadata: Iterable[tuple[str, str]]
) -> wpb.Header:
    """The header of a ``Call`` frame (timeout None or 0: no deadline).

    The Call is filled in place inside its Header: one built apart (and a
    dict for its map) is copied in, more than twice the cost, and this runs
    for every call on the worker socket and the local lane."""
    header = wpb.Header(call_id=call_id)
    call = header.call
    call.SetInParent()  # a Call even with every field at its default
    call.stream = stream
    call.timeout = timeout or 0.0  # on the wire 0 means "no deadline"
    carried = call.metadata
    for key, value in metadata:  # the map's update() is a Python loop too
        carried[key] = value
    return header


def encode_frame(header: wpb.Header, payload: bytes = b"") -> list[bytes]:
    """The byte pieces of one frame, for ``StreamWriter.writelines``."""
    head = header.SerializeToString()
    return [PREFIX.pack(len(head), len(payload)), head, payload]


def write_frame(
    writer: asyncio.StreamWriter,
    header: wpb.Header,
    payload: bytes = b"",
    max_frame: int | None = None,
) -> None:
    """Queue one frame on ``writer`` (call ``await writer.drain()`` for backpressure).

    The pieces go in one ``writelines`` call with no await in between, so frames
    written by concurrent tasks never interleave. With ``max_frame``, a frame
    over it raises PayloadTooLarge and nothing is written: the peer would drop
    the connection (and every call on it) rather than read it.
    """
    pieces = encode_frame(header, payload)
    if max_frame is not None:
        _check_frame(len(pieces[1]), len(payload), max_frame)
    writer.writelines(pieces)


def _check_frame(header: int, payload: int, max_frame: int) -> None:
    """PayloadTooLarge for a frame of these sizes over ``max_frame``."""
    if header + payload > max_frame:
        raise PayloadTooLarge(
            f"{payload} bytes are over the {max_frame - FRAME_HEADROOM}-byte message limit"
        )


# How long a frame queued with ``wait`` may wait for company (FrameQueue):
# one tick of uvloop's timers, which count whole milliseconds. Waiting 2 ms
# gathered more under load but cost calls at 10 to 12 in flight up to 13%.
WAIT_LIMIT = 0.001


class FrameQueue:
    """Frames queued during one event-loop iteration, then written with one
    ``writelines`` call (the same bytes as writing them one by one).

    Each ``writelines`` is a system call that also wakes the peer: a worker
    that finishes several calls in one iteration (the common case under load),
    or either end of the local lane, sends their frames together. Frames keep
    their order (one queue), and one as large as ``flush_at`` goes out at
    once, so big answers are not held. A frame queued with ``wait`` may wait
    a little longer, for frames of later iterations (``write``).
    Called outside an event loop, it writes each frame at once.
    Nothing is written once the writer is closing (the peer is gone); a write
    that fails goes to ``on_error``, once: the connection is then unusable and
    later frames are dropped.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter | asyncio.Transport,
        on_error: Callable[[Exception], object],
        flush_at: int = 64 * 1024,
    ) -> None:
        self._writer = writer
        self._on_error = on_error
        self._flush_at = flush_at
        self._pieces: list[bytes] = []
        self._size = 0
        self._flush_soon: asyncio.Handle | None = None
        self._waiting = False  # _flush_soon is the timer of frames that wait
        self._broken = False
        # Looked up once: asyncio.get_running_loop() is a system call (getpid)
        # per frame otherwise. A queue serves the loop it is first used on.
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(
        self,
        header: wpb.Header,
        payload: bytes = b"",
        max_frame: int | None = None,
        *,
        wait: bool = False,
    ) -> None:
        """Queue one frame; it is written at the end of this loop iteration.
        With ``max_frame``, a frame over it raises PayloadTooLarge and
        nothing is queued (as :func:`write_frame`).

        With ``wait``, the frame may wait up to ``WAIT_LIMIT`` seconds for
        company (the frames queued meanwhile leave with it); a frame queued
        without ``wait`` takes every waiting frame along at the end of its
        iteration."""
        # encode_frame's pieces, without its list: this runs for every frame.
        head = header.SerializeToString()
        if max_frame is not None:
            _check_frame(len(head), len(payload), max_frame)
        self._pieces += (PREFIX.pack(len(head), len(payload)), head, payload)
        self._queued(len(head) + len(payload), wait)

    def write_many(self, header: wpb.Header, payloads: list[bytes]) -> None:
        """Queue one frame per payload, all with ``header`` (serialized once)."""
        head = header.SerializeToString()
        size = 0
        for payload in payloads:
            self._pieces += (PREFIX.pack(len(head), len(payload)), head, payload)
            size += len(head) + len(payload)
        self._queued(size, False)

    def _queued(self, size: int, wait: bool) -> None:
        self._size += size
        if self._size >= self._flush_at:
            self.flush()
            return
        due = self._flush_soon
        if due is not None:
            if wait or not self._waiting:
                return  # it leaves with the frames already due
            due.cancel()  # the waiting frames go now, with this one
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to wait for: the frame goes now
                self.flush()
                return
        self._waiting = wait
        if wait:
            self._flush_soon = loop.call_later(WAIT_LIMIT, self.flush)
        else:
            self._flush_soon = loop.call_soon(self.flush)

    @property
    def closing(self) -> bool:
        """True once nothing more will be written (the peer is gone)."""
        return self._broken or self._writer.is_closing()

    def flush(self) -> None:
        """Write every queued frame now."""
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        pieces, self._pieces, self._size = self._pieces, [], 0
        if not pieces or self.closing:
            return
        try:
            self._writer.writelines(pieces)
        except Exception as exc:
            self._broken = True
            self._on_error(exc)

    def unsent(self) -> list[wpb.Header]:
        """The headers of the frames queued and not written yet, parsed again:
        for a connection that failed, which of its calls never left."""
        return [wpb.Header.FromString(head) for head in self._pieces[1::3]]

    async def drain(self) -> None:
        """Wait while the writer's buffer is over its high-water mark
        (``StreamWriter.drain``): backpressure, one iteration behind the queue.
        A transport's owner follows its ``pause_writing`` instead."""
        if isinstance(self._writer, asyncio.StreamWriter):
            await self._writer.drain()


def check_answer(payload: bytes, max_frame: int) -> None:
    """Raise PayloadTooLarge when a worker's answer could not cross the next
    gRPC hop (:func:`answer_limit`)."""
    limit = answer_limit(max_frame)
    if len(payload) > limit:
        raise PayloadTooLarge(f"an answer of {len(payload)} bytes is over the {limit}-byte limit")


class FrameBuffer:
    """Frames cut from bytes as they arrive, for an ``asyncio.Protocol``'s
    ``data_received`` (the local lane between an API server and a replica):
    no task and no await per frame, and every frame that arrived in one read
    is handed over at once."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[wpb.Header, bytes]]:
        """The frames completed by ``data``, in order. Raises PayloadTooLarge
        when a frame announces more than ``max_frame`` bytes (the stream is
        then unusable: the caller closes it)."""
        buffer = self._buffer
        if not buffer and type(data) is bytes:
            # Nothing held back (the usual case): frames are cut from ``data``
            # itself, each piece copied once (not into the buffer, then out),
            # and a payload that is the rest of ``data`` not at all.
            frames, start = self._cut(data)
            if start < len(data):
                buffer += memoryview(data)[start:]
            return frames
        buffer += data
        with memoryview(buffer) as view:  # slices of a view copy nothing
            frames, start = self._cut(view)
        del buffer[:start]
        return frames

    def _cut(self, data: bytes | memoryview) -> tuple[list[tuple[wpb.Header, bytes]], int]:
        """The whole frames at the start of ``data`` and where they end."""
        frames: list[tuple[wpb.Header, bytes]] = []
        start, size = 0, len(data)
        while size - start >= PREFIX.size:
            header_len, payload_len = PREFIX.unpack_from(data, start)
            if header_len > MAX_HEADER or header_len + payload_len > self._max_frame:
                raise PayloadTooLarge(
                    f"frame of {header_len + payload_len} bytes is over the"
                    f" {self._max_frame}-byte limit"
                )
            head = start + PREFIX.size
            body = head + header_len
            end = body + payload_len
            if end > size:
                break
            header = wpb.Header.FromString(bytes(data[head:body]))
            frames.append((header, bytes(data[body:end])))
            start = end
        return frames, start
