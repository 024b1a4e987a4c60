"""One persistent gRPC channel per replica endpoint.

Channels are made when a replica registers (or on first use) and closed once
no registered replica uses their endpoint and no call is running on them. The
pool also answers the question the router's retry rule depends on: "is this
channel connected?" (:meth:`Connection.connect`), so a request is only ever
sent over a connection that is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio
import grpc
import grpc.aio

from anyserve import rpc
from anyserve.errors import AnyServeError, HandlerError, Unavailable, from_rpc_error
from anyserve.lane_client import Lane
from anyserve.lane_slot import LaneSlot

if TYPE_CHECKING:
    from anyserve.api_server.registry import ReplicaEntry

logger = logging.getLogger(__name__)

_READY = grpc.ChannelConnectivity.READY
_BROKEN = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_FAILED = (_BROKEN, grpc.ChannelConnectivity.SHUTDOWN)

# A replica that comes back on the same endpoint should be reachable within a
# heartbeat or so, not after gRPC's default reconnect backoff (up to 120 s).
_CHANNEL_OPTIONS = [
    *rpc.grpc_options(),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Subchannels are shared process-wide by default: a fresh channel would
    # inherit the old one's reconnect backoff (see ChannelPool.refresh).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

# grpc is untyped here (see pyproject): these callables take and return bytes.
Unary = Any
Streaming = Any


class ReplicaConnection(Protocol):
    """What the router needs of a connection to one replica (the seam that
    lets tests route against fakes, as httpx's transports do)."""

    endpoint: str
    calls: int

    async def connect(self, within: float) -> bool: ...

    def open_lane(self, replica: ReplicaEntry) -> Lane | None: ...

    async def local(self, replica: ReplicaEntry, within: float) -> Lane | None: ...

    def unary(self, path: str) -> Unary: ...

    def stream(self) -> Streaming: ...


class StreamResponses(Protocol):
    """A stream request's responses as the router hands them out: read from
    gRPC (:class:`ReplicaStream`) or from the local lane (``LaneStream``)."""

    replica: ReplicaEntry

    async def read(self) -> bytes | None: ...

    async def read_batch(self) -> list[bytes] | None: ...


class Connections(Protocol):
    """Where the router gets connections from: :class:`ChannelPool`, or a fake."""

    def get(self, endpoint: str) -> ReplicaConnection: ...


class Connection:
    """A channel to one endpoint plus cached callables (bytes in, bytes out)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.channel = grpc.aio.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
        self.calls = 0  # calls running on this channel; it is only closed at 0
        self._unary: dict[str, Unary] = {}
        self._stream: Streaming | None = None
        self._lanes = LaneSlot()

    def unary(self, path: str) -> Unary:
        """The unary callable for ``path``; requests and responses stay serialized."""
        call = self._unary.get(path)
        if call is None:
            call = self._unary[path] = self.channel.unary_unary(path)
        return call

    def stream(self) -> Streaming:
        """The ``ModelStreamInfer`` callable (serialized messages both ways)."""
        if self._stream is None:
            self._stream = self.channel.stream_stream(rpc.MODEL_STREAM_INFER)
        return self._stream

    def warm_up(self) -> None:
        """Start connecting now so the first request does not pay for it."""
        self.channel.get_state(try_to_connect=True)

    @property
    def lane(self) -> Lane | None:
        """The local lane to this endpoint's replica while it is open."""
        return self._lanes.lane

    def open_lane(self, replica: ReplicaEntry) -> Lane | None:
        """The local lane to ``replica`` if it is open already, else None
        (nothing is opened: :meth:`local` does that)."""
        return self._lanes.current(replica.lane, replica.replica_id)

    async def local(self, replica: ReplicaEntry, within: float) -> Lane | None:
        """The local lane to ``replica`` (it registered one, on this host:
        the caller checks), opened on first use; None when it cannot be used
        (then for a few seconds: calls go over gRPC)."""
        return await self._lanes.get(replica.lane, replica.replica_id, within)

    async def aclose(self) -> None:
        """Close the channel and the lane (cancels calls still running)."""
        self._lanes.close()
        await self.channel.close()

    async def connect(self, within: float) -> bool:
        """True once the channel is READY; False when the connection attempt
        failed (refused, unreachable, TLS/HTTP2 handshake) or took longer than
        ``within`` seconds. Costs one C call when already connected."""
        state = self.channel.get_state(try_to_connect=True)
        if state == _READY:
            return True
        with anyio.move_on_after(within):
            while state not in _FAILED:
                await self.channel.wait_for_state_change(state)
                state = self.channel.get_state(try_to_connect=True)
                if state == _READY:
                    return True
        return False


# What a stream's read-ahead hands over: a message, None at the clean end, or
# how it ended otherwise.
_Item: TypeAlias = bytes | grpc.aio.AioRpcError | AnyServeError | None


class ReplicaStream:
    """The responses of one request sent on a replica's ``ModelStreamInfer``.

    With ``spawn`` (:meth:`anyserve.api_server.abandoned.Abandoned.spawn`), a
    task that may outlive the request reads the call and hands each message
    over: a reader cancelled while it waits (its client went away) leaves the
    gRPC read alone, since cancelling a pending grpc.aio read leaks native
    memory (abandoned.py). :meth:`stop` makes that task drop whatever still
    comes until the call ends. Without ``spawn`` the call is read directly.
    """

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall,
        replica: ReplicaEntry,
        batched: bool = False,
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], bool] | None = None,
    ) -> None:
        self._call = call
        self.replica = replica
        self.batched = batched
        self._stopped = False
        self._end: tuple[_Item] | None = None  # how the stream ended, once read
        # Two messages read ahead at most: gRPC's flow control holds the rest.
        self._inbox: asyncio.Queue[_Item] | None = asyncio.Queue(2) if spawn else None
        if spawn is not None and not spawn(self._read_ahead):
            self._inbox = None

    async def _read_ahead(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        ended = False
        try:
            while not ended:
                item = await self._next()
                ended = not isinstance(item, bytes)
                if not self._stopped:
                    await inbox.put(item)
        finally:
            if not ended and not self._stopped:
                # Cancelled (the server stops) before the end came: the
                # reader must not wait for ever. Room is certain when it waits.
                with contextlib.suppress(asyncio.QueueFull):
                    inbox.put_nowait(Unavailable("the API server stopped reading the stream"))

    async def _next(self) -> _Item:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            ended: _Item = exc
            return ended
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task's own cancellation
            # grpc.aio raises CancelledError for a call cancelled underneath
            # (abandoned.py's fallback): an end, not this task's cancellation.
            return Unavailable("the call to the replica was cancelled")
        # Anything but bytes is grpc.aio.EOF (absent from the type stubs).
        return message if isinstance(message, bytes) else None

    def stop(self) -> None:
        """Nobody reads any more: what the replica still sends is dropped."""
        self._stopped = True
        if self._inbox is not None:
            while not self._inbox.empty():  # unblocks a read-ahead waiting for room
                self._inbox.get_nowait()

    async def read(self) -> bytes | None:
        """The next serialized ModelStreamInferResponse, or None at the clean end.

        Raises the anyserve error matching the status the replica ended with.
        """
        inbox = self._inbox
        if inbox is None:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            return message if isinstance(message, bytes) else None
        item = self._end[0] if self._end is not None else await inbox.get()
        if isinstance(item, bytes):
            return item
        self._end = (item,)  # the read-ahead has ended: every later read says so
        if item is None:
            return None
        if isinstance(item, AnyServeError):
            raise item
        raise from_rpc_error(item) from None

    async def read_batch(self) -> list[bytes] | None:
        """The next responses (several when the stream was opened ``batched``),
        or None at the clean end. Raises like :meth:`read`."""
        message = await self.read()
        if message is None:
            return None
        if not self.batched:
            return [message]
        try:
            return rpc.unpack_batch(message)
        except ValueError as exc:
            raise HandlerError(f"replica sent a malformed stream batch: {exc}") from None


class ChannelPool:
    """Connections by endpoint; see the module docstring for their lifetime."""

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        self._retired: list[Connection] = []

    def get(self, endpoint: str) -> Connection:
        """The connection to ``endpoint``, created on first use."""
        conn = self._connections.get(endpoint)
        if conn is None:
            conn = self._connections[endpoint] = Connection(endpoint)
        return conn

    def refresh(self, endpoint: str) -> Connection:
        """The connection to ``endpoint``, replaced by a fresh one when the
        current one is in TRANSIENT_FAILURE.

        Called on every registration heartbeat: the replica just proved it is
        up, so requests must not keep failing fast until gRPC's reconnect
        backoff runs out (a replica restarted on the same port).
        """
        conn = self._connections.get(endpoint)
        if conn is not None and conn.channel.get_state() == _BROKEN:
            self._retired.append(conn)
            conn = None
        if conn is None:
            conn = self._connections[endpoint] = Connection(endpoint)
        conn.warm_up()
        return conn

    async def prune(self, keep: set[str]) -> None:
        """Close idle connections whose endpoint is not in ``keep``. Busy ones
        are left for a later call so running requests finish."""
        idle = [
            conn
            for endpoint, conn in self._connections.items()
            if endpoint not in keep and conn.calls == 0
        ]
        for conn in idle:
            del self._connections[conn.endpoint]
            logger.debug("closing channel to %s", conn.endpoint)
        idle += [conn for conn in self._retired if conn.calls == 0]
        self._retired = [conn for conn in self._retired if conn.calls]
        for conn in idle:
            await conn.aclose()

    async def close(self) -> None:
        """Close every connection (cancels calls still running)."""
        conns = [*self._connections.values(), *self._retired]
        self._connections.clear()
        self._retired.clear()
        for conn in conns:
            await conn.aclose()
