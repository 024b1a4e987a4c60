"""Frames on the dispatcher <-> worker socket."""

from __future__ import annotations

import asyncio
import socket

import pytest

from anyserve import rpc, wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import PayloadTooLarge
from anyserve.proto import ModelInferRequest, ModelStreamInferResponse

pytestmark = pytest.mark.anyio


async def pair() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamWriter]:
    """(reader of end a, writer of end b, writer of end a kept open)."""
    a, b = socket.socketpair()
    reader, a_writer = await asyncio.open_unix_connection(sock=a)
    _, writer = await asyncio.open_unix_connection(sock=b)
    return reader, writer, a_writer


async def test_frames_round_trip_with_large_payload() -> None:
    reader, writer, other = await pair()
    big = bytes(range(256)) * 40_000

    async def send() -> None:
        # More than a socket buffer: drain() only returns while the reader reads.
        wire.write_frame(writer, wpb.Header(call_id=7, chunk=wpb.Chunk()), big)
        wire.write_frame(writer, wpb.Header(call_id=8, end=wpb.End()))
        await writer.drain()

    sender = asyncio.create_task(send())
    header, payload = await wire.read_frame(reader)
    assert (header.call_id, header.WhichOneof("kind"), payload) == (7, "chunk", big)
    header, payload = await wire.read_frame(reader)
    assert (header.call_id, header.WhichOneof("kind"), payload) == (8, "end", b"")
    await sender
    writer.close()
    other.close()
    with pytest.raises(wire.ConnectionClosed):
        await wire.read_frame(reader)


async def test_oversized_frame_is_refused() -> None:
    reader, writer, other = await pair()
    wire.write_frame(writer, wpb.Header(call_id=1, chunk=wpb.Chunk()), b"x" * 2048)
    await writer.drain()
    with pytest.raises(PayloadTooLarge):
        await wire.read_frame(reader, max_frame=1024)
    writer.close()
    other.close()


def test_peek_and_wrap_without_parsing() -> None:
    request = ModelInferRequest(model_name="chat", id="42", raw_input_contents=[b"\0" * 100_000])
    data = request.SerializeToString()
    assert rpc.peek_string_field(data, 1) == "chat"
    assert rpc.peek_string_field(data, 3) == "42"
    with pytest.raises(ValueError):
        rpc.peek_string_field(data[:50], 1)
    wrapped = ModelStreamInferResponse.FromString(rpc.wrap_stream_response(b"\x1a\x01x"))
    assert wrapped.infer_response.id == "x"


def test_a_lane_calls_map_is_forwarded_as_grpc_pairs_are() -> None:
    # The lane reads the Call's map with rpc.forwarded, gRPC's pairs with read_hop.
    pairs = [
        ("x-capability-type", "echo"),
        ("x-request-id", "r1"),
        (rpc.CALL_ID, "c-1"),
        (rpc.BATCH, "1"),
        (rpc.SOLE_CANDIDATE, "1"),
        ("x-trace-bin", "AAEC"),
        ("authorization", "Bearer t"),
        ("user-agent", "grpc-python"),
        ("traceparent", "00-ab-cd-01"),
    ]
    call = wpb.Call(metadata=dict(pairs))
    hop = rpc.read_hop(pairs)
    assert rpc.forwarded(call.metadata) == hop.forward == dict(pairs[:2] + pairs[4:5])
    assert (hop.call_id, hop.batched) == ("c-1", True)
    assert rpc.read_hop([(rpc.BATCH, "0"), ("x-a", b"\0")]) == ({}, None, False)
