"""Threads for a worker's sync handlers (:class:`SyncPool`).

``anyio.to_thread.run_sync`` spends more on each call than the whole worker
spends on an async call: two extra loop iterations for its checkpoints, a
capacity limiter and a cancel scope per call, a locked queue per thread. Through
a replica at 64 calls in flight, a sync echo handler cost its worker 71 µs of
CPU per call with it and 40 µs with this pool (an async one: 27 µs).

The pool keeps its threads for the worker's life and hands each thread its next
call from the loop, one at a time (a thread never takes calls on its own, so it
lets go of the GIL between calls, as anyio's threads do). They are still AnyIO
worker threads (each is one ``anyio.to_thread.run_sync`` call for its whole
life), so a handler reaches the event loop with ``anyio.from_thread`` as before
(``context.call``, ``stream.send``, the blocking object store).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import anyio.to_thread

from anyserve.errors import Unavailable

__all__ = ["SyncPool", "call_limiter"]

T = TypeVar("T")


def call_limiter(is_sync: bool, concurrency: int) -> SyncPool | asyncio.Semaphore:
    """What bounds a worker's calls in flight to ``concurrency``: threads for a
    sync handler (a :class:`SyncPool`, served with the worker), a plain
    semaphore for an async one (no loop round-trip per acquire, unlike
    ``anyio.CapacityLimiter``)."""
    return SyncPool(concurrency) if is_sync else asyncio.Semaphore(concurrency)


class _Job:
    """One call: run on a thread, its outcome set on the loop."""

    __slots__ = ("context", "finished", "func", "future", "waiter")

    def __init__(self, func: Callable[[], object], future: asyncio.Future[Any]) -> None:
        self.context = contextvars.copy_context()
        self.func = func
        self.future = future
        self.finished = False  # the thread is done with it
        # What a cancelled caller waits on while the thread runs it (cancelling
        # the caller has cancelled ``future`` itself).
        self.waiter: asyncio.Future[None] | None = None


class _Thread:
    """One pool thread's mailbox: it runs one call at a time, and is handed the
    next by the loop (a thread never takes calls on its own, so it lets go of
    the GIL between calls, as anyio's worker threads do)."""

    __slots__ = ("jobs",)

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()


class SyncPool:
    """Runs blocking calls on at most ``size`` threads, in the order they come.

    While :meth:`serve` runs, threads are started as calls need them and live
    until it ends; then each finishes the call it is running, and calls still
    queued are not run. Outside :meth:`serve` (a handler called in process),
    :meth:`run` falls back to ``anyio.to_thread.run_sync`` with the same bound.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._threads: list[_Thread] = []
        self._idle: list[_Thread] = []  # the last one idle is used first
        self._queued: collections.deque[_Job] = collections.deque()
        self._group: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limiter = anyio.CapacityLimiter(size)  # the threads' and the fallback's

    async def serve(self) -> None:
        """Own the threads until cancelled."""
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tg:
                self._group = tg
                await anyio.sleep_forever()
        finally:
            self._group = None
            for thread in self._threads:
                thread.jobs.put(None)  # it ends after its call, if any
            self._threads.clear()
            self._idle.clear()
            for job in self._queued:  # never run
                if not job.future.done():
                    job.future.set_exception(Unavailable("the worker is stopping"))
            self._queued.clear()

    async def run(self, func: Callable[[], T]) -> T:
        """``func()`` on a pool thread, with the caller's context variables.

        Cancelled before a thread took it, it never runs; cancelled while it
        runs (a thread cannot be stopped), it is waited for, then the
        cancellation goes on. Raises what ``func`` raised."""
        group, loop = self._group, self._loop
        if group is None or loop is None:
            return await anyio.to_thread.run_sync(func, limiter=self._limiter)
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(func, future)
        if self._idle:
            self._idle.pop().jobs.put(job)
        else:
            self._queued.append(job)
            if len(self._threads) < self.size:
                # It takes the oldest queued call once it has started: a
                # thread that never starts (the pool stopping) holds no call.
                thread = _Thread()
                self._threads.append(thread)
                group.start_soon(self._serve_thread, thread)
        try:
            return cast(T, await future)
        except asyncio.CancelledError:
            if job in self._queued:  # no thread took it: it never runs
                self._queued.remove(job)
            elif not job.finished:  # a thread runs it: wait for the end
                job.waiter = loop.create_future()
                with anyio.CancelScope(shield=True):
                    await job.waiter
            raise

    def _ended(
        self, thread: _Thread, job: _Job, result: object, error: BaseException | None
    ) -> None:
        # On the loop: the call's outcome, and the thread's next call.
        future = job.future
        job.finished = True
        if job.waiter is not None:
            job.waiter.set_result(None)  # its caller was cancelled and waits for this
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        self._next(thread)

    def _next(self, thread: _Thread) -> None:
        # On the loop: a thread is free; hand it the oldest queued call.
        if thread not in self._threads:
            return  # the pool stopped: the thread reads its stop mark
        if self._queued:
            thread.jobs.put(self._queued.popleft())
        else:
            self._idle.append(thread)

    async def _serve_thread(self, thread: _Thread) -> None:
        # abandon_on_cancel: serve() ends at once; the thread ends on its own
        # once it has finished its call and read the stop mark.
        await anyio.to_thread.run_sync(
            self._work, thread, abandon_on_cancel=True, limiter=self._limiter
        )

    def _work(self, thread: _Thread) -> None:
        loop = self._loop
        assert loop is not None
        report = loop.call_soon_threadsafe
        jobs = thread.jobs
        try:
            report(self._next, thread)  # started: ready for a call
        except RuntimeError:  # the loop is closed
            return
        while (job := jobs.get()) is not None:
            result: object = None
            error: BaseException | None = None
            try:
                result = job.context.run(job.func)
            except StopIteration as exc:
                # An asyncio future refuses StopIteration (as anyio does).
                error = RuntimeError("the handler raised StopIteration")
                error.__cause__ = exc
            except BaseException as exc:
                error = exc
            try:
                report(self._ended, thread, job, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return
            del job, result, error  # nothing kept alive while waiting
