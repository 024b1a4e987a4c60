"""OpenTelemetry tracing across every hop of a request.

One request is one trace, however many processes it crosses: the API server's
span (HTTP route or gRPC method) is the parent of the replica's ``dispatch``
span, which is the parent of its ``queue wait`` span and of the worker's
``handler`` span; a ``context.call`` or a delegation is a ``call ...`` /
``delegate`` client span whose child is the API server's span of that new hop.
The W3C ``traceparent`` travels as an HTTP header or gRPC metadata between
processes and inside the worker ``Call`` frame's metadata between a replica and
its worker; an incoming one is continued, else a trace starts at the API server.

Only ``opentelemetry-api`` is required. Each process calls :func:`setup` once
at start: it installs the SDK (``anyserve[otel]``) when the standard variables
ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
or ``OTEL_TRACES_EXPORTER``; the SDK itself reads ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``...), then
looks once at the tracer provider. Without a real one (no SDK, nothing
configured) :data:`ENABLED` stays False: the server wrappers are not installed
at all and every per-request hook returns at its first line, so tracing costs
nothing; OpenTelemetry itself is not even imported then (unless the program
imported it). A provider the embedding program (or the user's app, in a worker)
set up itself is used as it is.

The server spans (ASGI, gRPC, a worker's handler) are :mod:`anyserve.tracing_servers`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from anyserve.capability import query_from_headers

if TYPE_CHECKING:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Span

log = logging.getLogger("anyserve.tracing")

#: The W3C trace context header / metadata key (responses carry it too).
TRACEPARENT = "traceparent"
#: Default ``service.name`` of each kind of process (``OTEL_SERVICE_NAME`` wins).
API_SERVER_SERVICE = "anyserve-api-server"
REPLICA_SERVICE = "anyserve-replica"
WORKER_SERVICE = "anyserve-worker"

# Span attributes anyserve adds (besides the semantic conventions' own).
ATTR_REPLICA = "anyserve.replica"
ATTR_CAPABILITY = "anyserve.capability"
ATTR_MODEL = "anyserve.model"
ATTR_HANDLER = "anyserve.handler"
ATTR_WORKER = "anyserve.worker"
ATTR_REQUEST_ID = "anyserve.request_id"

#: True once :func:`setup` found a real tracer provider; read by every hook.
ENABLED = False
_configured = False
_tracer: trace.Tracer | None = None
_EXPORTERS = "opentelemetry_traces_exporter"  # the SDK's entry-point group


def setup(service_name: str) -> bool:
    """Set up this process's tracing (the first call decides; later ones
    return its answer). ``service_name`` is used unless ``OTEL_SERVICE_NAME``
    (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) names the service.

    Returns whether spans are recorded. Never raises for a configuration
    problem (a missing SDK or exporter package): it logs one warning and
    leaves tracing off, since a server must not fail to start for its traces.
    """
    global ENABLED, _configured, _tracer
    if _configured:
        return ENABLED
    _configured = True
    if not _may_trace():
        return False
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if _is_noop(provider) and _requested():
        _install_sdk(service_name)
        provider = trace.get_tracer_provider()
    ENABLED = not _is_noop(provider)
    if ENABLED:
        from anyserve import __version__

        _tracer = provider.get_tracer("anyserve", __version__)
        log.info("tracing on (service %s)", _service_name(service_name))
    return ENABLED


def _may_trace() -> bool:
    # Without the variables asking for traces, only a provider the program set
    # (importing the API to do so) or named (OTEL_PYTHON_TRACER_PROVIDER) can trace:
    # otherwise tracing is off without importing OpenTelemetry (memory, start time).
    return (
        _requested()
        or "opentelemetry.trace" in sys.modules
        or "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
    )


def _is_noop(provider: trace.TracerProvider) -> bool:
    from opentelemetry import trace

    return isinstance(provider, trace.NoOpTracerProvider | trace.ProxyTracerProvider)


def _requested() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _service_name(default: str) -> str:
    named = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if named:
        return named
    for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return default


def _install_sdk(service_name: str) -> None:
    from opentelemetry import trace

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* variables ask for traces but the OpenTelemetry SDK is not installed"
            " (pip install 'anyserve[otel]'): tracing is off"
        )
        return
    exporters = [e for name in _exporter_names() if (e := _exporter(name)) is not None]
    if not exporters:
        return
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the
    # attributes given here win, so service.name is only given as the default.
    attributes: dict[str, Any] = {"process.pid": os.getpid()}
    if _service_name("") == "":
        attributes["service.name"] = service_name
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG), the batch processor's
    # delays and sizes from OTEL_BSP_*; the provider flushes at interpreter exit.
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _exporter_names() -> list[str]:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]


def _exporter(name: str) -> Any:
    """An exporter of the SDK's entry-point group by its ``OTEL_TRACES_EXPORTER``
    name (``otlp`` picks by ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``), or None
    (warned) when its package is not installed."""
    import importlib.metadata

    package = f"an exporter named {name!r}"
    if name == "otlp":
        env = os.environ
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol == "grpc":
            name, package = "otlp_proto_grpc", "opentelemetry-exporter-otlp-proto-grpc"
        else:
            name, package = "otlp_proto_http", "opentelemetry-exporter-otlp-proto-http"
    for entry in importlib.metadata.entry_points(group=_EXPORTERS, name=name):
        return entry.load()()
    log.warning("traces exporter %r needs %s, which is not installed: not exported", name, package)
    return None


def flush(timeout: float = 5.0) -> None:
    """Export the spans still batched (blocking, at most ``timeout`` seconds):
    called when a process shuts down. A no-op when tracing is off."""
    if ENABLED:
        from opentelemetry import trace

        force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if force_flush is not None:
            force_flush(int(timeout * 1000))


async def aflush(timeout: float = 5.0) -> None:
    """:func:`flush` from async code: the export runs in a thread, the loop goes on."""
    if ENABLED:
        import anyio.to_thread

        await anyio.to_thread.run_sync(flush, timeout)


def tracer() -> trace.Tracer:
    """anyserve's tracer (a no-op one while tracing is off)."""
    if _tracer is None:
        from opentelemetry import trace

        return trace.NoOpTracer()
    return _tracer


