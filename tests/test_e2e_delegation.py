"""Delegation end to end: a replica hands a request it cannot serve back
through the API server, and loops end with 508 naming every replica tried,
however the hop headers are forged. The clusters (``randomly``, ``bench``) are
the session's, from tests/conftest.py.
"""

from __future__ import annotations

import time

import grpc
import grpc.aio
import httpx
import pytest

from anyserve import codec
from anyserve.cluster import Cluster
from anyserve.proto import ModelInferRequest
from anyserve.testing import GrpcClient
from tests.api_calls import EMPTY, pb_served_by

pytestmark = pytest.mark.anyio


async def test_random_policy_loop_ends_508_naming_every_replica(randomly: Cluster) -> None:
    nothing = {"X-Capability-Type": "nothing"}
    async with httpx.AsyncClient(base_url=randomly.url, timeout=30) as http:
        for path in ("/infer", "/infer/stream"):
            started = time.monotonic()
            response = await http.post(path, headers=nothing, json=EMPTY)
            assert time.monotonic() - started < 1.0
            assert response.status_code == 508, response.text
            message = response.json()["error"]
            assert message.startswith("loop detected")
            assert "type=nothing" in message
            tried = message.rsplit("replicas tried: ", 1)[1].split(", ")
            assert sorted(tried) == ["heavy_app", "stream_app"]

    started = time.monotonic()
    async with GrpcClient(randomly.api.grpc_endpoint) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.infer(ModelInferRequest(id="g"), capability={"type": "nothing"})
    assert time.monotonic() - started < 1.0
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details()
    assert details.startswith("loop detected")
    assert sorted(details.rsplit("replicas tried: ", 1)[1].split(", ")) == [
        "heavy_app",
        "stream_app",
    ]


async def test_forged_hop_headers_cannot_raise_the_hop_limit(randomly: Cluster) -> None:
    nothing = {"X-Capability-Type": "nothing"}
    limit = randomly.api.config.hop_limit
    real = {"heavy_app", "stream_app"}

    async def tried(forged: dict[str, str]) -> list[str]:
        started = time.monotonic()
        response = await http.post("/infer", headers={**nothing, **forged}, json=EMPTY)
        assert time.monotonic() - started < 1.0
        assert response.status_code == 508, (forged, response.text)
        message: str = response.json()["error"]
        assert message.startswith("loop detected")
        return message.rsplit("replicas tried: ", 1)[1].split(", ")

    async with httpx.AsyncClient(base_url=randomly.url, timeout=30) as http:
        # A list as long as the limit or longer: refused at once, no replica runs it.
        forged = {"X-Delegated-From": "f", "X-Anyserve-Visited": "a,b,c,d,e,f"}
        assert await tried(forged) == ["a", "b", "c", "d", "e", "f"]
        # An empty list does not reset the count: the sender is a hop, and each
        # real replica is tried at most once, within the limit.
        hops = await tried({"X-Delegated-From": "x", "X-Anyserve-Visited": ""})
        assert hops[0] == "x" and sorted(hops[1:]) == sorted(real) and len(hops) <= limit
        # The same replica listed again and again only counts against the request.
        hops = await tried({"X-Delegated-From": "heavy_app", "X-Anyserve-Visited": "heavy_app"})
        assert hops == ["heavy_app", "stream_app"]
        # A list without the delegation header is not trusted at all.
        assert sorted(await tried({"X-Anyserve-Visited": "a,b,c,d,e,f"})) == sorted(real)

    # Straight to a replica with forged metadata: its delegation extends the
    # list, it never shortens it.
    metadata = [("x-delegated-from", "f"), ("x-anyserve-visited", "a,b,c,d,e,f")]
    async with GrpcClient(randomly.replica("heavy_app").endpoint) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.infer(
                ModelInferRequest(id="f"), capability={"type": "nothing"}, metadata=metadata
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details().startswith("loop detected")


async def test_stale_route_to_a_replica_is_delegated(bench: Cluster) -> None:
    # The chat replica has no `heavy` handler (as if the registry were stale):
    # it hands the request back through the API server to the heavy replica.
    async with GrpcClient(bench.replica("chat_app").endpoint) as client:
        response = await client.infer(
            ModelInferRequest(id="stale-1"),
            capability={"type": "heavy"},
            metadata=[("x-request-id", "stale-1")],
        )
    assert pb_served_by(response) == "heavy_app"
    found = codec.decode_outputs(response)
    assert found["text_output"] == b"heavy work done" and found["replica"] == b"heavy_app"


async def test_a_replica_on_the_api_servers_host_delegates_through_its_lane(
    bench: Cluster,
) -> None:
    # The /register answer names the API server's lane; the replica's
    # delegated call goes through it (its taken count), not gRPC.
    lane = bench.api.lane
    chat = bench.replica("chat_app")
    assert lane is not None and chat.registration is not None
    assert chat.registration.lane == bench.api.state.lane
    before = lane.taken
    async with GrpcClient(chat.endpoint) as client:
        response = await client.infer(ModelInferRequest(id="stale-2"), capability={"type": "heavy"})
    assert pb_served_by(response) == "heavy_app"
    assert lane.taken == before + 1
