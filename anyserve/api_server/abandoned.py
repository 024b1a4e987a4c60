"""Replica calls nobody waits for any more, ended by asking their replica.

A request whose client went away (or whose task was cancelled for any other
reason) must stop its replica's work. Cancelling the grpc.aio call would do
it, but grpcio leaks native memory for every call cancelled while one of its
operations is in flight, on both ends (grpc/grpc#43360; the replica side is
described in anyserve/replica/in_flight.py): an API server whose clients
often give up would grow without bound.

So the call is left running and handed to :class:`Abandoned`, whose task
sends the replica ``Cancel`` with the call's id (:data:`anyserve.rpc.CALL_ID`).
The replica cancels the handler and ends the call with CANCELLED, and the
call completes normally: a unary call's answer arrives, a stream's remaining
messages are read and dropped. A call still running :data:`GRACE` seconds
later (a replica that does not answer, or one without ``Cancel``) is
cancelled in gRPC after all, as is every call handed over while no task runs
(before start-up, after shutdown).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import grpc
import grpc.aio
from anyio.abc import TaskGroup

from anyserve import rpc
from anyserve.api_server.channels import ReplicaConnection

logger = logging.getLogger(__name__)

#: Seconds a replica has to end a call after ``Cancel`` before the call is
#: cancelled in gRPC.
GRACE = 5.0

# Call ids: unguessable across API servers and restarts, unique within one.
_CALL_PREFIX = secrets.token_hex(8)
_CALL_COUNTER = itertools.count()


def new_call_id() -> str:
    """A fresh id for one call to a replica (:data:`anyserve.rpc.CALL_ID`)."""
    return f"{_CALL_PREFIX}{next(_CALL_COUNTER):x}"


async def answer(call: grpc.aio.UnaryUnaryCall) -> object:
    """``await call``, except that cancelling this wait leaves the call running
    (awaiting the call itself would cancel it in gRPC), for :meth:`Abandoned.add`."""
    if not call.done():
        # Waiting on a future of our own: cancelling it leaves the call's task alone.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: object) -> None:
            if not done.done():
                done.set_result(None)

        call.add_done_callback(wake)
        await done
    return await call


async def _contained(task: Callable[[], Coroutine[Any, Any, None]]) -> None:
    # A task of the shared group must not end the others: anyio cancels a
    # whole group when one task fails (or raises a stray CancelledError).
    try:
        await task()
    except Exception:
        logger.exception("a task reading a replica call failed")


class Abandoned:
    """Ends abandoned calls (module docstring); :meth:`run` is its task.

    One ``Cancel`` at a time goes to a replica, naming every call handed over
    for it since the last one: a flood of departures costs a few RPCs, not one
    each, and never needs more than one extra HTTP/2 stream (a replica's
    streams may all be taken by the calls waiting to be cancelled). Each call
    is then watched through its done callback, with no task of its own.
    """

    def __init__(self, grace: float = GRACE) -> None:
        self.grace = grace
        self.ended = 0  # calls ended by their replica after Cancel (for tests, metrics)
        self.cancelled = 0  # calls that had to be cancelled in gRPC
        self._tg: TaskGroup | None = None
        self._waiting: dict[ReplicaConnection, list[tuple[grpc.aio.Call, str]]] = {}
        self._sending: set[ReplicaConnection] = set()  # a Cancel is on its way there
        self._wake = asyncio.Event()

    def spawn(self, task: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run ``task`` in this object's task group (it outlives the request
        that starts it); False when :meth:`run` is not running."""
        if self._tg is None:
            return False
        self._tg.start_soon(_contained, task)
        return True

    def add(self, conn: ReplicaConnection, call: grpc.aio.Call, call_id: str) -> None:
        """Stop waiting for ``call`` (sent on ``conn`` under ``call_id``) and
        have it ended. A stream must have been read by a task of
        :meth:`spawn` (it reads what still comes). Never blocks or raises; a
        finished call is left alone."""
        if call.done():
            return
        if self._tg is None:
            self._cancel(call)
            return
        conn.calls += 1  # the channel stays open until the call has ended
        self._waiting.setdefault(conn, []).append((call, call_id))
        self._wake.set()

    async def run(self) -> None:
        """End the calls handed over, until cancelled; then cancel in gRPC
        whatever is left."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    for conn in [c for c in self._waiting if c not in self._sending]:
                        self._sending.add(conn)
                        tg.start_soon(self._end, conn, self._waiting.pop(conn))
        finally:
            self._tg = None
            waiting, self._waiting = self._waiting, {}
            for conn, calls in waiting.items():
                for call, _ in calls:
                    conn.calls -= 1
                    self._cancel(call)

    async def _end(self, conn: ReplicaConnection, calls: list[tuple[grpc.aio.Call, str]]) -> None:
        """One ``Cancel`` naming every call of ``calls``, then a watch on each."""
        names = "\n".join(call_id for _, call_id in calls).encode()
        try:
            # gRPC's own deadline, not a cancel scope: cancelling this call
            # would leak like the ones it ends.
            await conn.unary(rpc.CANCEL)(names, timeout=self.grace)
        except Exception as exc:  # AioRpcError; UsageError once the channel closed
            self._sent(conn)
            logger.info(
                "Cancel of %d calls on %s failed (%s); cancelling them in gRPC",
                len(calls),
                conn.endpoint,
                exc,
            )
            for call, _ in calls:
                conn.calls -= 1
                if not call.done():
                    self._cancel(call)
            return
        self._sent(conn)
        loop = asyncio.get_running_loop()
        for call, _ in calls:
            self._watch(conn, call, loop)

    def _sent(self, conn: ReplicaConnection) -> None:
        self._sending.discard(conn)
        if conn in self._waiting:  # handed over meanwhile: the next Cancel
            self._wake.set()

    def _watch(
        self, conn: ReplicaConnection, call: grpc.aio.Call, loop: asyncio.AbstractEventLoop
    ) -> None:
        # Counted once the call ends; cancelled in gRPC if that takes too long.
        late: list[bool] = []

        def overdue() -> None:
            late.append(True)
            self._cancel(call)

        timer = loop.call_later(self.grace, overdue)

        def ended(_: object) -> None:
            timer.cancel()
            conn.calls -= 1
            if not late:
                self.ended += 1

        call.add_done_callback(ended)

    def _cancel(self, call: grpc.aio.Call) -> None:
        self.cancelled += 1
        call.cancel()
