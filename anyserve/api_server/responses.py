"""HTTP helpers shared by the routes: error answers and bounded body reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from anyserve.api_server.meta import RequestMeta, http_timeout, parse_meta
from anyserve.errors import (
    AnyServeError,
    HandlerError,
    InvalidArgument,
    PayloadTooLarge,
    Unavailable,
    to_http,
)
from anyserve.proto import ModelInferResponse, ModelStreamInferResponse

_encode = json.JSONEncoder(separators=(",", ":")).encode


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A compact JSON response."""
    return Response(_encode(doc), status, headers, media_type="application/json")


class Answer(Response):
    """A 200 response with its headers given ready, as Starlette would render
    ``Response(body, headers={"X-Request-Id": ..., **extra}, media_type=...)``,
    byte for byte and in the same order, without the dict walk, encodes and
    scans of ``Response.init_headers`` on every answer of an inference route."""

    def __init__(
        self,
        body: bytes,
        request_id: str,
        media_type: bytes,
        *extra: tuple[bytes, bytes],
        length: int | None = None,
    ) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"x-request-id", request_id.encode("latin-1")),
            *extra,
            (b"content-length", b"%d" % (len(body) if length is None else length)),
            (b"content-type", media_type),
        ]


class PiecesAnswer(Answer):
    """An :class:`Answer` whose body is several buffers (a binary answer's JSON
    header, then its outputs, which may be shared-memory mappings), sent one
    after another rather than joined into one copy."""

    def __init__(
        self, pieces: list[Any], request_id: str, media_type: bytes, *extra: tuple[bytes, bytes]
    ) -> None:
        super().__init__(b"", request_id, media_type, *extra, length=sum(map(len, pieces)))
        self.pieces = pieces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for index, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": index < last})


def error_response(exc: AnyServeError, request_id: str = "") -> Response:
    """The HTTP answer for ``exc`` (:func:`anyserve.errors.to_http`)."""
    status, body, headers = to_http(exc)
    if request_id:
        headers["X-Request-Id"] = request_id
    return json_response(body, status, headers)


