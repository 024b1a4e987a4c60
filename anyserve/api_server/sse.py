"""Relaying a replica's ``ModelStreamInfer`` responses to an HTTP client as SSE.

Event conventions (docs/protocol.md): one ``data:`` event per response, as
the ``render`` function given makes it (v2 JSON, the generate extension's flat
JSON, or base64 protobuf for :func:`protobuf_data`); an in-band or status
error becomes ``event: error`` whose data is the error body of
:func:`anyserve.errors.error_body` (``{"error", "type", "code"}``) and ends
the stream with no end marker; a clean end is ``event: done`` with
``data: [DONE]``. When the very first thing the replica says is an error, no
SSE stream is started: the client gets the HTTP status and a JSON error.

Two tasks share the work so that events already waiting are written together
(one write for many small chunks) while the first event is never held back: a
pump reads the replica and renders events into a small buffer, and the SSE
body iterator takes everything buffered at each step. The gRPC call lives in
this response's ``async with``: a client that disconnects cancels the task
group, which leaves the block and cancels the call to the replica.

Another wire format (the OpenAI API's, :mod:`anyserve.api_server.openai`)
passes a :class:`Framing` instead of a render function: it makes the events
of each response, the error event, the end marker and the answer to an error
that comes before the stream starts.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from anyserve.api_server.channels import StreamResponses
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.responses import error_response, replica_message, shutting_down
from anyserve.api_server.router import Router
from anyserve.api_server.sequences import Sequences
from anyserve.errors import (
    AnyServeError,
    error_body,
    from_stream_response,
)
from anyserve.proto import ModelInferResponse, ModelStreamInferResponse

Render = Callable[[ModelInferResponse], bytes]


DONE_EVENT = b"event: done\ndata: [DONE]\n\n"
_BUFFER = 64  # rendered events a slow client may fall behind before the replica waits


def data_event(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` (split over several data lines if needed)."""
    if b"\n" in payload or b"\r" in payload:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return b"data: " + payload + b"\n\n"


def protobuf_data(response: ModelInferResponse) -> bytes:
    """Render a response for a protobuf client: base64 of its serialized bytes."""
    return base64.b64encode(response.SerializeToString())


def error_event(exc: AnyServeError) -> bytes:
    """``event: error`` whose data is the error's JSON body."""
    return b"event: error\n" + data_event(json.dumps(error_body(exc)).encode())


class Framing:
    """How a relay frames what it sends; this one is anyserve's own (module
    docstring) around ``render``. Subclasses may return several events, or
    none (``b""``), for one response."""

    def __init__(self, render: Render) -> None:
        self.render = render

    def events(self, response: ModelInferResponse) -> bytes:
        """The SSE events for one response."""
        return data_event(self.render(response))

    def error(self, exc: AnyServeError) -> bytes:
        """The event reporting an error once the stream has started (its last)."""
        return error_event(exc)

    def end(self) -> bytes:
        """The events after the last response of a clean end."""
        return DONE_EVENT

    def error_response(self, exc: AnyServeError, request_id: str) -> Response:
        """The HTTP answer when the first thing the replica says is an error."""
        return error_response(exc, request_id)


