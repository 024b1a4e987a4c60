"""Admission: the queue limit and the deadline estimate."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Mapping
from typing import cast

import pytest

from anyserve import rpc
from anyserve.errors import Overloaded
from anyserve.replica.admission import Admission, capacity
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.manager import Manager
from tests.unit.replica_fakes import handler

SYNC = dataclasses.replace(handler("chat"), max_concurrency=8, max_queue=1024)


def test_capacity_counts_batch_items() -> None:
    assert capacity(SYNC) == 8
    assert capacity(dataclasses.replace(SYNC, max_concurrency=2, max_batch_size=16)) == 32


def test_calls_queue_up_to_max_queue_then_are_refused() -> None:
    admission = Admission()
    # 8 running and 1,023 waiting: one more place.
    assert admission.admit(SYNC, 8 + 1023, None).rounds == 128
    with pytest.raises(Overloaded, match=r"1024 calls queued .*max_queue 1024") as info:
        admission.admit(SYNC, 8 + 1024, None)
    assert info.value.retry_after >= 1.0


def test_max_queue_zero_runs_calls_at_once_or_refuses_them() -> None:
    strict = dataclasses.replace(SYNC, max_queue=0)
    admission = Admission()
    assert admission.admit(strict, 7, 0.001).rounds == 0
    with pytest.raises(Overloaded):
        admission.admit(strict, 8, None)


def test_nothing_is_refused_for_time_before_the_speed_is_known() -> None:
    admission = Admission()
    assert admission.service_time("chat") is None
    assert admission.admit(SYNC, 500, 0.001).rounds > 0


def test_a_call_that_could_not_start_before_its_deadline_is_refused() -> None:
    admission = Admission()
    # A call that ran at once took 0.5 s: the handler's speed.
    admission.finished(admission.admit(SYNC, 0, None), 0.5)
    assert admission.service_time("chat") == pytest.approx(0.5)
    # 16 running or waiting ahead: two rounds of 0.5 s before this one starts.
    assert admission.admit(SYNC, 16, 1.5).rounds == 2
    with pytest.raises(Overloaded, match=r"about 1 s .*deadline is 0.9 s away") as info:
        admission.admit(SYNC, 16, 0.9)
    assert info.value.retry_after == 1.0
    # A free worker takes it whatever the deadline: it starts at once.
    assert admission.admit(SYNC, 7, 0.01).rounds == 0


def test_service_time_discounts_the_time_a_call_spent_queued() -> None:
    admission = Admission()
    # It waited two rounds and ran one: 3 s in all is 1 s of service.
    admission.finished(admission.admit(SYNC, 16, None), 3.0)
    assert admission.service_time("chat") == pytest.approx(1.0)
    # Later samples move the average a fifth of the way.
    admission.finished(admission.admit(SYNC, 0, None), 2.0)
    assert admission.service_time("chat") == pytest.approx(1.2)


class _BusySlot:
    """A worker with every place taken (what the admission check reads of a Slot)."""

    inflight = 8 + 1024


class _BusyManager:
    async def acquire(self, name: str) -> _BusySlot:
        return _BusySlot()


class _Delegator:
    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def allowed(self, metadata: Mapping[str, str]) -> bool:
        return True

    async def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> bytes:
        self.sent.append(dict(metadata))
        return b"served elsewhere"

    async def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> AsyncGenerator[bytes, None]:
        raise AssertionError("unary only")
        yield b""  # pragma: no cover


@pytest.mark.anyio
async def test_an_overloaded_call_is_delegated_unless_this_replica_is_the_only_candidate() -> None:
    delegator = _Delegator()
    dispatcher = Dispatcher([SYNC], cast(Manager, _BusyManager()), delegator)
    query = {"x-capability-type": "chat"}
    assert await dispatcher.unary(b"", query, 5.0) == b"served elsewhere"
    assert len(delegator.sent) == 1
    with pytest.raises(Overloaded, match="max_queue 1024"):
        await dispatcher.unary(b"", {**query, rpc.SOLE_CANDIDATE: "1"}, 5.0)
    assert len(delegator.sent) == 1
