"""Triton's system shared memory control plane, through tritonclient (HTTP and
gRPC, sync) against a real cluster: segments made with
``tritonclient.utils.shared_memory`` as Triton's examples make them, registered,
listed, refused and unregistered as against Triton. No segment is left behind.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio.to_thread
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.guard import is_loopback
from anyserve.api_server.server import ApiServer
from anyserve.api_server.shm_control import NO_CUDA
from anyserve.api_server.shm_regions import SHM_DIR
from anyserve.cluster import Cluster, start_cluster

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR}"),
]

APP = "tests.apps.triton_models:app"
PREFIX = "anyserve-e2e-"
T = TypeVar("T")
CLIENTS = pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.5)
    async with start_cluster([APP], api=config) as running:
        yield running


async def in_thread(fn: Callable[[], T]) -> T:
    """Sync tritonclient calls block: run them off the server's event loop."""
    return await anyio.to_thread.run_sync(fn)


def url(server: ApiServer, module: Any) -> str:
    return server.url.removeprefix("http://") if module is httpclient else server.grpc_endpoint


def ours() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)}


@pytest.fixture
def segments(cluster: Cluster) -> Iterator[Callable[[int], str]]:
    """``make(size)``: a new segment made by tritonclient; returns its key.
    Afterwards every region is unregistered and every segment destroyed."""
    handles: list[Any] = []

    def make(size: int) -> str:
        key = f"/{PREFIX}{uuid.uuid4().hex[:12]}"
        handles.append(shm.create_shared_memory_region(key[1:], key, size))
        return key

    before = ours()
    yield make
    cluster.api.state.shm.unregister(None)
    for handle in handles:
        shm.destroy_shared_memory_region(handle)
    assert ours() == before, f"left in {SHM_DIR}: {ours() - before}"


