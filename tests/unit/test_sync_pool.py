"""SyncPool: a sync handler's calls on long-lived AnyIO worker threads; the
bound, cancellation before and during a call, anyio.from_thread from a pool
thread, context variables, and what happens when serve() ends."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.from_thread
import pytest

from anyserve.errors import Unavailable
from anyserve.sync_pool import SyncPool
from tests.support import eventually

pytestmark = pytest.mark.anyio

_where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="unset")


@pytest.fixture
async def pool() -> AsyncIterator[SyncPool]:
    pool = SyncPool(2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.serve)
        await eventually(lambda: pool._group is not None, what="the pool serving")
        yield pool
        tg.cancel_scope.cancel()


async def test_results_errors_and_stop_iteration_come_back(pool: SyncPool) -> None:
    assert await pool.run(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="bad"):
        await pool.run(lambda: (_ for _ in ()).throw(ValueError("bad")))

    def stop() -> None:
        raise StopIteration

    with pytest.raises(RuntimeError, match="StopIteration"):
        await pool.run(stop)


async def test_at_most_size_calls_run_at_once(pool: SyncPool) -> None:
    gate = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def blocked() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(pool.run, blocked)
        await eventually(lambda: running[0] == 2, what="two calls running")
        assert len(pool._threads) == 2  # no third thread: the others queue
        gate.set()
    assert most[0] == 2 and running[0] == 0


async def test_a_call_cancelled_while_queued_never_runs(pool: SyncPool) -> None:
    gate = threading.Event()
    ran: list[str] = []
    async with anyio.create_task_group() as tg:
        for _ in range(2):  # both threads busy
            tg.start_soon(pool.run, lambda: gate.wait(10))
        await eventually(lambda: len(pool._threads) == 2 and not pool._idle)
        with anyio.move_on_after(0.05):
            await pool.run(lambda: ran.append("queued"))
        gate.set()
    assert await pool.run(lambda: "after") == "after"  # the threads took the next call
    assert ran == []


async def test_a_call_cancelled_while_running_is_waited_for(pool: SyncPool) -> None:
    started, gate = threading.Event(), threading.Event()
    events: list[str] = []

    def running() -> None:
        started.set()
        gate.wait(10)
        events.append("thread finished")

    async def cancel_then_release(scope: anyio.CancelScope) -> None:
        await eventually(started.is_set, what="the call running")
        scope.cancel()
        await anyio.sleep(0.05)  # time for run() to end early, were it to
        events.append("released")
        gate.set()

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            tg.start_soon(cancel_then_release, scope)
            try:
                await pool.run(running)
            finally:
                events.append("run ended")
    assert scope.cancelled_caught  # the cancellation went on, once the thread was done
    assert events == ["released", "thread finished", "run ended"]


async def test_a_pool_thread_reaches_the_loop_and_sees_the_callers_context(
    pool: SyncPool,
) -> None:
    async def on_loop() -> str:
        return "from the loop"

    _where.set("caller")
    assert await pool.run(lambda: anyio.from_thread.run(on_loop)) == "from the loop"
    assert await pool.run(_where.get) == "caller"


async def test_threads_end_with_serve() -> None:
    pool = SyncPool(3)
    threads: list[threading.Thread] = []
    gate = threading.Event()

    def blocked() -> None:
        threads.append(threading.current_thread())
        gate.wait(10)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.serve)
        await eventually(lambda: pool._group is not None)
        async with anyio.create_task_group() as calls:
            for _ in range(3):
                calls.start_soon(pool.run, blocked)
            await eventually(lambda: len(threads) == 3, what="three calls running")
            gate.set()
        assert len(set(threads)) == 3
        mailboxes = list(pool._threads)
        tg.cancel_scope.cancel()

    # Each thread read its stop mark and went back to anyio's idle workers.
    await eventually(lambda: all(m.jobs.empty() for m in mailboxes), what="threads stopped")
    assert pool._threads == []
    assert await pool.run(lambda: "fallback") == "fallback"  # not serving: anyio.to_thread


async def test_calls_still_queued_when_the_pool_stops_fail_and_the_running_one_ends() -> None:
    pool = SyncPool(1)
    gate = threading.Event()
    outcomes: dict[str, object] = {}

    async def call(name: str, func: Callable[[], object]) -> None:
        try:
            outcomes[name] = await pool.run(func)
        except Unavailable as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as calls:
        async with anyio.create_task_group() as serving:
            serving.start_soon(pool.serve)
            await eventually(lambda: pool._group is not None)
            calls.start_soon(call, "running", lambda: gate.wait(10) and "done")
            await eventually(lambda: pool._threads and not pool._queued, what="it running")
            calls.start_soon(call, "queued", lambda: "ran")
            await eventually(lambda: pool._queued, what="the second call queued")
            serving.cancel_scope.cancel()  # the worker stops
        await eventually(lambda: "queued" in outcomes, what="the queued call failed")
        gate.set()
    assert outcomes["running"] == "done"
    assert isinstance(outcomes["queued"], Unavailable)
