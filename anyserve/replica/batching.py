"""Dynamic batching inside a worker: :class:`Batcher` gathers single requests
into lists and runs each list once.

A worker whose handler has ``max_batch_size`` holds one Batcher; every unary
call on the worker's socket (so every entry: HTTP, gRPC, delegation,
``context.call``, from any caller) is submitted to it and waits for its own
result. The policy:

* A batch goes when it is full (``max_batch_size``), when its oldest request has
  waited ``batch_timeout`` seconds, or at once when a request's deadline would
  pass before that (the whole gathered batch goes with it).
* At most ``max_in_flight`` batches run at once. While they all run, requests
  keep queueing and the next batch takes up to ``max_batch_size`` of them, so
  batches grow with the load instead of waiting behind each other.
* A request whose caller goes away (its ``submit`` is cancelled) before its
  batch goes leaves the queue and never reaches the handler. Once its batch has
  gone the handler computes it anyway and the result is dropped.
* An exception from a batch fails every request of that batch with it; a result
  that is not a list of one value per request fails the batch with HandlerError.

The Batcher knows nothing of frames, processes or handlers: the "run this
batch" callable is the seam (the unit tests pass fakes). :func:`handler_batcher`
builds the worker's, which calls the handler's ``run_batch`` with the requests
and their contexts. Times are anyio's clock (``anyio.current_time()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from anyserve.app import Handler
from anyserve.context import Context
from anyserve.errors import AnyServeError, HandlerError, Unavailable
from anyserve.proto import ModelInferRequest

log = logging.getLogger("anyserve.worker")

T = TypeVar("T")


@dataclass(eq=False)
class _Entry(Generic[T]):
    """One submitted request waiting for its batch and its result."""

    item: T
    arrived: float
    deadline: float
    future: asyncio.Future[Any] = field(repr=False)
    # Taken into a batch: the handler will see it (it has left the queue).
    taken: bool = False


class Batcher(Generic[T]):
    """Forms batches of submitted items and runs them with ``run``.

    ``run(items)`` must return a list with one result per item, in order.
    :meth:`serve` must be running (in a task group) for submissions to finish.
    Raises ValueError for a size or a bound below 1 or a negative timeout.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[object]],
        *,
        max_batch_size: int,
        batch_timeout: float,
        max_in_flight: int,
    ) -> None:
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be >= 1")
        if not batch_timeout >= 0:
            raise ValueError(f"batch_timeout must be >= 0 seconds, got {batch_timeout!r}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_in_flight = max_in_flight
        #: Batches running now (at most ``max_in_flight``).
        self.in_flight = 0
        self._queue: deque[_Entry[T]] = deque()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (cancelled ones leave at once)."""
        return len(self._queue)

    async def submit(self, item: T, deadline: float = math.inf) -> Any:
        """Queue ``item`` for the next batch and return its result.

        ``deadline`` is on anyio's clock (``math.inf``: none). Raises the
        exception that failed the item's batch. Cancelling the caller before
        the batch goes takes the item out of it.
        """
        queue = self._queue
        entry = _Entry(
            item, anyio.current_time(), deadline, asyncio.get_running_loop().create_future()
        )
        queue.append(entry)
        # Wake the collector only when this arrival changes its plan: a first
        # request starts the timer, a full or urgent batch goes now.
        if (
            len(queue) == 1
            or len(queue) >= self.max_batch_size
            or deadline <= queue[0].arrived + self.batch_timeout
        ):
            self._wake.set()
        try:
            return await entry.future
        except BaseException:
            if not entry.taken:
                with contextlib.suppress(ValueError):
                    queue.remove(entry)
            elif entry.future.done() and not entry.future.cancelled():
                entry.future.exception()  # retrieved: cancelled after its batch failed
            raise

    async def serve(self) -> None:
        """Form and start batches until cancelled."""
        async with anyio.create_task_group() as tg:
            while True:
                await self._gathered()
                await self._slots.acquire()
                batch = self._take()
                if batch:
                    self.in_flight += 1
                    tg.start_soon(self._dispatch, batch)
                else:  # every request of it went away meanwhile
                    self._slots.release()

    async def _gathered(self) -> None:
        """Return once the queue holds a batch that should go."""
        queue = self._queue
        while True:
            self._wake.clear()
            if not queue:
                await self._wake.wait()
                continue
            if len(queue) >= self.max_batch_size:
                return
            flush_at = queue[0].arrived + self.batch_timeout
            wait = flush_at - anyio.current_time()
            if wait <= 0 or any(entry.deadline <= flush_at for entry in queue):
                return
            with anyio.move_on_after(wait):
                await self._wake.wait()

    def _take(self) -> list[_Entry[T]]:
        """Up to ``max_batch_size`` requests from the head of the queue."""
        queue = self._queue
        batch: list[_Entry[T]] = []
        while queue and len(batch) < self.max_batch_size:
            entry = queue.popleft()
            if entry.future.done():
                continue  # cancelled: its caller went away
            entry.taken = True
            batch.append(entry)
        return batch

    async def _dispatch(self, batch: list[_Entry[T]]) -> None:
        try:
            try:
                results = check_results(await self._run([e.item for e in batch]), len(batch))
            except Exception as exc:
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
            else:
                for entry, result in zip(batch, results, strict=True):
                    if not entry.future.done():
                        entry.future.set_result(result)
        finally:
            self.in_flight -= 1
            self._slots.release()
            for entry in batch:  # only when the batch itself was cancelled
                if not entry.future.done():
                    entry.future.set_exception(Unavailable("the worker stopped during the batch"))


def check_results(results: object, size: int) -> list[Any]:
    """``results`` when it is a list of ``size`` values, else HandlerError saying
    what the batched handler should have returned."""
    if not isinstance(results, list):
        raise HandlerError(
            "a batched handler must return a list with one response per request,"
            f" not {type(results).__name__}"
        )
    if len(results) != size:
        raise HandlerError(
            f"the batched handler returned {len(results)} responses for {size} requests;"
            " it must return one per request, in order"
        )
    return results


def handler_error(exc: Exception) -> HandlerError:
    """What a handler's exception becomes for its callers: a HandlerError
    naming the exception's class and message."""
    text = str(exc)
    return HandlerError(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def handler_batcher(handler: Handler) -> Batcher[tuple[ModelInferRequest, Context]] | None:
    """The Batcher of a batched handler (None for others): items are
    ``(request, context)``, at most ``max_concurrency`` batches run at once,
    and an exception is logged once for its batch, then fails each request
    (an anyserve error keeps its class, any other becomes a HandlerError)."""
    run_batch = handler.run_batch
    info = handler.info
    if run_batch is None or not info.max_batch_size:
        return None

    async def run(batch: list[tuple[ModelInferRequest, Context]]) -> Any:
        try:
            return await run_batch([r for r, _ in batch], [c for _, c in batch])
        except AnyServeError:
            raise
        except Exception as exc:
            log.warning(
                "batched handler %s raised on a batch of %d (requests %s):\n%s",
                info.name,
                len(batch),
                ", ".join(c.request_id for _, c in batch),
                "".join(traceback.format_exception(exc)),
            )
            raise handler_error(exc) from None

    return Batcher(
        run,
        max_batch_size=info.max_batch_size,
        batch_timeout=info.batch_timeout,
        max_in_flight=info.max_concurrency,
    )
