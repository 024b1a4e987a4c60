"""Measuring HTTP requests at the API server's edge, and the ``/metrics`` exposition.

:class:`MetricsMiddleware` is pure ASGI (no body buffering): it times each
inference request, counts its body bytes both ways, notes when a stream's
first event leaves, and at the end records one observation in
:class:`~anyserve.metrics.api.ApiMetrics` and writes one access-log line. What
routing learnt (capability, replica, request id, relayed chunks) is read from
the request's ``RequestMeta``, which the endpoints leave at
``scope["state"]["meta"]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anyserve.logs import access, access_line, current_trace_id
from anyserve.metrics.api import ApiMetrics, capability_label

#: Content type of the text exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_EVENT_STREAM = b"text/event-stream"


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of every metric in ``registry``."""
    return generate_latest(registry)


def endpoint_of(method: str, path: str) -> str | None:
    """The endpoint kind of an inference request, or None for anything else
    (metadata, control plane, ``/metrics``)."""
    if method != "POST":
        return None
    if path == "/infer" or path.endswith("/infer"):
        return "infer"
    if path == "/infer/stream":
        return "stream"
    if path.endswith(("/generate", "/generate_stream")):
        return "generate"
    if path.startswith("/v1/"):
        return "openai"
    return None


class MetricsMiddleware:
    """ASGI middleware recording every inference request (see the module docstring).

    Also counts refused ``POST /register`` calls. Exceptions propagate
    unchanged (counted as 500 when no answer had started, 499 when cancelled).
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["method"], scope["path"])
        if endpoint is None:
            if scope["path"] == "/register":
                await self._register(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        measured = Measured(self.metrics, endpoint, scope, receive, send)
        self.metrics.in_flight += 1
        try:
            await self.app(scope, measured.receive, measured.send)
        except BaseException as exc:
            measured.record(exc)
            raise
        measured.record()

    async def _register(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sent(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.registration_failed()
            await send(message)

        await self.app(scope, receive, sent)


class Measured:
    """One inference request being measured: pass its :meth:`receive` and
    :meth:`send` to the application, then call :meth:`record` once, with the
    exception that ended it if any. The caller has counted it in
    ``metrics.in_flight``; :meth:`record` takes it out again. (The hot routes
    of :mod:`anyserve.api_server.dispatch` measure with it directly, without
    the middleware.)"""

    __slots__ = (
        "_receive",
        "_send",
        "endpoint",
        "first",
        "metrics",
        "received",
        "scope",
        "sent_bytes",
        "start",
        "status",
        "stream",
    )

    def __init__(
        self, metrics: ApiMetrics, endpoint: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.scope = scope
        self._receive = receive
        self._send = send
        self.start = time.perf_counter()
        self.status = 0  # of the answer started, 0 before
        self.received = 0
        self.sent_bytes = 0
        self.first: float | None = None
        self.stream = False

    async def receive(self) -> Message:
        """The application's ``receive``: counts request body bytes."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        """The application's ``send``: notes the status, whether the answer is
        a stream, its body bytes and when a stream's first event left."""
        kind = message["type"]
        if kind == "http.response.body":
            size = len(message.get("body", b""))
            if size:
                self.sent_bytes += size
                if self.stream and self.first is None:
                    self.first = time.perf_counter() - self.start
        elif kind == "http.response.start":
            self.status = message["status"]
            for key, value in message.get("headers", ()):
                if key == b"content-type":
                    self.stream = value.startswith(_EVENT_STREAM)
                    break
        await self._send(message)

    def record(self, failure: BaseException | None = None) -> None:
        """The request ended (with ``failure`` when it raised): one observation
        and one access-log line. With no answer started, a failure counts as
        499 when it is a cancellation (the client went away), else 500."""
        metrics = self.metrics
        metrics.in_flight -= 1
        seconds = time.perf_counter() - self.start
        status = self.status
        if not status and failure is not None:
            status = 499 if isinstance(failure, asyncio.CancelledError) else 500
        state: dict[str, Any] = self.scope.get("state") or {}
        meta = state.get("meta")
        cap = getattr(meta, "capability", None)
        stream = self.stream
        metrics.observe(
            cap,
            self.endpoint,
            status,
            seconds,
            request_bytes=self.received,
            response_bytes=self.sent_bytes,
            first_chunk=self.first if stream else None,
            chunks=getattr(meta, "chunks", 0) if stream else None,
        )
        if access.isEnabledFor(logging.INFO):
            log_access(self.scope["method"], self.scope["path"], status, seconds, meta)


def log_access(method: str, path: str, status: int, seconds: float, meta: Any) -> None:
    """One API-server access-log line; ``meta`` is the request's ``RequestMeta``
    (or None when the request failed before it had one)."""
    access_line(
        f"{method} {path} {status} {seconds * 1000:.1f}ms",
        {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "capability": capability_label(getattr(meta, "capability", None)),
            "replica": getattr(meta, "replica_id", ""),
            "request_id": getattr(meta, "request_id", ""),
            # The API server's span is current here when tracing is on.
            "trace_id": getattr(meta, "trace_id", "") or current_trace_id(),
        },
    )
