"""One call as a worker process holds it: cancellation, stream credit, figures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import anyio

from anyserve._proto import worker_pb2 as wpb
from anyserve.context import Context
from anyserve.metrics.worker import HANDLER_METRICS

__all__ = ["STREAM_WINDOW", "WorkerCall"]

# Chunks of one stream a worker may send ahead of what its caller has taken;
# the dispatcher grants more as the caller takes them (see Credit in worker.proto).
STREAM_WINDOW = 64


@dataclass
class WorkerCall:
    """A call in flight in the worker (one per Call frame, until it ends)."""

    # Registered when the Call frame is read, so a Cancel right behind it
    # (before the call's task ran) is not lost.
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    context: Context | None = None
    # Chunks this stream may still send before the dispatcher grants more.
    credits: int = STREAM_WINDOW
    granted: asyncio.Event = field(default_factory=asyncio.Event)
    # The dispatcher cancelled it: confirm with a Cancel frame once it has ended.
    confirm: bool = False
    # For the replica's metrics (CallStats): when the Call frame arrived, and
    # how often the stream waited for credit.
    started: float = field(default_factory=time.perf_counter)
    stalls: int = 0

    def stats(self) -> wpb.CallStats:
        """This call's figures, with the handler metrics changed since the last report."""
        return wpb.CallStats(
            handler_seconds=time.perf_counter() - self.started,
            credit_stalls=self.stalls,
            metrics=HANDLER_METRICS.take(),
        )

    def grant(self, chunks: int) -> None:
        self.credits += chunks
        self.granted.set()

    async def spend(self) -> None:
        """Take one credit, waiting while the caller is behind (backpressure).
        Returns at once when the call is cancelled (the sender then stops)."""
        if self.credits <= 0:
            self.stalls += 1
        while self.credits <= 0 and not self.scope.cancel_called:
            self.granted.clear()
            await self.granted.wait()
        self.credits -= 1
