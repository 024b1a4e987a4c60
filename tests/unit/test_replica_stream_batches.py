"""Stream responses relayed in batches stay within one gRPC message each."""

from __future__ import annotations

import anyio
import pytest

from anyserve import rpc
from anyserve._proto import worker_pb2 as wpb
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.manager import Manager
from anyserve.replica.processes import WorkerConfig
from anyserve.replica.slot import Slot
from tests.support import eventually
from tests.unit.replica_fakes import handler, ready_slot

pytestmark = pytest.mark.anyio

LIMIT = 4000  # a batch may hold LIMIT - ANSWER_MARGIN bytes: 2,976


class _OneSlot(Manager):
    """A manager whose only worker is a given (fake) slot."""

    def __init__(self, slot: Slot) -> None:
        super().__init__([slot.handler], WorkerConfig(app="unit:app"))
        self._slot = slot

    async def acquire(self, name: str) -> Slot:
        return self._slot


async def test_ready_responses_are_batched_but_never_over_the_message_limit() -> None:
    info = handler("tokens", stream=True)
    slot, _ = ready_slot(info)
    dispatcher = Dispatcher([info], _OneSlot(slot), max_message=LIMIT)
    chunks = [bytes([65 + i]) * 900 for i in range(5)] + [b"s"] * 3
    batches: list[list[bytes]] = []

    async def consume() -> None:
        async for batch in dispatcher.stream(b"", {"x-capability-type": "tokens"}, None):
            batches.append(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await eventually(lambda: slot.inflight, timeout=5, what="the call frame went out")
        # Everything the worker sends is ready before the dispatcher takes any.
        (call_id,) = list(slot._calls)
        sink = slot._calls[call_id]
        for chunk in chunks:
            sink.put((wpb.Header(call_id=call_id, chunk=wpb.Chunk()), chunk))
        sink.put((wpb.Header(call_id=call_id, end=wpb.End()), b""))
    assert [c for b in batches for c in b] == chunks
    for batch in batches:
        assert len(rpc.pack_batch(batch)) <= LIMIT  # one gRPC message
    assert max(len(b) for b in batches) > 1  # ready responses still travel together
