"""The API server end to end with real replicas and real worker processes.

Every request here crosses the whole chain: HTTP/SSE or gRPC into an API
server, gRPC to a replica, a Unix socket to a worker process, and back. The
clusters are module-scoped (starting workers is the slow part):

* ``seed``: exactly the README's ``chat_app`` and ``embed_app`` (seed
  scenario 1). Default settings.
* ``bench``: ``forms_app`` (every handler form, misbehaving ones included),
  ``heavy_app`` (a delegation target) and ``chat_app`` (a replica that serves
  neither, for stale routes). Default settings.
* ``routing``: two small apps whose capabilities overlap
  (``tests/apps/e2e_apps.py``), behind a token.
* ``randomly``: ``stream_app`` (seed scenario 4) and ``heavy_app`` with
  ``no_match="random"`` (seed scenario 2's policy).

Tests that kill or restart something get their own API server and replicas,
and ``anyserve run`` is tested as the user runs it: a separate process,
stopped with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import grpc
import grpc.aio
import httpx
import numpy as np
import pytest

from anyserve import codec, rpc
from anyserve.api_server.channels import Connection
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from anyserve.client import Client
from anyserve.cluster import Cluster, start_cluster
from anyserve.errors import HandlerError, LoopDetected, NotFound
from anyserve.proto import ModelInferRequest, ModelInferResponse
from anyserve.testing import GrpcClient, start_replica, wait_until

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
TOKEN = "e2e-secret"

CHAT = {"X-Capability-Type": "chat"}
EMBED = {"X-Capability-Type": "embed"}
HEAVY = {"X-Capability-Type": "heavy"}
EMPTY: dict[str, Any] = {"inputs": []}


# --------------------------------------------------------------------------- helpers


def text_body(name: str, text: str, **extra: Any) -> dict[str, Any]:
    """A KServe v2 JSON body with one BYTES input."""
    return {"inputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}], **extra}


def outputs(doc: dict[str, Any]) -> dict[str, Any]:
    """JSON response outputs by name (one-element data unwrapped)."""
    found = {}
    for out in doc["outputs"]:
        data = out.get("data")
        found[out["name"]] = data[0] if isinstance(data, list) and len(data) == 1 else data
    return found


def served_by(doc: dict[str, Any]) -> str:
    """The replica that served a JSON response."""
    return str(doc["parameters"][rpc.SERVED_BY])


def pb_served_by(response: ModelInferResponse) -> str:
    return str(response.parameters[rpc.SERVED_BY].string_param)


async def infer(
    http: httpx.AsyncClient, headers: dict[str, str], body: Any = EMPTY, path: str = "/infer"
) -> dict[str, Any]:
    """POST a JSON inference request that must succeed; returns the JSON answer."""
    response = await http.post(path, headers=headers, json=body)
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` of each SSE event, as the lines arrive."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif not line.startswith(":"):  # ":" lines are keep-alive comments
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


async def stream_events(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], body: Any
) -> list[tuple[str, str]]:
    """Every event of one SSE answer (which must start with 200)."""
    async with http.stream("POST", path, headers=headers, json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [item async for item in sse(response)]


def tokens(events: list[tuple[str, str]]) -> list[str]:
    return [
        outputs(json.loads(data))["text_output"] for event, data in events if event == "message"
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Poll an async condition until true (TimeoutError after ``timeout``);
    returns the seconds it took."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - the condition is in another process
            await anyio.sleep(0.02)
    return anyio.current_time() - start


async def registry_ids(http: httpx.AsyncClient) -> set[str]:
    response = await http.get("/registry")
    assert response.status_code == 200, response.text
    return {r["replica_id"] for r in response.json()["replicas"]}


def anyserve_command() -> list[str]:
    """The ``anyserve`` console script of this environment (else ``python -m``)."""
    script = Path(sys.executable).parent / "anyserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "anyserve.cli"]


async def spawn(argv: list[str], log: Path) -> anyio.abc.Process:
    """Start a process in its own session (its own process group) from the repo
    root, so that ``examples.*`` imports and one killpg reaches its workers."""
    with log.open("wb") as out:
        return await anyio.open_process(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def kill_group(proc: anyio.abc.Process) -> None:
    """SIGKILL a spawned process and everything in its group, then reap it."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with anyio.move_on_after(10):
            await proc.wait()


