"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models``.

Bodies are converted at this edge (:mod:`anyserve.codec.openai` in,
:mod:`anyserve.codec.openai_responses` out) and routed like the KServe v2
endpoints: the body's ``model`` addresses a capability by its ``model`` key
(else its ``type``), and ``X-Capability-*`` headers win when present.

Chat and text completions always travel on the replica's streaming RPC: a
streamed request (``stream: true``) is relayed as OpenAI's SSE chunks by the
shared relay (:class:`~anyserve.api_server.sse.StreamRelay` with
:class:`OpenAIFraming`: ``data: {chunk}`` events, ``data: [DONE]``, errors as
``data: {"error": {...}}``); an unstreamed one is every response joined into
one answer. So one handler, streaming or not, serves both (a replica serves
a unary handler on its streaming RPC as a one-response stream). Embeddings are
one unary call.

Every error is OpenAI's body ``{"error": {"message", "type", "param",
"code"}}`` with the status of anyserve's error table (:func:`openai_error`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anyserve import rpc
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry
from anyserve.api_server.responses import (
    json_response,
    read_body,
    replica_message,
    request_meta,
    unless_disconnected,
)
from anyserve.api_server.sse import Framing, StreamRelay, data_event
from anyserve.api_server.state import ApiState
from anyserve.codec.json_tensors import encode_json
from anyserve.codec.openai import (
    OpenAIRequest,
    chat_request,
    completion_request,
    embedding_request,
    error_param,
)
from anyserve.codec.openai_responses import Chunks, Completion, Kind, embedding_document
from anyserve.errors import (
    AnyServeError,
    HandlerError,
    LoopDetected,
    NotFound,
    from_stream_response,
    to_http,
)
from anyserve.proto import ModelInferResponse, ModelStreamInferResponse

__all__ = [
    "OpenAIFraming",
    "chat_completions",
    "completions",
    "embeddings",
    "list_models",
    "model",
    "models",
    "openai_error",
]

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
#: Capability ``type`` -> the endpoint a model of that type answers (``/v1/models``).
ENDPOINTS = {
    "chat": "chat.completions",
    "completion": "completions",
    "embed": "embeddings",
    "embedding": "embeddings",
}

Endpoint = Callable[[ApiState, Request], Awaitable[Response]]


# --------------------------------------------------------------------------- errors


