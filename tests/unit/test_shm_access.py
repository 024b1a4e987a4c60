"""The shared memory control plane's edges: who may register (loopback only),
what a register body must say, and the CUDA refusals, through the real
Starlette app with a chosen client address (no sockets)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.api_server.app import build_app
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.shm_control import (
    NO_CUDA,
    grpc_peer_host,
    grpc_register,
    grpc_status,
    grpc_unregister,
    require_local,
)
from anyserve.api_server.shm_regions import NEED_NAME, SHM_DIR
from anyserve.api_server.state import ApiState
from anyserve.errors import PermissionDenied

pytestmark = pytest.mark.anyio

REGISTER = "/v2/systemsharedmemory/region/{}/register"


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50000", "127.0.0.1"),
        ("ipv4:127.9.8.7:1", "127.9.8.7"),
        ("ipv6:[::1]:50000", "::1"),
        ("ipv6:%5B::1%5D:50000", "::1"),  # newer gRPC percent-encodes the brackets
        ("ipv6:[::ffff:127.0.0.1]:2", "::ffff:127.0.0.1"),
        ("unix:/tmp/api.sock", "unix"),
        ("unix-abstract:api", "unix"),
        ("ipv4:192.0.2.7:5000", "192.0.2.7"),
        ("ipv6:[fd00::2]:5000", "fd00::2"),
        ("", None),
        ("vsock:3:5000", None),
    ],
)
def test_grpc_peers(peer: str, host: str | None) -> None:
    assert grpc_peer_host(peer) == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "unix"])
def test_local_clients_pass(host: str) -> None:
    require_local("registration", host)


@pytest.mark.parametrize("host", ["192.0.2.7", "fd00::2", "0.0.0.0", "testclient", None])
def test_other_clients_are_refused_saying_why(host: str | None) -> None:
    with pytest.raises(PermissionDenied) as caught:
        require_local("registration", host)
    message = caught.value.message
    assert message.startswith(
        f"registration of system shared memory from {host or 'an unknown address'} refused:"
    )
    assert "loopback clients only" in message


def test_grpc_register_and_unregister_check_the_peer_status_does_not() -> None:
    state = ApiState(ApiServerConfig(port=0, grpc_port=0, token=None))
    request = pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8)
    remote = "ipv4:192.0.2.7:5000"
    with pytest.raises(PermissionDenied, match=r"^registration of system shared memory from"):
        grpc_register(state.shm, request.SerializeToString(), remote)
    with pytest.raises(PermissionDenied, match=r"^unregistration of system shared memory from"):
        grpc_unregister(state.shm, b"", remote)
    assert grpc_status(state.shm, b"", remote) == b""  # no regions


@pytest.fixture
def key() -> Iterator[str]:
    path = Path(SHM_DIR, f"anyserve-test-{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 256)
    finally:
        os.close(fd)
    yield "/" + path.name
    path.unlink()
    assert not path.exists()


@asynccontextmanager
async def client(host: str) -> AsyncIterator[httpx.AsyncClient]:
    state = ApiState(ApiServerConfig(port=0, grpc_port=0, token=None))
    transport = httpx.ASGITransport(build_app(state), client=(host, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


async def test_a_remote_http_client_may_read_the_status_only(key: str) -> None:
    async with client("192.0.2.7") as http:
        for path, body in (
            (REGISTER.format("r"), {"key": key, "byte_size": 8}),
            ("/v2/systemsharedmemory/region/r/unregister", None),
            ("/v2/systemsharedmemory/unregister", None),
        ):
            answer = await http.post(path, json=body)
            assert answer.status_code == 403, answer.text
            doc = answer.json()
            assert doc["type"] == "permission_denied" and doc["code"] == "PERMISSION_DENIED"
            assert "from 192.0.2.7 refused" in doc["error"]
        answer = await http.get("/v2/systemsharedmemory/status")
        assert answer.status_code == 200 and answer.json() == []


async def test_http_register_status_unregister(key: str) -> None:
    async with client("127.0.0.1") as http:
        answer = await http.post(REGISTER.format("in 0"), json={"key": key, "byte_size": 16})
        assert answer.status_code == 200 and answer.json() == {}
        await http.post(REGISTER.format("out"), json={"key": key, "offset": 16, "byte_size": 8})
        region = {"name": "in 0", "key": key, "offset": 0, "byte_size": 16}
        status = await http.get("/v2/systemsharedmemory/status")
        assert status.json() == [region, {"name": "out", "key": key, "offset": 16, "byte_size": 8}]
        one = await http.get("/v2/systemsharedmemory/region/in%200/status")
        assert one.json() == [region]
        missing = await http.get("/v2/systemsharedmemory/region/nope/status")
        assert missing.status_code == 404
        assert missing.json()["error"] == "Unable to find system shared memory region: 'nope'"
        assert (await http.post("/v2/systemsharedmemory/region/out/unregister")).json() == {}
        assert (await http.get("/v2/systemsharedmemory/status")).json() == [region]
        assert (await http.post("/v2/systemsharedmemory/unregister")).status_code == 200
        assert (await http.get("/v2/systemsharedmemory/status")).json() == []


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "Shared memory register request has no 'key' field"),
        (b"{}", "Shared memory register request has no 'key' field"),
        (b'{"key": "/k"}', "Shared memory register request has no 'byte_size' field"),
        (b'{"key": 5, "byte_size": 8}', "Shared memory register request: 'key' must be a string"),
        (b'{"key": "/k", "byte_size": -1}', "'byte_size' must be a non-negative integer, got -1"),
        (b'{"key": "/k", "byte_size": 8, "offset": 1.5}', "'offset' must be a non-negative"),
        (b'{"key": "/k", "byte_size": true}', "'byte_size' must be a non-negative integer"),
        (b"[1]", "the shared memory register request must be a JSON object"),
        (b"{nope", "the shared memory register request must be JSON"),
    ],
)
async def test_register_bodies(body: bytes, error: str) -> None:
    async with client("127.0.0.1") as http:
        answer = await http.post(REGISTER.format("r"), content=body)
    assert answer.status_code == 400
    assert error in answer.json()["error"]


async def test_register_without_a_name_and_wrong_methods() -> None:
    async with client("127.0.0.1") as http:
        answer = await http.post("/v2/systemsharedmemory/register", json={"key": "/k"})
        assert answer.status_code == 400 and answer.json()["error"] == NEED_NAME
        assert (await http.get(REGISTER.format("r"))).status_code == 405
        assert (await http.post("/v2/systemsharedmemory/status")).status_code == 405


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/v2/cudasharedmemory/status", 200, None),
        ("GET", "/v2/cudasharedmemory/region/c/status", 404, "region: 'c'"),
        ("POST", "/v2/cudasharedmemory/region/c/register", 400, "failed to register CUDA"),
        ("POST", "/v2/cudasharedmemory/region/c/unregister", 400, "failed to unregister CUDA"),
        ("POST", "/v2/cudasharedmemory/unregister", 400, "failed to unregister CUDA"),
    ],
)
async def test_cuda_shared_memory_is_refused_clearly(
    method: str, path: str, status: int, error: str | None
) -> None:
    async with client("127.0.0.1") as http:
        answer = await http.request(method, path, json={"raw_handle": {"b64": ""}})
    assert answer.status_code == status
    doc: Any = answer.json()
    if error is None:
        assert doc == []
    else:
        assert error in doc["error"] and NO_CUDA in doc["error"]
