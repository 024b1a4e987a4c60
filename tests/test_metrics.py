"""The API server's /metrics and Triton statistics, against a real cluster.

One module cluster (an API server and one replica of tests/apps/metrics_app.py
with real workers); the tests that count requests send them to capabilities
no other test of the module uses, so they can run in any order.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import grpc.aio
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anyserve import codec, rpc
from anyserve._proto.grpc_predict_v2_pb2 import (
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
)
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from tests.api_calls import text_body
from tests.support import eventually

pytestmark = pytest.mark.anyio

ALPHA = "model=alpha,type=echo"
BETA = "model=beta,type=echo"
WORDS = "model=words,type=stream"


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None)
    options = {"metrics_port": 0}
    async with start_cluster(
        ["tests.apps.metrics_app:app"], api=config, replica_options=options
    ) as c:
        yield c


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    """Every sample of a /metrics page by (name, sorted labels)."""
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counts_by_capability_status_and_streams(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=20) as http:
        alpha = {"X-Capability-Model": "alpha"}
        beta = {"X-Capability-Model": "beta"}
        texts = ["a", "b", "fail", "c", "fail"]
        for text in texts:
            await http.post("/infer", headers=alpha, json=text_body("text_input", text))
        for text in ["x", "fail", "y", "z"]:
            await http.post(
                "/v2/models/beta/infer", headers=beta, json=text_body("text_input", text)
            )
        for _ in range(3):
            response = await http.post(
                "/infer/stream",
                headers={"X-Capability-Model": "words"},
                json=text_body("text_input", "one two three"),
            )
            assert response.status_code == 200
            assert response.text.count("data: {") == 3
        missing = await http.post(
            "/infer", headers={"X-Capability-Model": "nobody"}, json=text_body("text_input", "?")
        )
        assert missing.status_code == 404
    samples = await scrape(cluster.url)
    total = "anyserve_api_requests_total"
    assert value(samples, total, capability=ALPHA, endpoint="infer", code="200") == 3
    assert value(samples, total, capability=ALPHA, endpoint="infer", code="400") == 2
    assert value(samples, total, capability=BETA, endpoint="infer", code="200") == 3
    assert value(samples, total, capability=BETA, endpoint="infer", code="500") == 1
    assert value(samples, total, capability=WORDS, endpoint="stream", code="200") == 3
    # What a client asked for never becomes a label: an unknown capability is "unmatched".
    assert value(samples, total, capability="unmatched", endpoint="infer", code="404") >= 1
    assert not any("nobody" in str(key) for key in samples)
    duration = "anyserve_api_request_duration_seconds_count"
    assert value(samples, duration, capability=ALPHA, endpoint="infer") == 5
    assert value(samples, duration, capability=BETA, endpoint="infer") == 4
    ttfc = "anyserve_api_time_to_first_chunk_seconds_count"
    assert value(samples, ttfc, capability=WORDS, endpoint="stream") == 3
    assert value(samples, ttfc, capability=ALPHA, endpoint="infer") == 0
    chunks = "anyserve_api_stream_chunks_sum"
    assert value(samples, chunks, capability=WORDS, endpoint="stream") == 9
    assert (
        value(samples, "anyserve_api_request_body_bytes_total", capability=ALPHA, endpoint="infer")
        > 0
    )
    assert (
        value(samples, "anyserve_api_response_body_bytes_total", capability=BETA, endpoint="infer")
        > 0
    )
    assert value(samples, "anyserve_api_routing_decisions_total", decision="chosen") >= 12
    assert value(samples, "anyserve_api_routing_decisions_total", decision="no_match") >= 1
    assert value(samples, "anyserve_api_replicas_registered") == 1
    assert value(samples, "anyserve_api_capabilities_served") == 5
    assert value(samples, "anyserve_api_requests_in_flight") == 0


async def test_grpc_requests_are_counted(cluster: Cluster) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")

    def run() -> None:
        client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        try:
            tensor = grpcclient.InferInput("text_input", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b"hi"], dtype=object))
            for _ in range(2):
                client.infer("alpha", [tensor])
        finally:
            client.close()

    before = await scrape(cluster.url)
    await anyio.to_thread.run_sync(run)
    after = await scrape(cluster.url)
    name = "anyserve_api_requests_total"
    labels = {"capability": ALPHA, "endpoint": "grpc", "code": "200"}
    assert value(after, name, **labels) - value(before, name, **labels) == 2


@pytest.mark.parametrize("method", ["ModelInfer", "ModelStreamInfer"])
async def test_grpc_requests_in_flight_are_counted(
    cluster: Cluster, tmp_path: Path, method: str
) -> None:
    release = tmp_path / method
    request = ModelInferRequest(model_name="held", id=method)
    request.inputs.append(codec.encode_input("text_input", str(release)))
    body = request.SerializeToString()
    gauge = "anyserve_api_requests_in_flight"
    async with grpc.aio.insecure_channel(cluster.api.grpc_endpoint) as channel:
        if method == "ModelInfer":
            call: Any = channel.unary_unary(rpc.MODEL_INFER)(body, timeout=30)
        else:
            call = channel.stream_stream(rpc.MODEL_STREAM_INFER)(iter([body]), timeout=30)
        await eventually(release.with_suffix(".started").exists, what="the handler started")
        assert value(await scrape(cluster.url), gauge) == 1
        release.touch()
        if method == "ModelInfer":
            answer = ModelInferResponse.FromString(await call)
        else:
            answer = ModelStreamInferResponse.FromString(await call.read()).infer_response
        assert codec.decode_outputs(answer)["text_output"] == b"released"
        await eventually(lambda: call.done(), what="the call ended")
    assert value(await scrape(cluster.url), gauge) == 0


async def test_refused_registration_is_counted(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        response = await http.post("/register", json={"replica_id": 7})
    assert response.status_code == 400
    samples = await scrape(cluster.url)
    assert value(samples, "anyserve_api_registration_failures_total") >= 1


def _stats_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in doc["model_stats"]}


async def test_triton_statistics_over_http_and_grpc(cluster: Cluster) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    # "stats-only" requests: model=alpha is shared with the counting test, so
    # compare before and after.
    url = cluster.url.removeprefix("http://")

    def fetch() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        http_client = httpclient.InferenceServerClient(url)
        grpc_client = grpcclient.InferenceServerClient(cluster.api.grpc_endpoint)
        try:
            one = http_client.get_inference_statistics("beta")
            every = http_client.get_inference_statistics()
            by_grpc = grpc_client.get_inference_statistics("beta", as_json=True)
            return one, every, by_grpc
        finally:
            http_client.close()
            grpc_client.close()

    before, _, _ = await anyio.to_thread.run_sync(fetch)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=20) as http:
        for text in ["ok", "fail", "ok"]:
            await http.post("/v2/models/beta/infer", json=text_body("text_input", text))
    one, every, by_grpc = await anyio.to_thread.run_sync(fetch)
    was = _stats_by_name(before).get("beta", {}).get("inference_stats", {})
    now = _stats_by_name(one)["beta"]["inference_stats"]
    assert now["success"]["count"] - was.get("success", {}).get("count", 0) == 2
    assert now["fail"]["count"] - was.get("fail", {}).get("count", 0) == 1
    assert now["success"]["ns"] > 0
    assert "beta" in _stats_by_name(every)
    grpc_stats = _stats_by_name(by_grpc)["beta"]["inference_stats"]
    # as_json renders uint64 as strings (protobuf's JSON mapping).
    assert int(grpc_stats["success"]["count"]) == now["success"]["count"]
    assert int(grpc_stats["fail"]["count"]) == now["fail"]["count"]


async def test_statistics_of_an_unknown_model_are_not_found(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        response = await http.get("/v2/models/nobody/stats")
    assert response.status_code == 404
    assert "nobody" in response.json()["error"]


async def test_replica_metrics_show_calls_handler_metrics_and_a_restart(cluster: Cluster) -> None:
    replica = cluster.replicas[0]
    assert replica.metrics_port > 0
    url = f"http://127.0.0.1:{replica.metrics_port}"
    headers = {"X-Capability-Model": "counted"}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=20) as http:
        pids = set()
        for _ in range(3):
            response = await http.post(
                "/infer", headers=headers, json=text_body("text_input", "a b")
            )
            assert response.status_code == 200
            pids.add(response.json()["outputs"][0]["data"][0])
    samples = await scrape(url)
    cap = "model=counted,type=echo"
    labels = {"handler": "counted", "capability": cap}
    assert value(samples, "anyserve_replica_calls_total", code="ok", **labels) == 3
    assert value(samples, "anyserve_replica_handler_duration_seconds_count", **labels) == 3
    assert value(samples, "anyserve_replica_queue_wait_seconds_count", **labels) == 3
    assert value(samples, "anyserve_replica_workers", state="ready", **labels) == 1
    assert value(samples, "anyserve_replica_worker_starts_total", **labels) == 1
    assert value(samples, "anyserve_replica_worker_cold_start_seconds_count", **labels) == 1
    # Handler-defined metrics, shipped with the calls' End frames.
    assert value(samples, "app_words_total", kind="seen") == 6
    assert value(samples, "app_text_chars_count") == 3
    assert value(samples, "app_text_chars_bucket", le="10.0") == 3

    (pid,) = pids
    os.kill(int(pid), signal.SIGKILL)

    async def restarted() -> bool:
        now = await scrape(url)
        return (
            value(now, "anyserve_replica_worker_restarts_total", **labels) == 1
            and value(now, "anyserve_replica_workers", state="ready", **labels) == 1
        )

    await eventually(restarted, timeout=15)
    samples = await scrape(url)
    assert value(samples, "anyserve_replica_worker_crashes_total", **labels) == 1
    assert value(samples, "anyserve_replica_worker_starts_total", **labels) == 2


async def test_replica_metrics_port_answers_only_metrics(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{cluster.replicas[0].metrics_port}"
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/other")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405
