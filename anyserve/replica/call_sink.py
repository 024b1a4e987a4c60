"""Where one call's frames wait between a worker's connection and the
dispatcher task running the call (a :class:`~anyserve.replica.slot.Slot`
holds one per call in flight)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping

from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import AnyServeError

__all__ = ["CallSink"]


class CallSink:
    """Frames of one call, from the connection reader to the waiting dispatcher.

    A deque and at most one waiter, not an ``asyncio.Queue``: one is built
    per call, and only the call's dispatcher task ever waits on it."""

    __slots__ = ("_items", "_waiter", "metadata")

    def __init__(self, metadata: Mapping[str, str]) -> None:
        self._items: collections.deque[tuple[wpb.Header, bytes] | AnyServeError] = (
            collections.deque()
        )
        self._waiter: asyncio.Future[None] | None = None
        # Kept (a reference, no copy) to name the request if it gets stuck.
        self.metadata = metadata

    def put(self, item: tuple[wpb.Header, bytes] | AnyServeError) -> None:
        """Hand over a frame, or the error that ended the call (never waits)."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> tuple[wpb.Header, bytes]:
        """The next frame; raises the error that ended the call instead."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._unpack(self._items.popleft())

    def take_ready(self) -> tuple[wpb.Header, bytes] | None:
        """The next frame if one is already here, else None (never waits);
        raises the error that ended the call instead."""
        return self._unpack(self._items.popleft()) if self._items else None

    @staticmethod
    def _unpack(item: tuple[wpb.Header, bytes] | AnyServeError) -> tuple[wpb.Header, bytes]:
        if isinstance(item, AnyServeError):
            raise item
        return item
