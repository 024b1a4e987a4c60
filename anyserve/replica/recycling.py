"""Recycling workers: replacing a worker process that holds a stuck call or
too much memory, without counting it as a crash.

One :class:`Watchdog` task per replica looks at every ready worker every
``watch_interval`` seconds (nothing is done per call):

* **stuck calls**: a call the dispatcher cancelled (its deadline passed, its
  client went away) that is still running ``stuck_call_grace`` seconds later.
  A sync handler runs in a thread nothing can stop, so such a call holds one of
  the worker's threads for good; a few of them and the worker serves nothing
  while it still looks ready.
* **memory**: a worker whose resident memory (``/proc/<pid>/statm``) is over
  its handler's ``max_memory_mib``, else the replica's ``--max-memory-mib``.

Where a stuck call is detected: the *worker* knows when a cancelled call has
really ended (its thread returned) and says so by answering the dispatcher's
Cancel frame with one of its own; the *replica* knows when it cancelled the
call and owns the policy. So the slot remembers each cancel until it is
answered (:meth:`Slot.oldest_cancelled`) and this watchdog compares the oldest
with the grace. A worker whose event loop is blocked answers nothing, so it is
caught too; the worker itself needs no timer per call.

A worker to recycle is drained (:meth:`Slot.begin_recycle`: it takes no new
calls, its other calls finish within the drain timeout) and its process is
then stopped; the slot stays wanted, so its supervisor starts a new process at
once without a backoff and without counting a crash.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import anyio

from anyserve.replica.slot import Slot, State

log = logging.getLogger("anyserve.manager")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mib(pid: int) -> float | None:
    """Resident memory of process ``pid`` in MiB, None when it cannot be read
    (the process is gone, or no ``/proc`` on this system)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            fields = statm.read().split()
        return int(fields[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


class Recycler(Protocol):
    """What the watchdog asks of the manager: replace ``slot``'s worker."""

    def recycle(self, slot: Slot, reason: str, *, stuck: bool = False) -> None: ...


class Watchdog:
    """Finds workers to recycle (see the module docstring) and hands them to
    ``recycler``. ``limit_for`` is a handler's memory limit in MiB (None: none)."""

    def __init__(
        self,
        slots: Callable[[], Iterable[Slot]],
        recycler: Recycler,
        *,
        stuck_call_grace: float,
        limit_for: Callable[[Slot], float | None],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        memory: Callable[[int], float | None] = resident_mib,
    ) -> None:
        self.slots = slots
        self.recycler = recycler
        self.stuck_call_grace = stuck_call_grace
        self.limit_for = limit_for
        self.interval = interval
        self.clock = clock
        self.memory = memory

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await anyio.sleep(self.interval)
            self.check()

    def check(self) -> None:
        """Look at every ready worker once and recycle the ones that need it."""
        now = self.clock()
        for slot in self.slots():
            if slot.state is not State.READY:
                continue  # starting, or already leaving
            stuck = slot.oldest_cancelled()
            if stuck is not None and now - stuck.since > self.stuck_call_grace:
                request = f" (request {stuck.request_id})" if stuck.request_id else ""
                self.recycler.recycle(
                    slot,
                    f"call {stuck.call_id}{request} of handler {slot.handler.name} still "
                    f"running {now - stuck.since:.1f}s after its deadline or cancellation "
                    f"(stuck call grace {self.stuck_call_grace:g}s)",
                    stuck=True,
                )
                continue
            limit = self.limit_for(slot)
            if limit is None or slot.pid is None:
                continue
            used = self.memory(slot.pid)
            if used is not None and used > limit:
                self.recycler.recycle(
                    slot,
                    f"resident memory {used:.0f} MiB over the limit of {limit:g} MiB "
                    f"of handler {slot.handler.name}",
                )
