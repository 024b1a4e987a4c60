"""The OpenAI endpoints of the API server against a fake router (no sockets to
replicas, no processes): error bodies, SSE framing through the shared relay,
joined answers, embeddings and the model list."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest

from anyserve import codec, errors
from anyserve.api_server.app import build_app
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.openai import list_models, openai_error
from anyserve.api_server.registry import Registry
from anyserve.api_server.router import Router
from anyserve.api_server.state import ApiState
from anyserve.capability import Capability
from anyserve.codec.openai import field_error
from anyserve.errors import (
    AnyServeError,
    DeadlineExceeded,
    HandlerError,
    InvalidArgument,
    LoopDetected,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
)
from anyserve.proto import ModelInferRequest, ModelStreamInferResponse
from tests.support import parse_sse

pytestmark = pytest.mark.anyio

Batch = list[bytes] | AnyServeError


def chunk(result: Any) -> bytes:
    response = codec.to_infer_response(result, ModelInferRequest(id="r1"))
    return ModelStreamInferResponse(infer_response=response).SerializeToString()


class FakeStream:
    def __init__(self, batches: Sequence[Batch]) -> None:
        self._batches = list(batches)

    async def read_batch(self) -> list[bytes] | None:
        if not self._batches:
            return None
        batch = self._batches.pop(0)
        if isinstance(batch, AnyServeError):
            raise batch
        return batch


class FakeRouter:
    """Answers streams from ``batches`` and unary calls with ``unary_answer``."""

    def __init__(self, batches: Sequence[Batch] = (), unary_answer: bytes = b"") -> None:
        self.batches = batches
        self.unary_answer = unary_answer
        self.sent: list[tuple[bytes, RequestMeta]] = []

    @asynccontextmanager
    async def stream(
        self, body: bytes, meta: RequestMeta, *, batched: bool = False
    ) -> AsyncIterator[FakeStream]:
        self.sent.append((body, meta))
        yield FakeStream(self.batches)

    async def unary(self, path: str, body: bytes, meta: RequestMeta) -> bytes:
        self.sent.append((body, meta))
        if not self.unary_answer:
            raise RuntimeError("a bug")
        return self.unary_answer


@asynccontextmanager
async def api(router: FakeRouter) -> AsyncIterator[httpx.AsyncClient]:
    state = ApiState(ApiServerConfig(port=0, grpc_port=0, token=None))
    state.router = cast(Router, router)
    transport = httpx.ASGITransport(build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (InvalidArgument("bad"), 400, "invalid_request_error"),
        (Unauthenticated("who"), 401, "authentication_error"),
        (NotFound("none"), 404, "invalid_request_error"),
        (PayloadTooLarge("big"), 413, "invalid_request_error"),
        (Overloaded("busy", retry_after=2.5), 429, "rate_limit_error"),
        (HandlerError("boom"), 500, "server_error"),
        (AnyServeError("odd"), 500, "server_error"),
        (Unavailable("gone"), 503, "server_error"),
        (DeadlineExceeded("late"), 504, "server_error"),
        (LoopDetected("round"), 508, "server_error"),
    ],
)
def test_openai_error_follows_the_error_table(exc: AnyServeError, status: int, kind: str) -> None:
    found, body, headers = openai_error(exc)
    assert found == status == exc.http_status
    assert body == {
        "error": {"message": exc.message, "type": kind, "param": None, "code": exc.error_type}
    }
    assert ("Retry-After" in headers) == isinstance(exc, Overloaded)
    no_retry = isinstance(exc, HandlerError | LoopDetected)
    assert (headers.get("x-should-retry") == "false") == no_retry


def test_a_bad_field_is_the_param() -> None:
    status, body, _ = openai_error(field_error("messages[0].role", "no role"))
    assert status == 400 and body["error"]["param"] == "messages[0].role"


# --------------------------------------------------------------------------- streams


async def test_a_stream_is_openai_sse_ending_with_done() -> None:
    router = FakeRouter([[chunk("a"), chunk("b")], [chunk({"text_output": "c"})]])
    async with api(router) as http:
        response = await http.post("/v1/chat/completions", json=STREAM)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    events = parse_sse(response.text)
    assert all(name == "message" for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["a", "b", "c", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # Routed by the body's model, with the messages as the handler's input.
    body, meta = router.sent[0]
    assert meta.model_name == "echo" and meta.query == {}
    sent = ModelInferRequest.FromString(body)
    assert sent.model_name == "echo" and sent.parameters["stream"].bool_param


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        ([errors.to_stream_error(HandlerError("boom"))], "handler_error"),  # in-band
        (Unavailable("replica died"), "unavailable"),  # the call's status
    ],
)
async def test_an_error_midway_is_an_error_event_without_done(failure: Batch, code: str) -> None:
    async with api(FakeRouter([[chunk("a")], failure])) as http:
        response = await http.post(
            "/v1/completions", json={"model": "c", "prompt": "x", "stream": True}
        )
    events = parse_sse(response.text)
    assert json.loads(events[0][1])["choices"][0]["text"] == "a"
    error = json.loads(events[-1][1])["error"]
    assert error["code"] == code and error["type"] == "server_error"
    assert all(data != "[DONE]" for _, data in events)


async def test_an_error_before_the_stream_is_an_http_error() -> None:
    async with api(FakeRouter([Overloaded("busy", retry_after=2)])) as http:
        response = await http.post("/v1/chat/completions", json=STREAM)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_headers_win_over_the_model() -> None:
    router = FakeRouter([[chunk("a")]])
    async with api(router) as http:
        await http.post("/v1/chat/completions", json=CHAT, headers={"X-Capability-Type": "chat"})
    assert router.sent[0][1].query == {"type": "chat"}


# --------------------------------------------------------------------------- unstreamed


async def test_an_unstreamed_request_joins_the_stream() -> None:
    batches: list[Batch] = [[chunk("Hel")], [chunk({"text_output": "lo", "completion_tokens": 2})]]
    router = FakeRouter(batches)
    async with api(router) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    doc = response.json()
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert doc["usage"]["completion_tokens"] == 2
    assert "stream" not in ModelInferRequest.FromString(router.sent[0][0]).parameters


async def test_an_unstreamed_failure_is_the_error_status() -> None:
    batches: list[Batch] = [[chunk("a"), errors.to_stream_error(DeadlineExceeded("late"))]]
    async with api(FakeRouter(batches)) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"


async def test_malformed_bodies_get_openai_errors() -> None:
    async with api(FakeRouter()) as http:
        response = await http.post("/v1/embeddings", json={"model": "e", "input": 5})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "input"
        response = await http.post("/v1/chat/completions", content=b"[]")
        assert response.status_code == 400
        assert response.json()["error"]["param"] is None


async def test_embeddings_are_one_unary_call() -> None:
    request = ModelInferRequest()
    answer = codec.to_infer_response({"embedding": [0.5, 0.25]}, request).SerializeToString()
    router = FakeRouter(unary_answer=answer)
    async with api(router) as http:
        response = await http.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert response.json()["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}
    ]
    assert codec.decode_inputs(ModelInferRequest.FromString(router.sent[0][0])) == {
        "text_input": b"x"
    }


async def test_a_crash_is_an_openai_500() -> None:
    async with api(FakeRouter()) as http:
        response = await http.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error: RuntimeError: a bug"


# --------------------------------------------------------------------------- models


def test_models_list_capabilities_with_a_model_key() -> None:
    registry = Registry(ttl=60)
    chat = Capability(type="chat", model="m1")
    registry.upsert("a", "h:1", [chat, Capability(type="embed")])
    registry.upsert("b", "h:2", [Capability(type="completion", model="m1")], [chat])
    registry.upsert("c", "h:3", [], [Capability(type="embed", model="e1", gpu="1")])
    found = {entry["id"]: entry for entry in list_models(registry)}
    assert list(found) == ["e1", "m1"]
    assert found["m1"]["endpoints"] == ["chat.completions", "completions"]
    assert found["m1"]["capabilities"] == [chat.to_dict(), {"type": "completion", "model": "m1"}]
    assert found["m1"]["loaded"] is True and found["e1"]["loaded"] is False
    assert found["e1"]["endpoints"] == ["embeddings"]
    assert {found["e1"]["object"], found["e1"]["owned_by"]} == {"model", "anyserve"}


async def test_models_endpoints() -> None:
    async with api(FakeRouter()) as http:
        listed = await http.get("/v1/models")
        assert listed.json() == {"object": "list", "data": []}
        missing = await http.get("/v1/models/org/some-model")
        assert missing.status_code == 404
        assert "'org/some-model'" in missing.json()["error"]["message"]
