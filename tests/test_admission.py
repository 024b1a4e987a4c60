"""Admission on a single replica: load queues instead of failing, a full queue
or a call that could not start before its deadline gets 429 with Retry-After
at once, and the only replica for a capability answers that itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.limits import EdgeLimits
from anyserve.cluster import Cluster, start_cluster
from anyserve.replica.server import Replica
from tests.api_calls import text_body
from tests.support import eventually

pytestmark = pytest.mark.anyio

APP = "tests.apps.admission_app:app"


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    # Idle keep-alive connections are kept longer than the test runs: on a
    # loaded machine a client could otherwise reuse one just as the server
    # closes it (an httpx.ReadError that says nothing about admission).
    edge = EdgeLimits(keepalive_timeout=120.0)
    api = ApiServerConfig(port=0, grpc_port=0, token=None, edge=edge)
    async with start_cluster([APP], api=api) as running:
        yield running


def inflight(replica: Replica, handler: str) -> int:
    assert replica.manager is not None
    return sum(slot.inflight for slot in replica.manager.slots[handler])


async def post(http: httpx.AsyncClient, kind: str, text: str, **headers: str) -> httpx.Response:
    return await http.post(
        "/infer",
        headers={"X-Capability-Type": kind, **headers},
        json=text_body("text_input", text),
    )


async def test_256_concurrent_calls_to_one_worker_all_succeed(cluster: Cluster) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60, limits=limits) as http:

        async def one(i: int) -> None:
            for j in range(4):
                response = await post(http, "echo", f"{i}-{j}")
                statuses.append(response.status_code)
                if response.status_code == 200:
                    assert response.json()["outputs"][0]["data"] == [f"{i}-{j}"]

        async with anyio.create_task_group() as tg:
            for i in range(256):
                tg.start_soon(one, i)
    assert statuses == [200] * 1024, {s: statuses.count(s) for s in set(statuses)}


async def test_a_full_queue_is_429_with_retry_after_and_the_queued_calls_finish(
    cluster: Cluster, tmp_path: Path
) -> None:
    gate = tmp_path / "open"
    replica = cluster.replicas[0]
    answers: list[httpx.Response] = []
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):

        async def held() -> None:
            answers.append(await post(http, "gated", str(gate)))

        for _ in range(3):  # one runs, two wait: max_queue=2
            tg.start_soon(held)
        await eventually(lambda: inflight(replica, "gated") == 3)
        refused = await post(http, "gated", str(gate))
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"] == "overloaded"
        assert "max_queue 2" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        gate.touch()
    assert [a.status_code for a in answers] == [200] * 3


async def test_a_call_that_could_not_start_before_its_deadline_is_refused_at_once(
    cluster: Cluster,
) -> None:
    replica = cluster.replicas[0]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        first = await post(http, "paced", "0.2")  # the replica learns its speed
        assert first.status_code == 200, first.text
        answers: list[int] = []
        async with anyio.create_task_group() as tg:

            async def queued() -> None:
                answers.append((await post(http, "paced", "0.2")).status_code)

            for _ in range(4):
                tg.start_soon(queued)
            await eventually(lambda: inflight(replica, "paced") == 4)
            # Four rounds of about 0.2 s are ahead of it; it has 0.3 s.
            late = await post(http, "paced", "0.2", **{"X-Request-Timeout": "0.3"})
            assert late.status_code == 429, late.text
            # Refused up front (429), not left to time out (504).
            assert "deadline" in late.json()["error"]
        assert answers == [200] * 4
