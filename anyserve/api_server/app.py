"""The HTTP entry: Starlette routes for inference, streaming and the control plane.

Bodies are converted at this edge only: KServe v2 REST JSON, Triton's binary
tensor extension (``Inference-Header-Content-Length``) and the generate
extension become a serialized ``ModelInferRequest`` (:mod:`anyserve.codec`);
a body sent as ``application/x-protobuf`` is forwarded as is and answered in
protobuf (on ``/infer/stream``, each SSE event's data is the base64 of a
serialized ``ModelInferResponse``). Every error is ``{"error": "..."}`` with
the status of the error table (docs/protocol.md), built by
:mod:`anyserve.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from anyserve import codec, rpc
from anyserve.api_server import control, model_control, model_meta, shm_control
from anyserve.api_server import openai as openai_api
from anyserve.api_server.dispatch import Dispatch, on_crash, on_error, on_http
from anyserve.api_server.json_bodies import request_from_big_json
from anyserve.api_server.limits import BigBodyGate
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.responses import (
    Answer,
    PiecesAnswer,
    declared_length,
    header,
    json_response,
    read_big_body,
    read_body,
    replica_message,
    request_meta,
    unless_disconnected,
)
from anyserve.api_server.sequences import SESSION_HEADER
from anyserve.api_server.shared_memory import CallSegments
from anyserve.api_server.sse import StreamRelay, protobuf_data
from anyserve.api_server.state import ApiState
from anyserve.errors import AnyServeError, InvalidArgument
from anyserve.metrics.http import CONTENT_TYPE, MetricsMiddleware, exposition
from anyserve.metrics.stats import model_statistics, statistics_json
from anyserve.proto import ModelInferRequest, ModelInferResponse

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
_PROTOBUF_BYTES = PROTOBUF.encode()
_HEADER_LENGTH_BYTES = codec.HEADER_LENGTH.lower().encode()
_SESSION_BYTES = SESSION_HEADER.encode()
_PROTOBUF_TYPES = (PROTOBUF, "application/protobuf", "application/vnd.google.protobuf")

Endpoint = Callable[[ApiState, Request], Awaitable[Response]]


def _is_protobuf(request: Request) -> bool:
    ctype = (header(request, b"content-type") or "").split(";", 1)[0].strip().lower()
    return ctype in _PROTOBUF_TYPES


def _protobuf_payload(state: ApiState, body: bytes, name: str, meta: RequestMeta) -> bytes:
    body = state.shared_memory.rewrite(body, meta)
    try:
        in_body = rpc.peek_string_field(body, 1)
    except ValueError as exc:
        raise InvalidArgument(f"body is not a ModelInferRequest: {exc}") from None
    if name and in_body != name:
        # The URL names the model: append field 1 (model_name); in protobuf
        # the last value of a field wins, so nothing has to be re-encoded.
        encoded = name.encode()
        body = body + b"\x0a" + rpc.encode_varint(len(encoded)) + encoded
    meta.model_name = name or in_body
    return body


Decoded = tuple[bytes, ModelInferRequest | None, CallSegments | None]


async def _decode_infer(
    state: ApiState, request: Request, meta: RequestMeta, *, place: bool = False
) -> Decoded:
    """Read an inference body; return (serialized request, parsed request or
    None when the body was protobuf and is forwarded untouched, the call's
    shared-memory segments or None). Sets ``meta.model_name``. With ``place``,
    big raw inputs may be moved into shared memory
    (:mod:`anyserve.api_server.shared_memory`); the caller releases them.

    A big body (over 1 MiB, or chunked) is read into one buffer and, when it
    is JSON, parsed in pieces (:mod:`anyserve.api_server.json_bodies`) so the
    loop keeps serving, once it holds a slot of the server's big-body gate
    (429 when none frees up in time); small ones take the inline path, with
    no scheduling.
    """
    name = request.path_params.get("name", "")
    gate: BigBodyGate = request.app.state.big_bodies
    if gate.is_big(declared_length(request, state.config.max_body)):
        return await _decode_big(state, request, meta, name, gate, place)
    body = await read_body(request, state.config.max_body)
    if _is_protobuf(request):
        return _protobuf_payload(state, body, name, meta), None, None
    length = header(request, _HEADER_LENGTH_BYTES)
    segments = None
    if length is not None:
        parsed, segments = _from_binary(state, body, length, name, meta, place)
    else:
        parsed = codec.request_from_json(body, name)
        meta.model_name = parsed.model_name
        state.shared_memory.prepare(parsed, meta)
    return parsed.SerializeToString(), parsed, segments


def _from_binary(
    state: ApiState, body: codec.Body, header: str, name: str, meta: RequestMeta, place: bool
) -> tuple[ModelInferRequest, CallSegments | None]:
    """A binary-extension body parsed; with ``place``, its big inputs go
    straight from the body into shared memory when a replica here can take it."""
    minimum = state.shared_memory.threshold if place else 0
    length = codec.parse_header_length(header)
    parsed, aside = codec.request_from_binary_aside(body, length, name, minimum)
    meta.model_name = parsed.model_name
    return parsed, state.shared_memory.prepare(parsed, meta, aside)


async def _decode_big(
    state: ApiState,
    request: Request,
    meta: RequestMeta,
    name: str,
    gate: BigBodyGate,
    place: bool,
) -> Decoded:
    # Reading is not gated: a body costs its size once however slowly it
    # arrives (the body timeout bounds a stalled one), and a client trickling
    # its upload must not hold a slot that others' parsing needs.
    holder = [await read_big_body(request, state.config.max_body)]
    if _is_protobuf(request):
        return _protobuf_payload(state, bytes(holder.pop()), name, meta), None, None
    length = header(request, _HEADER_LENGTH_BYTES)
    segments = None
    if length is not None:
        # Raw tensor data: slicing it is a copy, not a parse; only the header is JSON.
        parsed, segments = _from_binary(state, memoryview(holder.pop()), length, name, meta, place)
        payload = parsed.SerializeToString()
        parsed.ClearField("raw_input_contents")  # the answer is rendered without it
    else:
        # Parsing is what multiplies a body's memory: bounded by the gate.
        async with gate.slot():
            payload, parsed = await request_from_big_json(holder, name)
        state.shared_memory.check(parsed, meta)
    meta.model_name = parsed.model_name
    return payload, parsed, segments


def _require_target(meta: RequestMeta) -> None:
    if not meta.query and not meta.model_name:
        raise InvalidArgument(
            "say what to run: X-Capability-* headers, or a model_name in the body"
            " (or use /v2/models/{name}/infer)"
        )


def _with_version(payload: bytes, request: Request) -> bytes:
    """The payload with the URL's ``/versions/{v}`` as its ``model_version``
    (field 2, appended: in protobuf the last value of a field wins)."""
    version = str(request.path_params.get("version", ""))
    if not version:
        return payload
    encoded = version.encode()
    return payload + b"\x12" + rpc.encode_varint(len(encoded)) + encoded


async def _unary(state: ApiState, request: Request, payload: bytes, meta: RequestMeta) -> bytes:
    """Route one unary request, on its sequence's or session's replica if any."""
    session = header(request, _SESSION_BYTES)
    async with state.sequences.route(payload, meta, session):
        call = state.router.unary(rpc.MODEL_INFER, payload, meta)
        raw: bytes = await unless_disconnected(request, call, state.expired)
        return raw


async def infer(state: ApiState, request: Request) -> Response:
    """``POST /infer``, ``/v2/models/{name}[/versions/{v}]/infer`` (JSON,
    binary or protobuf)."""
    meta = request_meta(request, state.config.request_timeout)
    payload, parsed, segments = await _decode_infer(state, request, meta, place=True)
    try:
        _require_target(meta)
        raw = await _unary(state, request, _with_version(payload, request), meta)
        if parsed is None:
            return Answer(raw, meta.request_id, _PROTOBUF_BYTES)
        response = replica_message(ModelInferResponse, raw)
        taken = None if segments is None else state.shared_memory.take_outputs(response, segments)
    finally:
        if segments is not None:
            state.shared_memory.release(segments)
    pieces, header_length = codec.response_pieces(response, parsed, taken)
    if header_length is None:
        return Answer(pieces[0], meta.request_id, b"application/json")
    length = (_HEADER_LENGTH_BYTES, b"%d" % header_length)
    # Big outputs go out as the shared-memory mappings they came in: no copy.
    return PiecesAnswer(pieces, meta.request_id, b"application/octet-stream", length)


async def infer_stream(state: ApiState, request: Request) -> Response:
    """``POST /infer/stream``: SSE of responses, answered in the request's kind:
    base64 of each serialized ``ModelInferResponse`` for a protobuf body, else
    KServe v2 REST JSON."""
    meta = request_meta(request, state.config.request_timeout)
    payload, parsed, _ = await _decode_infer(state, request, meta)
    _require_target(meta)
    render = protobuf_data if parsed is None else codec.response_to_json
    return StreamRelay(
        state.router,
        payload,
        meta,
        render,
        state.config.sse_ping,
        expired=state.expired,
        sequences=state.sequences,
        session=request.headers.get(SESSION_HEADER),
    )


async def _generate_payload(state: ApiState, request: Request) -> tuple[bytes, RequestMeta]:
    meta = request_meta(request, state.config.request_timeout)
    meta.model_name = request.path_params["name"]
    body = await read_body(request, state.config.max_body)
    return codec.generate_request(body, meta.model_name).SerializeToString(), meta


async def generate(state: ApiState, request: Request) -> Response:
    """``POST /v2/models/{name}/generate``: Triton's flat JSON in and out."""
    payload, meta = await _generate_payload(state, request)
    raw = await _unary(state, request, payload, meta)
    body = codec.generate_response_json(replica_message(ModelInferResponse, raw))
    return Answer(body, meta.request_id, b"application/json")