def live_processes(pgid: int, marker: str) -> list[str]:
    """Processes (not zombies) in process group ``pgid`` or whose command line
    mentions ``marker``: what a stopped system must not leave behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            )
        except OSError:
            continue  # exited while we looked
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z" and (int(pgrp) == pgid or marker in cmdline):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def readme_run_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Run it", 1)[1].split("\n## ", 1)[0]


def readme_curls() -> list[str]:
    """The curl commands of the README's "Run it" section, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme_run_section(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.startswith("curl ")]
    return commands


# --------------------------------------------------------------------------- clusters


@pytest.fixture(scope="module")
async def seed() -> AsyncIterator[Cluster]:
    apps = ["examples.chat_app:app", "examples.embed_app:app"]
    async with start_cluster(apps, api=ApiServerConfig(port=0, grpc_port=0, token=None)) as c:
        yield c


@pytest.fixture(scope="module")
async def bench() -> AsyncIterator[Cluster]:
    apps = ["tests.apps.forms_app:app", "examples.heavy_app:app", "examples.chat_app:app"]
    async with start_cluster(apps, api=ApiServerConfig(port=0, grpc_port=0, token=None)) as c:
        yield c


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


@pytest.fixture(scope="module")
async def randomly() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, no_match="random")
    async with start_cluster(
        ["examples.stream_app:app", "examples.heavy_app:app"], api=config
    ) as cluster:
        yield cluster


@pytest.fixture
async def http(seed: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=seed.url, timeout=30) as client:
        yield client


@pytest.fixture
async def bench_http(bench: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=bench.url, timeout=30) as client:
        yield client


# --------------------------------------------------------------------------- 1: seed scenario 1


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


