"""Lane._may_wait: a gathering call waits for company only while the lane is
busy and such calls keep coming (a fake clock; no socket)."""

from __future__ import annotations

import asyncio
import types

import pytest

from anyserve import lane_client
from anyserve.lane_client import Lane

pytestmark = pytest.mark.anyio


async def test_a_gathering_call_waits_only_on_a_busy_lane_with_calls_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(lane_client, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    lane = Lane("r1", "replica r1")
    loop = asyncio.get_running_loop()
    assert not lane._may_wait()  # the first call: nothing came before it
    for call_id in range(lane_client._GATHER_BUSY - 1):
        lane._unary[call_id] = loop.create_future()
    now[0] += lane_client._GATHER_GAP / 10
    assert not lane._may_wait()  # calls keep coming, but too few are in flight
    lane._unary[99] = loop.create_future()
    now[0] += lane_client._GATHER_GAP / 10
    assert lane._may_wait()  # busy, and the last call left a moment ago
    now[0] += lane_client._GATHER_GAP * 2
    assert not lane._may_wait()  # busy, but the calls come slowly (a slow handler)
    now[0] += lane_client._GATHER_GAP / 10
    assert lane._may_wait()
