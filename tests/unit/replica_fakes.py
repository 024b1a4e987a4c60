"""Stand-ins for the replica's unit tests: handlers without an app, a worker
connection without a socket, a clock that only moves when told."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import cast

from anyserve._proto import worker_pb2 as wpb
from anyserve.app import HandlerInfo
from anyserve.capability import Capability
from anyserve.replica.slot import Slot


def handler(
    name: str,
    *,
    stream: bool = False,
    resources: Mapping[str, float] | None = None,
    workers: int = 1,
    **capability: str,
) -> HandlerInfo:
    """A handler serving ``capability`` (default ``type=<name>``)."""
    return HandlerInfo(
        name=name,
        capability=Capability(capability or {"type": name}),
        stream=stream,
        workers=workers,
        resources=dict(resources or {}),
    )


class FakeWriter:
    """What a Slot uses of ``asyncio.StreamWriter``; keeps the frames written."""

    def __init__(self) -> None:
        self.frames: list[tuple[wpb.Header, bytes]] = []
        self.closing = False
        self.drains = 0

    def writelines(self, pieces: list[bytes]) -> None:
        # Three pieces per frame (prefix, header, payload); several frames
        # when the slot's queue sends a loop iteration's frames together.
        for at in range(0, len(pieces), 3):
            _prefix, head, payload = pieces[at : at + 3]
            self.frames.append((wpb.Header.FromString(head), payload))

    def is_closing(self) -> bool:
        return self.closing

    async def drain(self) -> None:
        self.drains += 1

    def kinds(self) -> list[tuple[int, str]]:
        """``(call_id, kind)`` of every frame written, in order."""
        return [(h.call_id, str(h.WhichOneof("kind"))) for h, _ in self.frames]


def as_writer(writer: FakeWriter) -> asyncio.StreamWriter:
    return cast(asyncio.StreamWriter, writer)


def ready_slot(info: HandlerInfo, worker_id: str | None = None) -> tuple[Slot, FakeWriter]:
    """A started slot whose (fake) worker said hello: READY, no calls."""
    slot = Slot(worker_id or f"{info.name}-0", info)
    writer = FakeWriter()
    slot.start()
    slot.connect(as_writer(writer))
    return slot, writer


class FakeClock:
    """A monotonic clock that moves only by :meth:`advance`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
