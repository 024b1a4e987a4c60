"""anyserve.tracing in one process: what is (not) installed when tracing is
off, and the spans and propagation of each hook when it is on (an SDK tracer
recording into memory; the process's global provider is never touched).
How ``setup`` reads the standard variables runs in child interpreters."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from anyserve import tracing, tracing_servers
from anyserve.app import AnyServe
from anyserve.calls import ApiDelegator
from anyserve.capability import Capability
from anyserve.context import Context
from anyserve.errors import NotFound

pytestmark = pytest.mark.anyio

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture
def off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_configured", True)
    monkeypatch.setattr(tracing, "ENABLED", False)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on, every finished span recorded in the exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_configured", True)
    monkeypatch.setattr(tracing, "ENABLED", True)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def context(metadata: dict[str, str] | None = None) -> Context:
    return Context(
        request_id="r1",
        metadata=metadata or {},
        capability=Capability({"type": "t"}),
        limiter=asyncio.Semaphore(1),
        is_sync=False,
    )


def named(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (found,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return found


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """(trace id, parent span id) of a finished span, in hex."""
    assert span.context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else ""
    return f"{span.context.trace_id:032x}", parent


def child_of(metadata: dict[str, str], span: ReadableSpan) -> bool:
    """Whether ``metadata`` carries ``span`` as its traceparent."""
    assert span.context is not None
    _, trace_id, span_id, _ = metadata["traceparent"].split("-")
    return (int(trace_id, 16), int(span_id, 16)) == (span.context.trace_id, span.context.span_id)


# --------------------------------------------------------------------------- off


async def test_off_nothing_is_wrapped_and_no_hook_does_anything(off: None) -> None:
    app = Starlette()
    assert tracing_servers.asgi(app) is app

    async def behavior(request: bytes, ctx: Any) -> bytes:
        return request

    assert tracing_servers.grpc_method(behavior, "M", respond=True) is behavior
    served = AnyServe("b")
    served.capability(type="t")(lambda request, context: {})
    (found,) = served.handlers
    assert tracing_servers.worker_handler(found) is found
    metadata = {"x-request-id": "r"}
    assert tracing.to_worker(metadata, tracing.now(), "h", "w") is metadata
    assert tracing.now() == 0
    with tracing.outgoing("call", metadata):
        pass
    assert metadata == {"x-request-id": "r"}
    pairs: list[tuple[str, str]] = []
    tracing.routed(pairs, "replica", {"type": "t"}, "")
    assert pairs == []
    assert context().trace_id == "" and tracing.current_trace_id() == ""


async def setup_in_child(env: dict[str, str], code: str = "") -> list[str]:
    """Run ``tracing.setup`` in a fresh interpreter with ``env`` (OTEL_* of
    this process removed): what it printed (whether tracing is on, the
    provider's service name) and, last, its stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    program = (
        f"{code}\nimport logging; logging.basicConfig(level='WARNING')\n"
        "from anyserve import tracing\nfrom opentelemetry import trace\n"
        "print(tracing.setup('anyserve-test'))\n"
        "provider = trace.get_tracer_provider()\n"
        "print(getattr(getattr(provider, 'resource', None), 'attributes', {}).get('service.name'))"
    )
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", program], env=base | env)
    return [*done.stdout.decode().split(), done.stderr.decode()]


