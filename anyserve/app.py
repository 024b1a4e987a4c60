"""AnyServe applications: ``@app.capability`` and handler normalisation.

Every handler form is turned, once at registration, into one shape:
``async run(request, context, emit)`` which calls ``await emit(value)`` for each
response (a unary handler emits exactly once). Nothing is inspected per request.

Forms accepted (``stream=False`` unless said):

* ``def h(request, context) -> response`` and ``def h(request) -> response``
  (sync; runs in a bounded thread pool);
* ``async def h(request, context) -> response``;
* ``def h(request, context, stream)`` with ``stream=True`` (the classic form:
  ``stream.send(chunk)`` blocks while the consumer is slow and raises
  :class:`~anyserve.context.StreamClosed` once the caller has gone);
* ``async def h(request, context)`` that ``yield``\\ s chunks (``stream=True``);
* ``def h(request, context)`` that ``yield``\\ s chunks (sync generator);
* ``async def h(request, context, stream)`` using ``await stream.asend(chunk)``;
* with ``max_batch_size``: ``def h(requests, contexts) -> list`` or ``def h(requests)``
  (sync or async), also normalised into ``async run_batch(requests, contexts)``,
  which the worker's batcher calls (``run`` is then a batch of one).

Responses may be KServe messages or plain values (``str``, ``bytes``, ``dict``
of output name to value); :mod:`anyserve.codec` encodes them in the worker.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from anyserve.capability import Capability
from anyserve.context import Context, Stream
from anyserve.signature import Tensor, tensors

Emit = Callable[[Any], Coroutine[Any, Any, None]]
Runner = Callable[[Any, Context, Emit], Awaitable[None]]
# A batched handler, normalised: its list of results (checked by the batcher).
BatchRunner = Callable[[list[Any], list[Context]], Awaitable[Any]]

# Threads per worker for sync handlers when max_concurrency is not given.
DEFAULT_SYNC_CONCURRENCY = 8
# In-flight calls per worker for async handlers when max_concurrency is not given.
DEFAULT_ASYNC_CONCURRENCY = 1024
# Seconds the oldest request of a batch waits for more before the batch goes.
DEFAULT_BATCH_TIMEOUT = 0.005


@dataclass(frozen=True)
class HandlerInfo:
    """What the replica knows about a handler without importing user code.

    Produced by a worker process describing the app (``describe()``) and sent as
    JSON; the dispatcher and manager route and schedule with it.
    """

    name: str
    capability: Capability
    stream: bool
    workers: int = 1
    max_concurrency: int = DEFAULT_ASYNC_CONCURRENCY
    resources: Mapping[str, float] = field(default_factory=dict)
    preload: bool = True
    # Dynamic batching: 0 = off; else the most requests one call of the handler gets.
    max_batch_size: int = 0
    batch_timeout: float = DEFAULT_BATCH_TIMEOUT
    # Declared signatures (empty: not declared, nothing is checked).
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    # Seconds a worker may take to start (load its model); None: the replica's default.
    start_timeout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capability": self.capability.to_dict(),
            "stream": self.stream,
            "workers": self.workers,
            "max_concurrency": self.max_concurrency,
            "resources": dict(self.resources),
            "preload": self.preload,
            "max_batch_size": self.max_batch_size,
            "batch_timeout": self.batch_timeout,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "start_timeout": self.start_timeout,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HandlerInfo:
        return cls(
            name=str(data["name"]),
            capability=Capability(data["capability"]),
            stream=bool(data["stream"]),
            workers=int(data.get("workers", 1)),
            max_concurrency=int(data.get("max_concurrency", DEFAULT_ASYNC_CONCURRENCY)),
            resources={str(k): float(v) for k, v in dict(data.get("resources", {})).items()},
            preload=bool(data.get("preload", True)),
            max_batch_size=int(data.get("max_batch_size", 0)),
            batch_timeout=float(data.get("batch_timeout", DEFAULT_BATCH_TIMEOUT)),
            inputs=tuple(Tensor.from_dict(t) for t in data.get("inputs", ())),
            outputs=tuple(Tensor.from_dict(t) for t in data.get("outputs", ())),
            start_timeout=(
                None if data.get("start_timeout") is None else float(data["start_timeout"])
            ),
        )


@dataclass(frozen=True)
class Handler:
    """A registered handler: its description plus the normalised runner."""

    info: HandlerInfo
    func: Callable[..., Any]
    run: Runner
    is_sync: bool
    # Batched handlers (max_batch_size > 0) only: the whole-batch form.
    run_batch: BatchRunner | None = None


class AnyServe:
    """An application: a set of capability handlers.

    >>> app = AnyServe()
    >>> @app.capability(type="chat", model="demo")
    ... def chat(request, context): ...
    """

    def __init__(self, name: str = "anyserve") -> None:
        self.name = name
        self._handlers: dict[str, Handler] = {}

    @property
    def handlers(self) -> list[Handler]:
        """Handlers in registration order."""
        return list(self._handlers.values())

    def handler(self, name: str) -> Handler:
        """The handler called ``name``; raises KeyError naming the known ones."""
        try:
            return self._handlers[name]
        except KeyError:
            raise KeyError(f"no handler {name!r}; this app has {sorted(self._handlers)}") from None

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able descriptions of every handler (what the replica routes on)."""
        return [h.info.to_dict() for h in self._handlers.values()]

    def capability(
        self,
        stream: bool = False,
        *,
        workers: int = 1,
        max_concurrency: int | None = None,
        resources: Mapping[str, float] | None = None,
        preload: bool = True,
        name: str | None = None,
        max_batch_size: int = 0,
        batch_timeout: float = DEFAULT_BATCH_TIMEOUT,
        inputs: list[Tensor] | None = None,
        outputs: list[Tensor] | None = None,
        **capability: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler for the capability given as keyword arguments.

        ``stream``: the handler produces a stream of responses. ``workers``:
        worker processes for this handler. ``max_concurrency``: calls one worker
        runs at once (threads for sync handlers, default 8; default 1024 for
        async ones). ``resources``: what one worker needs of the replica's
        ``--resources`` (e.g. ``{"gpu": 1}``). ``preload``: start workers at boot
        (else on the first request or by command). ``name``: the handler's id
        (default: the function name).

        ``max_batch_size`` > 0 turns on dynamic batching: the handler receives a
        list of requests (up to that many, gathered for at most
        ``batch_timeout`` seconds) and returns a list of responses in the same
        order. ``inputs``/``outputs``: declared signatures (lists of
        :class:`~anyserve.Tensor`); requests that do not fit are refused
        before the handler runs.

        Raises ValueError for an empty capability, a duplicate name, a
        malformed option, or a function whose signature fits no handler form.
        """
        if not capability:
            raise ValueError("@app.capability needs at least one key, e.g. type='chat'")
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise ValueError(f"max_batch_size must be an int, got {max_batch_size!r}")
        if max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0 (0: no batching)")
        if max_batch_size and stream:
            raise ValueError("streaming handlers are not batched: drop max_batch_size")
        if isinstance(batch_timeout, bool) or not isinstance(batch_timeout, int | float):
            raise ValueError(f"batch_timeout must be seconds, got {batch_timeout!r}")
        if not 0 <= batch_timeout <= 60:
            raise ValueError("batch_timeout must be between 0 and 60 seconds")
        declared_inputs = tensors(inputs, "inputs")
        declared_outputs = tensors(outputs, "outputs")
        cap = Capability(capability)

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            handler_name = str(name or getattr(func, "__name__", "handler"))
            if handler_name in self._handlers:
                raise ValueError(f"duplicate handler name {handler_name!r}; pass name=...")
            run_batch: BatchRunner | None = None
            if max_batch_size:
                run_batch, is_sync = _normalise_batch(func)
                run = _batch_of_one(run_batch)
            else:
                run, is_sync = _normalise(func, stream)
            limit = max_concurrency or (
                DEFAULT_SYNC_CONCURRENCY if is_sync else DEFAULT_ASYNC_CONCURRENCY
            )
            info = HandlerInfo(
                name=handler_name,
                capability=cap,
                stream=stream,
                workers=workers,
                max_concurrency=limit,
                resources=dict(resources or {}),
                preload=preload,
                max_batch_size=max_batch_size,
                batch_timeout=float(batch_timeout),
                inputs=declared_inputs,
                outputs=declared_outputs,
            )
            self._handlers[handler_name] = Handler(
                info=info, func=func, run=run, is_sync=is_sync, run_batch=run_batch
            )
            return func

        return register


def _positional_arity(func: Callable[..., Any]) -> int:
    params = inspect.signature(func).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 3
    return sum(1 for p in params if p.kind in kinds)


def _normalise(func: Callable[..., Any], stream: bool) -> tuple[Runner, bool]:
    """Turn any supported handler form into ``async run(request, context, emit)``."""
    arity = _positional_arity(func)
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
            async with context.limiter, aclosing(func(*args(request, context, None))) as chunks:
                async for chunk in chunks:
                    await emit(chunk)

        return run_async_gen, False

    if inspect.iscoroutinefunction(func):

        async def run_async(request: Any, context: Context, emit: Emit) -> None:
            async with context.limiter:
                if arity == 3:
                    stream_obj = Stream(emit, context)
                    await func(request, context, stream_obj)
                else:
                    await emit(await func(*args(request, context, None)))

        return run_async, False

    # Sync forms run in a worker thread so the event loop stays free; the thread
    # reaches the loop only through Stream.send (anyio.from_thread).
    if inspect.isgeneratorfunction(func):

        def drain_gen(request: Any, context: Context, stream_obj: Stream) -> None:
            for chunk in func(*args(request, context, None)):
                stream_obj.send(chunk)

        target: Callable[[Any, Context, Stream], Any] = drain_gen
    elif arity == 3:
        target = func
    else:

        def call_unary(request: Any, context: Context, stream_obj: Stream) -> None:
            stream_obj.send(func(*args(request, context, None)))

        target = call_unary

    async def run_sync(request: Any, context: Context, emit: Emit) -> None:
        stream_obj = Stream(emit, context)
        await anyio.to_thread.run_sync(
            functools.partial(context.run_in_thread, target, request, context, stream_obj),
            limiter=context.limiter,  # type: ignore[arg-type]  # a CapacityLimiter for sync handlers
        )

    return run_sync, True


def _normalise_batch(func: Callable[..., Any]) -> tuple[BatchRunner, bool]:
    """Turn a batched handler into ``async run_batch(requests, contexts)`` (sync
    ones in the thread pool), under the worker's limiter like unary handlers."""
    if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
        raise ValueError(f"batched handler {func.__name__!r} must return a list, not yield")
    arity = _positional_arity(func)
    if arity not in (1, 2):
        raise ValueError(
            f"batched handler {func.__name__!r} must take (requests) or (requests, contexts);"
            f" it takes {arity} positional arguments"
        )

    def call(requests: list[Any], contexts: list[Context]) -> Any:
        return func(*(requests, contexts)[:arity])

    if inspect.iscoroutinefunction(func):

        async def run_batch_async(requests: list[Any], contexts: list[Context]) -> Any:
            async with contexts[0].limiter:
                return await call(requests, contexts)

        return run_batch_async, False

    async def run_batch_sync(requests: list[Any], contexts: list[Context]) -> Any:
        return await anyio.to_thread.run_sync(
            functools.partial(call, requests, contexts),
            limiter=contexts[0].limiter,  # type: ignore[arg-type]  # a CapacityLimiter (sync)
        )

    return run_batch_sync, True


def _batch_of_one(run_batch: BatchRunner) -> Runner:
    """The ``run`` of a batched handler: one request as a batch of one."""

    async def run(request: Any, context: Context, emit: Emit) -> None:
        results = await run_batch([request], [context])
        if not isinstance(results, list) or len(results) != 1:
            raise TypeError("a batched handler must return a list of one response per request")
        await emit(results[0])

    return run


def load_app(spec: str, app_dir: str | None = None) -> AnyServe:
    """Import ``module.path:attr`` or ``path/to/file.py:attr`` and return the app.

    ``app_dir`` (default: the current directory) is put first on ``sys.path`` so
    ``examples.chat_app:app`` resolves from where the command was run. Raises
    ValueError for a malformed spec or an attribute that is not an AnyServe, and
    lets the import error of the user's module through unchanged.
    """
    import importlib
    import importlib.util
    import os
    import sys

    module_part, sep, attr = spec.partition(":")
    if not sep:
        attr = "app"
    if not module_part:
        raise ValueError(f"app {spec!r}: expected 'module:attr' or 'file.py:attr'")
    base = os.path.abspath(app_dir or os.getcwd())
    if base not in sys.path:
        sys.path.insert(0, base)
    if module_part.endswith(".py") or os.sep in module_part:
        path = os.path.abspath(os.path.join(base, module_part))
        mod_name = os.path.splitext(os.path.basename(path))[0]
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise ValueError(f"app {spec!r}: cannot load {path}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise ValueError(
            f"app {spec!r}: module {module_part!r} has no attribute {attr!r}"
        ) from None
    if not isinstance(app, AnyServe):
        raise ValueError(f"app {spec!r} is a {type(app).__name__}, not an AnyServe")
    return app
