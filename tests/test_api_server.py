"""The API server end to end: real HTTP and gRPC against fake replicas."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import grpc
import grpc.aio
import httpx
import pytest

from anyserve import rpc, shm
from anyserve.client import Client
from anyserve.errors import HandlerError, NotFound, from_stream_response
from anyserve.proto import (
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
)
from tests.api_calls import CHAT, EMPTY, outputs
from tests.fake_replica import FakeReplica, register, running_api
from tests.support import eventually, free_port, sse_events, timed_sse_events

pytestmark = pytest.mark.anyio


def pb_outputs(response: ModelInferResponse) -> dict[str, Any]:
    return {
        out.name: out.contents.bytes_contents[0].decode()
        for out in response.outputs
        if out.datatype == "BYTES" and out.contents.bytes_contents
    }


async def served_by(http: httpx.AsyncClient, headers: dict[str, str], body: Any = EMPTY) -> str:
    response = await http.post("/infer", headers=headers, json=body)
    assert response.status_code == 200, response.text
    return str(outputs(response.json())["replica"])


# --------------------------------------------------------------------------- registry


async def test_register_upsert_unregister_and_bad_bodies() -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        body = {
            "replica_id": "r1",
            "endpoint": "127.0.0.1:50051",
            "capabilities": [{"type": "chat", "model": "llama"}],
            "loadable": [{"type": "heavy"}],
            "workers": [{"id": "w0"}],
        }
        answer = (await http.post("/register", json=body)).json()
        assert answer["ok"] is True
        assert answer["grpc_endpoint"] == api.grpc_endpoint
        assert answer["heartbeat_interval"] == 2.0 and answer["ttl"] == 6.0

        body["capabilities"] = [{"type": "embed", "dim": 768}]
        assert (await http.post("/register", json=body)).status_code == 200
        replicas = (await http.get("/registry")).json()["replicas"]
        assert len(replicas) == 1
        entry = replicas[0]
        assert entry["capabilities"] == [{"type": "embed", "dim": "768"}]
        assert entry["loadable"] == [{"type": "heavy"}]
        assert entry["workers"] == [{"id": "w0"}]
        assert entry["in_flight"] == 0 and entry["last_heartbeat_age"] < 5

        bad_bodies: list[Any] = [
            [],
            {"endpoint": "h:1", "capabilities": []},
            {"replica_id": "x", "endpoint": "nohost", "capabilities": []},
            {"replica_id": "x", "endpoint": "h:1", "capabilities": "type=chat"},
            {"replica_id": "x", "endpoint": "h:1", "capabilities": [{"a": {"b": 1}}]},
            {"replica_id": "x", "endpoint": "h:1", "capabilities": [], "workers": {}},
        ]
        for bad in bad_bodies:
            response = await http.post("/register", json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]
        assert (await http.post("/register", content=b"{nope")).status_code == 400

        assert (await http.post("/unregister", json={"replica_id": "r1"})).json()["removed"]
        assert (await http.get("/registry")).json()["replicas"] == []
        health = (await http.get("/health")).json()
        assert api.state.lane is not None  # this host has /dev/shm: the lane is served
        path, name = api.state.lane
        assert health == {
            "status": "ok",
            "replicas": 0,
            "grpc_endpoint": api.grpc_endpoint,
            "registry": {"backend": "memory"},
            "lane": {"path": path, "name": name, "host": shm.host_id()},
        }


async def test_silent_replica_expires() -> None:
    async with (
        running_api(heartbeat_interval=0.05, ttl=0.2) as api,
        httpx.AsyncClient(base_url=api.url) as http,
    ):
        body = {"replica_id": "r", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "t"}]}
        await http.post("/register", json=body)
        assert len((await http.get("/registry")).json()["replicas"]) == 1

        async def gone() -> bool:
            return not (await http.get("/registry")).json()["replicas"]

        await eventually(gone, timeout=3.0)
        response = await http.post("/infer", headers={"X-Capability-Type": "t"}, json=EMPTY)
        assert response.status_code == 404


async def test_token_guards_registration() -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        api.config.token = "s3cret"
        body = {"replica_id": "r", "endpoint": "127.0.0.1:1", "capabilities": [{"type": "t"}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await http.post("/register", json=body, headers=headers)
            assert response.status_code == 401
            assert "token" in response.json()["error"]
        assert (await http.get("/registry")).json()["replicas"] == []

        good = {"Authorization": "Bearer s3cret"}
        assert (await http.post("/register", json=body, headers=good)).status_code == 200
        response = await http.post("/unregister", json={"replica_id": "r"})
        assert response.status_code == 401
        assert len((await http.get("/registry")).json()["replicas"]) == 1


# --------------------------------------------------------------------------- routing


async def test_routing_matches_subsets_closest_first() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("big", [{"type": "chat", "model": "big"}]) as big,
        FakeReplica("plain", [{"type": "chat"}]) as plain,
        FakeReplica("embed", [{"type": "embed", "dim": 768}]) as embed,
    ):
        await register(http, big, plain, embed)
        for _ in range(3):
            assert await served_by(http, CHAT) == "plain"  # closest: no extra keys
        both = {"X-Capability-Type": "chat", "X-Capability-Model": "big"}
        assert await served_by(http, both) == "big"
        assert await served_by(http, {"X-Capability-Model": "big"}) == "big"
        assert await served_by(http, {"X-Capability-Dim": "768"}) == "embed"
        # Capability headers win over the model name; the replica sees the query.
        assert await served_by(http, CHAT, {"model_name": "embed", "inputs": []}) == "plain"
        assert plain.metadata[-1]["x-capability-type"] == "chat"

        # Without headers the model name routes: model value, else type value.
        assert await served_by(http, {}, {"model_name": "big", "inputs": []}) == "big"
        assert await served_by(http, {}, {"model_name": "embed", "inputs": []}) == "embed"
        response = await http.post("/v2/models/big/infer", json=EMPTY)
        assert outputs(response.json())["replica"] == "big"

        response = await http.post("/infer", json=EMPTY)
        assert response.status_code == 400
        assert "X-Capability" in response.json()["error"]
        response = await http.post("/infer", headers={"X-Capability-Type": "nope"}, json=EMPTY)
        assert response.status_code == 404
        assert "type=nope" in response.json()["error"]
        response = await http.post("/infer", headers=CHAT, content=b"{not json")
        assert response.status_code == 400


async def test_least_in_flight_spreads_load() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], unary_delay=0.15) as a,
        FakeReplica("b", [{"type": "chat"}], unary_delay=0.15) as b,
    ):
        await register(http, a, b)
        results: list[str] = []

        async def one() -> None:
            results.append(await served_by(http, CHAT))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert sorted(results) == ["a", "a", "b", "b"]


async def test_in_flight_cap_answers_429() -> None:
    async with (
        running_api(max_inflight_per_replica=1) as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], unary_delay=0.15) as a,
    ):
        await register(http, a)
        statuses: list[httpx.Response] = []

        async def one() -> None:
            statuses.append(await http.post("/infer", headers=CHAT, json=EMPTY))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        codes = sorted(r.status_code for r in statuses)
        assert codes == [200, 429]
        refused = next(r for r in statuses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"


async def test_dead_replica_is_503_fast_and_skipped_when_another_matches() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("live", [{"type": "chat"}]) as live,
    ):
        dead = {"replica_id": "dead", "endpoint": f"127.0.0.1:{free_port()}"}
        await http.post("/register", json={**dead, "capabilities": [{"type": "gone"}]})
        start = time.monotonic()
        response = await http.post("/infer", headers={"X-Capability-Type": "gone"}, json=EMPTY)
        assert response.status_code == 503
        assert "dead" in response.json()["error"]
        assert time.monotonic() - start < 2

        # Connection refused means nothing was sent: another match takes it.
        await http.post("/register", json={**dead, "capabilities": [{"type": "chat"}]})
        await register(http, live)
        for _ in range(4):
            assert await served_by(http, CHAT) == "live"


async def test_replica_restarted_on_its_port_is_reachable_after_its_heartbeat() -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        async with FakeReplica("a", [{"type": "chat"}]) as first:
            await register(http, first)
            assert await served_by(http, CHAT) == "a"
            port = first.port
        response = await http.post("/infer", headers=CHAT, json=EMPTY)
        assert response.status_code == 503
        async with FakeReplica("a", [{"type": "chat"}], port=port) as second:
            await register(http, second)  # the heartbeat says it is back
            assert await served_by(http, CHAT) == "a"


async def test_replica_errors_map_to_http_and_are_not_retried() -> None:
    crash = (grpc.StatusCode.UNAVAILABLE, "worker exited with code 9")
    full = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("crashy", [{"type": "chat"}], error=crash) as crashy,
        FakeReplica("other", [{"type": "chat", "model": "x"}]) as other,
        FakeReplica("busy", [{"type": "busy"}], error=full) as busy,
        FakeReplica("slow", [{"type": "slow"}], unary_delay=2) as slow,
    ):
        await register(http, crashy, other, busy, slow)
        response = await http.post("/infer", headers=CHAT, json=EMPTY)
        assert response.status_code == 503
        assert response.json() == {
            "error": "worker exited with code 9",
            "type": "unavailable",
            "code": "UNAVAILABLE",
        }
        assert crashy.calls == 1 and other.calls == 0  # the replica answered: no retry

        response = await http.post("/infer", headers={"X-Capability-Type": "busy"}, json=EMPTY)
        assert response.status_code == 429 and "retry-after" in response.headers

        headers = {"X-Capability-Type": "slow", "X-Request-Timeout": "0.1"}
        response = await http.post("/infer", headers=headers, json=EMPTY)
        assert response.status_code == 504
        deadline = slow.deadlines[-1]
        assert deadline is not None and deadline < 0.15  # the deadline travelled

        calls_before = slow.calls
        for absurd in ("1e10", "0", "never"):
            headers = {"X-Capability-Type": "slow", "X-Request-Timeout": absurd}
            response = await http.post("/infer", headers=headers, json=EMPTY)
            assert response.status_code == 400, (absurd, response.text)
            assert "X-Request-Timeout" in response.json()["error"]
        headers = {"X-Capability-Type": "slow", "X-Anyserve-Call-Chain": "type=x>" * 1000}
        response = await http.post("/infer", headers=headers, json=EMPTY)
        assert response.status_code == 400 and "call-chain" in response.json()["error"]
        assert slow.calls == calls_before  # refused at the edge


# --------------------------------------------------------------------------- bodies


async def test_protobuf_binary_and_size_limit() -> None:
    async with (
        running_api(max_body=4096) as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat", "model": "m"}]) as a,
    ):
        await register(http, a)
        request = ModelInferRequest(id="req-1")
        request.inputs.add(name="x", datatype="INT64", shape=[2]).contents.int64_contents.extend(
            [1, 2]
        )
        pb = {"Content-Type": "application/x-protobuf", "X-Request-Id": "trace-1"}
        response = await http.post(
            "/v2/models/m/infer", headers=pb, content=request.SerializeToString()
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-protobuf"
        answer = ModelInferResponse.FromString(response.content)
        assert answer.id == "req-1" and answer.model_name == "m"  # name from the URL
        assert list(answer.outputs[0].contents.int64_contents) == [1, 2]
        assert a.metadata[-1][rpc.REQUEST_ID] == "trace-1"

        response = await http.post("/infer", headers=pb, content=b"\xff\xff\xff")
        assert response.status_code == 400

        # Triton's binary tensor extension, binary outputs asked for.
        blob = (7).to_bytes(4, "little") + (9).to_bytes(4, "little")
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "INT32",
                        "shape": [2],
                        "parameters": {"binary_data_size": len(blob)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        response = await http.post(
            "/v2/models/m/infer",
            headers={"Inference-Header-Content-Length": str(len(header))},
            content=header + blob,
        )
        assert response.status_code == 200, response.text
        length = int(response.headers["inference-header-content-length"])
        doc = json.loads(response.content[:length])
        assert doc["outputs"][0]["parameters"]["binary_data_size"] == len(blob)
        assert response.content[length : length + len(blob)] == blob

        big = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["x" * 5000]}]}
        response = await http.post("/infer", headers=CHAT, json=big)
        assert response.status_code == 413

        async def chunked() -> Any:
            for _ in range(10):
                yield b"x" * 1000

        response = await http.post("/infer", headers=CHAT, content=chunked())
        assert response.status_code == 413


async def test_generate_and_model_metadata() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat", "model": "m"}]) as a,
    ):
        await register(http, a)
        response = await http.post("/v2/models/m/generate", json={"text_input": "hi"})
        assert response.status_code == 200
        flat = response.json()
        assert flat["text_input"] == "hi" and flat["replica"] == "a"

        async with http.stream(
            "POST", "/v2/models/m/generate_stream", json={"text_input": "hi"}
        ) as stream:
            events = [item async for item in sse_events(stream)]
        assert [json.loads(d)["text_output"] for e, d in events[:-1]] == [
            "chunk-0",
            "chunk-1",
            "chunk-2",
        ]
        assert events[-1] == ("done", "[DONE]")

        meta = (await http.get("/v2/models/m")).json()
        assert meta["platform"] == "fake" and meta["inputs"][0]["name"] == "text_input"
        assert (await http.get("/v2/models/m/ready")).json() == {"name": "m", "ready": True}
        assert (await http.get("/v2/models/nope")).status_code == 404
        assert (await http.get("/v2/models/nope/ready")).status_code == 404
        assert (await http.get("/v2/health/live")).status_code == 200
        assert (await http.get("/v2/health/ready")).status_code == 200
        server = (await http.get("/v2")).json()
        assert server["name"] == "anyserve" and "binary_tensor_data" in server["extensions"]
        response = await http.get("/no/such/path")
        assert response.status_code == 404 and "error" in response.json()


# --------------------------------------------------------------------------- SSE


async def test_sse_is_incremental_and_ends_with_done() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], chunks=3, chunk_delay=0.1) as a,
    ):
        await register(http, a)
        async with http.stream("POST", "/infer/stream", headers=CHAT, json=EMPTY) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [item async for item in timed_sse_events(response)]
        assert [e for e, _, _ in events] == ["message", "message", "message", "done"]
        assert events[-1][1] == "[DONE]"
        assert outputs(json.loads(events[0][1]))["text_output"] == "chunk-0"
        assert events[0][2] < 0.08  # the first chunk is not held back
        assert events[2][2] - events[0][2] > 0.15  # later ones arrive as produced


async def test_sse_error_after_events_and_error_before_any() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], chunks=5, error_after=2) as a,
        FakeReplica("nf", [{"type": "nf"}], error=(grpc.StatusCode.NOT_FOUND, "no handler")) as nf,
    ):
        await register(http, a, nf)
        async with http.stream("POST", "/infer/stream", headers=CHAT, json=EMPTY) as response:
            events = [item async for item in sse_events(response)]
        assert [e for e, _ in events] == ["message", "message", "error"]
        assert json.loads(events[-1][1]) == {
            "error": "boom",
            "type": "handler_error",
            "code": "INTERNAL",
        }

        headers = {"X-Capability-Type": "nf"}
        response = await http.post("/infer/stream", headers=headers, json=EMPTY)
        assert response.status_code == 404
        assert response.json()["error"] == "no handler"
        response = await http.post("/infer/stream", headers={"X-Capability-Type": "x"}, json=EMPTY)
        assert response.status_code == 404


async def test_sse_disconnect_cancels_the_replica_call() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], chunks=1000, chunk_delay=0.05) as a,
        FakeReplica("b", [{"type": "slow"}], first_delay=30) as b,
    ):
        await register(http, a, b)
        async with http.stream("POST", "/infer/stream", headers=CHAT, json=EMPTY) as response:
            events = sse_events(response)
            await anext(events)  # one event, then hang up
            await events.aclose()
        with anyio.fail_after(1):
            await a.cancelled.wait()
        # These fakes have no Cancel RPC (api_server/abandoned.py): the call
        # was cancelled in gRPC instead, at once.
        abandoned = api.state.router.abandoned
        await eventually(lambda: abandoned.cancelled == 1, what="the fallback cancel")
        assert abandoned.ended == 0

        # Gone before the first response: the call is cancelled too.
        async def leave_early() -> None:
            headers = {"X-Capability-Type": "slow"}
            async with http.stream("POST", "/infer/stream", headers=headers, json=EMPTY):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_early)
            await b.stream_started.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(1):
            await b.cancelled.wait()

        async def idle() -> bool:
            replicas = (await http.get("/registry")).json()["replicas"]
            return all(r["in_flight"] == 0 for r in replicas)

        await eventually(idle, timeout=3.0)


# --------------------------------------------------------------------------- delegation


async def test_delegation_excludes_visited_replicas() -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        grpc_entry = api.grpc_endpoint
        async with (
            FakeReplica("a", [{"type": "chat"}], delegate_to=grpc_entry) as a,
            FakeReplica("b", [{"type": "chat", "model": "x"}]) as b,
        ):
            await register(http, a, b)
            headers = {**CHAT, "X-Request-Id": "trace-9"}
            response = await http.post("/infer", headers=headers, json=EMPTY)
            assert response.status_code == 200, response.text
            found = outputs(response.json())
            assert found["replica"] == "b" and found["visited"] == "a"
            assert b.metadata[-1][rpc.DELEGATED_FROM] == "a"
            assert b.metadata[-1][rpc.REQUEST_ID] == "trace-9"


async def test_hop_limit_names_replicas_and_cannot_be_forged_away() -> None:
    async with running_api(hop_limit=3) as api, httpx.AsyncClient(base_url=api.url) as http:
        grpc_entry = api.grpc_endpoint
        loop = [{"type": "loop"}]
        async with (
            FakeReplica("r1", loop, delegate_to=grpc_entry) as r1,
            FakeReplica("r2", loop, delegate_to=grpc_entry) as r2,
            FakeReplica("r3", loop, delegate_to=grpc_entry) as r3,
            FakeReplica("r4", loop, delegate_to=grpc_entry) as r4,
        ):
            await register(http, r1, r2, r3, r4)
            headers = {"X-Capability-Type": "loop"}
            response = await http.post("/infer", headers=headers, json=EMPTY)
            assert response.status_code == 508
            message = response.json()["error"]
            assert message.startswith("loop detected")
            assert "hop limit 3" in message
            tried = message.rsplit("replicas tried: ", 1)[1].split(", ")
            assert len(tried) == 3 and set(tried) <= {"r1", "r2", "r3", "r4"}
            assert r1.calls + r2.calls + r3.calls + r4.calls == 3

            # The count is the list itself: forged headers only shorten the way.
            forged = {**headers, "X-Delegated-From": "me", "X-Anyserve-Visited": ""}
            response = await http.post("/infer", headers=forged, json=EMPTY)
            assert response.status_code == 508
            assert response.json()["error"].rsplit(": ", 1)[1].split(", ")[0] == "me"
            forged = {**headers, "X-Delegated-From": "x", "X-Anyserve-Visited": "a,b,c,d"}
            before = r1.calls + r2.calls + r3.calls + r4.calls
            response = await http.post("/infer", headers=forged, json=EMPTY)
            assert response.status_code == 508
            assert r1.calls + r2.calls + r3.calls + r4.calls == before


async def test_random_no_match_policy_delegates_onwards() -> None:
    async with (
        running_api(no_match="random") as api,
        httpx.AsyncClient(base_url=api.url) as http,
    ):
        grpc_entry = api.grpc_endpoint
        async with (
            FakeReplica("a", [{"type": "chat"}], delegate_to=grpc_entry) as a,
            FakeReplica("b", [{"type": "embed"}]) as b,
        ):
            await register(http, a, b)
            heavy = {"X-Capability-Type": "heavy"}
            for _ in range(4):
                found = outputs((await http.post("/infer", headers=heavy, json=EMPTY)).json())
                assert found["replica"] == "b" and found["visited"] in ("", "a")

            # Only delegating replicas: each is tried once, then a loop (508) naming them.
            await http.post("/unregister", json={"replica_id": "b"})
            async with FakeReplica("c", [{"type": "x"}], delegate_to=grpc_entry) as c:
                await register(http, c)
                response = await http.post("/infer", headers=heavy, json=EMPTY)
                assert response.status_code == 508
                message = response.json()["error"]
                assert message.startswith("loop detected")
                assert "type=heavy" in message and "a" in message and "c" in message


# --------------------------------------------------------------------------- gRPC entry


async def test_grpc_entry_proxies_unary_and_bidi_streams() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat", "model": "ma"}], chunks=2) as a,
        FakeReplica("b", [{"type": "chat", "model": "mb"}], chunks=3) as b,
        grpc.aio.insecure_channel(api.grpc_endpoint) as channel,
    ):
        await register(http, a, b)
        infer = channel.unary_unary(rpc.MODEL_INFER, None, None)
        request = ModelInferRequest(model_name="mb", id="1").SerializeToString()
        answer = ModelInferResponse.FromString(await infer(request, timeout=5))
        assert pb_outputs(answer)["replica"] == "b" and answer.id == "1"
        md = [("x-capability-model", "ma")]
        answer = ModelInferResponse.FromString(await infer(request, metadata=md, timeout=5))
        assert pb_outputs(answer)["replica"] == "a"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer(ModelInferRequest(model_name="zz").SerializeToString(), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        call = channel.stream_stream(rpc.MODEL_STREAM_INFER, None, None)(timeout=5)
        for name, rid in (("ma", "r1"), ("mb", "r2"), ("zz", "r3")):
            await call.write(ModelInferRequest(model_name=name, id=rid).SerializeToString())
        await call.done_writing()
        got: dict[str, list[str]] = {"r1": [], "r2": [], "r3": []}
        while (raw := await call.read()) is not grpc.aio.EOF:
            assert isinstance(raw, bytes)
            message = ModelStreamInferResponse.FromString(raw)
            rid = message.infer_response.id
            if message.error_message:
                error = from_stream_response(message)
                got[rid].append(f"error:{type(error).__name__}")
            else:
                got[rid].append(pb_outputs(message.infer_response)["replica"])
        assert await call.code() == grpc.StatusCode.OK
        assert got == {"r1": ["a", "a"], "r2": ["b", "b", "b"], "r3": ["error:NotFound"]}

        live = channel.unary_unary(rpc.SERVER_LIVE, None, None)
        assert ServerLiveResponse.FromString(await live(b"", timeout=5)).live
        meta = channel.unary_unary(rpc.SERVER_METADATA, None, None)
        assert ServerMetadataResponse.FromString(await meta(b"", timeout=5)).name == "anyserve"


# --------------------------------------------------------------------------- client


async def test_client_infer_stream_registry() -> None:
    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat", "model": "m"}], chunks=3) as a,
        FakeReplica("e", [{"type": "err"}], chunks=3, error_after=1) as e,
        Client(api.url, timeout=5) as client,
    ):
        await register(http, a, e)
        assert await client.health()
        response = await client.infer({"type": "chat"}, {"text": "hi", "n": [1, 2]})
        assert pb_outputs(response)["replica"] == "a"
        assert pb_outputs(response)["text"] == "hi"
        response = await client.infer(model="m", inputs={"x": 1.5}, request_id="id-7")
        assert response.id == "id-7" and response.model_name == "m"

        chunks = [pb_outputs(r)["text_output"] async for r in client.stream({"type": "chat"})]
        assert chunks == ["chunk-0", "chunk-1", "chunk-2"]
        seen = []
        with pytest.raises(HandlerError, match="boom"):
            async for r in client.stream({"type": "err"}):
                seen.append(r)
        assert len(seen) == 1
        with pytest.raises(NotFound):
            await client.infer({"type": "nope"})
        with pytest.raises(NotFound):
            async for _ in client.stream({"type": "nope"}):
                pass
        ids = [r["replica_id"] for r in (await client.registry())["replicas"]]
        assert ids == ["a", "e"]
    async with Client(f"http://127.0.0.1:{free_port()}") as client:
        assert not await client.health()


async def test_infer_stream_answers_protobuf_in_base64_protobuf() -> None:
    import base64  # (imports kept local: this function was added on its own)

    async with (
        running_api() as api,
        httpx.AsyncClient(base_url=api.url) as http,
        FakeReplica("a", [{"type": "chat"}], chunks=2) as a,
        FakeReplica("e", [{"type": "err"}], chunks=3, error_after=1) as e,
    ):
        await register(http, a, e)
        body = ModelInferRequest(id="pb-1").SerializeToString()
        pb = {**CHAT, "Content-Type": "application/x-protobuf"}
        async with http.stream("POST", "/infer/stream", headers=pb, content=body) as response:
            events = [item async for item in sse_events(response)]
        assert [e for e, _ in events] == ["message", "message", "done"]
        assert events[-1][1] == "[DONE]"
        chunks = [
            ModelInferResponse.FromString(base64.b64decode(data, validate=True))
            for _, data in events[:-1]
        ]
        assert [pb_outputs(c)["text_output"] for c in chunks] == ["chunk-0", "chunk-1"]
        assert chunks[0].id == "pb-1"

        # errors stay JSON events, whatever the data's form
        pb_err = {**pb, "X-Capability-Type": "err"}
        async with http.stream("POST", "/infer/stream", headers=pb_err, content=body) as response:
            events = [item async for item in sse_events(response)]
        assert [e for e, _ in events] == ["message", "error"]
        assert json.loads(events[-1][1])["type"] == "handler_error"

        # a JSON body on the same route still gets v2 JSON events
        async with http.stream("POST", "/infer/stream", headers=CHAT, json=EMPTY) as response:
            events = [item async for item in sse_events(response)]
        assert outputs(json.loads(events[0][1]))["text_output"] == "chunk-0"
