"""Dynamic worker management end to end: real replicas, worker processes, API
server and CLI on loopback (DESIGN.md section 7).

On demand starts, switching within declared resources, the admin service and
its CLI, draining stops, crash loops, and the registration following each of
them. The API server's heartbeat interval is long (5 s) on purpose: every
"within a second" below can only come from the replica notifying its change.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import grpc
import grpc.aio
import httpx
import pytest

from anyserve import codec, rpc
from anyserve._proto import admin_pb2 as apb
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from anyserve.proto import ModelInferRequest, ModelInferResponse
from anyserve.replica import admin
from anyserve.replica.manager import Manager
from anyserve.replica.server import Replica
from anyserve.replica.slot import State
from anyserve.replica.supervisor import CRASH_LIMIT
from anyserve.testing import GrpcClient, start_replica
from tests.support import eventually

pytestmark = pytest.mark.anyio

WORKERS_APP = "tests.apps.workers_app:app"
CRASH_APP = "tests.apps.workers_crash_app:app"
SLOW_APP = "tests.apps.workers_slow_app:app"
DYNAMIC_APP = "examples.dynamic_app:app"
GPU = {"gpu": 1.0}
# How soon /registry must show a change (the heartbeat alone would take 5 s).
FOLLOW = 1.0

T = TypeVar("T")


def api_config() -> ApiServerConfig:
    return ApiServerConfig(port=0, grpc_port=0, heartbeat_interval=5.0, token=None)


def request(text: str = "", request_id: str = "r") -> ModelInferRequest:
    message = ModelInferRequest(id=request_id)
    if text:
        message.inputs.append(codec.encode_input("text_input", text))
    return message


def body(text: str = "") -> dict[str, Any]:
    inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [text]}]
    return {"inputs": inputs if text else []}


def text_of(response: ModelInferResponse) -> Any:
    return codec.decode_outputs(response)["text_output"]


def served_by(response: ModelInferResponse) -> str:
    return response.parameters[rpc.SERVED_BY].string_param


def json_output(doc: Mapping[str, Any], name: str) -> Any:
    for output in doc["outputs"]:
        if output["name"] == name:
            return output["data"][0]
    raise KeyError(name)


def types(caps: Sequence[Mapping[str, str]]) -> set[str]:
    return {cap["type"] for cap in caps}


def workers_of(entry: Mapping[str, Any], handler: str) -> list[dict[str, Any]]:
    return [w for w in entry["workers"] if w["handler"] == handler]


def offered(entry: Mapping[str, Any]) -> set[str]:
    """Capability types the replica registers as loaded or loadable."""
    return types(entry["capabilities"]) | types(entry["loadable"])


async def registry_entry(http: httpx.AsyncClient, replica_id: str) -> dict[str, Any] | None:
    answer = await http.get("/registry")
    answer.raise_for_status()
    for entry in answer.json()["replicas"]:
        if entry["replica_id"] == replica_id:
            return dict(entry)
    return None


async def registry_until(
    http: httpx.AsyncClient,
    replica_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = FOLLOW,
) -> dict[str, Any]:
    """The replica's /registry entry once ``predicate`` holds; fails after ``timeout``."""
    last: dict[str, Any] | None = None

    async def followed() -> bool:
        nonlocal last
        last = await registry_entry(http, replica_id)
        return last is not None and predicate(last)

    try:
        await eventually(followed, timeout)
    except TimeoutError:
        raise AssertionError(f"/registry did not follow within {timeout}s; last: {last}") from None
    assert last is not None
    return last


