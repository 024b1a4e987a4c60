"""Triton's shared memory extensions, control plane: the HTTP routes and gRPC methods.

System shared memory (``/v2/systemsharedmemory/...``, gRPC
``SystemSharedMemory{Status,Register,Unregister}``) keeps regions in the API
server's :class:`~anyserve.api_server.shm_regions.RegionTable`, answered as
Triton answers: status is a JSON list of ``{"name", "key", "offset",
"byte_size"}`` (gRPC: a map by name), register and unregister ``{}`` (an empty
message); unregistering an unknown name is no error.

Shared memory exists on one machine only, and a registration makes the server
read and write that file: register and unregister are accepted from loopback
clients only (HTTP peers in 127.0.0.0/8 or ``::1``; gRPC peers ``ipv4:127.*``,
``ipv6:[::1]``, ``unix:``), else PermissionDenied (403 / PERMISSION_DENIED)
says why. Status is open to every client.

CUDA shared memory (``/v2/cudasharedmemory/...``, ``CudaSharedMemory*``) is not
supported: status of every region is an empty list, anything else an error
saying so (register and unregister: 400 / INVALID_ARGUMENT, as a Triton built
without GPUs answers a registration; status of a name: 404 / NOT_FOUND).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc
from starlette.requests import Request
from starlette.responses import Response

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.api_server.guard import is_loopback
from anyserve.api_server.responses import json_response, read_body
from anyserve.api_server.shm_regions import NEED_NAME, Region, RegionTable
from anyserve.api_server.state import ApiState
from anyserve.errors import AnyServeError, InvalidArgument, NotFound, PermissionDenied, abort

NO_CUDA = "CUDA shared memory is not supported by anyserve (use system shared memory)"
_MAX_BODY = 64 * 1024  # a registration is a few dozen bytes of JSON
_LOCAL = "127.0.0.0/8, ::1 or a Unix socket"

Endpoint = Callable[[ApiState, Request], Awaitable[Response]]
GrpcFunction = Callable[[RegionTable, bytes, str], bytes]

# --------------------------------------------------------------------------- who may


def grpc_peer_host(peer: str) -> str | None:
    """The address of a grpc.aio peer (``ipv4:127.0.0.1:5000``,
    ``ipv6:[::1]:5000``, possibly percent-encoded); ``"unix"`` for a Unix
    socket peer; None when it cannot be told."""
    kind, _, rest = unquote(peer or "").partition(":")
    if kind in ("unix", "unix-abstract"):
        return "unix"
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def require_local(action: str, host: str | None) -> None:
    """Raise PermissionDenied unless ``host`` (the client's address, ``"unix"``
    for a Unix socket) is this machine."""
    if host == "unix" or (host and is_loopback(host)):
        return
    raise PermissionDenied(
        f"{action} of system shared memory from {host or 'an unknown address'} refused:"
        " shared memory exists on this machine only, so the API server takes it from"
        f" loopback clients only ({_LOCAL})"
    )


def _http_host(request: Request) -> str | None:
    return request.client.host if request.client else None


# --------------------------------------------------------------------------- HTTP


def _region_json(region: Region) -> dict[str, Any]:
    return {
        "name": region.name,
        "key": region.key,
        "offset": region.offset,
        "byte_size": region.byte_size,
    }


async def http_status(state: ApiState, request: Request) -> Response:
    """``GET /v2/systemsharedmemory[/region/{name}]/status``."""
    regions = state.shm.status(request.path_params.get("name", ""))
    return json_response([_region_json(r) for r in regions])


async def _register_body(request: Request) -> tuple[str, int, int]:
    """``(key, offset, byte_size)`` of a register request's JSON body."""
    body = await read_body(request, _MAX_BODY)
    try:
        doc = json.loads(body) if body.strip() else {}
    except ValueError:
        raise InvalidArgument("the shared memory register request must be JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the shared memory register request must be a JSON object")
    if "key" not in doc:
        raise InvalidArgument("Shared memory register request has no 'key' field")
    if not isinstance(doc["key"], str):
        raise InvalidArgument("Shared memory register request: 'key' must be a string")
    if "byte_size" not in doc:
        raise InvalidArgument("Shared memory register request has no 'byte_size' field")
    offset, byte_size = doc.get("offset", 0), doc["byte_size"]
    for field, value in (("offset", offset), ("byte_size", byte_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgument(
                f"Shared memory register request: '{field}' must be a non-negative integer,"
                f" got {json.dumps(value)}"
            )
    return doc["key"], offset, byte_size


async def http_register(state: ApiState, request: Request) -> Response:
    """``POST /v2/systemsharedmemory/region/{name}/register`` with
    ``{"key", "offset", "byte_size"}`` (``offset`` defaults to 0)."""
    require_local("registration", _http_host(request))
    name = request.path_params.get("name", "")
    if not name:  # POST /v2/systemsharedmemory/register
        raise InvalidArgument(NEED_NAME)
    key, offset, byte_size = await _register_body(request)
    state.shm.register(name, key, offset, byte_size)
    return json_response({})


async def http_unregister(state: ApiState, request: Request) -> Response:
    """``POST /v2/systemsharedmemory[/region/{name}]/unregister`` (no name: all)."""
    require_local("unregistration", _http_host(request))
    state.shm.unregister(request.path_params.get("name", ""))
    return json_response({})


async def http_cuda_status(state: ApiState, request: Request) -> Response:
    """``GET /v2/cudasharedmemory/status``: ``[]``; a region's status: 404."""
    name = request.path_params.get("name", "")
    if name:
        raise NotFound(f"Unable to find cuda shared memory region: '{name}': {NO_CUDA}")
    return json_response([])


async def http_cuda_refused(state: ApiState, request: Request) -> Response:
    """CUDA ``register`` / ``unregister``: 400 saying it is not supported."""
    name = request.path_params.get("name", "")
    action = request.url.path.rsplit("/", 1)[-1]
    target = f" region '{name}'" if name else " regions"
    raise InvalidArgument(f"failed to {action} CUDA shared memory{target}: {NO_CUDA}")


_GET, _POST = ["GET"], ["POST"]
_SYSTEM, _CUDA = "/v2/systemsharedmemory", "/v2/cudasharedmemory"

#: Triton's shared memory routes: ``(path, endpoint, methods)``, for app.py to bind.
ROUTES: list[tuple[str, Endpoint, list[str]]] = [
    (f"{_SYSTEM}/status", http_status, _GET),
    (f"{_SYSTEM}/region/{{name}}/status", http_status, _GET),
    (f"{_SYSTEM}/register", http_register, _POST),
    (f"{_SYSTEM}/region/{{name}}/register", http_register, _POST),
    (f"{_SYSTEM}/unregister", http_unregister, _POST),
    (f"{_SYSTEM}/region/{{name}}/unregister", http_unregister, _POST),
    (f"{_CUDA}/status", http_cuda_status, _GET),
    (f"{_CUDA}/region/{{name}}/status", http_cuda_status, _GET),
    (f"{_CUDA}/register", http_cuda_refused, _POST),
    (f"{_CUDA}/region/{{name}}/register", http_cuda_refused, _POST),
    (f"{_CUDA}/unregister", http_cuda_refused, _POST),
    (f"{_CUDA}/region/{{name}}/unregister", http_cuda_refused, _POST),
]


# --------------------------------------------------------------------------- gRPC


def _parse(cls: Any, request: bytes) -> Any:
    try:
        return cls.FromString(request)
    except Exception:
        raise InvalidArgument(f"malformed {cls.__name__}") from None


def grpc_status(table: RegionTable, request: bytes, peer: str) -> bytes:
    """``SystemSharedMemoryStatus``: every region (empty name) or the one named."""
    parsed = _parse(pb.SystemSharedMemoryStatusRequest, request)
    answer = pb.SystemSharedMemoryStatusResponse()
    for region in table.status(parsed.name):
        answer.regions[region.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=region.name,
                key=region.key,
                offset=region.offset,
                byte_size=region.byte_size,
            )
        )
    return answer.SerializeToString()


def grpc_register(table: RegionTable, request: bytes, peer: str) -> bytes:
    """``SystemSharedMemoryRegister`` (loopback clients only)."""
    require_local("registration", grpc_peer_host(peer))
    parsed = _parse(pb.SystemSharedMemoryRegisterRequest, request)
    table.register(parsed.name, parsed.key, parsed.offset, parsed.byte_size)
    return b""  # SystemSharedMemoryRegisterResponse has no fields


def grpc_unregister(table: RegionTable, request: bytes, peer: str) -> bytes:
    """``SystemSharedMemoryUnregister``: the region named, or all (loopback clients only)."""
    require_local("unregistration", grpc_peer_host(peer))
    table.unregister(_parse(pb.SystemSharedMemoryUnregisterRequest, request).name)
    return b""


def grpc_cuda_status(table: RegionTable, request: bytes, peer: str) -> bytes:
    """``CudaSharedMemoryStatus``: no regions; NOT_FOUND for a name."""
    name = _parse(pb.CudaSharedMemoryStatusRequest, request).name
    if name:
        raise NotFound(f"Unable to find cuda shared memory region: '{name}': {NO_CUDA}")
    return b""


def _grpc_cuda_refused(action: str, message: Any) -> GrpcFunction:
    def refuse(table: RegionTable, request: bytes, peer: str) -> bytes:
        name = _parse(message, request).name
        target = f" region '{name}'" if name else " regions"
        raise InvalidArgument(f"failed to {action} CUDA shared memory{target}: {NO_CUDA}")

    return refuse


def grpc_handlers(state: ApiState) -> dict[str, grpc.RpcMethodHandler]:
    """The shared memory methods of ``inference.GRPCInferenceService``, by
    name, for the gRPC entry's handler table (bytes in, bytes out)."""
    table = state.shm

    def unary(function: GrpcFunction) -> grpc.RpcMethodHandler:
        async def call(request: bytes, context: Any) -> bytes:
            try:
                return function(table, request, context.peer())
            except AnyServeError as exc:
                await abort(context, exc)

        return grpc.unary_unary_rpc_method_handler(call)

    return {
        "SystemSharedMemoryStatus": unary(grpc_status),
        "SystemSharedMemoryRegister": unary(grpc_register),
        "SystemSharedMemoryUnregister": unary(grpc_unregister),
        "CudaSharedMemoryStatus": unary(grpc_cuda_status),
        "CudaSharedMemoryRegister": unary(
            _grpc_cuda_refused("register", pb.CudaSharedMemoryRegisterRequest)
        ),
        "CudaSharedMemoryUnregister": unary(
            _grpc_cuda_refused("unregister", pb.CudaSharedMemoryUnregisterRequest)
        ),
    }
