"""Triton's Python client examples' calls and checks, against anyserve.

Each test makes the calls one of NVIDIA's examples (triton-inference-server/
client, ``src/python/examples/``) makes, through tritonclient (HTTP and gRPC,
sync, async and aio), and checks what it checks, against an API server and a
replica serving ``tests/apps/triton_models.py`` (worker processes are real).
Where anyserve differs on purpose (the server's name is "anyserve"; no model
config overrides) the test checks anyserve's answer instead.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import grpc
import numpy as np
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
aiohttpclient = pytest.importorskip("tritonclient.http.aio")
aiogrpcclient = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor  # noqa: E402

pytestmark = pytest.mark.anyio

APP = "tests.apps.triton_models:app"
T = TypeVar("T")


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.5)
    async with start_cluster([APP], api=config) as running:
        yield running


def http_url(cluster: Cluster) -> str:
    return cluster.url.removeprefix("http://")


def grpc_url(cluster: Cluster) -> str:
    return cluster.api.grpc_endpoint


async def in_thread(fn: Callable[[], T]) -> T:
    """Sync tritonclient calls block: run them off the server's event loop."""
    return await anyio.to_thread.run_sync(fn)


def simple_inputs(module: Any, datatype: str = "INT32") -> tuple[list[Any], Any, Any]:
    dtype = {"INT32": np.int32, "INT8": np.int8}[datatype]
    a = np.arange(16, dtype=dtype).reshape(1, 16)
    b = np.ones((1, 16), dtype=dtype)
    inputs = [
        module.InferInput("INPUT0", [1, 16], datatype),
        module.InferInput("INPUT1", [1, 16], datatype),
    ]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a, b


def check_sum_and_difference(result: Any, a: Any, b: Any) -> None:
    assert np.array_equal(result.as_numpy("OUTPUT0"), a + b), "incorrect sum"
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b), "incorrect difference"


