"""Keeping one slot's worker process alive: restarts with backoff, crash loops.

A supervisor runs a slot's worker process again and again while the slot is
wanted. After a crash it waits (exponential backoff: ``BACKOFF_START`` seconds
doubling to ``BACKOFF_MAX``, back to the start after a run longer than
``HEALTHY_RUN``) and restarts it; ``CRASH_LIMIT`` crashes within
``CRASH_WINDOW`` seconds mark the slot failed until it is started again by
command. A worker recycled on purpose (:mod:`anyserve.replica.recycling`) is
started again at once and is not a crash.

How a process is run is not decided here: the supervisor is given a
:data:`RunWorker` (run one worker process for a slot until it ends and say why;
the real one is :class:`anyserve.replica.processes.WorkerLauncher`), a clock and
the backoff wait, so its policy can be exercised without processes or sleeping.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from anyserve.replica.slot import Slot

log = logging.getLogger("anyserve.manager")

CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
# A run longer than this was healthy: the next crash restarts after BACKOFF_START.
HEALTHY_RUN = 10 * BACKOFF_MAX

#: Runs one worker process for a slot until it ends; returns why it ended
#: (``"was killed by SIGKILL (exit code -9)"``, ``"stopped"``...).
RunWorker = Callable[[Slot], Awaitable[str]]
#: Waits out a restart backoff of the given seconds (shorter when the slot is stopped).
BackoffWait = Callable[[Slot, float], Awaitable[None]]


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a crashed worker, and when to give up on it."""

    backoff_start: float = BACKOFF_START
    backoff_max: float = BACKOFF_MAX
    crash_limit: int = CRASH_LIMIT
    crash_window: float = CRASH_WINDOW
    healthy_run: float = HEALTHY_RUN


class CrashHistory:
    """The crashes of one supervision run and the backoff they lead to."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.recent: deque[float] = deque()  # crash times within the window
        self._backoff = policy.backoff_start

    def crashed(self, started: float, now: float) -> float | None:
        """Record a crash at ``now`` of a process started at ``started``; return
        the seconds to wait before restarting it, or None when it crash-loops."""
        policy = self.policy
        self.recent.append(now)
        while self.recent and now - self.recent[0] > policy.crash_window:
            self.recent.popleft()
        if len(self.recent) >= policy.crash_limit:
            return None
        if now - started > policy.healthy_run:
            self._backoff = policy.backoff_start
        delay = self._backoff
        self._backoff = min(self._backoff * 2, policy.backoff_max)
        return delay


async def wait_backoff(slot: Slot, delay: float) -> None:
    """Wait ``delay`` seconds; a stop of ``slot`` ends the wait early."""
    with anyio.move_on_after(delay):
        await slot.stop_requested.wait()


class Supervisor:
    """Supervises slots: :meth:`supervise` runs as one task per started slot.

    ``on_change`` is called (synchronously) whenever a slot's state changes
    here, so registration can follow.
    """

    def __init__(
        self,
        run_worker: RunWorker,
        *,
        on_change: Callable[[], None],
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        backoff: BackoffWait = wait_backoff,
    ) -> None:
        self.run_worker = run_worker
        self.on_change = on_change
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.backoff = backoff

    async def supervise(self, slot: Slot, after: Sequence[Slot] = ()) -> None:
        """Keep ``slot``'s worker running while the slot is wanted (it has been
        started), then let go of it. Its process starts once every slot in
        ``after`` has stopped (switching: they make room for it)."""
        crashes = CrashHistory(self.policy)
        try:
            for other in after:
                await other.stopped.wait()
            while slot.wanted:
                started = self.clock()
                try:
                    reason = await self.run_worker(slot)
                except Exception as exc:
                    # A bug around one process must not end the manager's task
                    # group, and every other handler's workers with it: a crash.
                    log.exception("running worker %s failed", slot.id)
                    reason = f"could not be run: {exc!r}"
                if not slot.wanted:
                    break
                if slot.recycling:
                    log.info("worker %s recycled; starting its replacement", slot.id)
                    slot.recycled()
                    self.on_change()
                    continue
                # A crash: fail fast if it keeps happening, else back off and restart.
                delay = crashes.crashed(started, self.clock())
                if delay is None:
                    slot.mark_failed(
                        f"worker {slot.id} crashed {len(crashes.recent)} times in "
                        f"{self.policy.crash_window:.0f}s, the last time: {reason}; start it "
                        f"again with `anyserve workers start {slot.handler.name}`"
                    )
                    log.error("worker %s marked failed: %s", slot.id, slot.failure)
                    self.on_change()
                    return
                log.warning("worker %s %s; restarting in %.1fs", slot.id, reason, delay)
                slot.restarting()
                self.on_change()
                await self.backoff(slot, delay)
        finally:
            slot.supervision_ended()
            self.on_change()