async def cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run the real ``anyserve`` command (a subprocess; the replica keeps
    serving in this event loop meanwhile)."""
    env = {k: v for k, v in os.environ.items() if k != "ANYSERVE_TOKEN"}
    if token is not None:
        env["ANYSERVE_TOKEN"] = token
    done = await anyio.run_process(
        [sys.executable, "-m", "anyserve.cli", *args], check=False, env=env
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def concurrently(*calls: Awaitable[T]) -> list[T]:
    """Await ``calls`` at the same time; their results in order."""
    results: dict[int, T] = {}

    async def one(index: int, call: Awaitable[T]) -> None:
        results[index] = await call

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(one, index, call)
    return [results[i] for i in range(len(calls))]


def row(listing: str, worker_id: str) -> str:
    """The line of ``anyserve workers list`` output for one worker."""
    for line in listing.splitlines():
        if line.split()[:1] == [worker_id]:
            return line
    raise AssertionError(f"no row for {worker_id} in:\n{listing}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@asynccontextmanager
async def cluster_of(*apps: str, **replica_options: Any) -> AsyncIterator[Cluster]:
    async with start_cluster(
        apps, api=api_config(), replica_options={"grace": 5.0, **replica_options}
    ) as cluster:
        yield cluster


@asynccontextmanager
async def http_to(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        yield http


def manager_of(replica: Replica) -> Manager:
    assert replica.manager is not None
    return replica.manager


# -- 1. seed scenario 5 ----------------------------------------------------------------


async def test_scenario5_heavy_starts_on_demand_through_api_server() -> None:
    async with cluster_of(DYNAMIC_APP, resources=GPU) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        rid = replica.replica_id
        before = await registry_entry(http, rid)
        assert before is not None
        assert types(before["capabilities"]) == {"chat"}
        assert types(before["loadable"]) == {"heavy"}
        assert workers_of(before, "heavy") == []

        answer = await http.post("/infer", headers={"X-Capability-Type": "heavy"}, json=body("x"))
        assert answer.status_code == 200, answer.text
        assert json_output(answer.json(), "text_output") == "heavy work done (started on demand)"
        heavy_pid = json_output(answer.json(), "pid")

        after = await registry_until(http, rid, lambda e: "heavy" in types(e["capabilities"]))
        (heavy,) = workers_of(after, "heavy")
        assert heavy["state"] == "ready"
        assert heavy["pid"] == heavy_pid
        assert heavy["capability"] == {"type": "heavy"}
        # One GPU: the idle chat worker made room and can come back on demand.
        assert types(after["capabilities"]) == {"heavy"}
        assert types(after["loadable"]) == {"chat"}
        assert all(w["state"] != "ready" for w in workers_of(after, "chat"))
        assert manager_of(replica).free() == {"gpu": 0.0}

        # And back: a chat request switches again.
        answer = await http.post("/infer", headers={"X-Capability-Type": "chat"}, json=body("x"))
        assert answer.status_code == 200, answer.text
        assert json_output(answer.json(), "text_output") == "chat here"
        await registry_until(
            http,
            rid,
            lambda e: types(e["capabilities"]) == {"chat"} and types(e["loadable"]) == {"heavy"},
        )
        assert not pid_alive(heavy_pid)


# -- 2. the CLI and the admin service ------------------------------------------------


async def test_cli_workers_start_stop_list_change_what_is_served() -> None:
    async with cluster_of(WORKERS_APP) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        rid, where = replica.replica_id, ("--replica", replica.endpoint)

        code, out, err = await cli("workers", "list", *where)
        assert code == 0, err
        assert "ready" in row(out, "a-0") and "type=a" in row(out, "a-0")
        assert "b-0" not in out  # on demand only: never started

        code, out, err = await cli("workers", "start", "type=b", *where)
        assert code == 0, err
        assert "ready" in row(out, "b-0")  # the command returns once it serves
        entry = await registry_until(http, rid, lambda e: "b" in types(e["capabilities"]))
        assert workers_of(entry, "b")[0]["state"] == "ready"
        answer = await http.post("/infer", headers={"X-Capability-Type": "b"}, json=body())
        assert answer.status_code == 200, answer.text

        code, out, err = await cli("workers", "stop", "b-0", *where)
        assert code == 0, err
        assert "stopped" in row(out, "b-0") and "ready" in row(out, "a-0")
        # Stopped by command: neither loaded nor loadable (not started on demand).
        entry = await registry_until(http, rid, lambda e: "b" not in offered(e))
        assert "a" in types(entry["capabilities"])
        answer = await http.post("/infer", headers={"X-Capability-Type": "b"}, json=body())
        assert answer.status_code == 404, answer.text
        assert "type=b" in answer.json()["error"]

        # By handler name this time; the capability comes back.
        code, out, err = await cli("workers", "start", "b", *where)
        assert code == 0, err
        await registry_until(http, rid, lambda e: "b" in types(e["capabilities"]))
        answer = await http.post("/infer", headers={"X-Capability-Type": "b"}, json=body())
        assert answer.status_code == 200, answer.text

        # Unknown capability and worker: a clear error, exit code 1.
        (code, _, err), (code2, _, err2) = await concurrently(
            cli("workers", "start", "type=nope", *where), cli("workers", "stop", "zzz-9", *where)
        )
        assert code == 1 and err.startswith("anyserve: NotFound (404): ") and "type=nope" in err
        assert code2 == 1 and err2.startswith("anyserve: NotFound (404): ") and "zzz-9" in err2


async def test_admin_needs_the_token_when_one_is_set() -> None:
    async with start_replica(CRASH_APP, token="s3cret") as replica:
        where = ("--replica", replica.endpoint)
        refused = await concurrently(
            cli("workers", "list", *where),
            cli("workers", "start", "crasher", *where, "--token", "wrong"),
        )
        for code, out, err in refused:
            assert code == 1 and err.startswith("anyserve: Unauthenticated (401): "), (out, err)
        assert manager_of(replica).slots["crasher"] == []
        assert manager_of(replica).slots["ok"][0].state is State.READY

        async with grpc.aio.insecure_channel(replica.endpoint) as channel:
            stop = channel.unary_unary(
                admin.STOP_WORKER,
                request_serializer=apb.StopWorkerRequest.SerializeToString,
                response_deserializer=apb.WorkersReply.FromString,
            )
            for metadata in [(), (("authorization", "Bearer wrong"),)]:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stop(
                        apb.StopWorkerRequest(worker_id="ok-0"), metadata=metadata, timeout=5
                    )
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

        allowed = await concurrently(
            cli("workers", "list", *where, "--token", "s3cret"),
            cli("workers", "list", *where, token="s3cret"),  # from $ANYSERVE_TOKEN
        )
        for code, out, err in allowed:
            assert code == 0, err
            assert "ready" in row(out, "ok-0")


async def test_a_replica_id_needs_the_token_when_the_api_server_has_one() -> None:
    api = ApiServerConfig(port=0, grpc_port=0, heartbeat_interval=5.0, token="s3cret")
    async with start_cluster([WORKERS_APP], api=api) as cluster:
        replica = cluster.replicas[0]
        where = ("--replica", replica.replica_id, "--api-server", cluster.url)
        # Without the token the registry hides endpoints: one line saying so.
        (code, out, err), (code2, out2, err2) = await concurrently(
            cli("workers", "list", *where), cli("registry", "--api-server", cluster.url)
        )
        assert code == 1, out
        assert err.splitlines() == [
            f"anyserve: the registry at {cluster.url} shows replica endpoints only to callers"
            " with its token: pass --token (or set ANYSERVE_TOKEN), or give HOST:PORT"
        ]
        assert code2 == 0, err2
        assert f"{replica.replica_id}  (endpoint hidden: pass --token)" in out2
        # With it: the same token opens the registry and the admin service.
        (code, out, err), (code2, out2, err2) = await concurrently(
            cli("workers", "list", *where, token="s3cret"),
            cli("registry", "--api-server", cluster.url, "--token", "s3cret"),
        )
        assert code == 0, err
        assert "ready" in row(out, "a-0")
        assert code2 == 0, err2
        assert f"{replica.replica_id}  {replica.endpoint}  " in out2


# -- 3. switching within resources ---------------------------------------------------


async def test_switch_stops_the_idle_worker_to_make_room(tmp_path: Path) -> None:
    async with (
        start_replica(WORKERS_APP, resources=GPU) as replica,
        GrpcClient(replica.endpoint) as client,
    ):
        manager = manager_of(replica)
        (a_slot,) = manager.slots["a"]
        assert manager.pick("a") is a_slot  # ready
        a_pid = a_slot.pid
        assert a_pid is not None

        response = await client.infer(request(), capability={"type": "b"}, timeout=20)
        assert text_of(response) == b"b"
        assert a_slot.state is State.STOPPED and a_slot.pid is None
        assert not pid_alive(a_pid)
        (b_slot,) = manager.slots["b"]
        assert b_slot.state is State.READY
        assert manager.free() == {"gpu": 0.0}

        # b is now the busy one: a request for a is refused at once, not queued.
        gate = tmp_path / "gate"
        async with anyio.create_task_group() as tg:
            results: list[ModelInferResponse] = []

            async def slow_b() -> None:
                results.append(
                    await client.infer(request(str(gate)), capability={"type": "b"}, timeout=20)
                )

            tg.start_soon(slow_b)
            await eventually(lambda: b_slot.inflight == 1)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.infer(request(), capability={"type": "a"}, timeout=10)
            assert time.monotonic() - started < 2
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no idle worker can make room" in (refused.value.details() or "")
            gate.touch()
        assert text_of(results[0]) == b"b"
        assert b_slot.state is State.READY  # the refusal left the busy worker alone


async def test_switch_refused_with_429_when_no_other_replica_can_serve(tmp_path: Path) -> None:
    async with cluster_of(WORKERS_APP, resources=GPU) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        entry = await registry_entry(http, replica.replica_id)
        assert entry is not None
        assert types(entry["capabilities"]) == {"a"}
        # huge needs two GPUs: never offered by a one-GPU replica.
        assert types(entry["loadable"]) == {"b"}
        answer = await http.post("/infer", headers={"X-Capability-Type": "huge"}, json=body())
        assert answer.status_code == 404, answer.text

        gate = tmp_path / "gate"
        async with anyio.create_task_group() as tg:
            statuses: list[int] = []

            async def slow_a() -> None:
                answer = await http.post(
                    "/infer", headers={"X-Capability-Type": "a"}, json=body(str(gate))
                )
                statuses.append(answer.status_code)

            tg.start_soon(slow_a)
            await eventually(lambda: manager_of(replica).slots["a"][0].inflight == 1)
            started = time.monotonic()
            answer = await http.post(
                "/infer",
                headers={"X-Capability-Type": "b", "X-Request-Timeout": "10"},
                json=body(),
            )
            assert time.monotonic() - started < 2
            assert answer.status_code == 429, answer.text
            assert "Retry-After" in answer.headers
            assert "no idle worker can make room" in answer.json()["error"]
            gate.touch()
        assert statuses == [200]


async def test_switch_delegated_to_another_replica_while_busy(tmp_path: Path) -> None:
    async with cluster_of(WORKERS_APP, WORKERS_APP, resources=GPU) as cluster:
        first, second = cluster.replicas
        gate = tmp_path / "gate"
        async with GrpcClient(first.endpoint) as client, anyio.create_task_group() as tg:
            results: list[ModelInferResponse] = []

            async def slow_a() -> None:
                results.append(
                    await client.infer(request(str(gate)), capability={"type": "a"}, timeout=20)
                )

            tg.start_soon(slow_a)
            await eventually(lambda: manager_of(first).slots["a"][0].inflight == 1)
            # Sent to the busy replica itself: it hands the request back to the
            # API server, which picks the other replica (switching there).
            response = await client.infer(request(), capability={"type": "b"}, timeout=20)
            assert text_of(response) == b"b"
            assert served_by(response) == second.replica_id
            assert manager_of(first).slots["b"] == []
            assert manager_of(second).slots["b"][0].state is State.READY
            gate.touch()
        assert text_of(results[0]) == b"a"
        assert served_by(results[0]) == first.replica_id


# -- 4. stopping drains ----------------------------------------------------------------


async def test_stop_drains_three_calls_while_new_calls_go_elsewhere(tmp_path: Path) -> None:
    async with cluster_of(SLOW_APP, SLOW_APP) as cluster, http_to(cluster) as http:
        first, second = cluster.replicas
        (slot,) = manager_of(first).slots["slow"]
        gate = tmp_path / "gate"
        async with GrpcClient(first.endpoint) as client, anyio.create_task_group() as tg:
            results: list[ModelInferResponse] = []
            stopped: list[tuple[int, str, str]] = []

            async def slow_call(n: int) -> None:
                results.append(
                    await client.infer(
                        request(str(gate), f"held-{n}"), capability={"type": "slow"}, timeout=20
                    )
                )

            for n in range(3):
                tg.start_soon(slow_call, n)
            await eventually(lambda: slot.inflight == 3)

            async def stop() -> None:
                stopped.append(
                    await cli("workers", "stop", "type=slow", "--replica", first.endpoint)
                )

            tg.start_soon(stop)
            await eventually(lambda: slot.state is State.DRAINING, timeout=30)
            # The capability leaves the registration while its worker still drains.
            entry = await registry_until(http, first.replica_id, lambda e: "slow" not in offered(e))
            assert workers_of(entry, "slow")[0]["state"] == "draining"
            assert slot.state is State.DRAINING and slot.inflight == 3
            assert not stopped

            # New calls go to the other replica: through the API server, and
            # even when sent to the draining replica itself (delegated).
            answer = await http.post("/infer", headers={"X-Capability-Type": "slow"}, json=body())
            assert answer.status_code == 200, answer.text
            assert answer.json()["parameters"][rpc.SERVED_BY] == second.replica_id
            response = await client.infer(request(), capability={"type": "slow"}, timeout=10)
            assert served_by(response) == second.replica_id

            gate.touch()
        assert sorted(r.id for r in results) == ["held-0", "held-1", "held-2"]
        assert all(text_of(r) == b"slow" and served_by(r) == first.replica_id for r in results)
        code, out, err = stopped[0]
        assert code == 0, err
        assert "stopped" in row(out, "slow-0")
        assert slot.state is State.STOPPED and slot.pid is None


# -- 5. crash loops --------------------------------------------------------------------


async def test_crash_loops_mark_the_capability_failed_and_deregister_it() -> None:
    async with cluster_of(CRASH_APP) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        rid, manager = replica.replica_id, manager_of(replica)
        where = ("--replica", replica.endpoint)
        entry = await registry_entry(http, rid)
        assert entry is not None and types(entry["loadable"]) >= {"broken_import", "crasher"}

        import_answer: list[httpx.Response] = []
        crash_errors: list[str] = []

        async def broken_import() -> None:
            # The first request waits while the worker crashes and is restarted.
            import_answer.append(
                await http.post(
                    "/infer", headers={"X-Capability-Type": "broken_import"}, json=body()
                )
            )

        async def crasher() -> None:
            async with GrpcClient(replica.endpoint) as client:
                for _ in range(CRASH_LIMIT + 1):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await client.infer(request(), capability={"type": "crasher"}, timeout=20)
                    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                    crash_errors.append(failed.value.details() or "")

        async with anyio.create_task_group() as tg:
            tg.start_soon(broken_import)
            tg.start_soon(crasher)

        # Crash on every request: each in-flight call fails naming the exit
        # code, the worker is restarted, and the sixth request meets the failure.
        assert all("exited with code 7" in e for e in crash_errors[:CRASH_LIMIT]), crash_errors
        assert crash_errors[-1].startswith("handler crasher failed: ")
        assert f"crashed {CRASH_LIMIT} times" in crash_errors[-1]
        (crash_slot,) = manager.slots["crasher"]
        assert crash_slot.state is State.FAILED and crash_slot.restarts == CRASH_LIMIT - 1

        # Crash at import: the waiting request gets 503 naming the failure.
        answer = import_answer[0]
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert "broken_import failed" in error and f"crashed {CRASH_LIMIT} times" in error
        assert "exited with code 3" in error
        (import_slot,) = manager.slots["broken_import"]
        assert import_slot.state is State.FAILED

        # Deregistered (neither loaded nor loadable), shown failed; the rest serves.
        entry = await registry_until(
            http, rid, lambda e: not offered(e) & {"crasher", "broken_import"}
        )
        assert [w["state"] for w in workers_of(entry, "crasher")] == ["failed"]
        assert [w["state"] for w in workers_of(entry, "broken_import")] == ["failed"]
        assert "crashed" in workers_of(entry, "crasher")[0]["error"]
        assert "ok" in types(entry["capabilities"])
        answer = await http.post("/infer", headers={"X-Capability-Type": "ok"}, json=body())
        assert answer.status_code == 200 and json_output(answer.json(), "text_output") == "fine"
        # It still exists, but down: 503 naming the failure, not "no replica serves" (404).
        assert {"crasher", "broken_import"} <= types(entry["failed"])
        answer = await http.post("/infer", headers={"X-Capability-Type": "crasher"}, json=body())
        assert answer.status_code == 503, answer.text
        assert "is down on" in answer.json()["error"] and "crashing" in answer.json()["error"]
        unknown = await http.post("/infer", headers={"X-Capability-Type": "zzz"}, json=body())
        assert unknown.status_code == 404  # what never existed is still unknown

        # Started again by command: the crasher comes back (until its next call).
        code, out, err = await cli("workers", "start", "type=crasher", *where)
        assert code == 0, err
        assert "ready" in row(out, "crasher-0") and "failed" in row(out, "broken_import-0")
        entry = await registry_until(http, rid, lambda e: "crasher" in types(e["capabilities"]))
        assert "broken_import" not in offered(entry)


async def test_deadline_bounds_the_wait_for_a_worker_that_never_gets_ready() -> None:
    async with cluster_of(CRASH_APP) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        async with GrpcClient(replica.endpoint) as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await client.infer(request(), capability={"type": "never_ready"}, timeout=2)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 3
            # The cold start goes on for the next request; the replica still serves.
            (slot,) = manager_of(replica).slots["never_ready"]
            assert slot.state is State.STARTING and slot.pid is not None
            response = await client.infer(request(), capability={"type": "ok"}, timeout=5)
            assert text_of(response) == b"fine"

        # Through the API server: 504 once the request's own timeout passes.
        started = time.monotonic()
        answer = await http.post(
            "/infer",
            headers={"X-Capability-Type": "never_ready", "X-Request-Timeout": "1"},
            json=body(),
        )
        assert answer.status_code == 504, answer.text
        assert time.monotonic() - started < 2
        assert slot.state is State.STARTING
