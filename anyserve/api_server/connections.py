"""HTTP connections with read timeouts and a cap, on top of uvicorn's HTTP protocol.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but has
no header or body read timeout and no connection cap: a client that opens
connections and sends half a request line holds descriptors forever, until
``/health`` and ``/register`` cannot be accepted any more. :func:`edge_protocol`
builds a subclass of uvicorn's ``HttpToolsProtocol`` (httptools' C parser, a
core dependency; ``H11Protocol`` where httptools cannot be imported), passed
as ``Config(http=...)`` so uvicorn itself is not patched, that adds:

* a header timeout: the request line and headers must be complete within
  ``header_timeout`` seconds of the connection or of the previous response,
  else the connection is closed without an answer;
* a body timeout: while the application waits for more body, a gap of
  ``body_timeout`` seconds without a byte is answered 408 and the connection
  closed (not counted while uvicorn itself paused reading);
* a cap: beyond ``max_connections`` open connections, a new one evicts the
  oldest connection with no request in progress (idle keep-alive, or still
  sending its headers), so that real requests and the control plane stay
  reachable under a flood of half-open connections; when every connection
  has a request in progress, the new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from anyserve.api_server.limits import EdgeLimits
from anyserve.api_server.responses import CONNECTION_KEY

logger = logging.getLogger("anyserve.api_server")

__all__ = ["ConnectionTable", "edge_protocol"]


def _raw_answer(status: bytes, message: str, extra: bytes = b"") -> bytes:
    # Written straight to the transport: there is no request cycle to answer through.
    body = b'{"error":"' + message.encode() + b'"}'
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + extra
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_408 = _raw_answer(b"408 Request Timeout", "the request body stopped arriving")
_503 = _raw_answer(
    b"503 Service Unavailable", "too many connections in progress; retry", b"retry-after: 1\r\n"
)


class ConnectionTable:
    """The open connections of one listener, oldest first, and which of them
    may be evicted (no request in progress). Counters are for tests and logs."""

    def __init__(self, limits: EdgeLimits, max_connections: int) -> None:
        self.limits = limits
        self.max_connections = max_connections
        self.open: dict[EdgeProtocolBase, None] = {}
        self.evictable: dict[EdgeProtocolBase, None] = {}
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def admit(self, conn: EdgeProtocolBase) -> bool:
        """Make room for ``conn``; False when there is none (every open
        connection has a request in progress)."""
        while len(self.open) >= self.max_connections:
            if not self.evictable:
                self.refused += 1
                return False
            victim = next(iter(self.evictable))
            self.evicted += 1
            victim.drop()
        self.open[conn] = None
        self.evictable[conn] = None
        return True

    def forget(self, conn: EdgeProtocolBase) -> None:
        """``conn`` is closed."""
        self.open.pop(conn, None)
        self.evictable.pop(conn, None)


if TYPE_CHECKING:
    # Both of uvicorn's protocols have what the mixin uses (cycle, flow,
    # transport, loop and the asyncio.Protocol callbacks); h11's stands for both.
    _Protocol = H11Protocol
else:
    _Protocol = object


def _http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's fastest HTTP/1.1 protocol available here."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools missing (a platform without a wheel)
        return H11Protocol
    return HttpToolsProtocol


class EdgeProtocolBase(_Protocol):
    """uvicorn's HTTP protocol with the edge's timeouts and cap (see the
    module); mixed into the protocol class :func:`edge_protocol` picks."""

    table: ConnectionTable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._header_deadline: float | None = None
        self._seen: object = None  # the request cycle whose headers were seen
        self._last_data = 0.0
        # Called once when the connection is lost: requests in progress on it
        # stop there (responses.unless_disconnected) without a watcher task each.
        self.lost_callbacks: set[Callable[[], None]] = set()

    # -- lifecycle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.table.admit(self):
            logger.warning(
                "refusing an HTTP connection: %d open, all with a request in progress",
                len(self.table.open),
            )
            transport.write(_503)
            transport.close()
            self.transport = transport
            return
        self._admitted = True
        super().connection_made(transport)
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self._admitted:
            return
        self.table.forget(self)
        super().connection_lost(exc)
        callbacks, self.lost_callbacks = self.lost_callbacks, set()
        for callback in callbacks:
            callback()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        self._last_data = self.loop.time()
        super().data_received(data)
        self._track()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()  # type: ignore[misc]
        # The request's cycle holds this scope (uvicorn types it as a closed TypedDict).
        self.scope[CONNECTION_KEY] = self  # type: ignore[literal-required]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no request is in progress
            self.table.evictable[self] = None
            self._expect_headers()
        else:
            self._track()

    def drop(self) -> None:
        """Close at once (evicted): nothing is in progress on it."""
        self.table.forget(self)
        self._cancel_timer()
        self.transport.abort()

    # -- timers

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        """Have :meth:`_on_timer` run within ``delay`` seconds. A pending timer
        due no later is kept (it re-checks the deadlines and re-arms): a new
        timer and a cancel per request would cost more than the rare early
        wake-up."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= self.loop.time() + delay:
                return
            timer.cancel()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _expect_headers(self) -> None:
        self._header_deadline = self.loop.time() + self.table.limits.header_timeout
        self._arm(self.table.limits.header_timeout)

    def _track(self) -> None:
        """After bytes arrived: note a request whose headers are complete, and
        keep the body timer running while its body is awaited."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        if cycle is not self._seen:
            self._seen = cycle
            self._header_deadline = None
            self.table.evictable.pop(self, None)
            if cycle.more_body:
                self._arm(self.table.limits.body_timeout)
        # Once the whole request is in, a pending timer is left to fire: it
        # finds no deadline and nothing to wait for (see _on_timer), and the
        # answer's _expect_headers reuses it.

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now, limits = self.loop.time(), self.table.limits
        if self._header_deadline is not None:
            if now >= self._header_deadline:
                self.table.timed_out += 1
                self.drop()
            else:
                self._arm(self._header_deadline - now)
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.more_body:
            return
        if cycle.response_started or self.flow.read_paused:
            # Not the client's fault: the answer is already going, or uvicorn
            # stopped reading because the application has not taken the body.
            self._arm(limits.body_timeout)
            return
        quiet = now - self._last_data
        if quiet < limits.body_timeout:
            self._arm(limits.body_timeout - quiet)
            return
        self.table.timed_out += 1
        # The application is still waiting in receive(): closing makes it see
        # a disconnect; the 408 is written here because its answer would not be.
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.write(_408)
        self.transport.close()


def edge_protocol(limits: EdgeLimits, table: ConnectionTable) -> type[asyncio.Protocol]:
    """The protocol class of one listener (uvicorn's ``Config(http=...)``):
    connections tracked in ``table``, with ``limits``' timeouts."""
    return type("EdgeProtocol", (EdgeProtocolBase, _http_protocol()), {"table": table})
