"""Big tensors between the API server and a worker on the same host go through
shared memory (``/dev/shm``), not through gRPC and the worker socket; no
segment outlives its call, also when a worker or the API server is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from anyserve import codec, shm
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from anyserve.testing import start_replica
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio

APP = "tests.apps.shm_app:app"
ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def segments_of(pid: int) -> list[str]:
    """Names of the segments in /dev/shm owned by process ``pid``."""
    return [n for n in os.listdir(shm.SHM_DIR) if (shm.segment_owner(n) or (0, 0))[0] == pid]


def binary_body(x: np.ndarray[Any, Any], binary_out: bool = True) -> tuple[bytes, dict[str, str]]:
    """A Triton binary-tensor request for input ``x`` (FP32)."""
    raw = x.astype("<f4").tobytes()
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": binary_out},
    }
    header = json.dumps(doc).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + raw, headers


def decode(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    length = response.headers.get("Inference-Header-Content-Length")
    if length is None:
        parsed = codec.response_from_json(response.content)
    else:
        parsed = codec.response_from_binary(response.content, int(length))
    return dict(codec.decode_outputs(parsed))


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    async with start_cluster([APP], api=ApiServerConfig(port=0, grpc_port=0, token=None)) as c:
        yield c


@pytest.fixture(scope="module")
async def cluster_no_shm() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, shm_threshold=0)
    async with start_cluster([APP], api=config) as c:
        yield c


async def scale(url: str, x: np.ndarray[Any, Any], binary_out: bool = True) -> dict[str, Any]:
    body, headers = binary_body(x, binary_out)
    headers["X-Capability-Type"] = "scale"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return decode(await http.post("/infer", content=body, headers=headers))


async def test_an_8_mib_input_and_output_cross_in_shared_memory(cluster: Cluster) -> None:
    x = np.arange(2 * MIB, dtype=np.float32)  # 8 MiB
    out = await scale(cluster.url, x)
    # The message the worker got (as it crossed gRPC and the socket) is small,
    # and the handler's array is a read-only view of a mapping.
    assert int(out["message_bytes"][0]) < 4096
    assert bool(out["view"][0])
    assert float(out["total"][0]) == float(x.sum(dtype=np.float64))
    np.testing.assert_array_equal(out["y"], x * 2)
    assert segments_of(os.getpid()) == []  # both segments deleted with the call


async def test_json_answer_of_a_big_output_from_shared_memory(cluster: Cluster) -> None:
    x = np.ones(MIB // 2, dtype=np.float32)  # 2 MiB in, 2 MiB out, answered as JSON
    out = await scale(cluster.url, x, binary_out=False)
    assert int(out["message_bytes"][0]) < 4096
    assert len(out["y"]) == x.size and float(np.sum(out["y"])) == 2.0 * x.size
    assert segments_of(os.getpid()) == []


async def test_a_handler_reading_the_protobuf_gets_the_bytes(cluster: Cluster) -> None:
    """Without zero_copy, an input that came through shared memory is copied
    into raw_input_contents: code reading the message sees no difference."""
    x = np.arange(2 * MIB, dtype=np.float32)
    body, headers = binary_body(x)
    headers["X-Capability-Type"] = "raw"
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        out = decode(await http.post("/infer", content=body, headers=headers))
    assert int(out["length"][0]) == x.nbytes
    assert float(out["total"][0]) == float(x.sum(dtype=np.float64))
    assert segments_of(os.getpid()) == []


async def test_small_inputs_stay_in_the_message(cluster: Cluster) -> None:
    x = np.ones(1024, dtype=np.float32)  # 4 KiB, under the 1 MiB threshold
    out = await scale(cluster.url, x)
    assert int(out["message_bytes"][0]) >= x.nbytes
    np.testing.assert_array_equal(out["y"], x * 2)


async def test_with_the_threshold_at_zero_big_inputs_go_through_grpc(
    cluster_no_shm: Cluster,
) -> None:
    x = np.arange(2 * MIB, dtype=np.float32)
    out = await scale(cluster_no_shm.url, x)
    assert int(out["message_bytes"][0]) >= x.nbytes
    assert not bool(out["view"][0])  # a view of the message's bytes, not of a mapping
    np.testing.assert_array_equal(out["y"], x * 2)


async def test_clients_cannot_name_segments_themselves(cluster: Cluster) -> None:
    doc = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [1],
                "data": [1.0],
                "parameters": {shm.PATH: "/dev/shm/anything", shm.SIZE: 4},
            }
        ]
    }
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        answer = await http.post("/infer", json=doc, headers={"X-Capability-Type": "scale"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "parameter 'anyserve-shm-" in error and "is reserved for anyserve" in error


async def hold_call(url: str, status: list[int]) -> None:
    body, headers = binary_body(np.ones(MIB, dtype=np.float32))
    headers["X-Capability-Type"] = "hold"
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        try:
            answer = await http.post("/infer", content=body, headers=headers)
        except httpx.TransportError:  # the API server was killed
            status.append(-1)
            return
        status.append(answer.status_code)


def hold_workers(cluster: Cluster) -> list[int]:
    return [
        slot.pid
        for replica in cluster.replicas
        for slot in replica.running.manager.all_slots()
        if slot.handler.name == "hold" and slot.pid and slot.inflight
    ]


async def test_a_worker_killed_mid_call_leaves_no_segment(cluster: Cluster) -> None:
    status: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold_call, cluster.url, status)
        await eventually(lambda: hold_workers(cluster), what="the call reached its worker")
        assert segments_of(os.getpid())  # the input is in shared memory meanwhile
        os.kill(hold_workers(cluster)[0], signal.SIGKILL)
    assert status == [503]
    assert segments_of(os.getpid()) == []


async def test_an_api_server_killed_mid_call_leaves_no_segment() -> None:
    port = free_port()
    proc = await anyio.open_process(
        [sys.executable, "-m", "anyserve.cli", "api-server", "--port", str(port),
         "--grpc-port", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:

            async def serves_hold() -> bool:
                try:
                    replicas = (await http.get("/registry")).json()["replicas"]
                except httpx.HTTPError:
                    return False
                return bool(replicas)

            async with start_replica(APP, api_server=url):
                await eventually(serves_hold, timeout=20, what="the replica registered")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(hold_call, url, [])
                    await eventually(
                        lambda: segments_of(proc.pid), what="the input was put in shared memory"
                    )
                    proc.kill()
                    await proc.wait()
                    # The replica's sweeper deletes what the dead server owned.
                    await eventually(
                        lambda: not segments_of(proc.pid),
                        timeout=3 * shm.SWEEP_INTERVAL,
                        what="the dead API server's segments were swept",
                    )
                    tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_8_mib_through_a_registered_region_is_not_copied(cluster: Cluster) -> None:
    """Triton's system shared memory: the client's region is read and written
    by the worker in place; the gRPC messages stay small."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client_shm = pytest.importorskip("tritonclient.utils.shared_memory")
    x = np.arange(2 * MIB, dtype=np.float32)
    key = f"/anyserve_test_{os.getpid()}"

    def run() -> tuple[Any, np.ndarray[Any, Any]]:
        client = grpcclient.InferenceServerClient(url=cluster.api.grpc_endpoint)
        handle = client_shm.create_shared_memory_region("big", key, 2 * x.nbytes)
        try:
            client_shm.set_shared_memory_region(handle, [x])
            client.register_system_shared_memory("big", key, 2 * x.nbytes)
            tensor = grpcclient.InferInput("x", [x.size], "FP32")
            tensor.set_shared_memory("big", x.nbytes)
            outputs = [grpcclient.InferRequestedOutput(n) for n in ("y", "message_bytes", "view")]
            outputs[0].set_shared_memory("big", x.nbytes, offset=x.nbytes)
            result = client.infer("scale", [tensor], outputs=outputs)
            y = client_shm.get_contents_as_numpy(handle, np.float32, [x.size], offset=x.nbytes)
            client.unregister_system_shared_memory("big")
            return result, y.copy()
        finally:
            client_shm.destroy_shared_memory_region(handle)
            client.close()
            assert not os.path.exists("/dev/shm" + key)

    result, y = await anyio.to_thread.run_sync(run)
    assert result.get_response().ByteSize() < 4096  # the answer did not carry y either
    assert int(result.as_numpy("message_bytes")[0]) < 4096
    assert bool(result.as_numpy("view")[0])
    np.testing.assert_array_equal(y, x * 2)
