"""wire.FrameBuffer: frames cut from bytes as a protocol receives them."""

from __future__ import annotations

import pytest

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.errors import PayloadTooLarge


def _frames() -> list[tuple[wpb.Header, bytes]]:
    return [
        (wpb.Header(call_id=1, call=wpb.Call(metadata={"x-request-id": "r"})), b"request"),
        (wpb.Header(call_id=1, chunk=wpb.Chunk()), b""),
        (wpb.Header(call_id=2, end=wpb.End()), bytes(range(256)) * 40),
    ]


def _wire() -> bytes:
    return b"".join(b"".join(wire.encode_frame(h, p)) for h, p in _frames())


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 1000, 1 << 20])
def test_frames_come_whole_and_in_order_however_the_bytes_are_cut(piece: int) -> None:
    data, buffer = _wire(), wire.FrameBuffer()
    got: list[tuple[wpb.Header, bytes]] = []
    for start in range(0, len(data), piece):
        got += buffer.feed(data[start : start + piece])
    assert got == _frames()
    assert buffer.feed(b"") == []


def test_every_frame_of_one_read_is_handed_over_at_once() -> None:
    assert len(wire.FrameBuffer().feed(_wire())) == 3


def test_a_frame_announcing_more_than_the_limit_is_refused_before_it_arrives() -> None:
    header = wpb.Header(call_id=1, chunk=wpb.Chunk())
    prefix, head, _ = wire.encode_frame(header, b"x" * 2000)
    with pytest.raises(PayloadTooLarge, match="over the 1000-byte limit"):
        wire.FrameBuffer(max_frame=1000).feed(prefix + head)


def test_a_call_header_is_the_call_it_describes() -> None:
    # wire.call_header fills the Call in place; it reads back as one built apart.
    pairs = [("x-request-id", "r"), ("x-capability-type", "echo"), ("x-request-id", "r2")]
    header = wire.call_header(7, stream=True, timeout=2.5, metadata=pairs)
    built = wpb.Call(stream=True, timeout=2.5, metadata=dict(pairs))
    assert wpb.Header.FromString(header.SerializeToString()) == wpb.Header(call_id=7, call=built)
    bare = wpb.Header.FromString(
        wire.call_header(8, stream=False, timeout=None, metadata=[]).SerializeToString()
    )
    assert bare.WhichOneof("kind") == "call" and bare.call.timeout == 0.0  # 0: no deadline
