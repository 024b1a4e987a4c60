"""Calls to a running API server and reading its answers, shared by the
end-to-end modules (``tests/test_e2e_*.py``): capability headers, KServe v2
JSON bodies, who served a response, and whole SSE answers.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from anyserve import rpc
from anyserve.proto import ModelInferResponse
from tests.support import sse_events

CHAT = {"X-Capability-Type": "chat"}
EMBED = {"X-Capability-Type": "embed"}
HEAVY = {"X-Capability-Type": "heavy"}
EMPTY: dict[str, Any] = {"inputs": []}


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


async def stream_events(
    http: httpx.AsyncClient, path: str, headers: dict[str, str], body: Any
) -> list[tuple[str, str]]:
    """Every event of one SSE answer (which must start with 200)."""
    async with http.stream("POST", path, headers=headers, json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [item async for item in sse_events(response)]


def tokens(events: list[tuple[str, str]]) -> list[str]:
    """The ``text_output`` of each ``message`` event."""
    return [
        outputs(json.loads(data))["text_output"] for event, data in events if event == "message"
    ]


async def registry_ids(http: httpx.AsyncClient) -> set[str]:
    """The ids of the replicas in the API server's registry."""
    response = await http.get("/registry")
    assert response.status_code == 200, response.text
    return {r["replica_id"] for r in response.json()["replicas"]}