# --------------------------------------------------------------------------- propagation


def traceparent(span: Span) -> str:
    """The W3C ``traceparent`` value naming ``span`` ("" for an invalid span)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_trace_id() -> str:
    """The trace id of the span current here (32 hex digits; an access-log
    line written while a request is served), "" when not tracing."""
    if not ENABLED:
        return ""
    from opentelemetry import trace

    found = trace.get_current_span().get_span_context()
    return f"{found.trace_id:032x}" if found.is_valid else ""


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The trace context a request carried (``traceparent``...; the configured
    propagators decide), or an empty one: a new trace starts."""
    from opentelemetry import propagate

    return propagate.extract(carrier)


def routed(
    metadata: list[tuple[str, str]], replica: str, query: Mapping[str, str], model_name: str
) -> None:
    """The API server chose ``replica``: name it and the capability on the
    current (server) span and add its ``traceparent`` to ``metadata``, the
    replica's gRPC metadata."""
    if not ENABLED:
        return
    from opentelemetry import propagate, trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(ATTR_REPLICA, replica)
        if query:
            span.set_attribute(
                ATTR_CAPABILITY, ",".join(f"{k}={v}" for k, v in sorted(query.items()))
            )
        if model_name:
            span.set_attribute(ATTR_MODEL, model_name)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())


def now() -> int:
    """Nanoseconds since the epoch (a span's start time), or 0 when tracing is off."""
    return time.time_ns() if ENABLED else 0


def to_worker(
    metadata: Mapping[str, str], queued_since: int, handler: str, worker: str
) -> Mapping[str, str]:
    """The metadata of a worker ``Call`` frame: ``metadata`` plus the
    ``traceparent`` of the current (dispatch) span, after recording the
    ``queue wait`` span from ``queued_since`` (:func:`now`) until now.
    ``metadata`` itself when tracing is off."""
    if not ENABLED:
        return metadata
    from opentelemetry import propagate, trace

    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute(ATTR_HANDLER, handler)
        current.set_attribute(ATTR_WORKER, worker)
    attributes = {ATTR_HANDLER: handler, ATTR_WORKER: worker}
    tracer().start_span("queue wait", start_time=queued_since or None, attributes=attributes).end()
    carrier = dict(metadata)
    propagate.inject(carrier)
    return carrier


# --------------------------------------------------------------------------- spans


_NOTHING = contextlib.nullcontext()


def outgoing(
    name: str,
    metadata: MutableMapping[str, str],
    parent: otel_context.Context | None = None,
    **attributes: str,
) -> contextlib.AbstractContextManager[object]:
    """A client span around a request this process sends on (``context.call``,
    a delegation), child of ``parent`` (None: the current span); its
    ``traceparent`` is put into ``metadata``. An error leaving the block marks
    the span failed. A shared no-op context manager when tracing is off.

    The span is never made current, so the block may span an async
    generator's ``yield``s."""
    if not ENABLED:
        return _NOTHING
    return _outgoing(name, metadata, parent, attributes)


@contextlib.contextmanager
def _outgoing(
    name: str,
    metadata: MutableMapping[str, str],
    parent: otel_context.Context | None,
    attributes: Mapping[str, str],
) -> Iterator[object]:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, StatusCode

    spans_attributes = dict(attributes)
    query = query_from_headers(metadata.items())
    if query:
        # Capabilities are few (unlike request ids): fit for a span name.
        wanted = ",".join(f"{k}={v}" for k, v in sorted(query.items()))
        spans_attributes[ATTR_CAPABILITY] = wanted
        name = f"{name} {wanted}"
    span = tracer().start_span(
        name, context=parent, kind=SpanKind.CLIENT, attributes=spans_attributes
    )
    propagate.inject(metadata, context=trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, str(exc))
        raise
    finally:
        span.end()