# ----------------------------------------------------------------- simple infer


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
async def test_simple_infer_client(cluster: Cluster, module: Any) -> None:
    url = http_url(cluster) if module is httpclient else grpc_url(cluster)

    def run() -> None:
        client = module.InferenceServerClient(url=url)
        try:
            inputs, a, b = simple_inputs(module)
            outputs = [
                module.InferRequestedOutput("OUTPUT0"),
                module.InferRequestedOutput("OUTPUT1"),
            ]
            result = client.infer("simple", inputs, outputs=outputs, request_id="1")
            check_sum_and_difference(result, a, b)
            # The examples' headers and a request without explicit outputs.
            check_sum_and_difference(client.infer("simple", inputs, headers={"test": "1"}), a, b)
        finally:
            client.close()

    await in_thread(run)


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
async def test_simple_string_infer_client(cluster: Cluster, module: Any) -> None:
    url = http_url(cluster) if module is httpclient else grpc_url(cluster)

    def run() -> None:
        client = module.InferenceServerClient(url=url)
        try:
            numbers = np.arange(16, dtype=np.int32).reshape(1, 16)
            a = np.array([str(x).encode() for x in numbers.flatten()], dtype=object).reshape(1, 16)
            b = np.array([b"1"] * 16, dtype=object).reshape(1, 16)
            inputs = [
                module.InferInput("INPUT0", [1, 16], "BYTES"),
                module.InferInput("INPUT1", [1, 16], "BYTES"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("simple_string", inputs)
            sums, differences = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
            for i in range(16):
                assert int(sums[0][i]) == i + 1, "incorrect sum"
                assert int(differences[0][i]) == i - 1, "incorrect difference"
        finally:
            client.close()

    await in_thread(run)


async def test_simple_async_infer_client_http(cluster: Cluster) -> None:
    def run() -> None:
        client = httpclient.InferenceServerClient(url=http_url(cluster), concurrency=4)
        try:
            inputs, a, b = simple_inputs(httpclient)
            pending = [client.async_infer("simple", inputs, request_id=str(i)) for i in range(8)]
            for request in pending:
                check_sum_and_difference(request.get_result(), a, b)
        finally:
            client.close()

    await in_thread(run)


async def test_simple_async_infer_client_grpc(cluster: Cluster) -> None:
    def run() -> None:
        client = grpcclient.InferenceServerClient(url=grpc_url(cluster))
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        try:
            inputs, a, b = simple_inputs(grpcclient)
            for i in range(8):
                client.async_infer(
                    "simple",
                    inputs,
                    partial(lambda q, result, error: q.put((result, error)), results),
                    request_id=str(i),
                )
            for _ in range(8):
                result, error = results.get(timeout=20)
                assert error is None, error
                check_sum_and_difference(result, a, b)
        finally:
            client.close()

    await in_thread(run)


async def test_simple_aio_infer_client(cluster: Cluster) -> None:
    inputs, a, b = simple_inputs(aiohttpclient)
    async with aiohttpclient.InferenceServerClient(url=http_url(cluster)) as client:
        assert await client.is_server_live()
        check_sum_and_difference(await client.infer("simple", inputs), a, b)
    inputs, a, b = simple_inputs(aiogrpcclient)
    async with aiogrpcclient.InferenceServerClient(url=grpc_url(cluster)) as client:
        assert await client.is_server_live()
        check_sum_and_difference(await client.infer("simple", inputs), a, b)


async def test_reuse_infer_objects_client(cluster: Cluster) -> None:
    def run() -> None:
        for module, url in ((httpclient, http_url(cluster)), (grpcclient, grpc_url(cluster))):
            client = module.InferenceServerClient(url=url)
            try:
                inputs, a, b = simple_inputs(module)
                outputs = [
                    module.InferRequestedOutput("OUTPUT0"),
                    module.InferRequestedOutput("OUTPUT1"),
                ]
                for _ in range(3):  # the same input and output objects, again and again
                    check_sum_and_difference(client.infer("simple", inputs, outputs=outputs), a, b)
            finally:
                client.close()

    await in_thread(run)


# ----------------------------------------------------------------- health and metadata


async def test_health_metadata_http(cluster: Cluster) -> None:
    def run() -> None:
        client = httpclient.InferenceServerClient(url=http_url(cluster))
        try:
            assert client.is_server_live(headers={"test": "1", "dummy": "2"})
            assert client.is_server_ready()
            assert client.is_model_ready("simple")
            metadata = client.get_server_metadata()
            assert metadata["name"] == "anyserve"  # Triton's examples expect "triton"
            assert {"sequence", "model_repository", "binary_tensor_data"} <= set(
                metadata["extensions"]
            )
            assert client.get_model_metadata("simple", headers={"test": "1"})["name"] == "simple"
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("wrong_model_name")
            assert (
                "Request for unknown model: 'wrong_model_name' is not found"
                in caught.value.message()
            )
            assert client.get_model_config("simple")["name"] == "simple"
        finally:
            client.close()

    await in_thread(run)


async def test_health_metadata_grpc(cluster: Cluster) -> None:
    def run() -> None:
        client = grpcclient.InferenceServerClient(url=grpc_url(cluster))
        try:
            assert client.is_server_live(headers={"test": "1", "dummy": "2"})
            assert client.is_server_ready()
            assert client.is_model_ready("simple")
            assert client.get_server_metadata().name == "anyserve"
            assert client.get_model_metadata("simple", headers={"test": "1"}).name == "simple"
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_metadata("wrong_model_name")
            assert "Request for unknown model" in caught.value.message()
            assert caught.value.status() == "StatusCode.NOT_FOUND"
            assert client.get_model_config("simple").config.name == "simple"
        finally:
            client.close()

    await in_thread(run)


async def test_grpc_client_raw_stub(cluster: Cluster) -> None:
    """grpc_client.py: every health and metadata RPC through the raw stub."""

    def run() -> None:
        with grpc.insecure_channel(grpc_url(cluster)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(service_pb2.ServerLiveRequest()).live
            assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready
            assert stub.ModelReady(service_pb2.ModelReadyRequest(name="simple", version="")).ready
            assert stub.ServerMetadata(service_pb2.ServerMetadataRequest()).name == "anyserve"
            metadata = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="simple"))
            assert metadata.versions == ["1"]
            config = stub.ModelConfig(service_pb2.ModelConfigRequest(name="simple"))
            assert config.config.name == "simple"

    await in_thread(run)


# ----------------------------------------------------------------- versions


async def test_model_versions(cluster: Cluster) -> None:
    def run() -> None:
        http = httpclient.InferenceServerClient(url=http_url(cluster))
        grpc_client = grpcclient.InferenceServerClient(url=grpc_url(cluster))
        try:
            assert http.get_model_metadata("versioned")["versions"] == ["1", "3"]
            assert list(grpc_client.get_model_metadata("versioned").versions) == ["1", "3"]
            for client in (http, grpc_client):
                for version, expected in (("", b"3"), ("1", b"1"), ("3", b"3")):
                    result = client.infer("versioned", [], model_version=version)
                    assert result.as_numpy("VERSION").tolist() == [expected]
                assert client.is_model_ready("versioned", model_version="1")
                assert not client.is_model_ready("versioned", model_version="2")
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("versioned", [], model_version="2")
                assert caught.value.message().startswith(
                    "Request for unknown model: 'versioned' version 2 is not found"
                ), caught.value.message()
                with pytest.raises(InferenceServerException) as caught:
                    client.get_model_metadata("versioned", model_version="2")
                assert "version 2 is not found" in caught.value.message()
            assert http.get_model_metadata("versioned", model_version="1")["name"] == "versioned"
        finally:
            http.close()
            grpc_client.close()

    await in_thread(run)


async def test_unknown_version_is_404_over_http(cluster: Cluster) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=cluster.url) as http:
        answer = await http.post("/v2/models/versioned/versions/7/infer", json={"inputs": []})
        assert answer.status_code == 404
        assert answer.json()["error"].startswith(
            "Request for unknown model: 'versioned' version 7 is not found"
        )
        answer = await http.post("/v2/models/versioned/versions/1/infer", json={"inputs": []})
        assert answer.status_code == 200
        assert answer.json()["outputs"][0]["data"] == ["1"]


