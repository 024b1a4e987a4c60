"""KServe v2 health and metadata, Triton's model config and repository index:
answered locally or forwarded to a replica.

Server liveness, readiness and metadata are the API server's own, and so is
the repository index, built from the registry: every capability by its model
name (``model``, else ``type``), ``READY`` when a replica has it loaded, else
``UNAVAILABLE`` with reason ``loadable`` (a request would start it). Model
metadata, config and readiness are asked of a replica serving the model name,
or the capability of ``X-Capability-*`` headers / ``x-capability-*`` metadata
(its handlers know their tensors); when that replica does not implement the
call, a minimal answer is built here.

Readiness choice: the server is *ready* while it accepts requests (not
draining), whether or not any replica is registered yet. Replicas register
through this same HTTP port, so gating readiness on replicas would deadlock a
load balancer that only routes to ready backends. Per-model readiness is
``/v2/models/{name}/ready``.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import Response

from anyserve import rpc
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import model_config_pb2 as mc
from anyserve.api_server.meta import RequestMeta, http_timeout, parse_meta
from anyserve.api_server.responses import json_response, read_body
from anyserve.api_server.state import EXTENSIONS, ApiState, version
from anyserve.errors import AnyServeError, HandlerError, InvalidArgument, Unavailable
from anyserve.proto import (
    ModelMetadataRequest,
    ModelMetadataResponse,
    ModelReadyRequest,
    ModelReadyResponse,
    ServerMetadataResponse,
)

MODEL_VERSION = "1"  # the one version replicas list for every model


def server_metadata() -> ServerMetadataResponse:
    """Name, version and extensions of the API server."""
    return ServerMetadataResponse(name="anyserve", version=version(), extensions=EXTENSIONS)


def _unimplemented(exc: AnyServeError) -> bool:
    # from_grpc maps codes it has no class for (UNIMPLEMENTED, UNKNOWN, ...) to
    # the base class: the replica could not answer the question, not "no".
    return type(exc) is AnyServeError


async def model_metadata(state: ApiState, meta: RequestMeta, version_: str = "") -> bytes:
    """Serialized ModelMetadataResponse for the model or capability of ``meta``.

    Raises NotFound when no replica serves it, or the replica's error.
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


async def model_config(state: ApiState, meta: RequestMeta, version_: str = "") -> bytes:
    """Serialized ModelConfigResponse (Triton's model config) for the model or
    capability of ``meta``, from a replica serving it.

    Raises NotFound when no replica serves it, or the replica's error.
    """
    request = pb.ModelConfigRequest(name=meta.model_name, version=version_).SerializeToString()
    try:
        return await state.router.unary(rpc.MODEL_CONFIG, request, meta, allow_random=False)
    except AnyServeError as exc:
        if not _unimplemented(exc):
            raise
    config = mc.ModelConfig(name=meta.model_name, platform="anyserve", backend="anyserve")
    return pb.ModelConfigResponse(config=config).SerializeToString()


def repository_index(state: ApiState, ready_only: bool = False) -> pb.RepositoryIndexResponse:
    """Every capability in the registry by model name, with its state (see the
    module docstring), sorted by name; ``ready_only`` keeps the READY ones."""
    ready: set[str] = set()
    loadable: set[str] = set()
    for replica in state.registry:
        ready.update(cap.name for cap in replica.capabilities)
        loadable.update(cap.name for cap in replica.loadable)
    index = pb.RepositoryIndexResponse.ModelIndex
    models = {name: index(name=name, version=MODEL_VERSION, state="READY") for name in ready}
    if not ready_only:
        for name in loadable - ready:
            models[name] = index(
                name=name, version=MODEL_VERSION, state="UNAVAILABLE", reason="loadable"
            )
    return pb.RepositoryIndexResponse(models=[models[name] for name in sorted(models)])


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


# --------------------------------------------------------------------------- JSON

# (u)int64 fields Triton renders as JSON numbers; protobuf's JSON mapping makes
# them strings.
_INT64_LISTS = {"dims"}
_INT64_VALUES = {"max_queue_delay_microseconds"}


def _numbers(doc: Any) -> Any:
    if isinstance(doc, list):
        return [_numbers(item) for item in doc]
    if not isinstance(doc, dict):
        return doc
    result: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _INT64_LISTS:
            result[key] = [int(v) for v in value]
        elif key in _INT64_VALUES:
            result[key] = int(value)
        else:
            result[key] = _numbers(value)
    return result


def config_json(config: mc.ModelConfig) -> dict[str, Any]:
    """Triton's JSON form of a model config: proto field names, enum value
    names, default values included, int64 values as numbers."""
    doc = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    result: dict[str, Any] = _numbers(doc)
    return result


def index_json(index: pb.RepositoryIndexResponse) -> list[dict[str, str]]:
    """Triton's JSON form of a repository index: ``{name, version, state[, reason]}``."""
    models = []
    for model in index.models:
        entry = {"name": model.name, "version": model.version, "state": model.state}
        if model.reason:
            entry["reason"] = model.reason
        models.append(entry)
    return models


# --------------------------------------------------------------------------- HTTP


def _meta(state: ApiState, request: Request) -> RequestMeta:
    timeout = http_timeout(request.headers.get("x-request-timeout"), state.config.request_timeout)
    name = request.path_params.get("name", "")
    meta = parse_meta(request.headers.items(), model_name=name, timeout=timeout)
    if not meta.query and not meta.model_name:
        raise InvalidArgument("say which capability: X-Capability-* headers")
    return meta


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
    """``GET /v2/models/{name}``, and ``GET /infer/metadata`` addressed by
    ``X-Capability-*`` headers alone: model metadata JSON from a replica."""
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


async def http_model_config(state: ApiState, request: Request) -> Response:
    """``GET /v2/models/{name}/config``: Triton's model config JSON from a replica."""
    meta = _meta(state, request)
    raw = await model_config(state, meta, request.path_params.get("version", ""))
    try:
        response = pb.ModelConfigResponse.FromString(raw)
    except Exception:
        raise HandlerError("replica sent a malformed model config") from None
    return json_response(config_json(response.config))


async def http_repository_index(state: ApiState, request: Request) -> Response:
    """``POST /v2/repository/index`` (body empty or ``{"ready": bool}``): the
    repository index as Triton's JSON list."""
    body = await read_body(request, state.config.max_body)
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
        raise InvalidArgument('the repository index body must be empty or {"ready": true|false}')
    return json_response(index_json(repository_index(state, ready_only=doc.get("ready", False))))


async def http_model_ready(state: ApiState, request: Request) -> Response:
    """``GET /v2/models/{name}/ready``: 200 when ready, 400 when not (KServe:
    a 4xx status means false), 404 when no replica serves the name."""
    meta = _meta(state, request)
    if not await model_ready(state, meta, request.path_params.get("version", "")):
        raise InvalidArgument(f"model {meta.model_name!r} is not ready")
    return json_response({"name": meta.model_name, "ready": True})
