"""A replica's ``/metrics`` listener (``--metrics-port``): a minimal HTTP/1.1
responder in the replica's event loop.

One connection answers one ``GET /metrics`` (``Connection: close``): Prometheus
scrapes every few seconds, so neither keep-alive nor a thread per request is
worth having. Anything else gets 404 (or 405 for another method).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import anyio
from anyio.abc import TaskStatus
from prometheus_client.registry import CollectorRegistry

from anyserve.errors import StartupError
from anyserve.metrics.http import CONTENT_TYPE, exposition

log = logging.getLogger("anyserve.metrics")

# A scraper that does not send its request line and headers within this many
# seconds is dropped; a request head larger than this many bytes too.
READ_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024


def _answer(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _handle(
    registry: CollectorRegistry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        with anyio.fail_after(READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            return
        method, _, rest = head.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != "/metrics":
            answer = _answer("404 Not Found", b"only /metrics here\n")
        elif method not in ("GET", "HEAD"):
            answer = _answer("405 Method Not Allowed", b"GET /metrics\n")
        else:
            body = exposition(registry)
            answer = _answer("200 OK", b"" if method == "HEAD" else body, CONTENT_TYPE)
        writer.write(answer)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass  # a scraper that went away or misbehaved: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` of ``registry`` on ``host:port`` (0: any free
    port) until cancelled; reports the bound port as started. Raises
    StartupError when the port cannot be bound."""
    try:
        server = await asyncio.start_server(
            lambda r, w: _handle(registry, r, w),
            host,
            port,
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            reuse_address=True,
            limit=MAX_HEAD,
        )
    except OSError as exc:
        raise StartupError(
            f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    async with server:
        bound = server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        task_status.started(bound)
        await server.serve_forever()