async def _batched(events: MemoryObjectReceiveStream[bytes]) -> AsyncIterator[bytes]:
    async with events:
        async for event in events:
            parts = [event]
            while True:
                try:
                    parts.append(events.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            yield b"".join(parts) if len(parts) > 1 else event


class StreamRelay(Response):
    """ASGI response that routes one request to a replica's stream and relays it."""

    def __init__(
        self,
        router: Router,
        body: bytes,
        meta: RequestMeta,
        render: Render | Framing,
        ping: float,
        *,
        expired: asyncio.Event | None = None,
        sequences: Sequences | None = None,
        session: str | None = None,
    ) -> None:
        # Response.__init__ is not called: nothing is rendered up front.
        self._router = router
        # Replica affinity of a Triton sequence or X-Session-Id (held while relaying).
        self._sequences = sequences
        self._session = session
        self._body = body
        self._meta = meta
        self._framing = render if isinstance(render, Framing) else Framing(render)
        self._ping = ping
        # Set when the server's shutdown grace ran out: end with an error event.
        self._expired = expired or asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        try:
            async with AsyncExitStack() as stack:
                if self._sequences is not None:
                    route = self._sequences.route(self._body, self._meta, self._session)
                    await stack.enter_async_context(route)
                stream = await stack.enter_async_context(
                    self._router.stream(self._body, self._meta, batched=True)
                )
                gone, first = await _first_or_disconnect(stream, receive, self._expired)
                if gone:
                    return  # leaving the block cancels the replica's call
                if first:
                    error = from_stream_response(
                        replica_message(ModelStreamInferResponse, first[0])
                    )
                    if error is not None:
                        raise error
                started = True
                await self._relay(scope, receive, send, stream, first)
        except AnyServeError as exc:
            if started:  # headers are out: _relay reports errors as events
                raise
            await self._framing.error_response(exc, self._meta.request_id)(scope, receive, send)

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        stream: StreamResponses,
        first: list[bytes] | None,
    ) -> None:
        events_in, events_out = anyio.create_memory_object_stream[bytes](_BUFFER)
        async with anyio.create_task_group() as tg:
            pump = anyio.CancelScope()
            tg.start_soon(self._pump, stream, first, events_in, pump)

            async def end_at_shutdown() -> None:
                await self._expired.wait()
                pump.cancel()

            tg.start_soon(end_at_shutdown)
            response = EventSourceResponse(
                _batched(events_out),
                ping=self._ping,
                sep="\n",
                headers={"X-Request-Id": self._meta.request_id},
            )
            await response(scope, receive, send)
            # The response ends when the pump is done or the client left;
            # in the second case the pump is still reading: stop it.
            tg.cancel_scope.cancel()

    async def _pump(
        self,
        stream: StreamResponses,
        batch: list[bytes] | None,
        events: MemoryObjectSendStream[bytes],
        scope: anyio.CancelScope,
    ) -> None:
        """Render each batch the replica sends into one chunk of SSE events;
        ``scope`` is cancelled when the server's shutdown grace runs out."""
        framing = self._framing
        async with events:
            try:
                with scope:
                    await self._pump_batches(stream, batch, events)
                if scope.cancelled_caught:
                    await events.send(framing.error(shutting_down()))
            except anyio.BrokenResourceError:
                pass  # the client left: the response stopped taking events

    async def _pump_batches(
        self,
        stream: StreamResponses,
        batch: list[bytes] | None,
        events: MemoryObjectSendStream[bytes],
    ) -> None:
        framing = self._framing
        try:
            while batch is not None:
                rendered: list[bytes] = []
                for raw in batch:
                    message = replica_message(ModelStreamInferResponse, raw)
                    error = from_stream_response(message)
                    if error is not None:
                        rendered.append(framing.error(error))
                        await events.send(b"".join(rendered))
                        return
                    rendered.append(framing.events(message.infer_response))
                self._meta.chunks += len(batch)  # for anyserve_api_stream_chunks
                chunk = b"".join(rendered)
                if chunk:
                    await events.send(chunk)
                batch = await stream.read_batch()
        except AnyServeError as exc:
            await events.send(framing.error(exc))
            return
        await events.send(framing.end())


async def _first_or_disconnect(
    stream: StreamResponses, receive: Receive, expired: asyncio.Event
) -> tuple[bool, list[bytes] | None]:
    """Wait for the replica's first responses unless the client goes first.

    Returns ``(client_gone, first batch or None at a clean empty end)``.
    The body was read already, so the next ASGI message can only be the
    disconnect. Raises Unavailable when the server's shutdown grace runs out
    first.
    """
    first: list[bytes] | None = None
    error: AnyServeError | None = None
    done = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass  # the body was read already; anything else is ignored
            tg.cancel_scope.cancel()

        tg.start_soon(watch)

        async def end_at_shutdown() -> None:
            nonlocal error
            await expired.wait()
            error = shutting_down()
            tg.cancel_scope.cancel()

        tg.start_soon(end_at_shutdown)
        try:
            first = await stream.read_batch()
        except AnyServeError as exc:
            error = exc  # raised below, not wrapped in the task group's ExceptionGroup
        done = True
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return not done, first
