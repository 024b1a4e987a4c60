"""The supervisor's restart policy, with a fake process runner and a fake clock.

Every "process" is a scripted run: it lasts a number of (fake) seconds and
crashes. Backoff waits are recorded and move the fake clock instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from anyserve.replica.slot import Slot, State
from anyserve.replica.supervisor import (
    BACKOFF_MAX,
    CRASH_LIMIT,
    CRASH_WINDOW,
    CrashHistory,
    RestartPolicy,
    Supervisor,
    wait_backoff,
)
from tests.unit.replica_fakes import FakeClock, handler

pytestmark = pytest.mark.anyio

CRASH = "exited with code 1"


class ScriptedWorker:
    """Runs "processes" that crash after the given durations; once the script is
    over, the next run is stopped by command (as ``anyserve workers stop``)."""

    def __init__(self, clock: FakeClock, durations: Sequence[float]) -> None:
        self.clock = clock
        self.durations = list(durations)
        self.runs = 0

    async def __call__(self, slot: Slot) -> str:
        self.runs += 1
        slot.spawned(1000 + self.runs)
        if not self.durations:
            slot.begin_drain()
            return "stopped"
        self.clock.advance(self.durations.pop(0))
        return CRASH


class Harness:
    def __init__(self, durations: Sequence[float]) -> None:
        self.clock = FakeClock()
        self.worker = ScriptedWorker(self.clock, durations)
        self.delays: list[float] = []
        self.changes = 0
        self.supervisor = Supervisor(
            self.worker, on_change=self.changed, clock=self.clock, backoff=self.wait
        )
        self.slot = Slot("w-0", handler("w"))

    def changed(self) -> None:
        self.changes += 1

    async def wait(self, slot: Slot, delay: float) -> None:
        assert slot is self.slot and slot.state is State.STARTING
        self.delays.append(delay)
        self.clock.advance(delay)

    async def supervise(self) -> Slot:
        self.slot.start()
        with anyio.fail_after(1):
            await self.supervisor.supervise(self.slot)
        return self.slot


async def test_backoff_doubles_from_a_tenth_of_a_second_to_five() -> None:
    # 20 s runs: never 5 crashes within 60 s, and never healthy long enough to reset.
    harness = Harness([20.0] * 9)
    slot = await harness.supervise()
    assert harness.delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert slot.restarts == 9 and harness.worker.runs == 10
    assert slot.state is State.STOPPED and slot.pid is None and slot.stopped.is_set()


async def test_backoff_starts_over_after_a_long_healthy_run() -> None:
    harness = Harness([1.0, 1.0, 10 * BACKOFF_MAX + 1, 1.0])
    slot = await harness.supervise()
    assert harness.delays == [0.1, 0.2, 0.1, 0.2]
    assert slot.state is State.STOPPED


async def test_a_healthy_run_resets_the_backoff_but_not_the_crash_count() -> None:
    # The 51 s run is healthy, but the three crashes before it are still
    # within 60 s when the next two come.
    harness = Harness([1.0, 1.0, 1.0, 10 * BACKOFF_MAX + 1, 1.0])
    slot = await harness.supervise()
    assert harness.delays == [0.1, 0.2, 0.4, 0.1]
    assert slot.state is State.FAILED
    harness = Harness([1.0, 1.0, 1.0, CRASH_WINDOW + 1, 1.0])
    slot = await harness.supervise()
    assert harness.delays == [0.1, 0.2, 0.4, 0.1, 0.2]
    assert slot.state is State.STOPPED


async def test_five_crashes_within_a_minute_mark_the_slot_failed() -> None:
    harness = Harness([1.0] * 20)
    slot = await harness.supervise()
    assert harness.worker.runs == CRASH_LIMIT == 5
    assert harness.delays == [0.1, 0.2, 0.4, 0.8]
    assert slot.state is State.FAILED and not slot.wanted
    assert slot.restarts == CRASH_LIMIT - 1
    assert slot.failure == (
        f"worker w-0 crashed 5 times in 60s, the last time: {CRASH}; "
        "start it again with `anyserve workers start w`"
    )
    assert slot.stopped.is_set() and slot.ready.is_set() and slot.pid is None
    assert harness.changes >= CRASH_LIMIT


async def test_crashes_spread_over_more_than_the_window_never_fail() -> None:
    # Each run outlasts the crash window (and counts as healthy).
    harness = Harness([CRASH_WINDOW + 1] * 8)
    slot = await harness.supervise()
    assert harness.delays == [0.1] * 8
    assert slot.state is State.STOPPED and slot.restarts == 8


async def test_four_quick_crashes_then_a_slow_one_stay_below_the_limit() -> None:
    # Four crashes in the first 5 s, then one after a 57 s run: by then the
    # first two have left the 60 s window.
    harness = Harness([1.0, 1.0, 1.0, 1.0, 57.0])
    slot = await harness.supervise()
    assert slot.state is State.STOPPED and slot.restarts == 5


async def test_a_stopped_worker_is_not_restarted() -> None:
    harness = Harness([])
    slot = await harness.supervise()
    assert harness.worker.runs == 1 and harness.delays == []
    assert slot.state is State.STOPPED and slot.restarts == 0


async def test_a_stop_during_the_backoff_ends_supervision() -> None:
    harness = Harness([1.0] * 3)

    async def stopped_while_waiting(slot: Slot, delay: float) -> None:
        harness.delays.append(delay)
        slot.begin_drain()

    harness.supervisor.backoff = stopped_while_waiting
    slot = await harness.supervise()
    assert harness.worker.runs == 1 and harness.delays == [0.1]
    assert slot.state is State.STOPPED


async def test_the_first_run_waits_for_the_workers_making_room() -> None:
    harness = Harness([])
    other = Slot("other-0", handler("other"))
    other.start()  # still running: it has not stopped yet
    harness.slot.start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(harness.supervisor.supervise, harness.slot, [other])
        await anyio.wait_all_tasks_blocked()
        assert harness.worker.runs == 0
        other.supervision_ended()
    assert harness.worker.runs == 1


async def test_the_policy_is_configurable() -> None:
    harness = Harness([1.0] * 5)
    harness.supervisor.policy = RestartPolicy(backoff_start=1.0, backoff_max=3.0, crash_limit=3)
    slot = await harness.supervise()
    assert harness.delays == [1.0, 2.0]
    assert slot.state is State.FAILED and "crashed 3 times in 60s" in slot.failure


def test_crash_history() -> None:
    history = CrashHistory(RestartPolicy())
    assert [history.crashed(t, t + 1.0) for t in (0.0, 2.0, 4.0, 6.0)] == [0.1, 0.2, 0.4, 0.8]
    assert history.crashed(8.0, 9.0) is None
    assert len(history.recent) == CRASH_LIMIT


async def test_wait_backoff_ends_early_when_the_slot_is_stopped() -> None:
    slot = Slot("w-0", handler("w"))
    slot.start()
    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_backoff, slot, 60.0)
            await anyio.wait_all_tasks_blocked()
            slot.request_stop()


async def test_wait_backoff_waits_the_delay() -> None:
    slot = Slot("w-0", handler("w"))
    slot.start()
    started = anyio.current_time()
    await wait_backoff(slot, 0.01)
    assert anyio.current_time() - started >= 0.01
