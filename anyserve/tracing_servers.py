"""Server spans of :mod:`anyserve.tracing`: an ASGI wrapper for the API
server's HTTP entry, a wrapper for grpc.aio method behaviours (the API
server's gRPC entry, the replica's dispatch) and one for a worker's handler.

All are chosen once, when a server is built: with tracing off they return
what they were given, so a request pays nothing at all. With tracing on, each
request's span continues the ``traceparent`` it carried (a new trace
without one), is current while the request is served (the router and the
dispatcher add to it and pass it on), and, where ``respond`` is asked for, its
``traceparent`` goes back to the client: an HTTP response header, gRPC initial
metadata. Nothing here imports OpenTelemetry or gRPC before tracing is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from anyserve import rpc, tracing
from anyserve.app import Handler
from anyserve.context import Context, StreamClosed

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: HTTP paths never traced: the control plane (heartbeats every few seconds)
#: and probes would drown the requests in spans.
UNTRACED_PATHS = frozenset(
    {"/register", "/unregister", "/registry", "/health", "/metrics", "/v2/health/live"}
    | {"/v2/health/ready"}
)

_Request = TypeVar("_Request")
_Result = TypeVar("_Result")
Behavior = Callable[[_Request, Any], Awaitable[_Result]]


def asgi(app: ASGIApp, untraced: Collection[str] = UNTRACED_PATHS) -> ASGIApp:
    """``app`` with one server span per HTTP request (``untraced`` paths
    aside) whose ``traceparent`` is added to the response's headers; ``app``
    itself when tracing is off."""
    if not tracing.ENABLED:
        return app
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode

    tracer = tracing.tracer()

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in untraced:
            await app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate", b"baggage")
        }
        method = scope["method"]
        span = tracer.start_span(
            method,
            context=tracing.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        answer = tracing.traceparent(span).encode()
        status = 0

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and answer:
                status = message["status"]
                headers = [*message.get("headers", ()), (b"traceparent", answer)]
                message = {**message, "headers": headers}
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await app(scope, receive, send_traced)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            otel_context.detach(token)
            # Named by the route template (low cardinality), known only now.
            route = getattr(scope.get("route"), "path", None)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            if status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
            span.end()

    return traced


def grpc_method(
    behavior: Behavior[_Request, _Result], name: str, *, respond: bool = False
) -> Behavior[_Request, _Result]:
    """``behavior`` (a grpc.aio unary or stream-stream method, a coroutine
    function of ``(request or request iterator, context)``) inside a server
    span named ``name``; with ``respond``, the span's ``traceparent`` is sent
    as initial metadata first. ``behavior`` itself when tracing is off."""
    if not tracing.ENABLED:
        return behavior
    import grpc
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    tracer = tracing.tracer()
    method = name.rsplit("/", 1)[-1]

    async def traced(request: _Request, context: Any) -> _Result:
        pairs = context.invocation_metadata() or ()
        carrier = {k: v for k, v in pairs if isinstance(v, str)}
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": rpc.SERVICE,
            "rpc.method": method,
        }
        request_id = carrier.get(rpc.REQUEST_ID)
        if request_id:
            attributes[tracing.ATTR_REQUEST_ID] = request_id
        span = tracer.start_span(
            name, context=tracing.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            if respond and (answer := tracing.traceparent(span)):
                await context.send_initial_metadata(((tracing.TRACEPARENT, answer),))
            result = await behavior(request, context)
        except BaseException as exc:
            _grpc_failed(span, context, exc)
            raise
        else:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            return result
        finally:
            otel_context.detach(token)
            span.end()

    return traced


@contextlib.contextmanager
def lane_span(name: str, metadata: Mapping[str, str]) -> Iterator[None]:
    """A replica's server span for a call that came over the local lane
    (:mod:`anyserve.lane_server`), as :func:`grpc_method` makes one for a gRPC
    call: it continues the call's ``traceparent`` and is current inside.
    Nothing when tracing is off."""
    if not tracing.ENABLED:
        yield
        return
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode

    attributes = {"rpc.system": "anyserve-lane", "rpc.method": name.rsplit(" ", 1)[-1]}
    request_id = metadata.get(rpc.REQUEST_ID)
    if request_id:
        attributes[tracing.ATTR_REQUEST_ID] = request_id
    span = tracing.tracer().start_span(
        name, context=tracing.extract(dict(metadata)), kind=SpanKind.SERVER, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    except BaseException as exc:
        span.set_status(StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _grpc_failed(span: Span, context: Any, exc: BaseException) -> None:
    import grpc
    from opentelemetry.trace import StatusCode

    # An AnyServeError was turned into context.abort(...) by errors.grpc_method:
    # the status is the context's, the exception only says the call ended.
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(StatusCode.ERROR, context.details() or code.name)


def worker_handler(handler: Handler) -> Handler:
    """Set up tracing in a worker process and return ``handler`` with its calls
    traced (``handler`` itself when tracing is off). Call it after the app's
    import: a tracer provider the app set up itself is then used as it is.

    Each call gets a ``handler <name>`` span continuing the ``traceparent`` of
    its Call frame, current while the handler runs (a sync handler's thread
    inherits it), and ``context.trace_id`` / ``context.trace_context`` (the
    parent of its ``context.call`` spans). A batch's requests each get a span
    of their own trace covering the batch. The provider flushes at exit."""
    if not tracing.setup(tracing.WORKER_SERVICE):
        return handler
    from opentelemetry import context as otel_context

    run, run_batch, name = handler.run, handler.run_batch, handler.info.name

    async def traced_run(request: Any, context: Context, emit: Any) -> None:
        span = _handler_span(name, context)
        token = otel_context.attach(context.trace_context)
        try:
            await run(request, context, emit)
        except BaseException as exc:
            _handler_failed(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()

    async def traced_batch(requests: list[Any], contexts: list[Context]) -> Any:
        assert run_batch is not None
        spans = [_handler_span(name, context) for context in contexts]
        try:
            return await run_batch(requests, contexts)
        except BaseException as exc:
            for span in spans:
                _handler_failed(span, exc)
            raise
        finally:
            for span in spans:
                span.end()

    return dataclasses.replace(
        handler, run=traced_run, run_batch=None if run_batch is None else traced_batch
    )


def _handler_span(name: str, context: Context) -> Span:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    attributes = {tracing.ATTR_HANDLER: name, tracing.ATTR_REQUEST_ID: context.request_id}
    span = tracing.tracer().start_span(
        f"handler {name}",
        context=tracing.extract(context.metadata),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    found = span.get_span_context()
    context.trace_id = f"{found.trace_id:032x}" if found.is_valid else ""
    context.trace_context = trace.set_span_in_context(span)
    return span


def _handler_failed(span: Span, exc: BaseException) -> None:
    # Cancellation and a caller that went away (StreamClosed) are not the
    # handler's failures.
    from opentelemetry.trace import StatusCode

    if isinstance(exc, Exception) and not isinstance(exc, StreamClosed):
        span.record_exception(exc)
        span.set_status(StatusCode.ERROR, str(exc))
