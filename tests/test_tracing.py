"""OpenTelemetry traces across every process, end to end.

A test OTLP receiver (an HTTP server accepting ``POST /v1/traces`` with a
protobuf ``ExportTraceServiceRequest``, what the SDK's OTLP/HTTP exporter
sends) records the spans of a real API server, two real replicas and their
worker processes, all started with the standard ``OTEL_*`` variables. One
request carrying a client's ``traceparent`` goes client -> API server ->
replica A -> its worker -> ``context.call`` -> API server -> replica B -> its
worker, and must come back as one trace whose spans all link up to the
client's span. Exporters batch, so spans are polled for with a deadline.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import anyio.abc
import grpc.aio
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from anyserve import codec, rpc
from anyserve.proto import ModelInferRequest, ModelInferResponse
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.tracing_app"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class SpanRecord:
    service: str
    pid: int
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


class Receiver:
    """An OTLP/HTTP traces receiver on 127.0.0.1 (a thread), recording every span."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver.record(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def record(self, request: ExportTraceServiceRequest) -> None:
        found: list[SpanRecord] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        SpanRecord(
                            service=str(resource.get("service.name")),
                            pid=int(str(resource.get("process.pid", 0))),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(found)

    def of_trace(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join()


@asynccontextmanager
async def process(env: dict[str, str], *args: str) -> AsyncIterator[anyio.abc.Process]:
    """``anyserve ARGS`` with ``env``; interrupted (Ctrl-C) when the block exits."""
    proc = await anyio.open_process(
        [sys.executable, "-m", "anyserve.cli", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # a graceful stop
            with anyio.move_on_after(10):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def traced_cluster(receiver: Receiver) -> AsyncIterator[str]:
    """API server and two replicas (``front``, ``back``) as separate processes
    exporting to ``receiver``; yields the API server's URL once both serve."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as stack:
        api = ["api-server", "--port", str(port), "--grpc-port", "0", "--grace", "1"]
        await stack.enter_async_context(process(env, *api))
        for name in ("front", "back"):
            start = ["start", "--app", f"{APP}:{name}", "--port", "0", "--grace", "1"]
            await stack.enter_async_context(
                process(env, *start, "--api-server", url, "--replica-id", name)
            )

        async with httpx.AsyncClient(base_url=url, timeout=5) as http:

            async def serving() -> bool:
                try:
                    listed = (await http.get("/registry")).json()
                except httpx.HTTPError:
                    return False
                replicas = listed.get("replicas", []) if isinstance(listed, dict) else listed
                return len(replicas) == 2

            await eventually(serving, timeout=30, interval=0.1, what="both replicas registered")
        yield url


def text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list | tuple):
        return text(value[0])
    if hasattr(value, "tolist"):
        return text(value.tolist())
    return str(value)


async def test_one_request_is_one_trace_across_every_process() -> None:
    with receiving() as receiver:
        async with traced_cluster(receiver) as url:
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                response = await http.post(
                    "/infer",
                    headers={"X-Capability-Type": "front", "traceparent": traceparent},
                    json={"inputs": []},
                )
            assert response.status_code == 200, response.text
            answered = response.headers["traceparent"].split("-")
            assert answered[1] == CLIENT_TRACE and answered[2] != CLIENT_SPAN
            outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
            # context.trace_id in both handlers (one async, one sync) is the client's.
            assert text(outputs["front_trace"]) == CLIENT_TRACE
            assert text(outputs["back_trace"]) == CLIENT_TRACE

            def complete() -> bool:
                # Each process exports on its own schedule: wait until both
                # handlers' spans are in and every span's parent has arrived.
                spans = receiver.of_trace(CLIENT_TRACE)
                handlers = {s.name for s in spans if s.name.startswith("handler ")}
                known = {s.span_id for s in spans} | {CLIENT_SPAN}
                return len(handlers) == 2 and all(s.parent_id in known for s in spans)

            await eventually(complete, timeout=10, what="the request's spans exported")
            spans = receiver.of_trace(CLIENT_TRACE)

            # The gRPC entry continues a traceparent and answers with its span's too.
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                endpoint = (await http.get("/health")).json()["grpc_endpoint"]
            other = "0af7651916cd43dd8448eb211c80319c"
            async with grpc.aio.insecure_channel(endpoint) as channel:
                call = channel.unary_unary(rpc.MODEL_INFER)(
                    ModelInferRequest(id="g").SerializeToString(),
                    metadata=(
                        ("x-capability-type", "back"),
                        ("traceparent", f"00-{other}-{CLIENT_SPAN}-01"),
                    ),
                    timeout=10,
                )
                answer = ModelInferResponse.FromString(await call)
                initial = dict(await call.initial_metadata())
            assert text(codec.decode_outputs(answer)["back_trace"]) == other
            assert initial["traceparent"].split("-")[1] == other
        by_id = {s.span_id: s for s in spans}
        roots = [s for s in spans if s.parent_id == CLIENT_SPAN]
        assert [r.service for r in roots] == ["anyserve-api-server"], roots
        assert roots[0].name == "POST /infer"
        assert roots[0].attributes["anyserve.replica"] == "front"
        assert roots[0].attributes["anyserve.capability"] == "type=front"
        assert roots[0].attributes["http.response.status_code"] == 200
        for span in spans:
            if span is not roots[0]:
                assert span.parent_id in by_id, f"{span.name}: parent not in the trace"

        def parent(span: SpanRecord) -> SpanRecord:
            return by_id[span.parent_id]

        (front,) = [s for s in spans if s.name == "handler front_handler"]
        (back,) = [s for s in spans if s.name == "handler back_handler"]
        assert front.service == back.service == "anyserve-worker"
        # worker B <- replica B's dispatch <- the API server's gRPC span <- the call
        # span in worker A <- worker A's handler span <- replica A's dispatch <- root.
        dispatch_b = parent(back)
        assert dispatch_b.name == "dispatch ModelInfer"
        assert dispatch_b.service == "anyserve-replica"
        assert dispatch_b.attributes["anyserve.handler"] == "back_handler"
        entry = parent(dispatch_b)
        assert entry.name == "inference.GRPCInferenceService/ModelInfer"
        assert entry.service == "anyserve-api-server"
        assert entry.attributes["anyserve.replica"] == "back"
        call = parent(entry)
        assert call.name == "call type=back" and call.pid == front.pid
        assert parent(call) is front
        dispatch_a = parent(front)
        assert dispatch_a.name == "dispatch ModelInfer" and parent(dispatch_a) is roots[0]
        assert dispatch_a.pid != dispatch_b.pid
        queued = [s for s in spans if s.name == "queue wait"]
        assert {parent(q).span_id for q in queued} == {dispatch_a.span_id, dispatch_b.span_id}
        # Spans from every process: the API server, both replicas, both workers.
        assert len({(s.service, s.pid) for s in spans}) == 5