def header(request: Request, name: bytes) -> str | None:
    """The first ``name`` header of ``request`` (a lower-case name), as
    ``request.headers.get`` finds it, without building Starlette's Headers
    (a per-request object, and a key encode per lookup)."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def declared_length(request: Request, limit: int) -> int | None:
    """The Content-Length of ``request`` (None when absent: chunked).

    Raises PayloadTooLarge when it is over ``limit``, InvalidArgument when it
    is malformed.
    """
    declared = header(request, b"content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise InvalidArgument(f"bad Content-Length {declared!r}") from None
    if size > limit:
        raise PayloadTooLarge(f"body of {size} bytes is over the {limit}-byte limit")
    return size


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes.

    Raises PayloadTooLarge from the Content-Length header before reading, or
    as soon as the received bytes pass the limit (chunked or lying clients);
    InvalidArgument for a malformed Content-Length; Unavailable when the
    client goes away (or the body timeout closed the connection) first.
    """
    declared_length(request, limit)
    chunks: list[bytes] = []
    received = 0
    # Request.stream() read by hand: an async generator per request costs
    # more than the read itself for a small body.
    receive = request.receive
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise Unavailable("the client disconnected before sending its whole body")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_big_body(request: Request, limit: int) -> bytearray:
    """The body, as :func:`read_body` reads it, grown in one buffer: a big body
    costs its size once, not twice (chunks, then their join), and no upfront
    zero-fill holds the loop. Raises as :func:`read_body` does."""
    declared_length(request, limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            body += chunk
    except ClientDisconnect:
        raise Unavailable("the client disconnected before sending its whole body") from None
    return body


_T = TypeVar("_T")
_M = TypeVar("_M", ModelInferResponse, ModelStreamInferResponse)


def request_meta(request: Request, default_timeout: float) -> RequestMeta:
    """The routing facts of an HTTP request (headers; the model name is set by
    the route), remembered on the request for its error answer."""
    # Every header parse_meta reads, and X-Request-Timeout, starts with "x-":
    # only those are decoded (a request's other headers cost nothing here).
    pairs = [
        (key.decode("latin-1"), value.decode("latin-1"))
        for key, value in request.scope["headers"]
        if key[:2].lower() == b"x-"
    ]
    # The first one, compared as Starlette's Headers.get compares.
    given = next((value for key, value in pairs if key == "x-request-timeout"), None)
    meta = parse_meta(pairs, model_name="", timeout=http_timeout(given, default_timeout))
    # What request.state.request_id and .meta read (Starlette's State is a
    # view of this dict), set without a State object per request.
    state = request.scope.setdefault("state", {})
    state["request_id"] = meta.request_id
    state["meta"] = meta  # read back by anyserve.metrics.http
    return meta


def replica_message(kind: type[_M], raw: bytes) -> _M:
    """A replica's serialized answer parsed; HandlerError when it is malformed
    (a replica bug must not look like an empty success)."""
    try:
        return kind.FromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception
        raise HandlerError(f"replica sent a malformed {kind.__name__}: {exc}") from None


def shutting_down() -> Unavailable:
    """What a request still running when the shutdown grace ran out is told."""
    return Unavailable("the API server is shutting down; retry the request")


#: Scope key of the connection (api_server/connections.py) a request came on.
CONNECTION_KEY = "anyserve.connection"


class Expiry(asyncio.Event):
    """Set when the server's shutdown grace runs out: streams wait on it, and
    setting it stops every unary call :func:`unless_disconnected` is awaiting."""

    def __init__(self) -> None:
        super().__init__()
        self.stops: set[Callable[[], None]] = set()

    def set(self) -> None:
        super().set()
        stops, self.stops = self.stops, set()
        for stop in stops:
            stop()


async def unless_disconnected(
    request: Request, call: Coroutine[Any, Any, _T], expired: asyncio.Event | None = None
) -> _T:
    """Await ``call`` (the body has been read), cancelling it when the client
    disconnects first: the router then cancels the replica's call, and the
    handler with it. Raises Unavailable in that case (nobody reads the answer),
    and also when ``expired`` is set first (the server's shutdown grace ran
    out), and whatever ``call`` raises otherwise.

    On the server's own connections (the scope names one) ``call`` runs in
    this task, and the connection's loss or the expiry cancels it: no task
    is created per request. Elsewhere (another ASGI server, test transports)
    a watcher task reads ``http.disconnect``.
    """
    conn = request.scope.get(CONNECTION_KEY)
    if conn is None:
        return await _watched(request, call, expired)
    task = asyncio.current_task()
    assert task is not None
    why: list[Exception] = []

    def stop(reason: Exception) -> None:
        if not why:
            why.append(reason)
            task.cancel()

    def lost() -> None:
        stop(Unavailable("the client disconnected before the answer"))

    def expire() -> None:
        stop(shutting_down())

    if conn.cycle is None or conn.cycle.disconnected:
        call.close()
        raise Unavailable("the client disconnected before the answer")
    if expired is not None and expired.is_set():
        call.close()
        raise shutting_down()
    conn.lost_callbacks.add(lost)
    if isinstance(expired, Expiry):
        expired.stops.add(expire)
    try:
        return await call
    except asyncio.CancelledError:
        if why and task.uncancel() == 0:  # our own cancel: answer why
            raise why[0] from None
        raise
    finally:
        conn.lost_callbacks.discard(lost)
        if isinstance(expired, Expiry):
            expired.stops.discard(expire)


async def _watched(
    request: Request, call: Coroutine[Any, Any, _T], expired: asyncio.Event | None
) -> _T:
    """:func:`unless_disconnected` with a watcher task (an asyncio TaskGroup
    rather than anyio's: anyio's costs about ten times as much to set up)."""
    outcome: list[_T] = []
    failure: list[Exception] = []

    async def run() -> None:
        try:
            outcome.append(await call)
        except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
            failure.append(exc)
        finally:
            watcher.cancel()

    async def watch() -> None:
        # After the body only a disconnect can arrive.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.cancel()

    async def end_at_shutdown() -> None:
        assert expired is not None
        await expired.wait()
        failure.append(shutting_down())
        worker.cancel()

    async with asyncio.TaskGroup() as tg:
        worker = tg.create_task(run())
        watcher = tg.create_task(watch())
        if expired is not None:
            shutdown = tg.create_task(end_at_shutdown())
            worker.add_done_callback(lambda _: shutdown.cancel())
    if failure:
        raise failure[0]
    if not outcome:
        raise Unavailable("the client disconnected before the answer")
    return outcome[0]
