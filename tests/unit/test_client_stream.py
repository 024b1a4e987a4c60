"""anyserve.Client.stream reads protobuf SSE: base64 ModelInferResponse events."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from anyserve import codec
from anyserve.client import Client
from anyserve.errors import HandlerError, InvalidArgument, NotFound, Unavailable
from anyserve.proto import ModelInferRequest, ModelInferResponse

pytestmark = pytest.mark.anyio


def event(response: ModelInferResponse) -> str:
    return f"data: {base64.b64encode(response.SerializeToString()).decode()}\n\n"


DONE = "event: done\ndata: [DONE]\n\n"


def client_answering(body: str, seen: list[httpx.Request]) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = Client("http://api.test", timeout=5)
    client._http = httpx.AsyncClient(  # the transport is the only thing replaced
        base_url="http://api.test", transport=httpx.MockTransport(answer)
    )
    return client


async def test_stream_decodes_base64_protobuf_events() -> None:
    request = ModelInferRequest(id="c1")
    chunks = [codec.to_infer_response({"text_output": t}, request) for t in ("a", "b")]
    seen: list[httpx.Request] = []
    async with client_answering(
        event(chunks[0]) + ": ping\n\n" + event(chunks[1]) + DONE, seen
    ) as c:
        got = [r async for r in c.stream({"type": "chat"}, {"text": "hi"})]
    assert got == chunks
    assert seen[0].headers["content-type"] == "application/x-protobuf"
    assert seen[0].headers["x-capability-type"] == "chat"
    sent = ModelInferRequest.FromString(seen[0].content)
    assert codec.decode_inputs(sent) == {"text": b"hi"}


async def test_stream_errors() -> None:
    ok = event(codec.to_infer_response("a", ModelInferRequest()))
    error = {"error": "no such thing", "type": "not_found", "code": "NOT_FOUND"}
    cases: list[tuple[str, type[Exception], str]] = [
        (ok + f"event: error\ndata: {json.dumps(error)}\n\n", NotFound, "no such thing"),
        ("data: {not protobuf}\n\n", HandlerError, "malformed stream event"),
        (ok, Unavailable, "stream ended without end marker"),
    ]
    for body, error_class, message in cases:
        seen: list[httpx.Request] = []
        async with client_answering(body, seen) as c:
            with pytest.raises(error_class, match=message):
                async for _ in c.stream({"type": "chat"}):
                    pass


async def test_inputs_that_cannot_be_encoded_name_the_input() -> None:
    async with Client("http://api.test") as c:
        with pytest.raises(
            InvalidArgument, match=r"^input 'x': cannot encode a value of type dict"
        ):
            async for _ in c.stream({"type": "chat"}, {"x": {1: 2}}):
                pass