# ----------------------------------------------------------------- explicit contents


async def test_grpc_explicit_content_clients(cluster: Cluster) -> None:
    """grpc_explicit_{int,int8,byte}_content_client.py: typed contents through
    the raw stub; a wrong version string fails in Triton's words."""

    def request(model: str, datatype: str, a: list[Any], b: list[Any]) -> Any:
        message = service_pb2.ModelInferRequest(model_name=model, model_version="")
        for name, values in (("INPUT0", a), ("INPUT1", b)):
            tensor = message.inputs.add(name=name, datatype=datatype, shape=[1, 16])
            if datatype == "BYTES":
                tensor.contents.bytes_contents.extend(values)
            else:
                tensor.contents.int_contents[:] = values
        message.outputs.add(name="OUTPUT0")
        message.outputs.add(name="OUTPUT1")
        return message

    def run() -> None:
        a, b = list(range(16)), [1] * 16
        with grpc.insecure_channel(grpc_url(cluster)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for model, datatype, dtype in (
                ("simple", "INT32", np.int32),
                ("simple_int8", "INT8", np.int8),
            ):
                message = request(model, datatype, a, b)
                response = stub.ModelInfer(message)
                results = [
                    np.resize(np.frombuffer(raw, dtype=dtype), list(output.shape))
                    for raw, output in zip(
                        response.raw_output_contents, response.outputs, strict=True
                    )
                ]
                assert len(results) == 2
                for i in range(16):
                    assert results[0][0][i] == a[i] + b[i]
                    assert results[1][0][i] == a[i] - b[i]
                message.model_version = "wrong_specification"
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ModelInfer(message)
                assert (
                    "failed to get model version from specified version string"
                    " 'wrong_specification'" in str(caught.value)
                )
            texts = [str(i).encode() for i in range(16)]
            response = stub.ModelInfer(request("simple_string", "BYTES", texts, [b"1"] * 16))
            results = [
                np.resize(deserialize_bytes_tensor(raw), list(output.shape))
                for raw, output in zip(response.raw_output_contents, response.outputs, strict=True)
            ]
            for i in range(16):
                assert int(results[0][0][i]) == i + 1
                assert int(results[1][0][i]) == i - 1

    await in_thread(run)


# ----------------------------------------------------------------- decoupled


async def test_grpc_custom_repeat(cluster: Cluster) -> None:
    """simple_grpc_custom_repeat.py (shorter delays): every response, in order."""

    def run() -> list[int]:
        count, offset = 10, 100
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        inputs = [
            grpcclient.InferInput("IN", [count], "INT32"),
            grpcclient.InferInput("DELAY", [count], "UINT32"),
            grpcclient.InferInput("WAIT", [1], "UINT32"),
        ]
        inputs[0].set_data_from_numpy(np.arange(offset, offset + count, dtype=np.int32))
        inputs[1].set_data_from_numpy(np.full([count], 5, dtype=np.uint32))
        inputs[2].set_data_from_numpy(np.array([5], dtype=np.uint32))
        with grpcclient.InferenceServerClient(url=grpc_url(cluster)) as client:
            client.start_stream(
                callback=partial(lambda q, result, error: q.put((result, error)), results)
            )
            client.async_stream_infer(
                "repeat_int32", inputs, outputs=[grpcclient.InferRequestedOutput("OUT")]
            )
            got = []
            for _ in range(count):
                result, error = results.get(timeout=20)
                assert error is None, error
                assert len(result.as_numpy("OUT")) == 1
                got.append(int(result.as_numpy("OUT")[0]))
            client.stop_stream()
        return got

    assert await in_thread(run) == list(range(100, 110))


# ----------------------------------------------------------------- sequences

VALUES = [11, 7, 5, 3, 2, 0, 1]


def check_sequences(int0: list[Any], int1: list[Any], text0: list[Any]) -> None:
    """The sequence examples' checks: the first answer is the input plus one."""
    assert len(int0) == len(int1) == len(text0) == len(VALUES) + 1
    for i in range(len(VALUES) + 1):
        assert int0[i][0][0] == (1 if i == 0 else VALUES[i - 1])
        assert int1[i][0][0] == (101 if i == 0 else -VALUES[i - 1])
        assert text0[i][0][0] == (21 if i == 0 else -VALUES[i - 1])


def sequence_input(module: Any, value: int) -> list[Any]:
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.full([1, 1], value, dtype=np.int32))
    return [tensor]


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
async def test_sequence_sync_infer_client(cluster: Cluster, module: Any) -> None:
    url = http_url(cluster) if module is httpclient else grpc_url(cluster)

    def run() -> None:
        client = module.InferenceServerClient(url=url)

        def send(values: list[int], sequence_id: int | str) -> list[Any]:
            return [
                client.infer(
                    "simple_sequence",
                    sequence_input(module, value),
                    outputs=[module.InferRequestedOutput("OUTPUT")],
                    sequence_id=sequence_id,
                    sequence_start=index == 0,
                    sequence_end=index == len(values) - 1,
                ).as_numpy("OUTPUT")
                for index, value in enumerate(values)
            ]

        try:
            int0 = send([0, *VALUES], 1000)
            int1 = send([100, *(-v for v in VALUES)], 1001)
            text0 = send([20, *(-v for v in VALUES)], str(uuid.uuid4()))
            check_sequences(int0, int1, text0)
        finally:
            client.close()

    await in_thread(run)


