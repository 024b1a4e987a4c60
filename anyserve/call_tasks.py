"""Calls in flight as plain asyncio tasks: the worker's and the local lane's.

Plain ``create_task``, not anyio's ``TaskGroup.start_soon``: that builds a
task handle and a cancel scope per task, a quarter of a process's CPU per
call with a trivial handler. A worker's call keeps its own anyio cancel scope,
so anyio's rules still hold inside it (a sync handler's thread is waited for);
a lane call, which runs no thread, is ended by cancelling its task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = ["CallTasks"]


class CallTasks:
    """Calls in flight, each its own asyncio task (see the module docstring).

    Cancellation is the owner's: through the worker's per-call scope
    (:attr:`~anyserve.replica.worker_call.WorkerCall.scope`), or the task
    :meth:`start` returns (the lane's calls). Like a task group, an exception escaping a call's
    task (or given to :meth:`fail`) stops the owner: ``on_error`` is called
    and :meth:`raise_errors` raises it once the calls have ended.
    """

    def __init__(self, on_error: Callable[[], object]) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._on_error = on_error
        # Looked up once (get_running_loop costs a system call): the calls of
        # one owner run on one loop.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a call's task (on the running loop); returns the task."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """Stop the owner with ``exc`` (as if a call's task had raised it)."""
        self._errors.append(exc)
        self._on_error()

    async def wait(self) -> None:
        """Wait until every call's task has ended (their owner ends them);
        shielded, as a task group waits for its tasks even when cancelled."""
        with anyio.CancelScope(shield=True):
            while self._tasks:
                await asyncio.wait(set(self._tasks))

    def raise_errors(self) -> None:
        if self._errors:
            # An ExceptionGroup when they are all Exceptions, as a task group raises.
            raise BaseExceptionGroup("unhandled errors in a call", self._errors)
