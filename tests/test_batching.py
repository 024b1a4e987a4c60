"""Dynamic batching end to end: an API server and a replica of
tests/apps/batching_app.py with real worker processes, requests over HTTP
(and one over the API server's gRPC entry).

The handlers answer each request with the batch it was in and that batch's
size, and record every request id they saw (``?seen``), so a test can tell which
requests shared a batch and which never reached the handler. The workers run in
the checked mode (``ANYSERVE_CHECK_OUTPUTS=1``, inherited from this process).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import httpx
import pytest

from anyserve import codec
from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from anyserve.proto import ModelInferRequest
from anyserve.replica.slot import Slot
from anyserve.replica.worker import CHECK_OUTPUTS_ENV
from anyserve.testing import GrpcClient
from tests.api_calls import outputs, served_by, stream_events, text_body, tokens
from tests.support import eventually

pytestmark = pytest.mark.anyio

APP = "tests.apps.batching_app:app"
REPLICA = "batching_app"
FORMS = {
    form: {"X-Capability-Type": "batch", "X-Capability-Form": form} for form in ("sync", "async")
}
LONG = {"X-Capability-Type": "batch", "X-Capability-Form": "long"}  # 2 a batch, 30 s
# Shorter than the long form's batch_timeout: such a request may not wait for it.
NEAR_DEADLINE = "20"

T = TypeVar("T")


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CHECK_OUTPUTS_ENV, "1")  # the worker processes inherit it
        api = ApiServerConfig(port=0, grpc_port=0, token=None)
        async with start_cluster([APP], api=api) as cluster:
            yield cluster


@pytest.fixture
async def http(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as client:
        yield client


def long_slot(cluster: Cluster) -> Slot:
    (slot,) = cluster.replica(REPLICA).manager.slots["batch_long"]
    return slot


async def concurrently(*calls: Awaitable[T]) -> list[T]:
    """Await ``calls`` at the same time; their results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(index: int, call: Awaitable[T]) -> None:
        results[index] = await call

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(one, index, call)
    return results


async def post(
    http: httpx.AsyncClient,
    capability: dict[str, str],
    text: str,
    request_id: str,
    *,
    timeout: str | None = None,
    **extra: Any,
) -> httpx.Response:
    """One request with input ``text``; ``timeout`` is its X-Request-Timeout."""
    headers = {**capability, "X-Request-Id": request_id}
    if timeout is not None:
        headers["X-Request-Timeout"] = timeout
    return await http.post("/infer", headers=headers, json=text_body("text", text, **extra))


def answer(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    assert served_by(doc) == REPLICA
    return outputs(doc)


async def seen(http: httpx.AsyncClient, capability: dict[str, str]) -> dict[str, int]:
    """Every request id the handler has seen, with the batch it was in. (Its
    near deadline sends the query at once even to the long form.)"""
    response = await post(http, capability, "?seen", "seen-query", timeout=NEAR_DEADLINE)
    record: dict[str, int] = json.loads(answer(response)["echo"])
    return record


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_concurrent_requests_form_batches_each_request_gets_its_own_answer(
    http: httpx.AsyncClient, form: str
) -> None:
    ids = [f"{form}-many-{i}" for i in range(64)]
    responses = await concurrently(
        *(post(http, FORMS[form], f"t{i}", request_id) for i, request_id in enumerate(ids))
    )
    batches: dict[int, list[dict[str, Any]]] = {}
    for i, response in enumerate(responses):
        out = answer(response)
        assert (out["echo"], out["request_id"]) == (f"echo:t{i}", ids[i])
        batches.setdefault(out["batch"], []).append(out)
    # Each batch's members all report its size: nothing else was in it.
    for members in batches.values():
        assert {m["batch_size"] for m in members} == {len(members)}
    sizes = sorted(len(members) for members in batches.values())
    assert sizes[-1] > 1, f"no batch formed: {sizes}"
    assert sizes[-1] <= 16  # max_batch_size
    assert sum(sizes) == 64


@pytest.mark.parametrize(
    ("text", "status", "error_type", "message"),
    [
        ("fail", 500, "handler_error", "ValueError: batch {batch} was asked to fail"),
        ("refuse", 400, "invalid_argument", "batch {batch} refused"),
        ("short", 500, "handler_error", "returned {short} responses for {size} requests"),
    ],
)
async def test_a_failing_batch_fails_exactly_its_requests(
    http: httpx.AsyncClient, text: str, status: int, error_type: str, message: str
) -> None:
    ids = [f"{text}-{i}" for i in range(32)]
    texts = [text if i == 10 else f"t{i}" for i in range(32)]
    responses = await concurrently(
        *(
            post(http, FORMS["sync"], t, request_id)
            for t, request_id in zip(texts, ids, strict=True)
        )
    )
    record = await seen(http, FORMS["sync"])
    batch = record[ids[10]]
    members = {request_id for request_id, number in record.items() if number == batch}
    assert members <= set(ids)
    expected = message.format(batch=batch, size=len(members), short=len(members) - 1)
    for request_id, response in zip(ids, responses, strict=True):
        if request_id in members:
            assert response.status_code == status, response.text
            error = response.json()
            assert error["type"] == error_type
            assert expected in error["error"]
        else:
            assert answer(response)["echo"].startswith("echo:t")


@pytest.mark.parametrize(
    ("text", "status", "message"),
    [
        ("unencodable", 500, "TypeError: output 'echo': cannot encode a value of type object"),
        ("undeclared", 500, "the handler returned undeclared output 'extra'"),  # checked mode
        ("gone", 400, "gone is gone"),
    ],
)
async def test_one_bad_answer_fails_only_its_own_request(
    http: httpx.AsyncClient, text: str, status: int, message: str
) -> None:
    # The long form's batches are exactly two: these two share one.
    good, bad = await concurrently(
        post(http, LONG, "fine", f"{text}-good"), post(http, LONG, text, f"{text}-bad")
    )
    out = answer(good)
    assert (out["echo"], out["batch_size"]) == ("echo:fine", 2)
    assert bad.status_code == status, bad.text
    assert message in bad.json()["error"]
    record = await seen(http, LONG)
    assert record[f"{text}-bad"] == record[f"{text}-good"] == out["batch"]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "txt", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "missing input 'text'"),
        ({"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}, "must be BYTES"),
        ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x", "y"]}, "has shape [2]"),
    ],
)
async def test_a_request_that_does_not_fit_the_signature_never_reaches_the_handler(
    http: httpx.AsyncClient, tensor: dict[str, Any], message: str
) -> None:
    request_id = f"misfit-{tensor['name']}-{tensor['datatype']}-{len(tensor['data'])}"
    response = await http.post(
        "/infer",
        headers={**FORMS["sync"], "X-Request-Id": request_id},
        json={"inputs": [tensor]},
    )
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "invalid_argument"
    assert message in response.json()["error"]
    assert request_id not in await seen(http, FORMS["sync"])