async def test_sequence_stream_infer_client(cluster: Cluster) -> None:
    """simple_grpc_sequence_stream_infer_client.py: three sequences
    interleaved on one stream, every request sent before any answer."""

    def run() -> dict[str, list[Any]]:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        string_id = str(uuid.uuid4())
        with grpcclient.InferenceServerClient(url=grpc_url(cluster)) as client:
            client.start_stream(
                callback=partial(lambda q, result, error: q.put((result, error)), results)
            )
            for sequence_id, values in (
                (2000, [0, *VALUES]),
                (2001, [100, *(-v for v in VALUES)]),
                (string_id, [20, *(-v for v in VALUES)]),
            ):
                for index, value in enumerate(values):
                    client.async_stream_infer(
                        "simple_sequence",
                        sequence_input(grpcclient, value),
                        request_id=f"{sequence_id}_{index + 1}",
                        sequence_id=sequence_id,
                        sequence_start=index == 0,
                        sequence_end=index == len(values) - 1,
                    )
            by_id: dict[str, list[Any]] = {"2000": [], "2001": [], string_id: []}
            for _ in range(3 * (len(VALUES) + 1)):
                result, error = results.get(timeout=20)
                assert error is None, error
                by_id[result.get_response().id.rsplit("_", 1)[0]].append(result.as_numpy("OUTPUT"))
            client.stop_stream()
        return {"int0": by_id["2000"], "int1": by_id["2001"], "text0": by_id[string_id]}

    got = await in_thread(run)
    check_sequences(got["int0"], got["int1"], got["text0"])