def regions(client: Any, name: str = "") -> list[dict[str, Any]]:
    """The status, as a list of dicts sorted by name, from either client."""
    answer = client.get_system_shared_memory_status(name)
    if isinstance(answer, list):
        return answer
    return [
        {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
        for r in sorted(answer.regions.values(), key=lambda r: r.name)
    ]


def refused(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def is_grpc(client: Any) -> bool:
    return isinstance(client, grpcclient.InferenceServerClient)


@CLIENTS
async def test_register_status_unregister(
    cluster: Cluster, module: Any, segments: Callable[[int], str]
) -> None:
    def run() -> None:
        client = module.InferenceServerClient(url=url(cluster.api, module))
        try:
            inputs, outputs = segments(128), segments(64)
            client.register_system_shared_memory("input_data", inputs, 128)
            client.register_system_shared_memory("output_data", outputs, 32, offset=32)
            both = [
                {"name": "input_data", "key": inputs, "offset": 0, "byte_size": 128},
                {"name": "output_data", "key": outputs, "offset": 32, "byte_size": 32},
            ]
            assert regions(client) == both
            assert regions(client, "output_data") == both[1:]
            unknown = refused(lambda: client.get_system_shared_memory_status("nope"))
            assert unknown.message() == "Unable to find system shared memory region: 'nope'"
            assert unknown.status() == ("StatusCode.NOT_FOUND" if is_grpc(client) else "404")

            client.unregister_system_shared_memory("input_data")
            assert regions(client) == both[1:]
            client.unregister_system_shared_memory("input_data")  # again: no error, as Triton
            client.register_system_shared_memory("input_data", inputs, 64, offset=64)
            assert len(regions(client)) == 2
            client.unregister_system_shared_memory()  # all
            assert regions(client) == []
        finally:
            client.close()

    await in_thread(run)


@CLIENTS
async def test_registrations_triton_refuses(
    cluster: Cluster, module: Any, segments: Callable[[int], str]
) -> None:
    def run() -> None:
        client = module.InferenceServerClient(url=url(cluster.api, module))
        grpc = is_grpc(client)
        try:
            key = segments(64)
            client.register_system_shared_memory("region", key, 64)

            taken = refused(lambda: client.register_system_shared_memory("region", key, 8))
            assert taken.message() == "shared memory region 'region' already in manager"
            assert taken.status() == ("StatusCode.ALREADY_EXISTS" if grpc else "400")

            missing = f"/{PREFIX}missing-{uuid.uuid4().hex[:8]}"
            absent = refused(lambda: client.register_system_shared_memory("other", missing, 8))
            assert absent.message().startswith(
                f"Unable to open shared memory region: '{missing}' ("
            ), absent.message()
            assert absent.status() == ("StatusCode.INVALID_ARGUMENT" if grpc else "400")

            beyond = refused(
                lambda: client.register_system_shared_memory("other", key, 32, offset=48)
            )
            assert beyond.message().startswith(
                "failed to register shared memory region 'other': invalid args"
            ), beyond.message()
            assert "offset 48 + byte_size 32 is beyond the end" in beyond.message()

            bad_key = refused(lambda: client.register_system_shared_memory("other", "/a/b", 8))
            assert bad_key.message().startswith(
                "cannot register shared memory region 'other' - invalid shm key '/a/b'"
            )
            # None of them registered anything; the first region is untouched.
            assert [r["name"] for r in regions(client)] == ["region"]
            assert regions(client)[0]["byte_size"] == 64
        finally:
            client.close()

    await in_thread(run)


async def test_both_protocols_share_one_table(
    cluster: Cluster, segments: Callable[[int], str]
) -> None:
    def run() -> None:
        http = httpclient.InferenceServerClient(url=url(cluster.api, httpclient))
        grpc = grpcclient.InferenceServerClient(url=url(cluster.api, grpcclient))
        try:
            key = segments(16)
            http.register_system_shared_memory("from_http", key, 16)
            assert regions(grpc) == [
                {"name": "from_http", "key": key, "offset": 0, "byte_size": 16}
            ]
            grpc.unregister_system_shared_memory("from_http")
            assert regions(http) == []
        finally:
            http.close()
            grpc.close()

    await in_thread(run)


@CLIENTS
async def test_cuda_shared_memory_is_refused_clearly(cluster: Cluster, module: Any) -> None:
    def run() -> None:
        client = module.InferenceServerClient(url=url(cluster.api, module))
        try:
            status = client.get_cuda_shared_memory_status()
            if is_grpc(client):
                assert len(status.regions) == 0
            else:
                assert status == []
            for call in (
                lambda: client.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 64),
                lambda: client.unregister_cuda_shared_memory("gpu"),
                lambda: client.unregister_cuda_shared_memory(),
                lambda: client.get_cuda_shared_memory_status("gpu"),
            ):
                assert NO_CUDA in refused(call).message()
        finally:
            client.close()

    await in_thread(run)


@CLIENTS
async def test_the_server_lists_the_extension(cluster: Cluster, module: Any) -> None:
    def run() -> None:
        client = module.InferenceServerClient(url=url(cluster.api, module))
        try:
            metadata = client.get_server_metadata()
            extensions = (
                metadata["extensions"] if isinstance(metadata, dict) else metadata.extensions
            )
            assert "system_shared_memory" in extensions
            assert "cuda_shared_memory" not in extensions
        finally:
            client.close()

    await in_thread(run)


# ----------------------------------------------------------------- who may


def own_address(family: socket.AddressFamily) -> str | None:
    """This machine's address of ``family`` on a network interface (not loopback)."""
    target = ("192.0.2.254", 9) if family == socket.AF_INET else ("2001:db8::254", 9)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(target)  # picks the route's source address; sends nothing
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if is_loopback(address) or address in ("0.0.0.0", "::") else address


def bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
async def wide(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ApiServer, str, str]]:
    """An API server on every interface of one family; this machine's own
    address on an interface (the server sees a peer there as it would see
    another host) and the family's loopback address."""
    family: socket.AddressFamily = request.param
    address = own_address(family)
    if address is None:
        pytest.skip(f"this machine has no non-loopback {family.name} address")
    host, loopback = ("0.0.0.0", "127.0.0.1") if family == socket.AF_INET else ("::", "::1")
    config = ApiServerConfig(host=host, port=0, grpc_port=0, token="shm-test-token")
    async with ApiServer(config) as server:
        yield server, address, loopback


@CLIENTS
async def test_a_client_that_is_not_on_loopback_may_only_read(
    wide: tuple[ApiServer, str, str], module: Any
) -> None:
    server, address, loopback = wide
    port = server.http_port if module is httpclient else server.grpc_port
    key = f"/{PREFIX}{uuid.uuid4().hex[:12]}"

    def run() -> None:
        handle = shm.create_shared_memory_region(key[1:], key, 64)
        client = module.InferenceServerClient(url=f"{bracketed(address)}:{port}")
        local = module.InferenceServerClient(url=f"{bracketed(loopback)}:{port}")
        try:
            for call in (
                lambda: client.register_system_shared_memory("r", key, 64),
                lambda: client.unregister_system_shared_memory("r"),
                lambda: client.unregister_system_shared_memory(),
            ):
                error = refused(call)
                assert f"from {address} refused" in error.message(), error.message()
                assert "loopback clients only" in error.message()
                assert error.status() == (
                    "StatusCode.PERMISSION_DENIED" if is_grpc(client) else "403"
                )
            assert regions(client) == []  # status is open to all
            local.register_system_shared_memory("r", key, 64)  # the same server, from loopback
            assert [r["name"] for r in regions(client)] == ["r"]
            local.unregister_system_shared_memory()
            assert regions(client) == []
        finally:
            client.close()
            local.close()
            shm.destroy_shared_memory_region(handle)

    await in_thread(run)
    assert key[1:] not in os.listdir(SHM_DIR)
