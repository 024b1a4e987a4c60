"""KServe v2 health and metadata: answered locally or forwarded to a replica.

Server liveness, readiness and metadata are the API server's own. Model
metadata and readiness are asked of a replica serving the model name (its
handlers know their tensors); when that replica does not implement the call,
the answer is built from the registry.

Readiness choice: the server is *ready* while it accepts requests (not
draining), whether or not any replica is registered yet. Replicas register
through this same HTTP port, so gating readiness on replicas would deadlock a
load balancer that only routes to ready backends. Per-model readiness is
``/v2/models/{name}/ready``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anyserve import rpc
from anyserve.api_server.meta import RequestMeta, http_timeout, parse_meta
from anyserve.api_server.responses import json_response
from anyserve.api_server.state import EXTENSIONS, ApiState, version
from anyserve.errors import AnyServeError, HandlerError, InvalidArgument, Unavailable
from anyserve.proto import (
    ModelMetadataRequest,
    ModelMetadataResponse,
    ModelReadyRequest,
    ModelReadyResponse,
    ServerMetadataResponse,
)


def server_metadata() -> ServerMetadataResponse:
    """Name, version and extensions of the API server."""
    return ServerMetadataResponse(name="anyserve", version=version(), extensions=EXTENSIONS)


def _unimplemented(exc: AnyServeError) -> bool:
    # from_grpc maps codes it has no class for (UNIMPLEMENTED, UNKNOWN, ...) to
    # the base class: the replica could not answer the question, not "no".
    return type(exc) is AnyServeError


async def model_metadata(state: ApiState, meta: RequestMeta, version_: str = "") -> bytes:
    """Serialized ModelMetadataResponse for ``meta.model_name``.

    Raises NotFound when no replica serves the name, or the replica's error.
    """
    request = ModelMetadataRequest(name=meta.model_name, version=version_).SerializeToString()
    try:
        return await state.router.unary(rpc.MODEL_METADATA, request, meta, allow_random=False)
    except AnyServeError as exc:
        if not _unimplemented(exc):
            raise
    response = ModelMetadataResponse(name=meta.model_name, platform="anyserve")
    if version_:
        response.versions.append(version_)
    return response.SerializeToString()


async def model_ready(state: ApiState, meta: RequestMeta, version_: str = "") -> bool:
    """Whether a replica serving ``meta.model_name`` says the model is ready.

    Raises NotFound when no replica serves the name.
    """
    request = ModelReadyRequest(name=meta.model_name, version=version_).SerializeToString()
    try:
        raw = await state.router.unary(rpc.MODEL_READY, request, meta, allow_random=False)
    except AnyServeError as exc:
        if not _unimplemented(exc):
            raise
        return True  # a connected replica serves the name
    return ModelReadyResponse.FromString(raw).ready


# --------------------------------------------------------------------------- HTTP


def _meta(state: ApiState, request: Request) -> RequestMeta:
    timeout = http_timeout(request.headers.get("x-request-timeout"), state.config.request_timeout)
    name = request.path_params["name"]
    return parse_meta(request.headers.items(), model_name=name, timeout=timeout)


def _tensors(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


async def http_live(state: ApiState, request: Request) -> Response:
    """``GET /v2/health/live``: 200 while the process serves."""
    return json_response({"live": True})


async def http_ready(state: ApiState, request: Request) -> Response:
    """``GET /v2/health/ready``: 200 unless shutting down (see the module docstring)."""
    if state.draining:
        raise Unavailable("API server is shutting down")
    return json_response({"ready": True})


async def http_server_metadata(state: ApiState, request: Request) -> Response:
    """``GET /v2``: server metadata JSON."""
    meta = server_metadata()
    return json_response(
        {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
    )


async def http_model_metadata(state: ApiState, request: Request) -> Response:
    """``GET /v2/models/{name}``: model metadata JSON from a replica serving it."""
    meta = _meta(state, request)
    raw = await model_metadata(state, meta, request.path_params.get("version", ""))
    try:
        response = ModelMetadataResponse.FromString(raw)
    except Exception:
        raise HandlerError("replica sent malformed model metadata") from None
    return json_response(
        {
            "name": response.name or meta.model_name,
            "versions": list(response.versions),
            "platform": response.platform,
            "inputs": _tensors(response.inputs),
            "outputs": _tensors(response.outputs),
        }
    )


async def http_model_ready(state: ApiState, request: Request) -> Response:
    """``GET /v2/models/{name}/ready``: 200 when ready, 400 when not (KServe:
    a 4xx status means false), 404 when no replica serves the name."""
    meta = _meta(state, request)
    if not await model_ready(state, meta, request.path_params.get("version", "")):
        raise InvalidArgument(f"model {meta.model_name!r} is not ready")
    return json_response({"name": meta.model_name, "ready": True})