async def test_aio_sequence_stream_infer_client(cluster: Cluster) -> None:
    """simple_grpc_aio_sequence_stream_infer_client.py: the same through grpc.aio."""

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for sequence_id, values in ((3000, [0, *VALUES]), (3001, [100, *(-v for v in VALUES)])):
            for index, value in enumerate(values):
                yield {
                    "model_name": "simple_sequence",
                    "inputs": sequence_input(aiogrpcclient, value),
                    "request_id": f"{sequence_id}_{index + 1}",
                    "sequence_id": sequence_id,
                    "sequence_start": index == 0,
                    "sequence_end": index == len(values) - 1,
                }

    by_id: dict[str, list[int]] = {"3000": [], "3001": []}
    async with aiogrpcclient.InferenceServerClient(url=grpc_url(cluster)) as client:
        responses = client.stream_infer(inputs_iterator=requests())
        async for result, error in responses:
            assert error is None, error
            by_id[result.get_response().id.split("_")[0]].append(
                int(result.as_numpy("OUTPUT")[0][0])
            )
            if sum(map(len, by_id.values())) == 2 * (len(VALUES) + 1):
                break
    assert by_id["3000"] == [1, *VALUES]
    assert by_id["3001"] == [101, *(-v for v in VALUES)]


async def test_sequence_without_start_is_refused(cluster: Cluster) -> None:
    def run() -> None:
        with grpcclient.InferenceServerClient(url=grpc_url(cluster)) as client:
            with pytest.raises(InferenceServerException) as caught:
                client.infer("simple_sequence", sequence_input(grpcclient, 1), sequence_id=4242)
            assert "must specify the START flag" in caught.value.message()
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"

    await in_thread(run)


# ----------------------------------------------------------------- model control (runs last)


async def test_model_control(cluster: Cluster) -> None:
    """simple_{http,grpc}_model_control.py on ``simple_int8`` (loaded again at
    the end): index, load, a refused config override, unload, an unknown model."""

    def run(module: Any, url: str) -> None:
        client = module.InferenceServerClient(url=url)
        try:
            index = client.get_model_repository_index()
            names = (
                [m["name"] for m in index]
                if module is httpclient
                else [m.name for m in index.models]
            )
            assert {"simple", "simple_int8", "simple_sequence", "repeat_int32"} <= set(names)
            client.load_model("simple_int8")
            assert client.is_model_ready("simple_int8")
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("simple_int8", config='{"max_batch_size":"16"}')
            assert "failed to load" in caught.value.message()
            client.unload_model("simple_int8")
            assert not client.is_model_ready("simple_int8")
            client.load_model("simple_int8")
            assert client.is_model_ready("simple_int8")
            inputs, a, b = simple_inputs(module, "INT8")
            check_sum_and_difference(client.infer("simple_int8", inputs), a, b)
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("wrong_model_name")
            assert "failed to load" in caught.value.message()
            assert client.is_server_live()
        finally:
            client.close()

    await in_thread(partial(run, httpclient, http_url(cluster)))
    await in_thread(partial(run, grpcclient, grpc_url(cluster)))
