"""tritonclient (an independent KServe v2 client) against a real replica."""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
import pytest

from anyserve.replica.server import Replica
from anyserve.testing import start_replica

grpcclient = pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def replica() -> AsyncIterator[Replica]:
    async with start_replica("tests.apps.forms_app:app") as replica:
        yield replica


def text_input(text: str) -> Any:
    tensor = grpcclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


async def test_infer_by_headers_and_by_model_name(replica: Replica) -> None:
    def run() -> tuple[Any, Any]:
        client = grpcclient.InferenceServerClient(replica.endpoint)
        try:
            by_headers = client.infer(
                "ignored",
                [text_input("hi")],
                request_id="t-1",
                headers={"x-capability-type": "echo", "x-capability-form": "async"},
            )
            by_name = client.infer("slow", [text_input("x")], request_id="t-2")
            return by_headers, by_name
        finally:
            client.close()

    by_headers, by_name = await anyio.to_thread.run_sync(run)
    assert by_headers.get_response().id == "t-1"
    assert by_headers.as_numpy("text_output").tolist() == [b"async:hi"]
    assert by_name.as_numpy("text_output").tolist() == [b"done"]


async def test_two_requests_on_one_stream(replica: Replica) -> None:
    def run() -> list[tuple[str, bytes]]:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(replica.endpoint)
        try:
            client.start_stream(
                callback=partial(lambda q, result, error: q.put((result, error)), results),
                headers={"x-capability-type": "gen", "x-capability-form": "async"},
            )
            client.async_stream_infer("gen", [text_input("a b")], request_id="first")
            client.async_stream_infer("gen", [text_input("c d")], request_id="second")
            got = []
            for _ in range(4):
                result, error = results.get(timeout=20)
                assert error is None, error
                got.append((result.get_response().id, result.as_numpy("text_output").tolist()[0]))
            return got
        finally:
            client.stop_stream()
            client.close()

    got = await anyio.to_thread.run_sync(run)
    by_id: dict[str, list[bytes]] = {}
    for request_id, token in got:
        by_id.setdefault(request_id, []).append(token)
    assert by_id == {"first": [b"a", b"b"], "second": [b"c", b"d"]}


async def test_stream_error_reaches_callback(replica: Replica) -> None:
    def run() -> list[Any]:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(replica.endpoint)
        try:
            client.start_stream(
                callback=partial(lambda q, result, error: q.put((result, error)), results)
            )
            client.async_stream_infer("nothing-here", [text_input("x")], request_id="e1")
            return [results.get(timeout=20)]
        finally:
            client.stop_stream()
            client.close()

    [(result, error)] = await anyio.to_thread.run_sync(run)
    assert result is None
    assert "nothing-here" in str(error)