async def test_a_stream_request_that_does_not_fit_the_signature_is_refused(
    http: httpx.AsyncClient,
) -> None:
    words = {"X-Capability-Type": "words"}
    events = await stream_events(http, "/infer/stream", words, text_body("text", "a b"))
    assert tokens(events) == ["a", "b"]
    response = await http.post("/infer/stream", headers=words, json=text_body("txt", "a b"))
    assert response.status_code == 400, response.text
    assert "missing input 'text'" in response.json()["error"]


async def test_requested_outputs_are_the_only_ones_returned(http: httpx.AsyncClient) -> None:
    wanted = [{"name": "batch_size"}, {"name": "echo"}]
    response = await post(http, FORMS["async"], "pick", "pick-1", outputs=wanted)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["echo", "batch_size"]
    response = await post(http, FORMS["async"], "pick", "pick-2", outputs=[{"name": "nope"}])
    assert response.status_code == 400, response.text
    assert "requested output 'nope' does not exist" in response.json()["error"]


async def test_a_near_deadline_sends_the_batch_it_is_in_at_once(
    http: httpx.AsyncClient, cluster: Cluster
) -> None:
    slot = long_slot(cluster)
    with anyio.fail_after(15):  # far less than the 30 s batch_timeout
        alone = answer(await post(http, LONG, "alone", "near-alone", timeout=NEAR_DEADLINE))
        assert alone["batch_size"] == 1
        answers: dict[str, dict[str, Any]] = {}

        async def send(name: str, timeout: str | None) -> None:
            answers[name] = answer(await post(http, LONG, name, f"near-{name}", timeout=timeout))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, "relaxed", None)
            await eventually(lambda: slot.inflight == 1, what="the relaxed request is waiting")
            tg.start_soon(send, "urgent", NEAR_DEADLINE)
    assert answers["relaxed"]["batch"] == answers["urgent"]["batch"]
    assert answers["relaxed"]["batch_size"] == answers["urgent"]["batch_size"] == 2


async def test_a_request_whose_caller_went_away_never_reaches_the_handler(
    http: httpx.AsyncClient, cluster: Cluster
) -> None:
    slot = long_slot(cluster)
    request = ModelInferRequest(id="doomed")
    request.inputs.append(codec.encode_input("text", "doomed"))
    async with GrpcClient(cluster.api.grpc_endpoint) as client:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: client.infer(
                        request,
                        capability={"type": "batch", "form": "long"},
                        metadata=[("x-request-id", "cancel-doomed")],
                        timeout=120,
                    )
                )
                await eventually(lambda: slot.inflight == 1, what="the request is waiting")
                tg.cancel_scope.cancel()  # the client hangs up
            await eventually(lambda: slot.inflight == 0, what="the replica cancelled the call")
            # Two more fill a batch of two at once: the cancelled one left the queue.
            first, second = await concurrently(
                post(http, LONG, "after", "cancel-after"),
                post(http, LONG, "?seen", "cancel-report"),
            )
    out, report = answer(first), answer(second)
    assert out["batch_size"] == report["batch_size"] == 2
    record = json.loads(report["echo"])
    assert record["cancel-after"] == record["cancel-report"] == out["batch"]
    assert "cancel-doomed" not in record
