"""Routing end to end: capability headers and model names pick the replica.

Every request crosses the whole chain: HTTP into an API server, gRPC to a
replica, a Unix socket to a worker process, and back. Two clusters:

* ``seed`` (session-scoped, tests/conftest.py): the README's ``chat_app`` and
  ``embed_app``; these tests only send requests to it.
* ``routing`` (this module's): two small apps whose capabilities overlap
  (``tests/apps/e2e_apps.py``), behind a token. The tests here re-register,
  unregister and add dead replicas by hand (restoring the real entries), so
  no other module shares it.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from anyserve.api_server.channels import Connection
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from tests.api_calls import (
    CHAT,
    EMBED,
    EMPTY,
    infer,
    outputs,
    registry_ids,
    served_by,
    stream_events,
    text_body,
    tokens,
)
from tests.support import free_port

pytestmark = pytest.mark.anyio

TOKEN = "e2e-secret"


@pytest.fixture(scope="module")
async def routing() -> AsyncIterator[Cluster]:
    # A long heartbeat: the tests re-register these replicas by hand and must
    # not be overwritten behind their back (they restore the real entries).
    config = ApiServerConfig(port=0, grpc_port=0, token=TOKEN, heartbeat_interval=30.0)
    async with start_cluster(
        ["tests.apps.e2e_apps:demo", "tests.apps.e2e_apps:big"],
        api=config,
        per_app=[{"replica_id": "demo"}, {"replica_id": "big"}],
    ) as cluster:
        yield cluster


@pytest.fixture
async def http(seed: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=seed.url, timeout=30) as client:
        yield client


# --------------------------------------------------------------------------- seed scenario 1


async def test_capability_headers_pick_the_replica(http: httpx.AsyncClient) -> None:
    doc = await infer(http, CHAT, text_body("text_input", "hi"))
    assert served_by(doc) == "chat_app"
    assert outputs(doc)["output"] == "Hello, world!"
    assert doc["model_name"] == "llama-70b"

    doc = await infer(http, EMBED, text_body("text", "hello"))
    assert served_by(doc) == "embed_app"
    found = outputs(doc)
    assert found["dims"] == 8 and found["source"] == "text" and found["replica"] == "embed_app"
    assert abs(found["norm"] - 1.0) < 1e-6


async def test_body_model_name_routes_and_url_wins(http: httpx.AsyncClient) -> None:
    # The seed's /infer bodies name the model in the body, not in the URL.
    doc = await infer(http, {}, {"model_name": "llama-70b", "inputs": []})
    assert served_by(doc) == "chat_app"
    doc = await infer(http, {}, text_body("text", "hello", model_name="embed"))
    assert served_by(doc) == "embed_app"
    # The URL's name wins over the body's; capability headers win over both.
    doc = await infer(
        http, {}, text_body("text", "x", model_name="llama-70b"), "/v2/models/embed/infer"
    )
    assert served_by(doc) == "embed_app"
    doc = await infer(http, EMBED, text_body("text", "x", model_name="llama-70b"))
    assert served_by(doc) == "embed_app"

    # The same in Triton's binary form: the name is in the JSON header.
    payload = b"hello"
    header = json.dumps(
        {
            "model_name": "embed",
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4 + len(payload)},
                }
            ],
        }
    ).encode()
    response = await http.post(
        "/infer",
        content=header + struct.pack("<I", len(payload)) + payload,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    assert served_by(response.json()) == "embed_app"

    response = await http.post("/infer", json={"model_name": 7, "inputs": []})
    assert response.status_code == 400
    assert "model_name" in response.json()["error"]


# --------------------------------------------------------------------------- routing


async def test_routing_subset_closest_and_numbers(routing: Cluster) -> None:
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        # A query is a subset: {type: chat} reaches {type: chat, model: demo};
        # of two matches the one with fewer extra keys wins, every time.
        for _ in range(5):
            assert served_by(await infer(http, CHAT)) == "demo"
            demo = {**CHAT, "X-Capability-Model": "demo"}
            assert served_by(await infer(http, demo)) == "demo"
        assert served_by(await infer(http, {**CHAT, "X-Capability-Size": "big"})) == "big"
        assert served_by(await infer(http, {"X-Capability-Size": "big"})) == "big"
        doc = await infer(http, {**CHAT, "X-Capability-Model": "demo", "X-Capability-Size": "big"})
        assert outputs(doc)["text_output"] == "big"
        # By model name, the capability with fewer keys wins too.
        assert served_by(await infer(http, {}, {"model_name": "demo", "inputs": []})) == "demo"

        # Declared as int 2, sent as the header string "2".
        tool = {"X-Capability-Type": "tool", "X-Capability-Version": "2"}
        assert outputs(await infer(http, tool))["text_output"] == "tool v2"
        response = await http.post(
            "/infer", headers={**tool, "X-Capability-Version": "3"}, json=EMPTY
        )
        assert response.status_code == 404

        # Nothing says what to run: 400. Nothing matches: 404 (unary and stream).
        response = await http.post("/infer", json=EMPTY)
        assert response.status_code == 400 and "X-Capability" in response.json()["error"]
        nope = {"X-Capability-Type": "nope"}
        response = await http.post("/infer", headers=nope, json=EMPTY)
        assert response.status_code == 404 and "type=nope" in response.json()["error"]
        response = await http.post("/infer/stream", headers=nope, json=EMPTY)
        assert response.status_code == 404 and "type=nope" in response.json()["error"]


async def test_reregistering_replaces_and_unregistering_removes(routing: Cluster) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    demo = routing.replica("demo")
    assert demo.registration is not None
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        try:
            body = {
                "replica_id": "demo",
                "endpoint": demo.endpoint,
                "capabilities": [{"type": "renamed"}],
            }
            assert (await http.post("/register", json=body, headers=auth)).status_code == 200
            entry = [
                r
                for r in (await http.get("/registry")).json()["replicas"]
                if r["replica_id"] == "demo"
            ]
            assert entry[0]["capabilities"] == [{"type": "renamed"}]
            # The old capabilities are gone: chat now goes to the other replica,
            # and nothing serves tool any more.
            assert served_by(await infer(http, CHAT)) == "big"
            tool = {"X-Capability-Type": "tool", "X-Capability-Version": "2"}
            assert (await http.post("/infer", headers=tool, json=EMPTY)).status_code == 404
            # The new one routes to demo, which has no such handler and hands it
            # back; with no other replica to go to, it went round: 508 naming demo.
            renamed = {"X-Capability-Type": "renamed"}
            response = await http.post("/infer", headers=renamed, json=EMPTY)
            assert response.status_code == 508, response.text
            assert response.json()["error"].endswith("replicas tried: demo")

            await demo.registration.register_once()  # the replica's own body again
            assert served_by(await infer(http, CHAT)) == "demo"

            response = await http.post("/unregister", json={"replica_id": "demo"}, headers=auth)
            assert response.json() == {"ok": True, "removed": True}
            assert await registry_ids(http) == {"big"}
            assert served_by(await infer(http, CHAT)) == "big"
            assert (await http.post("/infer", headers=tool, json=EMPTY)).status_code == 404
        finally:
            await demo.registration.register_once()
        assert await registry_ids(http) == {"demo", "big"}
        assert served_by(await infer(http, CHAT)) == "demo"


async def test_dead_endpoint_is_503_quickly(routing: Cluster) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ghost = {
        "replica_id": "ghost",
        "endpoint": f"127.0.0.1:{free_port()}",  # nothing listens there
        "capabilities": [{"type": "ghost"}],
    }
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        assert (await http.post("/register", json=ghost, headers=auth)).status_code == 200
        try:
            for _ in range(2):  # fresh channel, then one in backoff
                started = time.monotonic()
                response = await http.post(
                    "/infer", headers={"X-Capability-Type": "ghost"}, json=EMPTY
                )
                assert response.status_code == 503, response.text
                assert time.monotonic() - started < 3.0
                assert "ghost" in response.json()["error"]
        finally:
            await http.post("/unregister", json={"replica_id": "ghost"}, headers=auth)


async def test_call_that_never_left_goes_to_another_replica(
    routing: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replica can die between the router's connectivity check and the call
    # (kill -9 at the wrong moment). Skipping the check makes that happen
    # every time: gRPC fails the call before it leaves ("failed to connect to
    # all addresses"), and the request must go to the next replica, not fail.
    async def connected(self: Connection, within: float) -> bool:
        return True

    monkeypatch.setattr(Connection, "connect", connected)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ghost = {
        "replica_id": "ghost-chat",
        "endpoint": f"127.0.0.1:{free_port()}",  # nothing listens there
        "capabilities": [{"type": "chat"}, {"type": "ghost"}],  # the closest match
    }
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        assert (await http.post("/register", json=ghost, headers=auth)).status_code == 200
        try:
            for _ in range(3):
                assert served_by(await infer(http, CHAT)) == "demo"
            events = await stream_events(http, "/infer/stream", CHAT, EMPTY)
            assert tokens(events) == ["demo"] and events[-1] == ("done", "[DONE]")
            # With nowhere else to go it is a 503 naming the replica, at once.
            only = {"X-Capability-Type": "ghost"}
            for path in ("/infer", "/infer/stream"):
                started = time.monotonic()
                response = await http.post(path, headers=only, json=EMPTY)
                assert response.status_code == 503, response.text
                assert "ghost-chat" in response.json()["error"]
                assert time.monotonic() - started < 3.0
        finally:
            await http.post("/unregister", json={"replica_id": "ghost-chat"}, headers=auth)


# --------------------------------------------------------------------------- token


async def test_wrong_token_cannot_register(routing: Cluster) -> None:
    owner = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        before = (await http.get("/registry", headers=owner)).json()["replicas"]
        hijack = {
            "replica_id": "demo",
            "endpoint": "127.0.0.1:1",
            "capabilities": [{"type": "stolen"}],
        }
        for headers in ({"Authorization": "Bearer wrong"}, {}, {"Authorization": TOKEN}):
            response = await http.post("/register", json=hijack, headers=headers)
            assert response.status_code == 401, headers
            assert "token" in response.json()["error"]
            response = await http.post("/unregister", json={"replica_id": "demo"}, headers=headers)
            assert response.status_code == 401
        after = (await http.get("/registry", headers=owner)).json()["replicas"]
        # Without the token the registry does not say where replicas live.
        anonymous = (await http.get("/registry")).json()["replicas"]
        assert len(anonymous) == 2 and not any("endpoint" in r for r in anonymous)

        def key(replicas: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
            return sorted(
                (r["replica_id"], r["endpoint"], json.dumps(r["capabilities"], sort_keys=True))
                for r in replicas
            )

        assert key(after) == key(before) and len(after) == 2
        assert served_by(await infer(http, CHAT)) == "demo"
