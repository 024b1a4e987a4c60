"""The dispatcher: from an incoming request to the worker that runs it.

It decides which handler serves a request (capability query from metadata, else
the model name and its ``model_version``; the endpoint decides the kind:
docs/protocol.md), picks the least busy worker of that handler, and relays
frames. Payloads stay serialized: the dispatcher never parses a request or a
response (it peeks at a few top-level fields). A request of a stateful
sequence (Triton's ``sequence_id``) goes to the worker holding the sequence,
after the sequence's previous request has ended (:mod:`anyserve.replica.sequences`),
and is never delegated: its state is here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Mapping
from contextlib import AsyncExitStack, aclosing
from typing import TYPE_CHECKING, Any, Protocol

from anyserve import rpc, tracing, wire
from anyserve.app import HandlerInfo
from anyserve.errors import (
    AnyServeError,
    InvalidArgument,
    NotFound,
    Overloaded,
    from_frame,
    from_stream_response,
)
from anyserve.proto import ModelStreamInferResponse
from anyserve.replica.admission import Admission
from anyserve.replica.manager import Manager
from anyserve.replica.resolution import Resolver, StreamOnly, UnknownVersion
from anyserve.replica.sequences import DEFAULT_IDLE_TIMEOUT, SequenceSlots
from anyserve.replica.slot import Slot
from anyserve.sequence import SequenceFlags

if TYPE_CHECKING:
    # Types only: prometheus_client loads only with --metrics-port.
    from anyserve.metrics.replica import SlotObserver

log = logging.getLogger("anyserve.dispatcher")

# Most stream responses relayed in one batch.
MAX_BATCH = 256
# Bytes a response adds to a batch besides its own (its length prefix, slack).
BATCH_OVERHEAD = 16


class Delegator(Protocol):
    """Sends a request this replica cannot serve back through the API server."""

    def allowed(self, metadata: Mapping[str, str]) -> bool: ...

    async def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> bytes: ...

    def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> AsyncGenerator[bytes, None]: ...


# Local answers that stand when a delegation finds nobody else either.
_BETTER_THAN_NOT_FOUND = (Overloaded, StreamOnly, UnknownVersion)


def _for_caller(local: AnyServeError) -> AnyServeError:
    """What the caller is told when ``local`` stands: a request only a
    streaming handler matches came to the wrong endpoint."""
    return InvalidArgument(local.message) if isinstance(local, StreamOnly) else local


class Dispatcher:
    """Routes calls to handlers and their workers."""

    def __init__(
        self,
        handlers: list[HandlerInfo],
        manager: Manager,
        delegator: Delegator | None = None,
        *,
        max_message: int = rpc.DEFAULT_MAX_MESSAGE,
        sequence_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.handlers = handlers
        self.manager = manager
        self.delegator = delegator
        # Batches of stream responses stay within one gRPC message.
        self.max_batch_bytes = max_message - wire.ANSWER_MARGIN
        self.admission = Admission()
        self.sequences = SequenceSlots(sequence_idle_timeout)
        # The replica's metrics, when it exports them (counts delegations).
        self.observer: SlotObserver | None = None
        #: Which handler serves a request.
        self.resolver = Resolver(handlers)

    def _worker(
        self, stack: AsyncExitStack | None, handler: HandlerInfo, seq: SequenceFlags | None
    ) -> Awaitable[Slot]:
        """A worker for the call, to await: the sequence's one (held by
        ``stack`` until the call ends), else the least busy. Not a coroutine
        itself: one frame less per call, as :meth:`unary`."""
        if seq is None:
            return self.manager.acquire(handler.name)
        assert stack is not None, "a sequence's worker is held by the call's exit stack"

        async def acquire() -> Slot:
            return await self.manager.acquire(handler.name)

        return stack.enter_async_context(self.sequences.hold(handler.name, seq, acquire))

    # -- calls -----------------------------------------------------------------

    def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> Coroutine[Any, Any, bytes]:
        """A unary call to await; it returns the serialized ModelInferResponse.
        ``timeout``: seconds left (None: no deadline).

        Raises the anyserve error the worker (or delegation) answered with;
        one about the request itself (InvalidArgument) already when called.
        """
        # Not a coroutine: it hands over the one running the call, a frame less
        # on each of its resumptions (this runs for every call).
        queued = tracing.now()  # the "queue wait" span starts here (0: not tracing)
        try:
            handler, seq = self.resolver.route(payload, metadata, stream=False)
        except (NotFound, Overloaded) as local:
            return self._delegate_unary(local, payload, metadata, timeout)
        if seq is None:
            # Nothing is held until the call ends: no exit stack (most calls).
            return self._unary(None, queued, handler, seq, payload, metadata, timeout)
        return self._sequence_unary(queued, handler, seq, payload, metadata, timeout)

    async def _sequence_unary(
        self,
        queued: int,
        handler: HandlerInfo,
        seq: SequenceFlags,
        payload: bytes,
        metadata: Mapping[str, str],
        timeout: float | None,
    ) -> bytes:
        async with AsyncExitStack() as stack:
            return await self._unary(stack, queued, handler, seq, payload, metadata, timeout)

    async def _unary(
        self,
        stack: AsyncExitStack | None,
        queued: int,
        handler: HandlerInfo,
        seq: SequenceFlags | None,
        payload: bytes,
        metadata: Mapping[str, str],
        timeout: float | None,
    ) -> bytes:
        try:
            slot = await self._worker(stack, handler, seq)
            ticket = self.admission.admit(handler, slot.inflight, timeout)
        except (NotFound, Overloaded) as local:
            if seq is not None:  # never delegated: the sequence's state is here
                raise _for_caller(local) from None
            return await self._delegate_unary(local, payload, metadata, timeout)
        started = time.monotonic()
        if tracing.ENABLED:
            # The Call frame carries the traceparent of this replica's span.
            metadata = tracing.to_worker(metadata, queued, handler.name, slot.id)
        call_id, sink = slot.open_call(payload, stream=False, metadata=metadata, timeout=timeout)
        done = False
        try:
            await slot.drain_writer()
            header, body = await sink.next()
            done = True
            if header.WhichOneof("kind") == "error":
                raise from_frame(header.error)
            self.admission.finished(ticket, time.monotonic() - started)
            return body
        finally:
            slot.close_call(call_id, cancel=not done)

    async def _delegate_unary(
        self,
        local: NotFound | Overloaded,
        payload: bytes,
        metadata: Mapping[str, str],
        timeout: float | None,
    ) -> bytes:
        """Nothing here can serve a call (no handler, stopped, no room to start
        it or to queue it): hand it back to the API server for another
        replica, unless the API server said there is none."""
        delegator = self._delegator_for(local, metadata)
        if delegator is None:
            raise _for_caller(local) from None
        try:
            return await delegator.unary(payload, metadata, timeout)
        except NotFound:
            # Nobody else has it either: "no room here, retry later" (429)
            # and "use the streaming endpoint" (400) tell the client more
            # than "not found" when we do have it.
            if isinstance(local, _BETTER_THAN_NOT_FOUND):
                raise _for_caller(local) from None
            raise

    async def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> AsyncIterator[list[bytes]]:
        """Run a streaming call; yields batches of serialized
        ModelStreamInferResponse messages: each batch is every response that
        was ready when the previous one was taken (one when the handler is
        slower than the caller), so a fast stream crosses the next hop in few
        messages without holding any response back.

        Leaving the iteration early (the client went away) cancels the handler.
        Raises the anyserve error that ended the call.
        """
        async with AsyncExitStack() as stack:
            batches = self._stream(stack, payload, metadata, timeout)
            try:
                async for batch in batches:
                    yield batch
            finally:
                # Leaving early ends the call now (close_call cancels it),
                # before the stack lets the sequence's next request go.
                await batches.aclose()

    async def _stream(
        self,
        stack: AsyncExitStack,
        payload: bytes,
        metadata: Mapping[str, str],
        timeout: float | None,
    ) -> AsyncGenerator[list[bytes], None]:
        queued = tracing.now()
        seq: SequenceFlags | None = None
        try:
            handler, seq = self.resolver.route(payload, metadata, stream=True)
            slot = await self._worker(stack, handler, seq)
            # A stream's length says nothing of its handler's speed: only the
            # queue length is checked.
            self.admission.admit(handler, slot.inflight, None)
        except (NotFound, Overloaded) as local:
            delegator = None if seq is not None else self._delegator_for(local, metadata)
            if delegator is None:
                raise
            async with aclosing(delegator.stream(payload, metadata, timeout)) as chunks:
                first = True
                try:
                    async for chunk in chunks:
                        better = isinstance(local, _BETTER_THAN_NOT_FOUND)
                        if first and better and _not_found_in_band(chunk):
                            raise _for_caller(local)
                        first = False
                        yield [chunk]
                except NotFound:
                    if isinstance(local, _BETTER_THAN_NOT_FOUND):
                        raise _for_caller(local) from None
                    raise
            return
        metadata = tracing.to_worker(metadata, queued, handler.name, slot.id)
        call_id, sink = slot.open_call(
            payload, stream=handler.stream, metadata=metadata, timeout=timeout
        )
        done = False
        pending: tuple[Any, bytes] | None = None  # a chunk that starts the next batch
        try:
            await slot.drain_writer()
            while not done:
                batch: list[bytes] = []
                size = 0
                frame = pending if pending is not None else await sink.next()
                pending = None
                while True:
                    header, body = frame
                    kind = header.WhichOneof("kind")
                    if kind == "chunk":
                        # A batch travels as one gRPC message: keep it under the limit.
                        if batch and size + len(body) + BATCH_OVERHEAD > self.max_batch_bytes:
                            pending = frame
                            break
                        batch.append(body)
                        size += len(body) + BATCH_OVERHEAD
                    elif kind == "end":
                        done = True
                        if not handler.stream:
                            # A unary handler served on the streaming endpoint.
                            batch.append(rpc.wrap_stream_response(body))
                        break
                    elif kind == "error":
                        done = True
                        if batch:
                            yield batch
                        raise from_frame(header.error)
                    if len(batch) >= MAX_BATCH:
                        break
                    ready = sink.take_ready()
                    if ready is None:
                        break
                    frame = ready
                if batch:
                    yield batch
                    # The caller took the batch: the worker may send as many more.
                    if not done:
                        slot.grant(call_id, len(batch))
        finally:
            slot.close_call(call_id, cancel=not done)

    def _delegator_for(self, local: AnyServeError, metadata: Mapping[str, str]) -> Delegator | None:
        """Where a call this replica cannot take now goes back to the API
        server, or None when it is answered here with ``local``."""
        if self.delegator is None or not self.delegator.allowed(metadata):
            return None
        # The API server had no other replica for it: bouncing an overloaded
        # call would only come back as the same 429, one round trip later.
        if isinstance(local, Overloaded) and metadata.get(rpc.SOLE_CANDIDATE) == "1":
            return None
        if self.observer is not None:
            self.observer.delegated()
        return self.delegator


def _not_found_in_band(message: bytes) -> bool:
    """Whether a serialized stream response is an in-band NotFound error."""
    error = from_stream_response(ModelStreamInferResponse.FromString(message))
    return isinstance(error, NotFound)
