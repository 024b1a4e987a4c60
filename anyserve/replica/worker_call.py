"""One call as a worker process holds it: cancellation, stream credit, figures."""

from __future__ import annotations

import asyncio
import time

import anyio

from anyserve._proto import worker_pb2 as wpb
from anyserve.context import Context
from anyserve.metrics.worker import HANDLER_METRICS

__all__ = ["STREAM_WINDOW", "WorkerCall"]

# The asyncio backend's scope class, instantiated directly: anyio.CancelScope()
# asks sniffio which library runs the loop (a look-up of the current task) for
# every scope, about 1 us of a trivial call's 25 in the worker. The object is
# the same either way; workers only run on asyncio.
_scope_class: type[anyio.CancelScope] | None = None


def _new_scope() -> anyio.CancelScope:
    global _scope_class
    if _scope_class is None:
        scope = anyio.CancelScope()
        _scope_class = type(scope)
        return scope
    return _scope_class()


# Chunks of one stream a worker may send ahead of what its caller has taken;
# the dispatcher grants more as the caller takes them (see Credit in worker.proto).
STREAM_WINDOW = 64


class WorkerCall:
    """A call in flight in the worker (one per Call frame, until it ends).

    A plain slotted class, not a dataclass with default factories: one is
    built per call, and a unary call never needs the credit event."""

    __slots__ = (
        "_granted",
        "call_id",
        "confirm",
        "context",
        "credits",
        "scope",
        "stalls",
        "started",
    )

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id
        # Registered when the Call frame is read, so a Cancel right behind it
        # (before the call's task ran) is not lost.
        self.scope = _new_scope()
        self.context: Context | None = None
        # Chunks this stream may still send before the dispatcher grants more.
        self.credits = STREAM_WINDOW
        # Made by the first wait for credit: most calls never wait.
        self._granted: asyncio.Event | None = None
        # The dispatcher cancelled it: confirm with a Cancel frame once it has ended.
        self.confirm = False
        # For the replica's metrics (CallStats): when the Call frame arrived, and
        # how often the stream waited for credit.
        self.started = time.perf_counter()
        self.stalls = 0

    def end(self) -> wpb.Header:
        """The header of this call's last frame (End), with its figures."""
        header = wpb.Header(call_id=self.call_id)
        header.end.SetInParent()
        return self.report(header)

    def report(self, header: wpb.Header) -> wpb.Header:
        """``header`` with this call's figures (its ``stats``), the handler
        metrics changed since the last report included.

        Set field by field: building a CallStats and copying it into the
        header's constructor costs three times as much."""
        stats = header.stats
        stats.SetInParent()
        stats.handler_seconds = time.perf_counter() - self.started
        if self.stalls:
            stats.credit_stalls = self.stalls
        metrics = HANDLER_METRICS.take()
        if metrics:
            stats.metrics.extend(metrics)
        return header

    def grant(self, chunks: int) -> None:
        self.credits += chunks
        self.wake()

    def wake(self) -> None:
        """Wake a send waiting for credit (more credit, or the call was cancelled)."""
        if self._granted is not None:
            self._granted.set()

    async def spend(self) -> None:
        """Take one credit, waiting while the caller is behind (backpressure).
        Returns at once when the call is cancelled (the sender then stops)."""
        if self.credits <= 0:
            self.stalls += 1
        while self.credits <= 0 and not self.scope.cancel_called:
            if self._granted is None:
                self._granted = asyncio.Event()
            self._granted.clear()
            await self._granted.wait()
        self.credits -= 1
