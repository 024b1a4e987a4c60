"""`make demo`: the five scenarios of the README, run for real and narrated.

Each scenario starts what it needs (API server, replicas with real worker
processes, a temporary object store) on free local ports, sends real HTTP/SSE
requests, prints what a user would see, and stops everything again.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anyio
import httpx

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import start_cluster


def say(text: str) -> None:
    print(text, flush=True)


def title(text: str) -> None:
    say(f"\n=== {text} ===")


def text_input(name: str, text: str) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}]}


def outputs(body: dict[str, Any]) -> str:
    served_by = body.get("parameters", {}).get("anyserve_served_by", "?")
    shown = ", ".join(
        f"{o['name']}={o['data'][0] if len(o['data']) == 1 else o['data']}"
        for o in body.get("outputs", [])
    )
    return f"[served by {served_by}] {shown}"


async def post(http: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]) -> None:
    shown = " ".join(f"-H '{k}: {v}'" for k, v in headers.items())
    url = str(http.base_url).rstrip("/")
    say(f"$ curl -X POST {url}/infer {shown} -d '{json.dumps(body)}'")
    response = await http.post("/infer", headers=headers, json=body)
    if response.status_code == 200:
        say(f"  200 {outputs(response.json())}")
    else:
        say(f"  {response.status_code} {response.text}")


async def scenario_routing() -> None:
    title("Scenario 1: capability routing (chat and embed replicas)")
    async with start_cluster(["examples.chat_app:app", "examples.embed_app:app"]) as cluster:
        say(cluster.describe())
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            await post(http, {"X-Capability-Type": "chat"}, text_input("text_input", "hi"))
            await post(http, {"X-Capability-Type": "embed"}, text_input("text", "hello world"))
            await post(http, {"X-Capability-Type": "unknown"}, text_input("text", "x"))


async def scenario_delegation() -> None:
    title("Scenario 2: delegation (no-match random, replicas forward what they cannot serve)")
    api = ApiServerConfig(port=0, grpc_port=0, no_match="random")
    apps = ["examples.chat_app:app", "examples.embed_app:app"]
    async with start_cluster(apps, api=api) as cluster:
        say(cluster.describe())
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            say("A capability nobody has goes round every replica, then stops at the hop limit:")
            await post(http, {"X-Capability-Type": "unknown"}, text_input("text", "x"))
    async with start_cluster([*apps, "examples.heavy_app:app"], api=api) as cluster:
        from anyserve.proto import ModelInferRequest
        from anyserve.testing import GrpcClient

        chat = cluster.replica("chat_app")
        say(
            f"A heavy request that reaches the chat replica ({chat.endpoint}) directly,"
            " as after a stale registry lookup:"
        )
        async with GrpcClient(chat.endpoint) as client:
            response = await client.infer(
                ModelInferRequest(id="demo-1"), capability={"type": "heavy"}
            )
        served = response.parameters["anyserve_served_by"].string_param
        text = response.outputs[0].contents.bytes_contents[0].decode()
        say(f"  chat_app delegated it through the API server; served by {served}: {text!r}")


async def scenario_objects() -> None:
    title("Scenario 3: objects passed by reference between replicas")
    apps = ["examples.pipeline_app:app", "examples.embed_app:app"]
    async with start_cluster(apps) as cluster:
        say(cluster.describe())
        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            await post(
                http,
                {"X-Capability-Type": "chat", "X-Capability-Model": "pipeline"},
                text_input("text", "objects travel by reference"),
            )


async def scenario_streaming() -> None:
    title("Scenario 4: streaming tokens over SSE")
    async with (
        start_cluster(["examples.stream_app:app"]) as cluster,
        httpx.AsyncClient(base_url=cluster.url, timeout=30) as http,
    ):
        say(
            f"$ curl -N -X POST {cluster.url}/infer/stream"
            """ -H 'X-Capability-Type: chat' -d '{"inputs": []}'"""
        )
        started = time.monotonic()
        async with http.stream(
            "POST", "/infer/stream", headers={"X-Capability-Type": "chat"}, json={"inputs": []}
        ) as response:
            async for line in response.aiter_lines():
                if line:
                    say(f"  +{(time.monotonic() - started) * 1000:5.0f} ms  {line}")


async def scenario_dynamic() -> None:
    title("Scenario 5: workers started on demand, switching within one GPU")
    options = {"resources": {"gpu": 1}}
    async with start_cluster(["examples.dynamic_app:app"], replica_options=options) as cluster:
        replica = cluster.replicas[0]
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:
            await show_registry(http)
            say("A heavy request arrives; the replica stops idle chat and starts heavy on demand:")
            await post(http, {"X-Capability-Type": "heavy"}, text_input("text", "big job"))
            await wait_registered(http, replica.replica_id, {"type": "heavy"})
            await show_registry(http)


async def wait_registered(http: httpx.AsyncClient, replica_id: str, cap: dict[str, str]) -> None:
    with anyio.fail_after(5):
        while True:
            replicas = (await http.get("/registry")).json()["replicas"]
            mine = [r for r in replicas if r["replica_id"] == replica_id]
            if mine and cap in mine[0]["capabilities"]:
                return
            await anyio.sleep(0.05)


async def show_registry(http: httpx.AsyncClient) -> None:
    for replica in (await http.get("/registry")).json()["replicas"]:
        workers = ", ".join(f"{w['id']}:{w['state']}" for w in replica.get("workers", []))
        say(
            f"  registry: {replica['replica_id']} loaded={replica['capabilities']} "
            f"loadable={replica.get('loadable', [])} workers=[{workers}]"
        )


async def main() -> None:
    for scenario in (
        scenario_routing,
        scenario_delegation,
        scenario_objects,
        scenario_streaming,
        scenario_dynamic,
    ):
        await scenario()
    say("\nAll five scenarios ran.")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        anyio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