async def test_readme_curl_commands_work_as_pasted(seed: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    section = readme_run_section()
    # The README's scenario is exactly the apps this cluster runs.
    readme_apps = set(re.findall(r"--app (\S+)", section))
    assert readme_apps == {"examples.chat_app:app", "examples.embed_app:app"}
    assert {r.config.app for r in seed.replicas} == readme_apps

    commands = readme_curls()
    assert len(commands) == 4, commands
    hostport = seed.url.removeprefix("http://")
    seen = set()
    for command in commands:
        assert "localhost:8080" in command, command
        argv = shlex.split(command.replace("localhost:8080", hostport))
        assert argv[0] == "curl"
        argv = [curl, *argv[1:], "-sS", "-w", "\n%{http_code}"]
        with anyio.fail_after(20):
            result = await anyio.run_process(argv, check=False)
        out = result.stdout.decode()
        assert result.returncode == 0, (command, result.stderr.decode())
        body, _, status = out.rpartition("\n")
        assert status == "200", (command, out)
        if "/infer/stream" in command:
            assert "event: done\ndata: [DONE]" in body
            events = [
                json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")
            ]
            assert [outputs(e)["text_output"] for e in events] == ["Hello", " ", "world", "!"]
            seen.add("stream")
        elif "/registry" in command:
            ids = {r["replica_id"] for r in json.loads(body)["replicas"]}
            assert ids == {"chat_app", "embed_app"}
            seen.add("registry")
        elif "X-Capability-Type: chat" in command:
            doc = json.loads(body)
            assert outputs(doc)["output"] == "Hello, world!" and served_by(doc) == "chat_app"
            seen.add("chat")
        elif "X-Capability-Type: embed" in command:
            doc = json.loads(body)
            assert served_by(doc) == "embed_app" and outputs(doc)["dims"] == 8
            assert {"dims", "norm", "source", "replica"} <= set(outputs(doc))
            seen.add("embed")
    assert seen == {"chat", "embed", "stream", "registry"}


# --------------------------------------------------------------------------- 2: seed scenario 4


async def test_stream_app_tokens_in_order_then_done(randomly: Cluster) -> None:
    async with (
        httpx.AsyncClient(base_url=randomly.url, timeout=30) as http,
        http.stream(
            "POST", "/infer/stream", headers=CHAT, json={"model_name": "chat", "inputs": []}
        ) as response,
    ):
        assert response.status_code == 200
        events = [item async for item in sse(response)]  # read as they arrive
    assert served_by(json.loads(events[0][1])) == "stream_app"  # named on the first chunk
    assert tokens(events) == ["Hello", " ", "world", "!"]
    finish = [outputs(json.loads(d))["finish_reason"] for e, d in events if e == "message"]
    assert finish == ["", "", "", "stop"]
    assert events[-1] == ("done", "[DONE]")
    assert [e for e, _ in events] == ["message"] * 4 + ["done"]


async def test_generate_stream_flat_events(randomly: Cluster) -> None:
    async with httpx.AsyncClient(base_url=randomly.url, timeout=30) as http:
        events = await stream_events(
            http, "/v2/models/tiny/generate_stream", {}, {"text_input": "one two three"}
        )
    assert events[-1] == ("done", "[DONE]")
    flat = [json.loads(data) for event, data in events if event == "message"]
    assert [e["text_output"] for e in flat] == ["one ", "two ", "three "]
    assert [e["finish_reason"] for e in flat] == ["", "", "stop"]
    assert "outputs" not in flat[0]  # Triton's flat form, not KServe tensors


async def test_sse_is_incremental(bench_http: httpx.AsyncClient, tmp_path: Path) -> None:
    http = bench_http
    # The handler yields "first", then waits for the gate file: the first
    # event can only be seen before the gate exists if nothing buffers it.
    gate = tmp_path / "gate"
    headers = {"X-Capability-Type": "gen", "X-Capability-Form": "gated"}
    with anyio.fail_after(15):
        async with http.stream(
            "POST", "/infer/stream", headers=headers, json=text_body("text_input", str(gate))
        ) as response:
            assert response.status_code == 200
            events = sse(response)
            first = await anext(events)
            assert not gate.exists()
            assert tokens([first]) == ["first"]
            gate.write_text("open")
            rest = [item async for item in events]
    assert tokens(rest) == ["second"] and rest[-1] == ("done", "[DONE]")


async def test_stream_error_midway_is_an_error_event(bench_http: httpx.AsyncClient) -> None:
    http = bench_http
    fail = {"X-Capability-Type": "fail"}
    events = await stream_events(http, "/infer/stream", fail, EMPTY)
    assert [e for e, _ in events] == ["message", "message", "error"]
    assert tokens(events) == ["one", "two"]
    error = json.loads(events[-1][1])
    assert "stream broke after two tokens" in error["error"]
    assert all(e != "done" and d != "[DONE]" for e, d in events)

    events = await stream_events(http, "/v2/models/fail/generate_stream", {}, {})
    assert [json.loads(d)["text_output"] for e, d in events if e == "message"] == ["one", "two"]
    assert events[-1][0] == "error" and "stream broke" in json.loads(events[-1][1])["error"]
    assert all(e != "done" for e, _ in events)


# --------------------------------------------------------------------------- 3: routing


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


# --------------------------------------------------------------------------- 9: token


async def test_wrong_token_cannot_register(routing: Cluster) -> None:
    async with httpx.AsyncClient(base_url=routing.url, timeout=30) as http:
        before = (await http.get("/registry")).json()["replicas"]
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
        after = (await http.get("/registry")).json()["replicas"]

        def key(replicas: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
            return sorted(
                (r["replica_id"], r["endpoint"], json.dumps(r["capabilities"], sort_keys=True))
                for r in replicas
            )

        assert key(after) == key(before) and len(after) == 2
        assert served_by(await infer(http, CHAT)) == "demo"


# --------------------------------------------------------------------------- 4: load and kill -9


async def test_two_replicas_share_load_and_survive_kill_9(tmp_path: Path) -> None:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.3)
    procs: list[anyio.abc.Process] = []
    async with ApiServer(config) as api, httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        try:
            for name in ("heavy-a", "heavy-b"):
                argv = [
                    *anyserve_command(),
                    "start",
                    "--app",
                    "examples.heavy_app:app",
                    "--port",
                    "0",  # it registers the port it got
                    "--api-server",
                    api.url,
                    "--replica-id",
                    name,
                    "--object-store",
                    str(tmp_path / "objects"),
                    "--log-level",
                    "warning",
                ]
                procs.append(await spawn(argv, tmp_path / f"{name}.log"))

            async def both_registered() -> bool:
                for name, proc in zip(("heavy-a", "heavy-b"), procs, strict=True):
                    assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
                return await registry_ids(http) == {"heavy-a", "heavy-b"}

            await eventually(both_registered, timeout=30)

            served: Counter[str] = Counter()

            async def one() -> None:
                served[served_by(await infer(http, HEAVY))] += 1

            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
            assert sum(served.values()) == 40
            assert served["heavy-a"] > 0 and served["heavy-b"] > 0, served

            victim = procs[0]
            os.killpg(victim.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                await victim.wait()
            killed = anyio.current_time()
            # Until the dead entry expires, and after, every request succeeds
            # on the survivor (a dead endpoint is skipped at connect time).
            with anyio.fail_after(config.effective_ttl + 5):
                while "heavy-a" in await registry_ids(http):
                    assert served_by(await infer(http, HEAVY)) == "heavy-b"
            gone_after = anyio.current_time() - killed
            assert gone_after <= config.effective_ttl + 0.5, gone_after
            for _ in range(10):
                assert served_by(await infer(http, HEAVY)) == "heavy-b"
        finally:
            for proc in procs:
                await kill_group(proc)


# --------------------------------------------------------------------------- 5: API server restart


async def _serve_api(
    config: ApiServerConfig,
    stop: anyio.Event,
    stopped: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[ApiServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # Each server in a task of its own: its task group must not interleave
    # with the replicas' (they outlive the first server).
    try:
        async with ApiServer(config) as server:
            task_status.started(server)
            await stop.wait()
    finally:
        stopped.set()


async def test_replicas_reappear_after_api_server_restart() -> None:
    interval = 0.5

    def config(port: int) -> ApiServerConfig:
        return ApiServerConfig(port=port, grpc_port=0, token=None, heartbeat_interval=interval)

    async with anyio.create_task_group() as servers:
        stop_first, stop_second = anyio.Event(), anyio.Event()
        first_stopped = anyio.Event()
        try:
            first: ApiServer = await servers.start(_serve_api, config(0), stop_first, first_stopped)
            url, port = first.url, first.http_port
            async with (
                start_replica(
                    "examples.heavy_app:app", api_server=url, replica_id="r-heavy"
                ) as heavy,
                start_replica(
                    "examples.embed_app:app", api_server=url, replica_id="r-embed"
                ) as embed,
                httpx.AsyncClient(base_url=url, timeout=10) as http,
            ):
                for replica in (heavy, embed):
                    assert replica.registration is not None
                    with anyio.fail_after(30):
                        await replica.registration.wait_registered()
                assert await registry_ids(http) == {"r-heavy", "r-embed"}

                stop_first.set()
                with anyio.fail_after(10):
                    await first_stopped.wait()
                # (No pytest.raises inside task groups: its failure is a
                # BaseException, which would take anyio's test runner down.)
                refused = False
                try:
                    await http.get("/registry")
                except httpx.ConnectError:
                    refused = True
                assert refused, "the first API server still answers"

                second: ApiServer = await servers.start(
                    _serve_api, config(port), stop_second, anyio.Event()
                )
                assert second.url == url

                async def back() -> bool:
                    return await registry_ids(http) == {"r-heavy", "r-embed"}

                took = await eventually(back, timeout=10)
                assert took <= interval + 1.0, took
                assert served_by(await infer(http, HEAVY)) == "r-heavy"
                # The replicas learnt the new gRPC entry: delegation goes through it.
                request = ModelInferRequest(id="after-restart")
                async with GrpcClient(embed.endpoint) as client:
                    response = await client.infer(request, capability={"type": "heavy"})
                assert pb_served_by(response) == "r-heavy"
        finally:
            stop_first.set()
            stop_second.set()


# --------------------------------------------------------------------------- 6: SSE disconnect


@pytest.mark.parametrize("form", ["async", "sync"])
async def test_closing_sse_stops_the_handler(
    bench_http: httpx.AsyncClient, tmp_path: Path, form: str
) -> None:
    http = bench_http
    marker = tmp_path / f"ticker-{form}"
    stopped = marker.with_suffix(".stopped")
    headers = {"X-Capability-Type": "ticker", "X-Capability-Form": form}
    with anyio.fail_after(15):
        async with http.stream(
            "POST", "/infer/stream", headers=headers, json=text_body("text_input", str(marker))
        ) as response:
            assert response.status_code == 200
            events = sse(response)
            assert tokens([await anext(events), await anext(events)]) == ["0", "1"]
            await events.aclose()
        # Leaving the block closed the connection after two events.
    await wait_until(stopped.exists, timeout=1.0)
    assert stopped.read_text() == form


# --------------------------------------------------------------------------- 7: tritonclient, curl


async def test_tritonclient_http_and_grpc_through_the_api_server(
    seed: Cluster, bench: Cluster
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    # By model name on the README's apps, by capability headers on forms_app.
    by_name_at = seed.url.removeprefix("http://")
    by_headers_at = bench.url.removeprefix("http://")
    echo = {"x-capability-type": "echo", "x-capability-form": "async"}

    def texts(array: Any) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.tolist()]

    def text_input(module: Any, name: str, text: str, binary: bool | None = None) -> Any:
        tensor = module.InferInput(name, [1], "BYTES")
        data = np.array([text.encode()], dtype=object)
        if binary is None:
            tensor.set_data_from_numpy(data)  # grpc: always raw
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        return tensor

    def wanted(binary: bool, *names: str) -> list[Any]:
        return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]

    def run_http(binary: bool) -> list[Any]:
        results = []
        client = httpclient.InferenceServerClient(url=by_name_at)
        try:
            results.append(
                client.infer(
                    "llama-70b",
                    [text_input(httpclient, "text_input", "hi", binary)],
                    outputs=wanted(binary, "output"),
                    request_id=f"h-{binary}",
                )
            )
            results.append(
                client.infer(
                    "embed",
                    [text_input(httpclient, "text", "hello", binary)],
                    outputs=wanted(binary, "dims", "norm"),
                )
            )
        finally:
            client.close()
        client = httpclient.InferenceServerClient(url=by_headers_at)
        try:
            results.append(
                client.infer(
                    "ignored-by-headers",
                    [text_input(httpclient, "text_input", "hey", binary)],
                    outputs=wanted(binary, "text_output", "pid"),
                    headers=dict(echo),  # a copy: tritonclient adds to the dict it is given
                )
            )
        finally:
            client.close()
        return results

    for binary in (True, False):
        by_name, numbers, by_headers = await anyio.to_thread.run_sync(run_http, binary)
        assert texts(by_name.as_numpy("output")) == ["Hello, world!"]
        assert by_name.get_response()["id"] == f"h-{binary}"
        assert by_name.get_response()["parameters"][rpc.SERVED_BY] == "chat_app"
        assert numbers.as_numpy("dims").tolist() == [8]
        assert abs(float(numbers.as_numpy("norm")[0]) - 1.0) < 1e-6
        assert texts(by_headers.as_numpy("text_output")) == ["async:hey"]
        assert int(by_headers.as_numpy("pid")[0]) > 0
        assert by_headers.get_response()["parameters"][rpc.SERVED_BY] == "forms_app"

    def run_grpc() -> list[Any]:
        results = []
        client = grpcclient.InferenceServerClient(seed.api.grpc_endpoint)
        try:
            inputs = [text_input(grpcclient, "text", "hello")]
            results.append(client.infer("embed", inputs, request_id="g-1"))
            inputs = [text_input(grpcclient, "text_input", "yo")]
            results.append(client.infer("llama-70b", inputs))
        finally:
            client.close()
        client = grpcclient.InferenceServerClient(bench.api.grpc_endpoint)
        try:
            inputs = [text_input(grpcclient, "text_input", "yo")]
            results.append(client.infer("ignored", inputs, headers=dict(echo)))
        finally:
            client.close()
        return results

    by_name, chat, by_headers = await anyio.to_thread.run_sync(run_grpc)
    assert by_name.get_response().id == "g-1"
    assert by_name.as_numpy("dims").tolist() == [8]
    assert pb_served_by(by_name.get_response()) == "embed_app"
    assert texts(chat.as_numpy("output")) == ["Hello, world!"]
    assert texts(by_headers.as_numpy("text_output")) == ["async:yo"]
    assert pb_served_by(by_headers.get_response()) == "forms_app"


async def test_tritonclient_grpc_stream_through_the_api_server(bench: Cluster) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")

    def run() -> list[str]:
        import queue

        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(bench.api.grpc_endpoint)
        try:
            client.start_stream(
                callback=lambda result, error: results.put((result, error)),
                headers={"x-capability-type": "gen", "x-capability-form": "async"},
            )
            words = grpcclient.InferInput("text_input", [1], "BYTES")
            words.set_data_from_numpy(np.array([b"a b c"], dtype=object))
            client.async_stream_infer("gen", [words], request_id="s-1")
            got = []
            for _ in range(3):
                result, error = results.get(timeout=10)
                assert error is None, error
                got.append(result.as_numpy("text_output")[0].decode())
            client.stop_stream()
            return got
        finally:
            client.close()

    assert await anyio.to_thread.run_sync(run) == ["a", "b", "c"]


async def test_curl_kserve_infer_path(seed: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps(text_body("text_input", "hi"))
    argv = [curl, "-sS", "-w", "\n%{http_code}", "-X", "POST"]
    argv += [
        f"{seed.url}/v2/models/llama-70b/infer",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    with anyio.fail_after(20):
        result = await anyio.run_process(argv, check=False)
    assert result.returncode == 0, result.stderr.decode()
    out, _, status = result.stdout.decode().rpartition("\n")
    assert status == "200", out
    doc = json.loads(out)
    assert outputs(doc)["output"] == "Hello, world!" and served_by(doc) == "chat_app"


async def test_python_client_end_to_end(seed: Cluster, bench: Cluster, randomly: Cluster) -> None:
    async with Client(seed.url, timeout=30) as client:
        response = await client.infer({"type": "chat"}, {"text_input": "hi"}, request_id="c-1")
        assert pb_served_by(response) == "chat_app" and response.id == "c-1"
        assert codec.decode_outputs(response)["output"] == b"Hello, world!"
        response = await client.infer(model="embed", inputs={"text": "hello"})
        assert codec.decode_outputs(response)["dims"] == 8
        with pytest.raises(NotFound):
            await client.infer({"type": "nope"})
    async with Client(randomly.url, timeout=30) as client:
        chunks = [c async for c in client.stream({"type": "chat"})]
        assert [codec.decode_outputs(c)["text_output"] for c in chunks] == [
            b"Hello",
            b" ",
            b"world",
            b"!",
        ]
        with pytest.raises(LoopDetected, match=r"^loop detected"):
            await client.infer({"type": "nothing"})
    async with Client(bench.url, timeout=30) as client:
        seen = []
        with pytest.raises(HandlerError, match="stream broke after two tokens"):
            async for chunk in client.stream({"type": "fail"}):
                seen.append(codec.decode_outputs(chunk)["text_output"])
        assert seen == [b"one", b"two"]


# --------------------------------------------------------------------------- 8: anyserve run


async def test_anyserve_run_serves_then_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    marker = f"anyserve-run-{uuid.uuid4().hex}"
    store = tmp_path / marker  # on every command line of the run: its workers' too
    port, grpc_port = free_port(), free_port()
    argv = [
        *anyserve_command(),
        "run",
        "examples.chat_app:app",
        "examples.stream_app:app",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--object-store",
        str(store),
        "--log-level",
        "warning",
    ]
    log = tmp_path / "run.log"
    proc = await spawn(argv, log)
    pgid = proc.pid
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def up() -> bool:
                assert proc.returncode is None, log.read_text()
                try:
                    if (await http.get("/health")).status_code != 200:
                        return False
                    return len(await registry_ids(http)) == 2
                except httpx.TransportError:
                    return False

            await eventually(up, timeout=40)
            doc = await infer(http, CHAT, text_body("text_input", "hi"))
            assert outputs(doc)["output"] == "Hello, world!"
            events = await stream_events(http, "/infer/stream", CHAT, EMPTY)
            assert tokens(events) == ["Hello", " ", "world", "!"]
            assert events[-1] == ("done", "[DONE]")
        assert len(live_processes(pgid, marker)) >= 5  # run + 4 workers at least

        os.killpg(pgid, signal.SIGINT)  # what Ctrl-C in a terminal does
        with anyio.fail_after(15):
            await proc.wait()
        assert proc.returncode == 0, log.read_text()
        await wait_until(lambda: not live_processes(pgid, marker), timeout=5)
    finally:
        await kill_group(proc)


# --------------------------------------------------------------------------- 10: delegation


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
        message = response.json()["error"]
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


async def test_delegated_stream_is_incremental(bench: Cluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    request = ModelInferRequest(id="ds-1", inputs=[codec.encode_input("text_input", str(gate))])
    async with GrpcClient(bench.replica("chat_app").endpoint) as client:
        call = client.stream(request, capability={"type": "gen", "form": "gated"})
        with anyio.fail_after(15):
            first = await call.read()
            # The handler cannot have finished: it waits for the gate.
            assert not gate.exists()
            assert not first.error_message
            assert codec.decode_outputs(first.infer_response)["text_output"] == b"first"
            assert pb_served_by(first.infer_response) == "forms_app"
            gate.write_text("open")
            rest = []
            while (message := await call.read()) is not grpc.aio.EOF:
                rest.append(message)
    assert [codec.decode_outputs(m.infer_response)["text_output"] for m in rest] == [b"second"]
    assert await call.code() == grpc.StatusCode.OK
