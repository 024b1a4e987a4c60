"""Inference through Triton's system shared memory, as Triton's own examples
(``simple_{http,grpc}_shm_client``, ``simple_{http,grpc}_shm_string_client``)
do it: the client writes its inputs into its own ``/dev/shm`` segment, names
the region on each input and requested output, and reads the answers from its
output region. Nothing of the tensors crosses gRPC or the worker socket."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import numpy as np
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient import utils  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.anyio

APP = "tests.apps.triton_models:app"
MODULES = pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None)
    async with start_cluster([APP], api=config) as running:
        yield running


def url_for(cluster: Cluster, module: Any) -> str:
    if module is httpclient:
        return cluster.url.removeprefix("http://")
    return cluster.api.grpc_endpoint


def unique(name: str) -> str:
    return f"/{name}_{uuid.uuid4().hex[:8]}"


def segments_left(keys: list[str]) -> list[str]:
    return [k for k in keys if os.path.exists("/dev/shm" + k)]


def requested(module: Any, name: str) -> Any:
    """A requested output as the examples ask for it (binary over HTTP)."""
    if module is httpclient:
        return module.InferRequestedOutput(name, binary_data=True)
    return module.InferRequestedOutput(name)


def output_meta(module: Any, output: Any) -> tuple[str, list[int]]:
    if module is httpclient:
        return output["datatype"], list(output["shape"])
    return output.datatype, list(output.shape)


@MODULES
async def test_simple_shm_client(cluster: Cluster, module: Any) -> None:
    """``simple_{http,grpc}_shm_client``: INT32 sum and difference."""
    keys = [unique("input_simple"), unique("output_simple")]

    def run() -> None:
        client = module.InferenceServerClient(url=url_for(cluster, module))
        client.unregister_system_shared_memory()
        a = np.arange(16, dtype=np.int32)
        b = np.ones(16, dtype=np.int32)
        size = a.size * a.itemsize
        out_handle = shm.create_shared_memory_region("output_data", keys[1], size * 2)
        in_handle = shm.create_shared_memory_region("input_data", keys[0], size * 2)
        try:
            client.register_system_shared_memory("output_data", keys[1], size * 2)
            shm.set_shared_memory_region(in_handle, [a])
            shm.set_shared_memory_region(in_handle, [b], offset=size)
            client.register_system_shared_memory("input_data", keys[0], size * 2)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "INT32"),
                module.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            inputs[0].set_shared_memory("input_data", size)
            inputs[1].set_shared_memory("input_data", size, offset=size)
            outputs = [
                requested(module, "OUTPUT0"),
                requested(module, "OUTPUT1"),
            ]
            outputs[0].set_shared_memory("output_data", size)
            outputs[1].set_shared_memory("output_data", size, offset=size)
            results = client.infer("simple", inputs, outputs=outputs)
            out0, out1 = results.get_output("OUTPUT0"), results.get_output("OUTPUT1")
            assert out0 is not None and out1 is not None
            datatype, shape = output_meta(module, out0)
            assert (datatype, shape) == ("INT32", [1, 16])
            sums = shm.get_contents_as_numpy(out_handle, utils.triton_to_np_dtype(datatype), shape)
            differences = shm.get_contents_as_numpy(
                out_handle, np.int32, output_meta(module, out1)[1], offset=size
            )
            for i in range(16):
                assert a[i] + b[i] == sums[0][i], "incorrect sum"
                assert a[i] - b[i] == differences[0][i], "incorrect difference"
            status = client.get_system_shared_memory_status()
            assert status  # both regions listed
            client.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(out_handle)
            shm.destroy_shared_memory_region(in_handle)
            client.close()

    await anyio.to_thread.run_sync(run)
    assert segments_left(keys) == []


@MODULES
async def test_simple_shm_string_client(cluster: Cluster, module: Any) -> None:
    """``simple_{http,grpc}_shm_string_client``: BYTES holding numbers."""
    keys = [unique("input_simple"), unique("output_simple")]

    def run() -> None:
        client = module.InferenceServerClient(url=url_for(cluster, module))
        client.unregister_system_shared_memory()
        numbers = np.arange(16, dtype=np.int32)
        a = np.array([str(x).encode() for x in numbers], dtype=object)
        b = np.array([b"1"] * 16, dtype=object)
        a_raw, b_raw = utils.serialize_byte_tensor(a), utils.serialize_byte_tensor(b)
        a_size, b_size = utils.serialized_byte_size(a_raw), utils.serialized_byte_size(b_raw)
        expected_sum = utils.serialize_byte_tensor(
            np.array([str(x + 1).encode() for x in numbers], dtype=object)
        )
        expected_diff = utils.serialize_byte_tensor(
            np.array([str(x - 1).encode() for x in numbers], dtype=object)
        )
        out0_size = utils.serialized_byte_size(expected_sum)
        out1_size = utils.serialized_byte_size(expected_diff)
        out_handle = shm.create_shared_memory_region("output_data", keys[1], out0_size + out1_size)
        in_handle = shm.create_shared_memory_region("input_data", keys[0], a_size + b_size)
        try:
            client.register_system_shared_memory("output_data", keys[1], out0_size + out1_size)
            shm.set_shared_memory_region(in_handle, [a_raw])
            shm.set_shared_memory_region(in_handle, [b_raw], offset=a_size)
            client.register_system_shared_memory("input_data", keys[0], a_size + b_size)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "BYTES"),
                module.InferInput("INPUT1", [1, 16], "BYTES"),
            ]
            inputs[0].set_shared_memory("input_data", a_size)
            inputs[1].set_shared_memory("input_data", b_size, offset=a_size)
            outputs = [
                requested(module, "OUTPUT0"),
                requested(module, "OUTPUT1"),
            ]
            outputs[0].set_shared_memory("output_data", out0_size)
            outputs[1].set_shared_memory("output_data", out1_size, offset=out0_size)
            results = client.infer("simple_string", inputs, outputs=outputs)
            out0 = results.get_output("OUTPUT0")
            assert out0 is not None
            datatype, shape = output_meta(module, out0)
            sums = shm.get_contents_as_numpy(out_handle, np.object_, shape)
            differences = shm.get_contents_as_numpy(out_handle, np.object_, shape, offset=out0_size)
            assert datatype == "BYTES"
            for i in range(16):
                assert int(sums[0][i]) == i + 1, "incorrect sum"
                assert int(differences[0][i]) == i - 1, "incorrect difference"
            client.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(out_handle)
            shm.destroy_shared_memory_region(in_handle)
            client.close()

    await anyio.to_thread.run_sync(run)
    assert segments_left(keys) == []


@MODULES
async def test_an_output_region_too_small_is_refused(cluster: Cluster, module: Any) -> None:
    key = unique("small_out")

    def run() -> str:
        client = module.InferenceServerClient(url=url_for(cluster, module))
        handle = shm.create_shared_memory_region("small_out", key, 16)
        try:
            client.register_system_shared_memory("small_out", key, 16)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "INT32"),
                module.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            for tensor in inputs:
                tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
            outputs = [module.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory("small_out", 16)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("simple", inputs, outputs=outputs)
            client.unregister_system_shared_memory("small_out")
            return str(caught.value)
        finally:
            shm.destroy_shared_memory_region(handle)
            client.close()

    message = await anyio.to_thread.run_sync(run)
    assert "should be at least 64 bytes to hold the results" in message
    assert segments_left([key]) == []


@MODULES
async def test_a_region_used_beyond_its_end_is_refused(cluster: Cluster, module: Any) -> None:
    key = unique("short_in")

    def run() -> str:
        client = module.InferenceServerClient(url=url_for(cluster, module))
        handle = shm.create_shared_memory_region("short_in", key, 64)
        try:
            client.register_system_shared_memory("short_in", key, 64)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "INT32"),
                module.InferInput("INPUT1", [1, 16], "INT32"),
            ]
            inputs[0].set_shared_memory("short_in", 64)
            inputs[1].set_shared_memory("short_in", 64, offset=32)
            with pytest.raises(InferenceServerException) as caught:
                client.infer("simple", inputs)
            client.unregister_system_shared_memory("short_in")
            return str(caught.value)
        finally:
            shm.destroy_shared_memory_region(handle)
            client.close()

    message = await anyio.to_thread.run_sync(run)
    assert "beyond shared memory region 'short_in' of 64 bytes" in message
