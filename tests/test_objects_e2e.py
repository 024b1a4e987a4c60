"""The object system end to end: references between replicas, hostile input,
expiry, context.call and call cycles (real API server, replicas and workers)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    store = tmp_path_factory.mktemp("objects")
    apps = ["examples.pipeline_app:app", "examples.embed_app:app", "tests.apps.objects_app:app"]
    async with start_cluster(
        apps, api=ApiServerConfig(port=0, grpc_port=0), object_store=str(store)
    ) as cluster:
        yield cluster


@pytest.fixture
async def http(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as client:
        yield client


def inputs(**values: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "datatype": "BYTES", "shape": [1], "data": [value]}
            for name, value in values.items()
        ]
    }


def outputs(body: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o["data"][0] for o in body["outputs"]}


async def test_seed_scenario_3_object_by_reference(
    http: httpx.AsyncClient, cluster: Cluster
) -> None:
    response = await http.post(
        "/infer",
        headers={"X-Capability-Type": "chat", "X-Capability-Model": "pipeline"},
        json=inputs(text="objects travel by reference"),
    )
    assert response.status_code == 200, response.text
    out = outputs(response.json())
    # The pipeline replica wrote the object; the embed replica read it.
    assert response.json()["parameters"]["anyserve_served_by"] == "pipeline_app"
    assert out["source"] == "object" and out["replica"] == "embed_app"
    assert out["dims"] == 4  # one value per word
    ref = out["object_ref"]
    assert (Path(cluster.object_store) / f"{ref}.bin").is_file()


@pytest.mark.parametrize("style", ["seed", "async"])
async def test_handlers_create_and_call(http: httpx.AsyncClient, style: str) -> None:
    body = inputs(text="alpha beta gamma") if style == "seed" else inputs(blob="x" * 5000)
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "store", "X-Capability-Style": style}, json=body
    )
    assert response.status_code == 200, response.text
    out = outputs(response.json())
    assert out["ref"].startswith("obj-") and len(out["ref"]) == 36
    if style == "seed":
        assert (out["text"], out["count"]) == ("alpha beta gamma", 3)
    else:
        assert (out["size"], out["kind"]) == (5000, "bytes")


HOSTILE = [
    "/etc/passwd",
    "../../../../etc/passwd",
    "obj-../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "obj-00000000000000000000000000000000\x00.bin",
    "",
    "obj-" + "a" * 10_000,
    "obj-1234",
    "OBJ-0123456789ABCDEF0123456789ABCDEF",
    "/tmp/elsewhere/obj-0123456789abcdef0123456789abcdef.bin",
]


@pytest.mark.parametrize("ref", HOSTILE)
async def test_hostile_references_are_rejected(
    http: httpx.AsyncClient, cluster: Cluster, tmp_path: Path, ref: str
) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("untouched")
    before = sorted(os.listdir(cluster.object_store))
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "read"}, json=inputs(ref=ref)
    )
    assert response.status_code == 400, response.text
    assert "error" in response.json()
    assert sentinel.read_text() == "untouched"
    assert sorted(os.listdir(cluster.object_store)) == before


async def test_symlink_out_of_the_store_is_rejected(
    http: httpx.AsyncClient, cluster: Cluster, tmp_path: Path
) -> None:
    target = tmp_path / "secret"
    target.write_text("do not read")
    ref = "obj-" + hashlib.md5(b"symlink").hexdigest()
    link = Path(cluster.object_store) / f"{ref}.bin"
    link.symlink_to(target)
    try:
        response = await http.post(
            "/infer", headers={"X-Capability-Type": "read"}, json=inputs(ref=ref)
        )
        assert response.status_code == 400, response.text
        assert "do not read" not in response.text
    finally:
        link.unlink()
    assert target.read_text() == "do not read"


async def test_missing_and_expired_objects_are_not_found(
    http: httpx.AsyncClient, cluster: Cluster
) -> None:
    missing = "obj-" + "0" * 32
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "read"}, json=inputs(ref=missing)
    )
    assert response.status_code == 404
    assert missing in response.json()["error"]

    response = await http.post(
        "/infer", headers={"X-Capability-Type": "store", "X-Capability-Style": "async"},
        json=inputs(blob="old"),
    )  # fmt: skip
    ref = outputs(response.json())["ref"]
    path = Path(cluster.object_store) / f"{ref}.bin"
    two_hours_ago = time.time() - 7200  # the replicas' TTL is the default hour
    os.utime(path, (two_hours_ago, two_hours_ago))
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "read"}, json=inputs(ref=ref)
    )
    assert response.status_code == 404
    assert ref in response.json()["error"] and "expired" in response.json()["error"]


async def test_context_call_stream(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "stream-call"}, json=inputs()
    )
    assert response.status_code == 200, response.text
    assert outputs(response.json())["text_output"] == "one|two|three"


async def test_call_cycle_is_a_clear_loop_error(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await http.post(
        "/infer", headers={"X-Capability-Type": "cycle", "X-Capability-Step": "a"}, json=inputs()
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 508, response.text
    message = json.loads(response.text)["error"]
    assert message.startswith("loop detected")
    assert "step=a" in message and "step=b" in message


async def test_replica_limits_reach_its_workers(tmp_path: Path) -> None:
    """--object-ttl and --object-max-size apply inside the handlers, not only to the sweeper."""
    async with (
        start_cluster(
            ["tests.apps.objects_app:app"],
            object_store=str(tmp_path),
            replica_options={"object_ttl": 60.0, "object_max_size": 1000},
        ) as small,
        httpx.AsyncClient(base_url=small.url, timeout=30) as http,
    ):
        store = {"X-Capability-Type": "store", "X-Capability-Style": "async"}
        too_big = await http.post("/infer", headers=store, json=inputs(blob="x" * 5000))
        assert too_big.status_code == 413, too_big.text
        response = await http.post("/infer", headers=store, json=inputs(blob="small"))
        ref = outputs(response.json())["ref"]
        two_minutes_ago = time.time() - 120
        os.utime(tmp_path / f"{ref}.bin", (two_minutes_ago, two_minutes_ago))
        response = await http.post(
            "/infer", headers={"X-Capability-Type": "read"}, json=inputs(ref=ref)
        )
        assert response.status_code == 404 and "expired" in response.json()["error"]
