"""HTTP load that rotates over several requests (aiohttp, in this process).

:mod:`benchmarks.http_load` sends one request again and again; the scale
benchmark needs many: 1,000 replicas' heartbeats (one body each), or the same
request spread round-robin over several API servers. Each of ``concurrency``
loops takes the next request of the rotation (one shared counter), sends it
on a keep-alive connection and checks its status.

* :func:`rotating_load`: back to back for ``warmup`` then ``duration`` seconds;
  requests/s, p50 and p99 of the measured window.
* :func:`send_each`: every request exactly once, as fast as ``concurrency``
  loops go; the seconds it took.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import anyio

from benchmarks import procs
from benchmarks.load import percentile

CALL_TIMEOUT = 30.0

T = TypeVar("T")
Probe = Callable[[], dict[str, float]]


class LoadFailed(RuntimeError):
    """A request got another status than expected, or failed (the message says how)."""


@dataclass(frozen=True)
class Call:
    """One HTTP request and the status a good answer has."""

    method: str
    url: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(frozen=True)
class LoadResult:
    """``requests`` finished in the ``seconds`` measured; ``probed``: how much the
    caller's probe (e.g. server CPU seconds by process) grew meanwhile."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    probed: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")


def _no_probe() -> dict[str, float]:
    return {}


def _run(func: Callable[..., Awaitable[T]], *args: object) -> T:
    return anyio.run(functools.partial(func, *args), backend_options=procs.event_loop_options())


def rotating_load(
    calls: Sequence[Call],
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    probe: Probe = _no_probe,
) -> LoadResult:
    """Send ``calls`` in rotation from ``concurrency`` loops; raises LoadFailed."""
    return _run(_rotating_load, calls, concurrency, duration, warmup, probe)


def send_each(calls: Sequence[Call], *, concurrency: int) -> float:
    """Send every call once; the seconds it took. Raises LoadFailed."""
    return _run(_send_each, calls, concurrency)


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)
    )


async def _once(session: aiohttp.ClientSession, call: Call) -> None:
    try:
        async with session.request(
            call.method, call.url, data=call.body or None, headers=dict(call.headers)
        ) as response:
            data = await response.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise LoadFailed(f"{call.method} {call.url} failed: {exc!r}") from None
    if response.status != call.status:
        raise LoadFailed(
            f"{call.method} {call.url} answered {response.status} (want {call.status}):"
            f" {data[:300]!r}"
        )


async def _run_all(loops: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run the loops in one task group; the first LoadFailed ends them all and
    is raised as itself (not inside an exception group)."""
    try:
        async with anyio.create_task_group() as tg:
            for loop in loops:
                tg.start_soon(loop)
    except BaseExceptionGroup as group:
        matched, rest = group.split(LoadFailed)
        if matched is None or rest is not None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def _rotating_load(
    calls: Sequence[Call], concurrency: int, duration: float, warmup: float, probe: Probe
) -> LoadResult:
    counter = itertools.count()
    clock = time.perf_counter
    async with _session(concurrency) as session:
        await _once(session, calls[0])  # connect; fail fast
        begin = clock() + warmup
        end = begin + duration
        latencies: list[float] = []
        marks: list[dict[str, float]] = []

        async def loop() -> None:
            while True:
                started = clock()
                if started >= end:
                    return
                await _once(session, calls[next(counter) % len(calls)])
                finished = clock()
                if begin <= finished <= end:
                    latencies.append(finished - started)

        async def mark() -> None:
            await anyio.sleep(max(0.0, begin - clock()))
            marks.append(probe())
            await anyio.sleep(max(0.0, end - clock()))
            marks.append(probe())

        await _run_all([*(loop for _ in range(concurrency)), mark])
    latencies.sort()
    before, after = marks
    return LoadResult(
        len(latencies),
        duration,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.99) * 1000,
        {key: value - before.get(key, 0.0) for key, value in after.items()},
    )


async def _send_each(calls: Sequence[Call], concurrency: int) -> float:
    pending = iter(calls)
    async with _session(concurrency) as session:

        async def loop() -> None:
            for call in pending:  # one shared iterator: each call is sent once
                await _once(session, call)

        started = time.perf_counter()
        await _run_all([loop] * concurrency)
        return time.perf_counter() - started
