"""AnyServe applications: ``@app.capability``, what the replica knows of each
handler (:class:`HandlerInfo`) and :func:`load_app`.

Declaring a handler checks every option and capability value at once
(:mod:`anyserve.handler_options`: a typo such as ``steam=True`` fails at
import) and normalises the function, whatever its form, into the one shape
the worker runs (:mod:`anyserve.handlers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anyserve.capability import Capability
from anyserve.handler_options import DEFAULT_MAX_QUEUE, check_capability, check_options
from anyserve.handlers import BatchRunner, Runner, batch_of_one, normalise, normalise_batch
from anyserve.signature import Tensor

# Threads per worker for sync handlers when max_concurrency is not given.
DEFAULT_SYNC_CONCURRENCY = 8
# In-flight calls per worker for async handlers when max_concurrency is not given.
DEFAULT_ASYNC_CONCURRENCY = 1024
# Seconds the oldest request of a batch waits for more before the batch goes.
DEFAULT_BATCH_TIMEOUT = 0.005
#: A handler's model version when its capability has no ``version`` key
#: (Triton's first version).
DEFAULT_VERSION = "1"
#: The capability key that is also the handler's model version.
VERSION_KEY = "version"


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
    # Calls one worker holds waiting beyond the ones it runs (admission limit).
    max_queue: int = DEFAULT_MAX_QUEUE
    # MiB one worker may hold resident before it is recycled; None: the replica's default.
    max_memory_mib: float | None = None
    # The model version (Triton's) this handler serves of its capability's name.
    version: str = DEFAULT_VERSION
    # Inputs that came through shared memory are not copied into the request.
    zero_copy: bool = False

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
            "max_queue": self.max_queue,
            "max_memory_mib": self.max_memory_mib,
            "version": self.version,
            "zero_copy": self.zero_copy,
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
            max_queue=int(data.get("max_queue", DEFAULT_MAX_QUEUE)),
            max_memory_mib=(
                None if data.get("max_memory_mib") is None else float(data["max_memory_mib"])
            ),
            version=str(data.get("version", DEFAULT_VERSION)),
            zero_copy=bool(data.get("zero_copy", False)),
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
        start_timeout: float | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_memory_mib: float | None = None,
        zero_copy: bool = False,
        **capability: str | int,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a handler for the capability given as keyword arguments.

        Capability values are strings, or ints matched as their decimal
        string (``gpus=2`` matches the header ``X-Capability-Gpus: 2``).

        ``stream``: the handler produces a stream of responses. ``workers``:
        worker processes for this handler (0: none at boot).
        ``max_concurrency``: calls one worker runs at once (threads for sync
        handlers, default 8; default 1024 for async ones).
        ``resources``: what one worker needs of the replica's ``--resources``
        (e.g. ``{"gpu": 1}``). ``preload``: start workers at boot (else on the
        first request or by command). ``name``: the handler's id (default:
        the function name). ``start_timeout``: seconds one worker may take to
        start, module import and model loading included, before it counts as
        failed (None: the replica's default, 600 s). ``max_queue``: calls one
        worker holds waiting beyond the ones it runs (default 1024); past it,
        or when a call's deadline would pass before a worker could take it,
        the call is refused with 429 (Overloaded) instead of queued.
        ``max_memory_mib``: resident memory one worker may hold; a worker over
        it takes no new calls and is replaced once its calls end (None: the
        replica's ``--max-memory-mib``, by default no limit).
        ``zero_copy``: a big raw input the API server passed through shared
        memory stays there: ``codec.decode_inputs`` gives a read-only numpy
        view of it and its ``request.raw_input_contents`` entry is empty
        (default False: its bytes are also copied into the request, so code
        reading ``raw_input_contents`` sees them as if they came over gRPC).

        ``version`` (a capability key with a meaning): the model version
        (Triton's) this handler serves of its capability's name, default
        ``"1"``. Handlers of one name with different versions are addressed
        by ``model_version`` / ``/v2/models/{name}/versions/{v}/...`` (or the
        ``X-Capability-Version`` header, as any key); a request naming no
        version gets the latest (highest) one.

        ``max_batch_size`` > 0 turns on dynamic batching: the handler receives a
        list of requests (up to that many, gathered for at most
        ``batch_timeout`` seconds) and returns a list of responses in the same
        order. ``inputs``/``outputs``: declared signatures (lists of
        :class:`~anyserve.Tensor`); requests that do not fit are refused
        before the handler runs.

        Raises ValueError, naming the key and the value, for: no capability
        key; a capability value that is not a str or int (``bool``, ``None``,
        a float...) or that no header can match (empty, padded, holding a
        comma); a key within a typo of an option name (``steam=True``: "did
        you mean `stream`?"); an option of the wrong type or range
        (``workers="2"``, ``max_concurrency=0``, ``resources={"gpu": -1}``,
        ``start_timeout=0``...); a duplicate name; or a function whose
        signature fits no handler form.
        """
        cap = check_capability(capability)
        options = check_options(
            stream=stream,
            workers=workers,
            max_concurrency=max_concurrency,
            resources=resources,
            preload=preload,
            name=name,
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            inputs=inputs,
            outputs=outputs,
            start_timeout=start_timeout,
            max_queue=max_queue,
            max_memory_mib=max_memory_mib,
            zero_copy=zero_copy,
        )

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            handler_name = options.name or str(getattr(func, "__name__", "handler"))
            if handler_name in self._handlers:
                raise ValueError(f"duplicate handler name {handler_name!r}; pass name=...")
            run_batch: BatchRunner | None = None
            if options.max_batch_size:
                run_batch, is_sync = normalise_batch(func)
                run = batch_of_one(run_batch)
            else:
                run, is_sync = normalise(func, options.stream)
            limit = options.max_concurrency or (
                DEFAULT_SYNC_CONCURRENCY if is_sync else DEFAULT_ASYNC_CONCURRENCY
            )
            info = HandlerInfo(
                name=handler_name,
                capability=cap,
                stream=options.stream,
                workers=options.workers,
                max_concurrency=limit,
                resources=options.resources,
                preload=options.preload,
                max_batch_size=options.max_batch_size,
                batch_timeout=options.batch_timeout,
                inputs=options.inputs,
                outputs=options.outputs,
                start_timeout=options.start_timeout,
                max_queue=options.max_queue,
                max_memory_mib=options.max_memory_mib,
                zero_copy=options.zero_copy,
                version=cap.get(VERSION_KEY, DEFAULT_VERSION),
            )
            self._handlers[handler_name] = Handler(
                info=info, func=func, run=run, is_sync=is_sync, run_batch=run_batch
            )
            return func

        return register


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
