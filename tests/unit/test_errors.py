"""One conversion table: every anyserve error through every form it travels in.

Each class goes through a real grpc.aio call (status + trailers), the API
server's HTTP error answer (status + JSON body, read back by the client's
rule), an in-band stream error, a worker frame and an SSE error event, and
must come back as the same class with the same message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from anyserve import errors
from anyserve._proto import worker_pb2 as wpb
from anyserve.api_server.responses import error_response
from anyserve.api_server.sse import error_event
from anyserve.errors import AnyServeError, Overloaded, Unavailable
from anyserve.proto import ModelStreamInferResponse

pytestmark = pytest.mark.anyio


def every_subclass() -> list[type[AnyServeError]]:
    found: list[type[AnyServeError]] = [AnyServeError]
    for cls in found:
        found.extend(c for c in cls.__subclasses__() if c not in found)
    return found


def all_classes() -> list[type[AnyServeError]]:
    """The classes of the protocol: those errors.py defines."""
    return [c for c in every_subclass() if c.__module__ == "anyserve.errors"]


def sample(cls: type[AnyServeError]) -> AnyServeError:
    if cls is Overloaded:
        return Overloaded("queue full: 32 calls waiting", retry_after=7.0)
    if cls is Unavailable:
        return Unavailable("handler chat is down: crash loop", retry_after=30.0)
    return cls(f"{cls.__name__} happened: détails ünicode")


CLASSES = all_classes()
EXPECTED = {
    # class name: (HTTP status, gRPC code)
    "AnyServeError": (500, grpc.StatusCode.INTERNAL),
    "InvalidArgument": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "NotFound": (404, grpc.StatusCode.NOT_FOUND),
    "LoopDetected": (508, grpc.StatusCode.NOT_FOUND),
    "PayloadTooLarge": (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "Overloaded": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "Unavailable": (503, grpc.StatusCode.UNAVAILABLE),
    "DeadlineExceeded": (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    "Unauthenticated": (401, grpc.StatusCode.UNAUTHENTICATED),
    "PermissionDenied": (403, grpc.StatusCode.PERMISSION_DENIED),
    "HandlerError": (500, grpc.StatusCode.INTERNAL),
}


def same(a: AnyServeError, b: AnyServeError) -> None:
    assert type(b) is type(a), f"{type(a).__name__} came back as {type(b).__name__}"
    assert b.message == a.message
    assert b.retry_after == a.retry_after


def test_subclasses_elsewhere_travel_as_their_protocol_class() -> None:
    # A module may refine an error for its own use (a private marker, a field
    # name); across a hop it is its errors.py ancestor, so it defines no type.
    for cls in every_subclass():
        if cls.__module__ != "anyserve.errors":
            assert "error_type" not in vars(cls), cls
            assert cls.error_type in errors.ERROR_TYPES


def test_the_table_covers_every_class_once() -> None:
    assert {cls.__name__ for cls in CLASSES} == set(EXPECTED)
    assert set(errors.ERROR_TYPES.values()) == set(CLASSES)
    for cls in CLASSES:
        assert (cls.http_status, cls.grpc_code) == EXPECTED[cls.__name__]


class _Raiser:
    """A servicer whose one method raises the error named by the request."""

    def __init__(self) -> None:
        self.to_raise: AnyServeError = AnyServeError("unset")

    @errors.grpc_method
    async def call(self, request: bytes, context: Any) -> bytes:
        raise self.to_raise


@pytest.fixture
async def grpc_raiser() -> AsyncIterator[tuple[_Raiser, grpc.aio.Channel]]:
    raiser = _Raiser()
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(raiser.call)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"C": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield raiser, channel
    finally:
        await channel.close()
        await server.stop(None)


async def through_grpc(
    exc: AnyServeError, raiser: _Raiser, channel: grpc.aio.Channel
) -> AnyServeError:
    raiser.to_raise = exc
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary("/t.T/C")(b"", timeout=5)
    assert caught.value.code() == exc.grpc_code
    assert caught.value.details() == exc.message
    return errors.from_rpc_error(caught.value)


async def through_http(exc: AnyServeError) -> AnyServeError:
    async def endpoint(request: Request) -> Response:
        return error_response(exc, "req-1")

    app = Starlette(routes=[Route("/", endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as http:
        response = await http.get("/")
    assert response.status_code == exc.http_status
    assert response.json()["error"] == exc.message
    assert response.headers["x-request-id"] == "req-1"
    if exc.retry_after is not None:
        assert response.headers["retry-after"] == str(int(exc.retry_after))
    else:
        assert "retry-after" not in response.headers
    return errors.from_http(
        response.status_code, response.content, response.headers.get("retry-after")
    )


def through_stream(exc: AnyServeError) -> AnyServeError:
    raw = errors.to_stream_error(exc, "req-1", "model-x")
    message = ModelStreamInferResponse.FromString(raw)
    assert message.error_message == exc.message
    assert message.infer_response.id == "req-1"
    found = errors.from_stream_response(message)
    assert found is not None
    return found


def through_frame(exc: AnyServeError) -> AnyServeError:
    header = wpb.Header(call_id=3, error=errors.to_frame(exc))
    return errors.from_frame(wpb.Header.FromString(header.SerializeToString()).error)


def through_sse(exc: AnyServeError) -> AnyServeError:
    event = error_event(exc).decode()
    lines = event.strip().split("\n")
    assert lines[0] == "event: error"
    data = "\n".join(line.removeprefix("data: ") for line in lines[1:])
    return errors.from_error_body(json.loads(data))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
async def test_every_conversion_keeps_class_and_message(
    cls: type[AnyServeError], grpc_raiser: tuple[_Raiser, grpc.aio.Channel]
) -> None:
    original = sample(cls)
    raiser, channel = grpc_raiser
    # Each conversion on its own...
    same(original, await through_grpc(original, raiser, channel))
    same(original, await through_http(original))
    steps: list[Callable[[AnyServeError], AnyServeError]] = [
        through_stream,
        through_frame,
        through_sse,
    ]
    for step in steps:
        same(original, step(original))
    # ...and chained, as an error crosses worker -> replica -> API server -> client.
    hop = through_frame(original)
    hop = await through_grpc(hop, raiser, channel)
    hop = through_stream(hop)
    hop = await through_grpc(hop, raiser, channel)
    hop = await through_http(hop)
    hop = through_sse(hop)
    same(original, hop)


TOO_BIG = "Received message larger than max (9 vs. 4)"


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "no such model", errors.NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_BIG, errors.PayloadTooLarge),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy", errors.Overloaded),
        (grpc.StatusCode.CANCELLED, "peer went away", errors.Unavailable),
        (grpc.StatusCode.UNIMPLEMENTED, "no such method", errors.AnyServeError),
    ],
)
def test_a_peer_that_is_not_anyserve_is_classified_by_its_status(
    code: grpc.StatusCode, details: str, expected: type[AnyServeError]
) -> None:
    found = errors.from_grpc(code, details)
    assert type(found) is expected and found.message.endswith(details)


def test_http_answers_without_a_type_fall_back_to_the_status() -> None:
    assert type(errors.from_http(404, b"Not Found")) is errors.NotFound
    assert type(errors.from_http(508, b'{"error": "x"}')) is errors.LoopDetected
    busy = errors.from_http(429, b'{"error": "busy"}', "3")
    assert isinstance(busy, Overloaded) and busy.retry_after == 3.0
    assert type(errors.from_http(418, b"teapot")) is errors.AnyServeError


def test_a_foreign_in_band_stream_error_is_a_handler_error() -> None:
    message = ModelStreamInferResponse(error_message="model failed")
    found = errors.from_stream_response(message)
    assert type(found) is errors.HandlerError and found.message == "model failed"
    assert errors.from_stream_response(ModelStreamInferResponse()) is None
