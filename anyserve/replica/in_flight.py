"""Calls the API server can end by id, without cancelling them in gRPC.

When an API server's client goes away, the API server must stop the replica's
work. Cancelling the grpc.aio call would, but grpcio leaks native memory for
every call cancelled while one of its operations is in flight, on the client
and on the server (grpc/grpc#43360: ~1-3 KB a call, scattered so the heap
cannot shrink); a service whose clients often give up grows without bound.
So the API server names each call (``x-anyserve-call`` metadata,
:data:`anyserve.rpc.CALL_ID`) and, instead of cancelling it, sends the
replica ``Cancel`` with that name (:data:`anyserve.rpc.CANCEL`). The replica
cancels the handler's task, which stops the worker's call as a gRPC
cancellation would, and then ends the call itself with status CANCELLED: the
call completes normally on both ends and nothing leaks.

A call id is the API server's random per-process prefix and a counter: it
cannot be guessed, so ``Cancel`` needs no token. A call without an id (a
client talking to the replica directly) is cancelled the gRPC way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from anyserve import rpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

CANCELLED_DETAILS = "cancelled by the API server: its client went away"


class CancelledByCaller(Exception):
    """Raised by :meth:`InFlight.run` when ``Cancel`` named the call."""


class _Entry:
    __slots__ = ("stopped", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.stopped = False


#: Ids named by ``Cancel`` before their call arrived (it can overtake it) that
#: are remembered, oldest forgotten first: most are of calls that just ended.
_EARLY_CANCELS = 1024


class InFlight:
    """The running calls that have an id, and the ``Cancel`` RPC that ends them."""

    def __init__(self) -> None:
        self._calls: dict[str, _Entry] = {}
        self._early: dict[str, None] = {}  # insertion-ordered set

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, call_id: str | None, call: Awaitable[_T]) -> _T:
        """Await ``call`` in this task, registered under ``call_id``.

        Raises CancelledByCaller when :meth:`cancel` named the call (its task
        was cancelled and that cancellation consumed), whatever ``call``
        raises otherwise, and CancelledError for any other cancellation.
        """
        if not call_id:
            return await call
        if call_id in self._early:  # cancelled before it arrived
            del self._early[call_id]
            if asyncio.iscoroutine(call):
                call.close()
            raise CancelledByCaller
        task = asyncio.current_task()
        assert task is not None
        entry = _Entry(task)
        # A duplicate id (a forged one) replaces the first: it can only make
        # that call uncancellable by id, and it still is the gRPC way.
        self._calls[call_id] = entry
        try:
            return await call
        except asyncio.CancelledError:
            if entry.stopped and task.uncancel() == 0:
                raise CancelledByCaller from None
            raise
        finally:
            if self._calls.get(call_id) is entry:
                del self._calls[call_id]

    def cancel(self, call_id: str) -> bool:
        """Cancel the call registered under ``call_id``; False when none is
        (one arriving later under that id is refused at once)."""
        entry = self._calls.pop(call_id, None)
        if entry is None or entry.stopped:
            self._early[call_id] = None
            if len(self._early) > _EARLY_CANCELS:
                del self._early[next(iter(self._early))]
            return False
        entry.stopped = True
        entry.task.cancel()
        return True

    async def _cancel_rpc(self, request: bytes, context: object) -> bytes:
        # Answers how many of the named calls were running (the others ended
        # already, or are refused when they arrive): either way they end.
        names = request.decode("ascii", "replace").split("\n")
        return str(sum(self.cancel(name) for name in names if name)).encode()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The ``anyserve.calls.Calls`` service (``Cancel``: call ids, one a
        line, in; the count of those running, in ASCII digits, out)."""
        return grpc.method_handlers_generic_handler(
            rpc.CALLS_SERVICE,
            {"Cancel": grpc.unary_unary_rpc_method_handler(self._cancel_rpc)},
        )
