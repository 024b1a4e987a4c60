"""The replica's object-store metrics: what its workers created and read (shipped
with their calls' stats) and what its sweeper expired and found in the directory."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from anyserve._proto import worker_pb2 as wpb
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from anyserve.metrics.replica import ReplicaMetrics
from anyserve.metrics.worker import OBJECTS_CREATED, OBJECTS_READ, ObjectCounts
from anyserve.objects.sweeper import SweepReport, sweep_directory
from tests.api_calls import text_body
from tests.support import eventually
from tests.test_metrics import scrape, value

TTL = 3.0  # long enough to see the gauges up, short enough to wait for expiry
CALLS = 3


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    options = {"metrics_port": 0, "object_ttl": TTL, "object_sweep_interval": 0.1}
    async with start_cluster(
        ["tests.apps.objects_metrics_app:app"],
        api=ApiServerConfig(port=0, grpc_port=0, token=None),
        object_store=str(tmp_path),
        replica_options=options,
    ) as c:
        yield c


@pytest.mark.anyio
async def test_objects_created_read_expired_and_measured(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{cluster.replicas[0].metrics_port}"
    headers = {"X-Capability-Type": "roundtrip"}
    async with httpx.AsyncClient(base_url=cluster.url, timeout=20) as http:
        for i in range(CALLS):
            response = await http.post(
                "/infer", headers=headers, json=text_body("text_input", "x" * i)
            )
            assert response.status_code == 200, response.text

    async def stored() -> bool:
        now = await scrape(url)
        return (
            value(now, "anyserve_replica_objects_created_total") == CALLS
            and value(now, "anyserve_replica_objects_read_total") == CALLS
            and value(now, "anyserve_replica_objects") == CALLS
        )

    await eventually(stored, timeout=TTL)
    samples = await scrape(url)
    assert value(samples, "anyserve_replica_object_store_bytes") > 0
    assert value(samples, "anyserve_replica_objects_expired_total") == 0
    assert value(samples, "anyserve_replica_objects_fetched_total") == 0  # one shared store

    async def expired() -> bool:
        now = await scrape(url)
        return (
            value(now, "anyserve_replica_objects_expired_total") == CALLS
            and value(now, "anyserve_replica_objects") == 0
            and value(now, "anyserve_replica_object_store_bytes") == 0
        )

    await eventually(expired, timeout=TTL + 5)
    samples = await scrape(url)
    assert value(samples, "anyserve_replica_objects_created_total") == CALLS


def test_worker_counts_travel_only_when_they_changed() -> None:
    counts = ObjectCounts()
    assert counts.take() == []
    counts.created += 2
    counts.read += 1
    updates = counts.take()
    assert [(u.name, u.value) for u in updates] == [(OBJECTS_CREATED, 2.0), (OBJECTS_READ, 1.0)]
    assert counts.take() == []  # sent already
    counts.read += 1
    metrics = ReplicaMetrics(list, {})
    metrics.apply([*updates, *counts.take()])
    assert metrics.objects[OBJECTS_CREATED] == 2
    assert metrics.objects[OBJECTS_READ] == 2
    # A labelled handler metric of that name is a handler's, not the store's count.
    labelled = wpb.MetricUpdate(name=OBJECTS_READ, label_names=["a"], label_values=["b"], value=5)
    metrics.apply([labelled])
    assert metrics.objects[OBJECTS_READ] == 2


def test_sweep_report_counts_what_it_removed_and_left(tmp_path: Path) -> None:
    old, young, orphan = (
        tmp_path / f"obj-{'a' * 32}.bin",
        tmp_path / f"obj-{'b' * 32}.bin",
        tmp_path / f".tmp-obj-{'c' * 32}-{'d' * 8}",
    )
    for path, size in ((old, 10), (young, 7), (orphan, 3)):
        path.write_bytes(b"x" * size)
    (tmp_path / "foreign.bin").write_bytes(b"x" * 100)  # not the store's: ignored
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(orphan, (now - 100, now - 100))
    report = sweep_directory(tmp_path, ttl=50, tmp_grace=50, now=now)
    assert report == SweepReport(expired=1, orphans=1, objects=1, bytes=7)
    assert report.removed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, "foreign.bin"])
    assert sweep_directory(tmp_path / "missing", 1, 1, now) == SweepReport()
