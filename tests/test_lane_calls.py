"""context.call from a worker on the API server's host goes over the API
server's local lane (anyserve/lane_server.py, api_server/grpc_entry.py), not
gRPC: answers, streams, and a parent's cancellation reaching the child."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import start_cluster
from tests.api_calls import outputs, text_body
from tests.support import eventually, sse_events

pytestmark = pytest.mark.anyio

APPS = ["tests.apps.lane_calls_app:outer", "tests.apps.lane_calls_app:inner"]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "grpc"])
async def test_context_call_and_call_stream_answer_the_same_either_way(lane: bool) -> None:
    api = ApiServerConfig(port=0, grpc_port=0, token=None, lane=lane)
    async with (
        start_cluster(APPS, api=api) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
    ):
        health = (await http.get("/health")).json()
        assert ("lane" in health) is lane
        response = await http.post(
            "/infer", headers={"X-Capability-Type": "relay"}, json=text_body("text_input", "x")
        )
        assert response.status_code == 200, response.text
        assert outputs(response.json())["text_output"] == "inner:x"
        headers = {"X-Capability-Type": "relay_stream"}
        body = text_body("text_input", "t")
        async with http.stream("POST", "/infer/stream", headers=headers, json=body) as r:
            assert r.status_code == 200
            texts = [data async for event, data in sse_events(r) if event != "done"]
        assert [outputs(json.loads(data))["text_output"] for data in texts] == ["t-0", "t-1", "t-2"]
        lane_server = cluster.api.lane
        assert (lane_server is not None) is lane
        if lane_server is not None:
            assert lane_server.taken == 2  # the two calls from the workers, nothing else


async def test_a_parent_cancelled_cancels_its_child_through_the_lane(tmp_path: Path) -> None:
    api = ApiServerConfig(port=0, grpc_port=0, token=None)
    marker = tmp_path / "child"
    async with (
        start_cluster(APPS, api=api) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):
        headers = {"X-Capability-Type": "relay"}
        body = text_body("text_input", str(marker))
        tg.start_soon(lambda: http.post("/infer", headers=headers, json=body))
        await eventually(marker.exists, timeout=10)  # the child runs
        tg.cancel_scope.cancel()  # the client leaves: parent, then child, cancelled
        await eventually(marker.with_suffix(".stopped").exists, timeout=5)
        assert cluster.api.lane is not None and cluster.api.lane.taken == 1
