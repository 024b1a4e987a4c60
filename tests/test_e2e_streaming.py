"""Streaming end to end: SSE from the API server and gRPC streams through a
replica, with real worker processes behind them.

Tokens arrive in order and end with ``done``; events are not buffered (a test
sees the first one while the handler still waits); an error midway is an
``error`` event; closing the SSE connection stops the handler; a delegated
stream is incremental too. The clusters (``randomly``, ``bench``) are the
session's, from tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import grpc.aio
import httpx
import pytest

from anyserve import codec
from anyserve.cluster import Cluster
from anyserve.proto import ModelInferRequest
from anyserve.testing import GrpcClient
from tests.api_calls import (
    CHAT,
    EMPTY,
    outputs,
    pb_served_by,
    served_by,
    stream_events,
    text_body,
    tokens,
)
from tests.support import eventually, sse_events

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bench_http(bench: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=bench.url, timeout=30) as client:
        yield client


# --------------------------------------------------------------------------- seed scenario 4


async def test_unary_request_to_a_stream_only_capability_is_told_the_endpoint(
    randomly: Cluster,
) -> None:
    # Only a streaming handler serves type=chat here: a 400 naming the streaming
    # endpoint, not a delegation loop (508) or a 404.
    async with httpx.AsyncClient(base_url=randomly.url, timeout=30) as http:
        response = await http.post("/infer", headers=CHAT, json=EMPTY)
        assert response.status_code == 400, response.text
        assert "/infer/stream" in response.json()["error"]
        assert response.json()["type"] == "invalid_argument"
        generate = await http.post("/v2/models/chat/generate", json={})
        assert generate.status_code == 400, generate.text
    async with GrpcClient(randomly.api.grpc_endpoint) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.infer(ModelInferRequest(), capability={"type": "chat"})
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ModelStreamInfer" in (caught.value.details() or "")


async def test_stream_app_tokens_in_order_then_done(randomly: Cluster) -> None:
    async with (
        httpx.AsyncClient(base_url=randomly.url, timeout=30) as http,
        http.stream(
            "POST", "/infer/stream", headers=CHAT, json={"model_name": "chat", "inputs": []}
        ) as response,
    ):
        assert response.status_code == 200
        events = [item async for item in sse_events(response)]  # read as they arrive
    assert served_by(json.loads(events[0][1])) == "stream_app"  # named on the first chunk
    assert tokens(events) == ["Hello", " ", "world", "!"]
    finish = [outputs(json.loads(d))["finish_reason"] for e, d in events if e == "message"]
    assert finish == ["", "", "", "stop"]
    assert events[-1] == ("done", "[DONE]")
    assert [e for e, _ in events] == ["message"] * 4 + ["done"]


async def test_generate_stream_flat_events(randomly: Cluster) -> None:
    async with httpx.AsyncClient(base_url=randomly.url, timeout=30) as http:
        events = await stream_events(
            http, "/v2/models/tiny/generate_stream", {}, {"text_input": "one two three"}
        )
    assert events[-1] == ("done", "[DONE]")
    flat = [json.loads(data) for event, data in events if event == "message"]
    assert [e["text_output"] for e in flat] == ["one ", "two ", "three "]
    assert [e["finish_reason"] for e in flat] == ["", "", "stop"]
    assert "outputs" not in flat[0]  # Triton's flat form, not KServe tensors


# --------------------------------------------------------------------------- incremental, errors


async def test_sse_is_incremental(bench_http: httpx.AsyncClient, tmp_path: Path) -> None:
    http = bench_http
    # The handler yields "first", then waits for the gate file: the first
    # event can only be seen before the gate exists if nothing buffers it.
    gate = tmp_path / "gate"
    headers = {"X-Capability-Type": "gen", "X-Capability-Form": "gated"}
    with anyio.fail_after(15):
        async with http.stream(
            "POST", "/infer/stream", headers=headers, json=text_body("text_input", str(gate))
        ) as response:
            assert response.status_code == 200
            events = sse_events(response)
            first = await anext(events)
            assert not gate.exists()
            assert tokens([first]) == ["first"]
            gate.write_text("open")
            rest = [item async for item in events]
    assert tokens(rest) == ["second"] and rest[-1] == ("done", "[DONE]")


async def test_stream_error_midway_is_an_error_event(bench_http: httpx.AsyncClient) -> None:
    http = bench_http
    fail = {"X-Capability-Type": "fail"}
    events = await stream_events(http, "/infer/stream", fail, EMPTY)
    assert [e for e, _ in events] == ["message", "message", "error"]
    assert tokens(events) == ["one", "two"]
    error = json.loads(events[-1][1])
    assert "stream broke after two tokens" in error["error"]
    assert all(e != "done" and d != "[DONE]" for e, d in events)

    events = await stream_events(http, "/v2/models/fail/generate_stream", {}, {})
    assert [json.loads(d)["text_output"] for e, d in events if e == "message"] == ["one", "two"]
    assert events[-1][0] == "error" and "stream broke" in json.loads(events[-1][1])["error"]
    assert all(e != "done" for e, _ in events)


# --------------------------------------------------------------------------- SSE disconnect


@pytest.mark.parametrize("form", ["async", "sync"])
async def test_closing_sse_stops_the_handler(
    bench_http: httpx.AsyncClient, tmp_path: Path, form: str
) -> None:
    http = bench_http
    marker = tmp_path / f"ticker-{form}"
    stopped = marker.with_suffix(".stopped")
    headers = {"X-Capability-Type": "ticker", "X-Capability-Form": form}
    with anyio.fail_after(15):
        async with http.stream(
            "POST", "/infer/stream", headers=headers, json=text_body("text_input", str(marker))
        ) as response:
            assert response.status_code == 200
            events = sse_events(response)
            assert tokens([await anext(events), await anext(events)]) == ["0", "1"]
            await events.aclose()
        # Leaving the block closed the connection after two events.
    await eventually(stopped.exists, timeout=1.0)
    assert stopped.read_text() == form


@pytest.mark.parametrize("kind", ["hang", "hang_sync"])
async def test_a_client_leaving_a_unary_request_cancels_its_handler(
    bench: Cluster, tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / kind
    stopped = marker.with_suffix(".stopped")
    headers = {"X-Capability-Type": kind}
    body = text_body("text_input", str(marker))
    async with (
        httpx.AsyncClient(base_url=bench.url, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: http.post("/infer", headers=headers, json=body))
        await eventually(marker.exists, timeout=10)  # the handler runs
        tg.cancel_scope.cancel()  # the client gives up: its connection closes
    started = anyio.current_time()
    await eventually(stopped.exists, timeout=1.0)
    assert anyio.current_time() - started <= 1.0
    assert stopped.read_text() == "cancelled"


# --------------------------------------------------------------------------- delegated stream


async def test_delegated_stream_is_incremental(bench: Cluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    request = ModelInferRequest(id="ds-1", inputs=[codec.encode_input("text_input", str(gate))])
    async with GrpcClient(bench.replica("chat_app").endpoint) as client:
        call = client.stream(request, capability={"type": "gen", "form": "gated"})
        with anyio.fail_after(15):
            first = await call.read()
            # The handler cannot have finished: it waits for the gate.
            assert not gate.exists()
            assert not first.error_message
            assert codec.decode_outputs(first.infer_response)["text_output"] == b"first"
            assert pb_served_by(first.infer_response) == "forms_app"
            gate.write_text("open")
            rest = []
            while (message := await call.read()) is not grpc.aio.EOF:
                rest.append(message)
    assert [codec.decode_outputs(m.infer_response)["text_output"] for m in rest] == [b"second"]
    assert await call.code() == grpc.StatusCode.OK