async def generate_stream(state: ApiState, request: Request) -> Response:
    """``POST /v2/models/{name}/generate_stream``: SSE of flat JSON events."""
    payload, meta = await _generate_payload(state, request)
    return StreamRelay(
        state.router,
        payload,
        meta,
        codec.generate_response_json,
        state.config.sse_ping,
        expired=state.expired,
        sequences=state.sequences,
        session=request.headers.get(SESSION_HEADER),
    )


async def metrics(state: ApiState, request: Request) -> Response:
    """``GET /metrics``: this server's metrics, Prometheus text format."""
    return Response(exposition(state.metrics.registry), media_type=CONTENT_TYPE)


async def model_stats(state: ApiState, request: Request) -> Response:
    """``GET /v2/models[/{name}[/versions/{version}]]/stats``: Triton's statistics
    (:mod:`anyserve.metrics.stats`); 404 for a model no replica serves."""
    name = request.path_params.get("name", "")
    version = request.path_params.get("version", "")
    stats = model_statistics(state.metrics, name, version, state.served_names())
    return json_response(statistics_json(stats))


# --------------------------------------------------------------------------- app


def build_app(state: ApiState) -> Dispatch:
    """The ASGI application of one server (no module-level state): the
    Starlette routes, the unary inference ones served by :class:`Dispatch`."""

    def bind(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def call(request: Request) -> Response:
            return await endpoint(state, request)

        call.__name__ = endpoint.__name__
        return call

    post, get = ["POST"], ["GET"]
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    hot = [Route(path, bind(infer), methods=post) for path in ("/infer", f"{model}/infer")]
    hot.append(Route(f"{versioned}/infer", bind(infer), methods=post))
    routes = [
        Route("/metrics", bind(metrics), methods=get),
        Route("/v2/models/stats", bind(model_stats), methods=get),
        Route(f"{model}/stats", bind(model_stats), methods=get),
        Route(f"{versioned}/stats", bind(model_stats), methods=get),
        Route("/register", bind(control.register), methods=post),
        Route("/unregister", bind(control.unregister), methods=post),
        Route("/registry", bind(control.registry), methods=get),
        Route("/health", bind(control.health), methods=get),
        *hot,
        Route("/infer/stream", bind(infer_stream), methods=post),
        Route(f"{model}/generate", bind(generate), methods=post),
        Route(f"{model}/generate_stream", bind(generate_stream), methods=post),
        Route("/v1/chat/completions", bind(openai_api.chat_completions), methods=post),
        Route("/v1/completions", bind(openai_api.completions), methods=post),
        Route("/v1/embeddings", bind(openai_api.embeddings), methods=post),
        Route("/v1/models", bind(openai_api.models), methods=get),
        Route("/v1/models/{model:path}", bind(openai_api.model), methods=get),
        Route("/v2/health/live", bind(model_meta.http_live), methods=get),
        Route("/v2/health/ready", bind(model_meta.http_ready), methods=get),
        Route("/v2", bind(model_meta.http_server_metadata), methods=get),
        Route(model, bind(model_meta.http_model_metadata), methods=get),
        Route(versioned, bind(model_meta.http_model_metadata), methods=get),
        Route(f"{model}/ready", bind(model_meta.http_model_ready), methods=get),
        Route(f"{versioned}/ready", bind(model_meta.http_model_ready), methods=get),
        Route(f"{model}/config", bind(model_meta.http_model_config), methods=get),
        Route(f"{versioned}/config", bind(model_meta.http_model_config), methods=get),
        Route("/v2/repository/index", bind(model_meta.http_repository_index), methods=post),
        Route("/v2/repository/models/{name}/load", bind(model_control.http_load), methods=post),
        Route("/v2/repository/models/{name}/unload", bind(model_control.http_unload), methods=post),
        Route("/infer/metadata", bind(model_meta.http_model_metadata), methods=get),
        *(Route(path, bind(ep), methods=methods) for path, ep, methods in shm_control.ROUTES),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(MetricsMiddleware, metrics=state.metrics)],
        exception_handlers={
            AnyServeError: on_error,
            HTTPException: on_http,
            Exception: on_crash,
        },
    )
    app.state.big_bodies = BigBodyGate(state.config.edge)
    return Dispatch(app, hot, state.metrics)
