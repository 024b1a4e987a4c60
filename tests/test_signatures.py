"""Declared tensor signatures end to end (real processes).

One cluster runs tests/apps/signature_app.py: ``classifier`` (``x`` FP32
[-1, 4] -> ``probs`` FP32 [-1, 3], ``max_batch_size=4``, two workers),
``echo`` (nothing declared) and ``lazy`` (``preload=False``: loadable only).
The real tritonclient reads the model config, metadata and repository index
over gRPC and HTTP through the API server; requests that break the
declaration are refused with 400 / INVALID_ARGUMENT before the handler runs;
``anyserve infer`` types ``-i x=1,2,3,4`` from the declaration.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import httpx
import numpy as np
import pytest

from anyserve.cluster import Cluster
from tests.support import eventually

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
triton_utils = pytest.importorskip("tritonclient.utils")

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

INDEX = [
    {"name": "classifier", "version": "1", "state": "READY"},
    {"name": "echo", "version": "1", "state": "READY"},
    {"name": "lazy", "version": "1", "state": "UNAVAILABLE", "reason": "loadable"},
]
X_META = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
PROBS_META = {"name": "probs", "datatype": "FP32", "shape": [-1, 3]}


def expected_probs(row: list[float]) -> list[float]:
    """What the classifier answers for one row (softmax of x0, x1, x2 + x3)."""
    logits = [row[0], row[1], row[2] + row[3]]
    exps = [math.exp(v - max(logits)) for v in logits]
    return [e / sum(exps) for e in exps]


async def registered(http: httpx.AsyncClient) -> bool:
    replicas = (await http.get("/registry")).json()["replicas"]
    return bool(replicas) and (
        {"model": "classifier", "type": "classify"} in replicas[0]["capabilities"]
        and {"type": "echo"} in replicas[0]["capabilities"]
        and {"type": "lazy"} in replicas[0]["loadable"]
    )


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    from anyserve.api_server.config import ApiServerConfig
    from anyserve.cluster import start_cluster

    config = ApiServerConfig(port=0, grpc_port=0, token=None)
    async with start_cluster(["tests.apps.signature_app:app"], api=config) as running:
        async with httpx.AsyncClient(base_url=running.url) as http:
            await eventually(lambda: registered(http), 30, what="signature_app registered")
        yield running


async def in_thread(func: Callable[[], T]) -> T:
    """Run a blocking tritonclient call off the event loop the cluster runs on."""
    return await anyio.to_thread.run_sync(func)


def x_input(module: Any, rows: list[list[float]], datatype: str = "FP32") -> Any:
    dtype = np.float32 if datatype == "FP32" else np.int32
    array = np.array(rows, dtype=dtype)
    tensor = module.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# ------------------------------------------------------------------ config, metadata, index


async def test_grpc_config_metadata_and_index(cluster: Cluster) -> None:
    def run() -> tuple[Any, Any, Any, Any]:
        client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        try:
            return (
                client.get_model_config("classifier"),
                client.get_model_metadata("classifier"),
                client.get_model_repository_index(),
                client.get_model_config("echo"),
            )
        finally:
            client.close()

    config_response, metadata, index, echo = await in_thread(run)
    config = config_response.config  # parsed by tritonclient's own generated classes
    assert (config.name, config.platform, config.backend) == ("classifier", "anyserve", "anyserve")
    assert config.max_batch_size == 4
    [x] = config.input
    assert (x.name, x.data_type, list(x.dims)) == ("x", model_config_pb2.TYPE_FP32, [4])
    [probs] = config.output
    assert (probs.name, probs.data_type, list(probs.dims)) == (
        "probs",
        model_config_pb2.TYPE_FP32,
        [3],
    )
    [group] = config.instance_group
    assert (group.count, group.kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.parameters["handler"].string_value == "classify"

    assert metadata.name == "classifier" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, 4])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probs", "FP32", [-1, 3])
    ]

    entries = [
        {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
        for m in index.models
    ]
    assert entries == [{"reason": "", **e} for e in INDEX]

    # Nothing declared: no tensors, no batching, one worker.
    assert echo.config.max_batch_size == 0 and not echo.config.input
    assert echo.config.instance_group[0].count == 1


async def test_http_config_metadata_and_index(cluster: Cluster) -> None:
    def run() -> tuple[Any, Any, Any]:
        client = httpclient.InferenceServerClient(cluster.url.removeprefix("http://"))
        try:
            return (
                client.get_model_config("classifier"),
                client.get_model_metadata("classifier"),
                client.get_model_repository_index(),
            )
        finally:
            client.close()

    config, metadata, index = await in_thread(run)
    assert config["name"] == "classifier" and config["max_batch_size"] == 4
    assert config["platform"] == config["backend"] == "anyserve"
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("x", "TYPE_FP32", [4])
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("probs", "TYPE_FP32", [3])
    ]
    assert config["instance_group"][0]["count"] == 2
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert metadata["inputs"] == [X_META] and metadata["outputs"] == [PROBS_META]
    assert index == INDEX


async def test_metadata_by_capability_headers_and_ready_only_index(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        by_headers = await http.get("/infer/metadata", headers={"X-Capability-Type": "classify"})
        assert by_headers.status_code == 200, by_headers.text
        assert by_headers.json()["name"] == "classifier"
        assert by_headers.json()["inputs"] == [X_META]

        undeclared = (await http.get("/v2/models/echo")).json()
        assert undeclared["inputs"] == [] and undeclared["outputs"] == []

        assert (await http.get("/infer/metadata")).status_code == 400
        assert (await http.get("/v2/models/nothing/config")).status_code == 404

        ready = await http.post("/v2/repository/index", json={"ready": True})
        assert ready.json() == INDEX[:2]
        assert (await http.post("/v2/repository/index", content=b"[1]")).status_code == 400

    def run() -> tuple[Any, Any]:
        client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        replica = grpcclient.InferenceServerClient(cluster.replicas[0].endpoint)
        try:
            # Headers win over the name, as for inference.
            config = client.get_model_config("ignored", headers={"x-capability-type": "classify"})
            return config, replica.get_model_repository_index()
        finally:
            client.close()
            replica.close()

    config, replica_index = await in_thread(run)
    assert config.config.name == "classifier" and config.config.max_batch_size == 4
    # A replica asked directly answers for its own handlers.
    assert [(m.name, m.state, m.reason) for m in replica_index.models] == [
        (e["name"], e["state"], e.get("reason", "")) for e in INDEX
    ]


# --------------------------------------------------------------------------- requests


async def test_a_request_that_fits_is_answered(cluster: Cluster) -> None:
    def run() -> Any:
        client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        try:
            return client.infer("classifier", [x_input(grpcclient, [[1, 2, 3, 4]])])
        finally:
            client.close()

    result = await in_thread(run)
    probs = result.as_numpy("probs")
    assert probs.shape == (1, 3)
    assert probs[0].tolist() == pytest.approx(expected_probs([1, 2, 3, 4]), rel=1e-5)


async def test_requests_breaking_the_declaration_are_refused(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        wrong_shape = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0] * 5}]
        }
        answer = await http.post("/v2/models/classifier/infer", json=wrong_shape)
        assert answer.status_code == 400, answer.text
        assert "'x'" in answer.json()["error"] and "[-1, 4]" in answer.json()["error"]

        wrong_type = {
            "inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4], "data": [1] * 4}]
        }
        answer = await http.post("/v2/models/classifier/infer", json=wrong_type)
        assert answer.status_code == 400, answer.text
        assert "'x'" in answer.json()["error"] and "FP32" in answer.json()["error"]

    def run() -> tuple[Any, Any]:
        grpc_client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        http_client = httpclient.InferenceServerClient(cluster.url.removeprefix("http://"))
        try:
            with pytest.raises(triton_utils.InferenceServerException) as by_grpc:
                grpc_client.infer("classifier", [x_input(grpcclient, [[1, 2, 3]])])
            with pytest.raises(triton_utils.InferenceServerException) as by_http:
                http_client.infer("classifier", [x_input(httpclient, [[1, 2, 3, 4]], "INT32")])
            return by_grpc.value, by_http.value
        finally:
            grpc_client.close()
            http_client.close()

    by_grpc, by_http = await in_thread(run)
    assert by_grpc.status() == "StatusCode.INVALID_ARGUMENT", by_grpc
    assert "'x'" in by_grpc.message()
    assert by_http.status() == "400", by_http
    assert "'x'" in by_http.message()


# --------------------------------------------------------------------------- the CLI


def anyserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anyserve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # A thread, so the in-process cluster keeps serving while the CLI runs.
    return await in_thread(lambda: anyserve(*args))


def printed_floats(line: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d*\.\d+(?:e[-+]?\d+)?", line)]


async def test_cli_types_inputs_from_the_declaration(cluster: Cluster) -> None:
    done = await run_cli(
        "infer", "-c", "type=classify", "-i", "x=1,2,3,4", "--api-server", cluster.url
    )
    assert done.returncode == 0, done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("probs: ")]
    assert printed_floats(line) == pytest.approx(expected_probs([1, 2, 3, 4]), rel=1e-5)

    too_few = await run_cli(
        "infer", "-c", "type=classify", "-i", "x=1,2,3", "--api-server", cluster.url
    )
    assert too_few.returncode != 0
    assert "'x'" in too_few.stderr and "[-1, 4]" in too_few.stderr


async def test_cli_explicit_types_and_text_without_a_declaration(cluster: Cluster) -> None:
    typed = await run_cli(
        "infer", "-c", "type=echo", "-i", "x:FP32[1,4]=1,2,3,4", "--api-server", cluster.url
    )
    assert typed.returncode == 0, typed.stderr
    assert "described: x:FP32[1, 4]=[[1.0, 2.0, 3.0, 4.0]]" in typed.stdout

    text = await run_cli("infer", "-c", "type=echo", "-i", "x=1,2,3,4", "--api-server", cluster.url)
    assert text.returncode == 0, text.stderr
    assert "described: x:BYTES[1]=b'1,2,3,4'" in text.stdout
