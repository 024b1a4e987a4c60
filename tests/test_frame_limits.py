"""No request or answer can kill a worker by its size: near the limit it is
served, over it that one call gets PayloadTooLarge (413 / RESOURCE_EXHAUSTED),
and the worker, its other calls and its capability are untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from anyserve import codec, errors
from anyserve.proto import ModelInferRequest
from anyserve.replica.server import Replica
from anyserve.testing import GrpcClient, start_replica

pytestmark = pytest.mark.anyio

LIMIT = 1024 * 1024  # the replica's gRPC message limit in these tests
SIZED = {"type": "sized"}


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    async with start_replica("tests.apps.sizes_app:app", max_message=LIMIT) as running:
        yield running


def request(n: int, blob: int = 0) -> ModelInferRequest:
    inputs: dict[str, Any] = {"n": n}
    if blob:
        inputs["blob"] = b"b" * blob
    return ModelInferRequest(id="r", inputs=[codec.encode_input(k, v) for k, v in inputs.items()])


def worker_pids(replica: Replica) -> set[int | None]:
    return {slot.pid for slot in replica.manager.all_slots()}


async def test_a_request_near_the_limit_is_served_by_the_same_worker(replica: Replica) -> None:
    pids = worker_pids(replica)
    async with GrpcClient(replica.endpoint) as client:
        near = request(10, blob=LIMIT - 200)
        assert near.ByteSize() > LIMIT - 256  # as large as gRPC lets through
        response = await client.infer(near, capability=SIZED)
        assert codec.decode_outputs(response)["got"].tolist() == [LIMIT - 200]
    assert worker_pids(replica) == pids


async def test_an_answer_over_the_limit_fails_only_its_call(replica: Replica) -> None:
    pids = worker_pids(replica)
    async with GrpcClient(replica.endpoint) as client:
        for _ in range(10):  # never counted as a crash: the capability stays served
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.infer(request(LIMIT + 10), capability=SIZED)
            error = errors.from_rpc_error(caught.value)
            assert isinstance(error, errors.PayloadTooLarge), error
            assert error.http_status == 413
            small = await client.infer(request(5), capability=SIZED)
            assert codec.decode_outputs(small)["blob"] == b"xxxxx"
    assert worker_pids(replica) == pids
    assert all(slot.restarts == 0 for slot in replica.manager.all_slots())


async def test_a_stream_chunk_over_the_limit_is_an_in_band_error(replica: Replica) -> None:
    pids = worker_pids(replica)
    async with GrpcClient(replica.endpoint) as client:
        chunks = [m async for m in client.stream(request(LIMIT + 10), capability=SIZED)]
    assert codec.decode_outputs(chunks[0].infer_response)["blob"] == b"a"
    error = errors.from_stream_response(chunks[1])
    assert isinstance(error, errors.PayloadTooLarge), chunks[1]
    assert len(chunks) == 2  # the error ends that stream
    assert worker_pids(replica) == pids