async def test_setup_follows_the_standard_variables() -> None:
    console = {"OTEL_TRACES_EXPORTER": "console"}
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    cases: dict[str, tuple[dict[str, str], str]] = {
        "nothing": ({}, ""),
        "console": (console, ""),
        "named": (console | {"OTEL_SERVICE_NAME": "mine"}, ""),
        "disabled": (console | {"OTEL_SDK_DISABLED": "true"}, ""),
        "none": ({"OTEL_TRACES_EXPORTER": "none"}, ""),
        "endpoint": (endpoint, ""),
        "grpc": (endpoint | {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ""),
        "no sdk": (endpoint, "import sys; sys.modules['opentelemetry.sdk'] = None"),
    }
    out: dict[str, list[str]] = {}

    async def run(name: str) -> None:
        out[name] = await setup_in_child(*cases[name])

    async with anyio.create_task_group() as tg:  # one interpreter each, at once
        for name in cases:
            tg.start_soon(run, name)
    assert out["nothing"][:2] == ["False", "None"]
    assert out["console"][:2] == ["True", "anyserve-test"]
    assert out["named"][:2] == ["True", "mine"]
    assert out["disabled"][:1] == out["none"][:1] == ["False"]
    assert out["endpoint"][:2] == ["True", "anyserve-test"]
    # An exporter that is not installed, or no SDK at all: a warning, tracing off.
    if out["grpc"][0] == "False":  # unless the gRPC exporter happens to be installed
        assert "opentelemetry-exporter-otlp-proto-grpc" in out["grpc"][-1]
    assert out["no sdk"][:1] == ["False"]
    assert "pip install 'anyserve[otel]'" in out["no sdk"][-1]


# --------------------------------------------------------------------------- on


async def test_the_http_entry_continues_the_trace_and_answers_its_traceparent(
    spans: InMemorySpanExporter,
) -> None:
    async def hello(request: Request) -> PlainTextResponse:
        # The route's code sees the server span as current (the router adds to it).
        pairs: list[tuple[str, str]] = []
        tracing.routed(pairs, "rep-1", {"type": "chat"}, "")
        return PlainTextResponse("hi", headers={"x-sent": dict(pairs)["traceparent"]})

    async def boom(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=503)

    routes = [Route("/hello/{name}", hello, methods=["POST"]), Route("/health", boom)]
    app = tracing_servers.asgi(Starlette(routes=routes))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        answer = await http.post("/hello/x", headers={"traceparent": TRACEPARENT})
        fresh = await http.post("/hello/y")
        untraced = await http.get("/health")
    finished = spans.get_finished_spans()
    assert len(finished) == 2  # /health is not traced
    assert "traceparent" not in untraced.headers
    span = finished[0]
    assert span.name == "POST /hello/{name}" and span.kind is SpanKind.SERVER
    assert hex_ids(span) == (TRACE, PARENT)
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["anyserve.replica"] == "rep-1"
    assert span.attributes["anyserve.capability"] == "type=chat"
    assert child_of({"traceparent": answer.headers["traceparent"]}, span)
    assert child_of({"traceparent": answer.headers["x-sent"]}, span)
    # Without a traceparent a new trace starts.
    assert hex_ids(finished[1])[0] != TRACE and hex_ids(finished[1])[1] == ""
    assert fresh.headers["traceparent"].split("-")[1] == hex_ids(finished[1])[0]


class FakeServicerContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata
        self.initial: tuple[tuple[str, str], ...] = ()
        self._code: Any = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def send_initial_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.initial = metadata

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return "no such thing"


async def test_a_grpc_method_span_continues_the_metadata_and_records_the_status(
    spans: InMemorySpanExporter,
) -> None:
    import grpc

    async def ok(request: bytes, ctx: Any) -> bytes:
        assert trace.get_current_span().is_recording()
        return b"fine"

    async def failing(request: bytes, ctx: Any) -> bytes:
        ctx._code = grpc.StatusCode.NOT_FOUND
        raise RuntimeError("aborted")

    ctx = FakeServicerContext((("traceparent", TRACEPARENT), ("x-request-id", "r9")))
    assert await tracing_servers.grpc_method(ok, "svc/Ok", respond=True)(b"", ctx) == b"fine"
    (span,) = spans.get_finished_spans()
    assert hex_ids(span) == (TRACE, PARENT)
    assert child_of(dict(ctx.initial), span)
    assert span.attributes is not None and span.attributes["anyserve.request_id"] == "r9"
    assert span.attributes["rpc.grpc.status_code"] == 0

    quiet = FakeServicerContext(())
    with pytest.raises(RuntimeError):
        await tracing_servers.grpc_method(failing, "svc/Fail")(b"", quiet)
    assert quiet.initial == ()  # respond not asked for
    failed = named(spans, "svc/Fail")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "no such thing"
    assert failed.attributes is not None and failed.attributes["rpc.grpc.status_code"] == 5


async def test_queue_wait_and_the_worker_call_frame_follow_the_dispatch_span(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.tracer().start_as_current_span("dispatch") as dispatch:
        assert tracing.current_trace_id() == f"{dispatch.get_span_context().trace_id:032x}"
        since = tracing.now()
        metadata = tracing.to_worker({"x-request-id": "r"}, since, "chat", "chat-0")
    assert metadata["x-request-id"] == "r"
    finished = {s.name: s for s in spans.get_finished_spans()}
    queued, parent = finished["queue wait"], finished["dispatch"]
    assert (
        queued.parent is not None and queued.parent.span_id == dispatch.get_span_context().span_id
    )
    assert queued.start_time == since
    assert parent.attributes is not None and parent.attributes["anyserve.worker"] == "chat-0"
    assert child_of(dict(metadata), parent)


async def test_the_worker_handler_span_is_the_parent_of_context_calls(
    spans: InMemorySpanExporter,
) -> None:
    app = AnyServe("a")
    seen: dict[str, Any] = {}

    @app.capability(type="t")
    async def handler(request: Any, ctx: Context) -> dict[str, Any]:
        seen["current"] = trace.get_current_span().get_span_context().span_id
        metadata: dict[str, str] = {"x-capability-type": "other"}
        with tracing.outgoing("call", metadata, ctx.trace_context):
            pass
        seen["sent"] = metadata
        return {}

    traced = tracing_servers.worker_handler(app.handlers[0])
    ctx = context({"traceparent": TRACEPARENT})

    async def emit(value: Any) -> None:
        pass

    await traced.run(None, ctx, emit)
    span = named(spans, "handler handler")
    call = named(spans, "call type=other")
    assert hex_ids(span) == (TRACE, PARENT) and ctx.trace_id == TRACE
    assert span.context is not None and seen["current"] == span.context.span_id
    assert call.kind is SpanKind.CLIENT and hex_ids(call) == (TRACE, f"{span.context.span_id:016x}")
    assert child_of(seen["sent"], call)


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def known(self) -> bool:
        return True

    async def unary(self, payload: bytes, metadata: dict[str, str], timeout: float | None) -> bytes:
        self.sent.append(dict(metadata))
        raise NotFound("nobody else")


async def test_a_delegation_hop_is_a_failed_child_span_of_the_dispatch(
    spans: InMemorySpanExporter,
) -> None:
    channel = FakeChannel()
    delegator = ApiDelegator("rep-a", channel)  # type: ignore[arg-type]
    dispatching = tracing.tracer().start_as_current_span("dispatch")
    with dispatching as dispatch, pytest.raises(NotFound):
        await delegator.unary(b"", {"x-capability-type": "t"}, 1.0)
    hop = named(spans, "delegate type=t")
    assert hop.parent is not None and hop.parent.span_id == dispatch.get_span_context().span_id
    assert hop.status.status_code is StatusCode.ERROR
    (sent,) = channel.sent
    assert child_of(sent, hop) and sent["x-delegated-from"] == "rep-a"


async def test_the_sdk_flush_runs_off_the_loop(spans: InMemorySpanExporter) -> None:
    # Nothing to export here; it must simply return (with a real provider it
    # exports what is batched).
    with anyio.fail_after(5):
        await tracing.aflush()


async def test_each_request_of_a_batch_gets_a_span_of_its_own_trace(
    spans: InMemorySpanExporter,
) -> None:
    app = AnyServe("a")

    @app.capability(type="t", max_batch_size=4)
    async def batched(requests: list[Any], contexts: list[Context]) -> list[dict[str, Any]]:
        return [{"trace": c.trace_id} for c in contexts]

    traced = tracing_servers.worker_handler(app.handlers[0])
    assert traced.run_batch is not None
    other = "0af7651916cd43dd8448eb211c80319c"
    contexts = [
        context({"traceparent": TRACEPARENT}),
        context({"traceparent": f"00-{other}-{PARENT}-01"}),
    ]
    answers = await traced.run_batch([None, None], contexts)
    assert [a["trace"] for a in answers] == [TRACE, other]
    finished = spans.get_finished_spans()
    assert sorted(hex_ids(s) for s in finished) == sorted([(TRACE, PARENT), (other, PARENT)])
