"""Stateful sequences on a replica: which worker holds each one, and the order
its requests run in.

Triton's sequence extension keeps a sequence's state in one model instance:
here, one worker process (the handler's ``context.sequence.state`` lives
there). The first request of a sequence (``sequence_start``, or the first one
seen) picks the least busy worker; every later one goes to that worker, one at
a time in arrival order (an ``asyncio.Lock``: its waiters are served first in,
first out). When that worker has since exited or been replaced its state is
gone: the request fails with Unavailable until a new ``sequence_start``, rather
than silently running on a fresh state. An entry ends with the sequence
(``sequence_end``) or after ``idle_timeout`` seconds without a request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from anyserve.errors import Unavailable
from anyserve.replica.slot import Slot, State
from anyserve.sequence import SequenceFlags

#: Seconds a sequence may go without a request before its entry is dropped.
DEFAULT_IDLE_TIMEOUT = 60.0


@dataclass(eq=False)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slot: Slot | None = None
    pid: int | None = None  # the worker process that holds the state
    users: int = 0  # requests holding or waiting for the lock
    last_used: float = 0.0


class SequenceSlots:
    """Sequence -> worker table of one replica (see the module docstring)."""

    def __init__(
        self,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        # Least recently used first, so expiry stops at the first live entry.
        self._entries: OrderedDict[tuple[str, int | str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(
        self, handler: str, seq: SequenceFlags, acquire: Callable[[], Awaitable[Slot]]
    ) -> AsyncIterator[Slot]:
        """The worker for this request of ``seq``, held until the block ends
        (the next request of the sequence waits). ``acquire`` picks a worker
        for a new sequence.

        Raises Unavailable when the worker holding the sequence's state has
        exited or been replaced, and whatever ``acquire`` raises.
        """
        self._expire()
        key = (handler, seq.id)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                if seq.start or entry.slot is None:
                    slot = await acquire()
                    entry.slot, entry.pid = slot, slot.pid
                elif entry.slot.state is not State.READY or entry.slot.pid != entry.pid:
                    raise Unavailable(
                        f"sequence {seq.describe()}: worker {entry.slot.id}, which held its"
                        " state, has exited or been replaced since; the state is lost."
                        " Start the sequence again (sequence_start)"
                    )
                yield entry.slot
        finally:
            entry.users -= 1
            entry.last_used = self._clock()
            if self._entries.get(key) is entry:
                if seq.end and entry.users == 0:
                    del self._entries[key]
                else:
                    self._entries.move_to_end(key)

    def _expire(self) -> None:
        """Drop entries idle for longer than the timeout (oldest first)."""
        cutoff = self._clock() - self.idle_timeout
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.users or entry.last_used > cutoff:
                break
            del self._entries[key]
