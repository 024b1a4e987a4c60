"""Handler normalisation: every handler form turned, once, into one shape.

``@app.capability`` (:mod:`anyserve.app`) calls :func:`normalise` (or
:func:`normalise_batch`) when a handler is registered; nothing is inspected
per request. The worker then only ever calls ``async run(request, context,
emit)``, which calls ``await emit(value)`` for each response (a unary handler
emits exactly once).

Forms accepted (``stream=False`` unless said):

* ``def h(request, context) -> response`` and ``def h(request) -> response``
  (sync; runs on the worker's threads, :class:`~anyserve.sync_pool.SyncPool`);
* ``async def h(request, context) -> response``;
* ``def h(request, context, stream)`` with ``stream=True`` (the classic form:
  ``stream.send(chunk)`` blocks while the consumer is slow and raises
  :class:`~anyserve.context.StreamClosed` once the caller has gone);
* ``async def h(request, context)`` that ``yield``\\ s chunks (``stream=True``);
* ``def h(request, context)`` that ``yield``\\ s chunks (sync generator);
* ``async def h(request, context, stream)`` using ``await stream.asend(chunk)``;
* with ``max_batch_size``: ``def h(requests, contexts) -> list`` or ``def h(requests)``
  (sync or async), normalised into ``async run_batch(requests, contexts)``,
  which the worker's batcher calls (``run`` is then a batch of one:
  :func:`batch_of_one`).

Responses may be KServe messages or plain values (``str``, ``bytes``, ``dict``
of output name to value); :mod:`anyserve.codec` encodes them in the worker.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any, cast

from anyserve.context import Context, Stream, StreamClosed
from anyserve.sync_pool import SyncPool

__all__ = ["BatchRunner", "Emit", "Runner", "batch_of_one", "normalise", "normalise_batch"]

Emit = Callable[[Any], Coroutine[Any, Any, None]]
Runner = Callable[[Any, Context, Emit], Awaitable[None]]
# A batched handler, normalised: its list of results (checked by the batcher).
BatchRunner = Callable[[list[Any], list[Context]], Awaitable[Any]]


def slots(context: Context) -> asyncio.Semaphore:
    """What bounds an async handler's calls in flight (its context's ``limiter``)."""
    return cast(asyncio.Semaphore, context.limiter)  # sync_pool.call_limiter made it


def threads(context: Context) -> SyncPool:
    """The threads a sync handler's calls run on (its context's ``limiter``)."""
    pool = context.limiter
    if not isinstance(pool, SyncPool):
        raise TypeError("a sync handler's context needs a SyncPool as its limiter")
    return pool


def positional_arity(func: Callable[..., Any]) -> int:
    """How many positional arguments ``func`` takes (3 for ``*args``)."""
    params = inspect.signature(func).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 3
    return sum(1 for p in params if p.kind in kinds)


def normalise(func: Callable[..., Any], stream: bool) -> tuple[Runner, bool]:
    """Turn any supported handler form into ``async run(request, context, emit)``."""
    arity = positional_arity(func)
    if arity not in (1, 2, 3):
        raise ValueError(
            f"handler {func.__name__!r} must take (request), (request, context) "
            f"or (request, context, stream); it takes {arity} positional arguments"
        )
    if arity == 3 and not stream:
        raise ValueError(f"handler {func.__name__!r} takes a stream; declare it with stream=True")

    def args(request: Any, context: Context, stream_obj: Stream | None) -> tuple[Any, ...]:
        return (request, context, stream_obj)[:arity]

    if inspect.isasyncgenfunction(func):

        async def run_async_gen(request: Any, context: Context, emit: Emit) -> None:
            async with slots(context), aclosing(func(*args(request, context, None))) as chunks:
                async for chunk in chunks:
                    await emit(chunk)

        return run_async_gen, False

    if inspect.iscoroutinefunction(func):

        async def run_async(request: Any, context: Context, emit: Emit) -> None:
            async with slots(context):
                if arity == 2:  # the usual form: no argument tuple built and sliced per call
                    await emit(await func(request, context))
                elif arity == 3:
                    await func(request, context, Stream(emit, context))
                else:
                    await emit(await func(request))

        return run_async, False

    # Sync forms run on the worker's threads so the event loop stays free; a
    # thread reaches the loop only through anyio.from_thread (Stream.send,
    # context.call).
    if inspect.isgeneratorfunction(func):

        def drain_gen(request: Any, context: Context, stream_obj: Stream) -> None:
            for chunk in func(*args(request, context, None)):
                stream_obj.send(chunk)

        target: Callable[[Any, Context, Stream], Any] = drain_gen
    elif arity == 3:
        target = func
    else:

        async def run_sync_unary(request: Any, context: Context, emit: Emit) -> None:
            # The result comes back with the thread, not through stream.send
            # (a second trip between the thread and the loop per call).
            result = await threads(context).run(
                functools.partial(context.run_in_thread, func, *args(request, context, None))
            )
            if context.cancelled:  # as stream.send would have said in the thread
                raise StreamClosed("the caller has gone")
            await emit(result)

        return run_sync_unary, True

    async def run_sync(request: Any, context: Context, emit: Emit) -> None:
        stream_obj = Stream(emit, context)
        await threads(context).run(
            functools.partial(context.run_in_thread, target, request, context, stream_obj)
        )

    return run_sync, True


def normalise_batch(func: Callable[..., Any]) -> tuple[BatchRunner, bool]:
    """Turn a batched handler into ``async run_batch(requests, contexts)`` (sync
    ones in the thread pool), under the worker's limiter like unary handlers."""
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise ValueError(f"batched handler {func.__name__!r} must return a list, not yield")
    arity = positional_arity(func)
    if arity not in (1, 2):
        raise ValueError(
            f"batched handler {func.__name__!r} must take (requests) or (requests, contexts);"
            f" it takes {arity} positional arguments"
        )

    def call(requests: list[Any], contexts: list[Context]) -> Any:
        return func(*(requests, contexts)[:arity])

    if inspect.iscoroutinefunction(func):

        async def run_batch_async(requests: list[Any], contexts: list[Context]) -> Any:
            async with slots(contexts[0]):
                return await call(requests, contexts)

        return run_batch_async, False

    async def run_batch_sync(requests: list[Any], contexts: list[Context]) -> Any:
        return await threads(contexts[0]).run(functools.partial(call, requests, contexts))

    return run_batch_sync, True


def batch_of_one(run_batch: BatchRunner) -> Runner:
    """The ``run`` of a batched handler: one request as a batch of one."""

    async def run(request: Any, context: Context, emit: Emit) -> None:
        results = await run_batch([request], [context])
        if not isinstance(results, list) or len(results) != 1:
            raise TypeError("a batched handler must return a list of one response per request")
        await emit(results[0])

    return run
