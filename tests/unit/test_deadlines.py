"""Deadlines and limits at the edges: an expired deadline stays expired, an
absurd one is the client's mistake, oversized routing headers are 400."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from anyserve.api_server.meta import MAX_TIMEOUT, http_timeout, parse_meta
from anyserve.calls import ApiCaller
from anyserve.capability import Capability
from anyserve.context import Context
from anyserve.errors import DeadlineExceeded, InvalidArgument
from anyserve.replica.servicer import _time_left


def context(timeout: float) -> Context:
    return Context(
        request_id="r1",
        metadata={},
        capability=Capability(type="parent"),
        limiter=asyncio.Semaphore(1),
        is_sync=False,
        timeout=timeout,
    )


def test_a_call_from_a_request_with_no_time_left_is_never_sent() -> None:
    parent = context(1e-6)
    time.sleep(0.001)
    assert parent.time_remaining() == 0.0
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        ApiCaller("http://127.0.0.1:1")._prepare(parent, {"type": "child"}, {})


def test_a_call_carries_the_time_left_or_no_deadline() -> None:
    caller = ApiCaller("http://127.0.0.1:1")
    _, metadata, timeout = caller._prepare(context(30.0), {"type": "child"}, {})
    assert timeout is not None and 29.0 < timeout <= 30.0
    assert metadata["x-capability-type"] == "child"
    _, _, unbounded = caller._prepare(context(0.0), {"type": "child"}, {})
    assert unbounded is None  # the parent had no deadline: neither has the child


class _GrpcContext:
    def __init__(self, left: float | None) -> None:
        self.left = left

    def time_remaining(self) -> float | None:
        return self.left


@pytest.mark.parametrize(("left", "expected"), [(None, None), (2.5, 2.5)])
def test_the_replica_passes_the_callers_deadline_on(left: Any, expected: Any) -> None:
    assert _time_left(_GrpcContext(left)) == expected


@pytest.mark.parametrize("left", [0.0, -0.5])
def test_the_replica_refuses_a_call_whose_deadline_passed(left: float) -> None:
    with pytest.raises(DeadlineExceeded):
        _time_left(_GrpcContext(left))


@pytest.mark.parametrize("value", ["1e10", str(MAX_TIMEOUT + 1), "inf", "nan", "0", "-1", "soon"])
def test_absurd_request_timeouts_are_400(value: str) -> None:
    with pytest.raises(InvalidArgument, match="X-Request-Timeout"):
        http_timeout(value, 300.0)
    assert http_timeout(str(MAX_TIMEOUT), 300.0) == MAX_TIMEOUT
    assert http_timeout(None, 300.0) == 300.0


def test_oversized_routing_headers_are_400() -> None:
    many = [(f"x-capability-k{i}", "v") for i in range(65)]
    with pytest.raises(InvalidArgument, match="capability headers too large"):
        parse_meta(many, model_name="", timeout=1.0)
    huge = [("x-capability-type", "x" * 5000)]
    with pytest.raises(InvalidArgument, match="capability headers too large"):
        parse_meta(huge, model_name="", timeout=1.0)
    chain = [("x-capability-type", "chat"), ("x-anyserve-call-chain", "type=a>" * 1000)]
    with pytest.raises(InvalidArgument, match="x-anyserve-call-chain"):
        parse_meta(chain, model_name="", timeout=1.0)
    fine = parse_meta([("x-capability-type", "chat")], model_name="", timeout=1.0)
    assert fine.query == {"type": "chat"}


@pytest.mark.anyio
async def test_the_api_channel_closes_the_old_channel_when_the_server_moves() -> None:
    import grpc

    from anyserve.calls import ApiChannel

    target = ["127.0.0.1:1"]
    channel = ApiChannel(lambda: target[0])
    first = await channel._get()
    assert await channel._get() is first  # one persistent channel
    target[0] = "127.0.0.1:2"
    second = await channel._get()
    assert second is not first
    assert first.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    await channel.aclose()
    assert second.get_state() == grpc.ChannelConnectivity.SHUTDOWN
