"""The per-request ``Context`` handed to handlers, and the ``Stream`` they send on.

A handler sees one ``Context`` per request. In async handlers its ``objects`` and
``call`` are coroutines; in sync handlers (which run in worker threads) the same
names block and return values. ``anyserve.call(...)`` and ``anyserve.objects.*``
used at module level reach the current request's context.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

import anyio
import anyio.from_thread

from anyserve import objects as _objects
from anyserve.capability import Capability
from anyserve.metrics.worker import HANDLER_METRICS, HandlerMetrics
from anyserve.objects.peers import source_of
from anyserve.proto import ModelInferResponse, ModelStreamInferResponse
from anyserve.sequence import SequenceContext
from anyserve.sync_pool import SyncPool


class StreamClosed(Exception):
    """The caller went away (cancelled, disconnected or the deadline passed).

    Raised by ``Stream.send`` so a sync streaming handler stops at its next send.
    """


class Caller(Protocol):
    """Sends requests from inside a handler to other capabilities (via the API server)."""

    async def call(
        self, parent: Context, capability: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> ModelInferResponse: ...

    def stream(
        self, parent: Context, capability: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> AsyncIterator[ModelInferResponse]: ...


_current: contextvars.ContextVar[Context] = contextvars.ContextVar("anyserve_context")


class Context:
    """What a handler knows about its request and what it may use.

    Attributes: ``request_id``; ``metadata`` (request headers/metadata that
    travel with the request, e.g. ``x-capability-*``); ``capability`` (the
    handler's); ``objects`` (the object store: async in async handlers, blocking
    in sync ones); ``cancelled`` (True once the caller went away; a CPU loop in
    a sync handler may poll it); ``sequence`` (a
    :class:`~anyserve.sequence.SequenceContext`: id, start, end and the
    per-sequence ``state`` dict, when the request belongs to a Triton
    sequence; else None); ``trace_id`` (the OpenTelemetry trace id of this
    request, 32 hex digits, for the handler's own logs; "" when not tracing).
    """

    __slots__ = (
        "_caller",
        "_deadline",
        "cancelled",
        "capability",
        "is_sync",
        "limiter",
        "metadata",
        "objects",
        "replica_id",
        "request_id",
        "sequence",
        "trace_context",
        "trace_id",
    )

    def __init__(
        self,
        *,
        request_id: str,
        metadata: Mapping[str, str],
        capability: Capability,
        limiter: SyncPool | asyncio.Semaphore,
        is_sync: bool,
        timeout: float = 0.0,
        store: _objects.ObjectStore | None = None,
        caller: Caller | None = None,
        replica_id: str = "",
        sequence: SequenceContext | None = None,
    ) -> None:
        self.request_id = request_id
        self.sequence = sequence
        self.metadata = metadata
        self.capability = capability
        self.limiter = limiter
        self.is_sync = is_sync
        self.replica_id = replica_id
        self.cancelled = False
        # Set by the worker when tracing (anyserve.tracing.handler_span):
        # trace_context is the parent of this request's context.call spans.
        self.trace_id = ""
        self.trace_context: Any = None
        # time.monotonic, not the event loop's clock: sync handlers ask from
        # their worker thread, where there is no running loop.
        self._deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        self._caller = caller
        self.objects: Any = None
        if store is not None:
            # With peers, ``get`` of a missing object asks where this request came from.
            facade = source_of(store, metadata)
            self.objects = _objects.BlockingObjects(facade) if is_sync else facade

    @property
    def metrics(self) -> HandlerMetrics:
        """Handler-defined Prometheus metrics (``counter``, ``gauge``,
        ``histogram``), exported on the replica's ``/metrics``; see
        :mod:`anyserve.metrics.worker`."""
        return HANDLER_METRICS

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one.

        Works in sync handlers (their thread) and async ones alike."""
        if self._deadline == math.inf:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def call(self, capability: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> Any:
        """Call another capability through the API server.

        Returns the ``ModelInferResponse`` (a coroutine to await in async
        handlers). The call carries this request's id, deadline and call chain;
        a cycle of calls ends in ``LoopDetected``. Raises the anyserve error the
        callee answered with.
        """
        caller = self._require_caller()
        coro = caller.call(self, capability, inputs or {})
        if self.is_sync:
            return anyio.from_thread.run(_await, coro)
        return coro

    def call_stream(
        self, capability: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
    ) -> Any:
        """Like :meth:`call` for a streaming capability: an async iterator of
        ``ModelInferResponse`` (a list, collected, in sync handlers)."""
        caller = self._require_caller()
        chunks = caller.stream(self, capability, inputs or {})
        if self.is_sync:
            return anyio.from_thread.run(_collect, chunks)
        return chunks

    def _require_caller(self) -> Caller:
        if self._caller is None:
            raise RuntimeError("context.call needs a replica started with --api-server")
        return self._caller

    def run_in_thread(self, target: Callable[..., Any], *args: Any) -> Any:
        """Run ``target(*args)`` with this context bound (sync handlers' thread)."""
        token = _current.set(self)
        obj_token = _objects.bind(self.objects) if self.objects is not None else None
        try:
            return target(*args)
        finally:
            if obj_token is not None:
                _objects.reset(obj_token)
            _current.reset(token)

    def bind(self) -> tuple[contextvars.Token[Context], contextvars.Token[Any] | None]:
        """Make this the current context (async handlers); undo with :meth:`unbind`."""
        token = _current.set(self)
        obj_token = _objects.bind(self.objects) if self.objects is not None else None
        return token, obj_token

    @staticmethod
    def unbind(tokens: tuple[contextvars.Token[Context], contextvars.Token[Any] | None]) -> None:
        token, obj_token = tokens
        if obj_token is not None:
            _objects.reset(obj_token)
        _current.reset(token)


async def _await(coro: Awaitable[Any]) -> Any:
    return await coro


async def _collect(chunks: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in chunks]


def current() -> Context:
    """The context of the request being handled; RuntimeError outside a handler."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("anyserve.call/current() is only available inside a handler") from None


def call(capability: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> Any:
    """Module-level ``anyserve.call(capability=..., inputs=...)``: ``current().call``."""
    return current().call(capability, inputs)


class Stream:
    """Where a streaming handler sends its responses.

    ``send`` is for sync handlers (worker threads): it blocks until the chunk is
    on its way (backpressure) and raises :class:`StreamClosed` once the caller
    has gone. Async handlers use ``await stream.asend(chunk)``. Chunks may be
    ``ModelStreamInferResponse``, ``ModelInferResponse`` or plain values.
    """

    __slots__ = ("_context", "_emit")

    def __init__(self, emit: Callable[[Any], Coroutine[Any, Any, None]], context: Context) -> None:
        self._emit = emit
        self._context = context

    def send(self, response: Any) -> None:
        """Send one chunk from a sync handler; raises StreamClosed after cancel."""
        if self._context.cancelled:
            raise StreamClosed("the caller has gone")
        if not self._context.is_sync:
            raise TypeError("in an async handler use `await stream.asend(chunk)`")
        anyio.from_thread.run(self._emit, response)

    async def asend(self, response: Any) -> None:
        """Send one chunk from an async handler."""
        if self._context.cancelled:
            raise StreamClosed("the caller has gone")
        await self._emit(response)

    def error(self, message: str) -> None:
        """Send an in-band error response to the caller (ends nothing by itself)."""
        self.send(ModelStreamInferResponse(error_message=message))
