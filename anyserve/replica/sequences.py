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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from anyserve.errors import Unavailable
from anyserve.replica.slot import Slot, State
from anyserve.sequence import IdleTable, SequenceFlags

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
        self._entries: IdleTable[tuple[str, int | str], _Entry] = IdleTable(idle_timeout, clock)

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
        key = (handler, seq.id)
        entry = self._entries.take(key, _Entry)
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
            self._entries.release(key, entry, end=seq.end)