def openai_error(exc: AnyServeError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` of the OpenAI-style answer for ``exc``.

    The status (and ``Retry-After`` for 429) are anyserve's
    (:func:`anyserve.errors.to_http`); ``type`` is ``invalid_request_error``
    for 4xx (``authentication_error`` for 401, ``rate_limit_error`` for 429)
    and ``server_error`` for 5xx; ``code`` is anyserve's error type
    (``not_found``, ``overloaded``, ...); ``param`` names the bad field of a
    malformed body. A handler that raised (500) or a loop (508) will not
    change on a retry: ``x-should-retry: false`` stops OpenAI's clients from
    sending it again.
    """
    status, _, headers = to_http(exc)
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_error"
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
    if isinstance(exc, HandlerError | LoopDetected):
        headers["x-should-retry"] = "false"
    param = error_param(exc)
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.error_type}}
    return status, body, headers


def _error_response(exc: AnyServeError, request_id: str) -> Response:
    status, body, headers = openai_error(exc)
    if request_id:
        headers["X-Request-Id"] = request_id
    return json_response(body, status, headers)


def _openai_errors(endpoint: Endpoint) -> Endpoint:
    """Answer every error of ``endpoint`` in OpenAI's shape (not anyserve's)."""

    @functools.wraps(endpoint)
    async def call(state: ApiState, request: Request) -> Response:
        try:
            return await endpoint(state, request)
        except AnyServeError as exc:
            return _error_response(exc, getattr(request.state, "request_id", ""))
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.url.path)
            crash = AnyServeError(f"internal error: {type(exc).__name__}: {exc}")
            return _error_response(crash, getattr(request.state, "request_id", ""))

    return call


# --------------------------------------------------------------------------- streams


class OpenAIFraming(Framing):
    """OpenAI's SSE: ``data: {chunk}`` per response, the closing chunks and
    ``data: [DONE]``; an error is ``data: {"error": {...}}`` (what OpenAI's
    clients raise from) and ends the stream without ``[DONE]``."""

    def __init__(self, chunks: Chunks) -> None:
        self.chunks = chunks

    def events(self, response: ModelInferResponse) -> bytes:
        chunk = self.chunks.chunk(response)
        return b"" if chunk is None else _event(chunk)

    def error(self, exc: AnyServeError) -> bytes:
        return _event(openai_error(exc)[1])

    def end(self) -> bytes:
        return b"".join(_event(chunk) for chunk in self.chunks.tail()) + DONE

    def error_response(self, exc: AnyServeError, request_id: str) -> Response:
        return _error_response(exc, request_id)


def _event(doc: dict[str, Any]) -> bytes:
    return data_event(encode_json(doc).encode("ascii"))


# --------------------------------------------------------------------------- endpoints


async def _read(
    state: ApiState, request: Request, parse: Callable[[bytes], OpenAIRequest]
) -> tuple[OpenAIRequest, RequestMeta]:
    """Parse the body and the routing headers; ``model`` names the model."""
    meta = request_meta(request, state.config.request_timeout)
    found = parse(await read_body(request, state.config.max_body))
    meta.model_name = found.model
    return found, meta


async def _complete(
    state: ApiState, request: Request, kind: Kind, parse: Callable[[bytes], OpenAIRequest]
) -> Response:
    found, meta = await _read(state, request, parse)
    payload = found.request.SerializeToString()
    if found.stream:
        chunks = Chunks(kind, found.model, meta.request_id, found.include_usage)
        framing = OpenAIFraming(chunks)
        return StreamRelay(
            state.router, payload, meta, framing, state.config.sse_ping, expired=state.expired
        )
    answer = Completion(kind, found.model, meta.request_id)

    async def collect() -> None:
        async with state.router.stream(payload, meta, batched=True) as stream:
            while (batch := await stream.read_batch()) is not None:
                for raw in batch:
                    message = replica_message(ModelStreamInferResponse, raw)
                    error = from_stream_response(message)
                    if error is not None:
                        raise error
                    answer.add(message.infer_response)

    # Like every unary answer: a client that leaves cancels the handler.
    await unless_disconnected(request, collect(), state.expired)
    return json_response(answer.document(), headers={"X-Request-Id": meta.request_id})


@_openai_errors
async def chat_completions(state: ApiState, request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    return await _complete(state, request, "chat", chat_request)


@_openai_errors
async def completions(state: ApiState, request: Request) -> Response:
    """``POST /v1/completions``."""
    return await _complete(state, request, "completion", completion_request)


@_openai_errors
async def embeddings(state: ApiState, request: Request) -> Response:
    """``POST /v1/embeddings``: one unary call; ``embedding`` output -> list."""
    found, meta = await _read(state, request, embedding_request)
    call = state.router.unary(rpc.MODEL_INFER, found.request.SerializeToString(), meta)
    raw = await unless_disconnected(request, call, state.expired)
    response = replica_message(ModelInferResponse, raw)
    doc = embedding_document(response, found.model, found.count, found.encoding_format)
    return json_response(doc, headers={"X-Request-Id": meta.request_id})


# --------------------------------------------------------------------------- models


def list_models(registry: Registry) -> list[dict[str, Any]]:
    """Every capability with a ``model`` key, as OpenAI model objects.

    Besides OpenAI's ``id``, ``object``, ``created`` (when the first replica
    serving it registered) and ``owned_by``: ``endpoints`` (what its
    capabilities' ``type`` says it answers: :data:`ENDPOINTS`), its
    ``capabilities`` and ``loaded`` (a worker is up: no cold start).
    """
    found: dict[str, dict[str, Any]] = {}
    for replica in registry:
        for loaded, capabilities in ((True, replica.capabilities), (False, replica.loadable)):
            for capability in capabilities:
                name = capability.get("model")
                if not name:
                    continue
                created = int(replica.registered_at)
                entry = found.setdefault(
                    name,
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "anyserve",
                        "endpoints": [],
                        "capabilities": [],
                        "loaded": False,
                    },
                )
                entry["created"] = min(entry["created"], created)
                entry["loaded"] = entry["loaded"] or loaded
                endpoint = ENDPOINTS.get(capability.get("type", ""))
                if endpoint and endpoint not in entry["endpoints"]:
                    entry["endpoints"].append(endpoint)
                if capability.to_dict() not in entry["capabilities"]:
                    entry["capabilities"].append(capability.to_dict())
    return [found[name] for name in sorted(found)]


@_openai_errors
async def models(state: ApiState, request: Request) -> Response:
    """``GET /v1/models``."""
    return json_response({"object": "list", "data": list_models(state.registry)})


@_openai_errors
async def model(state: ApiState, request: Request) -> Response:
    """``GET /v1/models/{model}``: one entry of the list, or 404."""
    name = request.path_params["model"]
    for entry in list_models(state.registry):
        if entry["id"] == name:
            return json_response(entry)
    raise NotFound(f"the model {name!r} does not exist (no replica serves it)")
