"""End-to-end tests of one replica: real worker processes, real gRPC on loopback."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from anyserve import codec
from anyserve.errors import HandlerError, from_stream_response
from anyserve.proto import ModelInferRequest
from anyserve.replica.server import Replica
from anyserve.replica.slot import State
from anyserve.testing import GrpcClient, start_replica
from tests.support import eventually

pytestmark = pytest.mark.anyio

APP = "tests.apps.forms_app:app"


def text_request(text: str, request_id: str = "r1") -> ModelInferRequest:
    request = ModelInferRequest(id=request_id)
    request.inputs.append(codec.encode_input("text_input", text))
    return request


@pytest.fixture(scope="module")
async def replica() -> object:
    async with start_replica(APP) as replica:
        yield replica


@pytest.fixture(scope="module")
async def client(replica: Replica) -> object:
    async with GrpcClient(replica.endpoint) as client:
        yield client


def output(response: object, name: str = "text_output") -> object:
    return codec.decode_outputs(response)[name]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("form", "expected"),
    [("sync", b"sync:hi"), ("sync1", b"sync1:hi"), ("async", b"async:hi")],
)
async def test_unary_forms(client: GrpcClient, form: str, expected: bytes) -> None:
    response = await client.infer(
        text_request("hi", "req-7"), capability={"type": "echo", "form": form}
    )
    assert response.id == "req-7"
    assert output(response) == expected


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_time_remaining_works_in_sync_and_async_handlers(
    client: GrpcClient, form: str
) -> None:
    capability = {"type": "deadline", "form": form}
    response = await client.infer(text_request("x"), capability=capability, timeout=20.0)
    [left] = codec.decode_outputs(response)["left"].tolist()  # FP64 [1]
    assert 10.0 < left <= 20.5  # gRPC rounds the deadline it sends up a little
    response = await client.infer(text_request("x"), capability=capability, timeout=None)
    assert codec.decode_outputs(response)["left"].tolist() == [-1.0]  # no deadline


async def test_exit_code_3_after_start_up_is_not_blamed_on_the_import(client: GrpcClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.infer(text_request("x"), capability={"type": "exit3"})
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "exited with code 3" in details and "import" not in details


@pytest.mark.parametrize("form", ["sync", "async", "syncgen"])
async def test_stream_forms(client: GrpcClient, form: str) -> None:
    call = client.stream(text_request("a b c", "s1"), capability={"type": "gen", "form": form})
    chunks = [message async for message in call]
    assert [m.error_message for m in chunks] == ["", "", ""]
    assert [output(m.infer_response) for m in chunks] == [b"a", b"b", b"c"]
    assert {m.infer_response.id for m in chunks} == {"s1"}


async def test_first_chunk_arrives_before_handler_finishes(
    client: GrpcClient, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    call = client.stream(text_request(str(gate)), capability={"type": "gen", "form": "gated"})
    first = await call.read()
    # The handler is still blocked on the gate, yet the first chunk is here.
    assert output(first.infer_response) == b"first"
    gate.write_text("go")
    second = await call.read()
    assert output(second.infer_response) == b"second"
    assert await call.read() is grpc.aio.EOF


async def test_unary_handler_served_on_stream_endpoint(client: GrpcClient) -> None:
    call = client.stream(text_request("x"), capability={"type": "echo", "form": "async"})
    chunks = [m async for m in call]
    assert len(chunks) == 1
    assert output(chunks[0].infer_response) == b"async:x"


async def test_model_name_addresses_capability(client: GrpcClient) -> None:
    request = text_request("q")
    request.model_name = "slow"  # type=slow, no model key
    response = await client.infer(request)
    assert output(response) == b"done"


async def test_concurrent_async_calls_overlap(client: GrpcClient) -> None:
    started = time.monotonic()
    results: list[bytes] = []

    async def one(i: int) -> None:
        response = await client.infer(text_request(str(i)), capability={"type": "slow"})
        results.append(output(response))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(one, i)
    elapsed = time.monotonic() - started
    assert results == [b"done"] * 100
    # Serially this would take 20 s; overlapping calls take a little over 0.2 s.
    assert elapsed < 5.0, elapsed


async def test_sync_cpu_handler_uses_two_processes(client: GrpcClient, replica: Replica) -> None:
    pids: set[int] = set()

    async def one() -> None:
        response = await client.infer(text_request("x"), capability={"type": "cpu"})
        [pid] = output(response, "pid").tolist()  # type: ignore[attr-defined]  # INT64 [1]
        pids.add(pid)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    assert replica.manager is not None
    worker_pids = {slot.pid for slot in replica.manager.slots["cpu_bound"]}
    assert len(worker_pids) == 2
    assert pids == worker_pids


async def test_unknown_capability_is_not_found(client: GrpcClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request("x"), capability={"type": "nope"})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "type=nope" in info.value.details()


async def test_unary_request_for_stream_only_capability(client: GrpcClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request("x"), capability={"type": "gen"})
    # A replica without an API server to delegate to: the endpoint was wrong.
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "streaming endpoint" in (info.value.details() or "")


async def test_raising_handler_is_internal_with_message(client: GrpcClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request("x"), capability={"type": "fail"})
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "the model is on fire" in info.value.details()


async def test_handler_chooses_its_status(client: GrpcClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request("x"), capability={"type": "bad-input"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must not be empty" in info.value.details()


async def test_malformed_request_is_invalid_argument(replica: Replica) -> None:
    from anyserve import rpc

    async with GrpcClient(replica.endpoint) as client:
        raw = client.channel.unary_unary(rpc.MODEL_INFER)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff", metadata=[("x-capability-type", "slow")], timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff", timeout=10)  # no metadata: the dispatcher peeks
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_error_midstream_is_in_band_after_earlier_chunks(client: GrpcClient) -> None:
    call = client.stream(text_request("x"), capability={"type": "fail"})
    chunks = [m async for m in call]
    assert [output(m.infer_response) for m in chunks[:2]] == [b"one", b"two"]
    assert "stream broke after two tokens" in chunks[2].error_message
    assert isinstance(from_stream_response(chunks[2]), HandlerError)


async def test_metadata_rpcs(replica: Replica) -> None:
    from anyserve import proto, rpc

    async with GrpcClient(replica.endpoint) as client:

        def unary(path: str, req: Any, resp: Any) -> Any:
            return client.channel.unary_unary(
                path,
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )

        live = await unary(rpc.SERVER_LIVE, proto.ServerLiveRequest, proto.ServerLiveResponse)(
            proto.ServerLiveRequest()
        )
        assert live.live
        ready = await unary(rpc.SERVER_READY, proto.ServerReadyRequest, proto.ServerReadyResponse)(
            proto.ServerReadyRequest()
        )
        assert ready.ready
        meta = await unary(
            rpc.SERVER_METADATA, proto.ServerMetadataRequest, proto.ServerMetadataResponse
        )(proto.ServerMetadataRequest())
        assert meta.name == "anyserve"
        model_ready = unary(rpc.MODEL_READY, proto.ModelReadyRequest, proto.ModelReadyResponse)
        assert (await model_ready(proto.ModelReadyRequest(name="slow"))).ready
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await model_ready(proto.ModelReadyRequest(name="missing"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        model_meta = unary(
            rpc.MODEL_METADATA, proto.ModelMetadataRequest, proto.ModelMetadataResponse
        )
        assert (await model_meta(proto.ModelMetadataRequest(name="echo"))).name == "echo"


async def test_killed_worker_fails_call_then_comes_back(
    client: GrpcClient, replica: Replica, tmp_path: Path
) -> None:
    assert replica.manager is not None
    marker = tmp_path / "hang.pid"
    failure: list[grpc.aio.AioRpcError] = []

    async def call_hang() -> None:
        try:
            await client.infer(text_request(str(marker)), capability={"type": "hang"})
        except grpc.aio.AioRpcError as exc:
            failure.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_hang)
        await eventually(lambda: marker.exists() and marker.read_text())
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
    assert time.monotonic() - killed_at < 2.0
    assert failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE
    assert "SIGKILL" in failure[0].details() and "-9" in failure[0].details()

    slot = replica.manager.slots["hang"][0]
    await eventually(lambda: slot.state is State.READY and slot.pid != pid)
    assert slot.restarts == 1
    response = await client.infer(text_request("x"), capability={"type": "slow"})
    assert output(response) == b"done"
    # And the restarted worker itself serves again.
    marker.unlink()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request(str(marker)), capability={"type": "hang"}, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert int(marker.read_text()) == slot.pid


async def test_slow_consumer_blocks_stream_send(client: GrpcClient, tmp_path: Path) -> None:
    from tests.apps.forms_app import FLOOD_CHUNKS

    marker = tmp_path / "flood"
    done = marker.with_suffix(".done")
    call = client.stream(text_request(str(marker)), capability={"type": "flood"}, timeout=60)
    await call.read()
    # The client reads nothing more: the handler's stream.send() must block
    # long before it has sent everything (no unbounded buffering on the way).
    with pytest.raises(TimeoutError):
        await eventually(done.exists, timeout=3.0)
    # What may be sent ahead: the credit window (64 chunks) plus what gRPC's own
    # flow control buffers (a few MiB, ~100 chunks); without backpressure the
    # handler sends all 1,000 (64 MiB) in well under a second.
    assert int(marker.read_text()) < FLOOD_CHUNKS // 2
    # Reading on lets it finish, with nothing lost.
    received = 1
    while (message := await call.read()) is not grpc.aio.EOF:
        assert message.error_message == ""
        received += 1
    assert received == FLOOD_CHUNKS
    await eventually(done.exists, timeout=5.0)


async def test_deadline_cancels_unary_handler(client: GrpcClient, tmp_path: Path) -> None:
    marker = tmp_path / "unary.pid"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.infer(text_request(str(marker)), capability={"type": "hang"}, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(marker.with_suffix(".stopped").exists, timeout=1.0)


@pytest.mark.parametrize("form", ["async", "sync"])
async def test_cancelled_stream_stops_handler(
    client: GrpcClient, tmp_path: Path, form: str
) -> None:
    marker = tmp_path / "ticker"
    call = client.stream(text_request(str(marker)), capability={"type": "ticker", "form": form})
    for _ in range(3):
        assert (await call.read()).error_message == ""
    call.cancel()
    stopped = marker.with_suffix(".stopped")
    await eventually(stopped.exists, timeout=1.0)
    assert stopped.read_text() == form
