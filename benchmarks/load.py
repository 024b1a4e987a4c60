"""A grpc.aio load generator that treats every payload as opaque bytes.

The client never (de)serializes messages on the measured path, so it costs the
same whichever server answers; differences in the results are the servers'.
:func:`unary_load` can also report the CPU seconds the client used while
measuring and the growth of a caller's ``probe`` (e.g. the servers' CPU seconds
by process, :func:`benchmarks.http_load.cpu_by_process`) over the same window.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from anyserve import rpc
from anyserve.proto import ModelStreamInferResponse

CALL_TIMEOUT = 10.0

Metadata = Sequence[tuple[str, str]]
Probe = Callable[[], dict[str, float]]


class LoadFailed(RuntimeError):
    """A call failed during a benchmark (the message names endpoint and status)."""


@dataclass(frozen=True)
class UnaryResult:
    """Latencies (seconds, sorted) of the calls that finished in ``seconds`` of
    measuring; ``client_cpu``: this process's CPU seconds in that window, and
    ``probed``: how much the caller's probe grew in it (0 and empty without a
    probe). Results of several windows :meth:`merge` into one."""

    latencies: list[float]
    seconds: float
    client_cpu: float = 0.0
    probed: dict[str, float] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 0.50) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 0.99) * 1000

    @staticmethod
    def merge(results: Sequence[UnaryResult]) -> UnaryResult:
        latencies = sorted(x for r in results for x in r.latencies)
        probed: dict[str, float] = {}
        for r in results:
            for key, value in r.probed.items():
                probed[key] = probed.get(key, 0.0) + value
        return UnaryResult(
            latencies,
            sum(r.seconds for r in results),
            sum(r.client_cpu for r in results),
            probed,
        )


@dataclass(frozen=True)
class StreamResult:
    """Per-call chunks/s and time to first chunk (ms); medians over the calls."""

    rates: list[float]
    firsts_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def first_chunk_ms(self) -> float:
        return statistics.median(self.firsts_ms)

    @staticmethod
    def merge(results: Sequence[StreamResult]) -> StreamResult:
        return StreamResult(
            [x for r in results for x in r.rates], [x for r in results for x in r.firsts_ms]
        )


def window_spread(base: Sequence[UnaryResult], ours: Sequence[UnaryResult]) -> str:
    """``"N windows LOW-HIGHx"``: the lowest and highest ratio of requests/s
    of ``ours`` to ``base`` window by window (windows of the same round pair
    up), to show how far a single window's ratio strays."""
    each = [o.rps / b.rps if b.rps else float("nan") for b, o in zip(base, ours, strict=True)]
    return f"{len(each)} windows {min(each):.2f}-{max(each):.2f}x"


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _failed(endpoint: str, what: str, exc: grpc.aio.AioRpcError) -> LoadFailed:
    return LoadFailed(f"{what} on {endpoint} failed: {exc.code().name}: {exc.details()}")


async def unary_load(
    endpoint: str,
    payload: bytes,
    metadata: Metadata,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    probe: Probe | None = None,
) -> UnaryResult:
    """Run ``concurrency`` back-to-back ModelInfer loops for ``warmup`` then
    ``duration`` seconds; count and time the calls that finish in the measured
    window. With a ``probe``, it and the client's CPU time are read as the
    window opens and closes. Raises LoadFailed on the first failed call."""
    async with grpc.aio.insecure_channel(endpoint, options=rpc.grpc_options()) as channel:
        infer = channel.unary_unary(rpc.MODEL_INFER)  # bytes in, bytes out
        meta = tuple(metadata)
        try:
            await infer(payload, metadata=meta, timeout=CALL_TIMEOUT)  # connect; fail fast
        except grpc.aio.AioRpcError as exc:
            raise _failed(endpoint, "ModelInfer", exc) from None
        clock = time.perf_counter
        begin = clock() + warmup
        end = begin + duration
        latencies: list[float] = []
        record = latencies.append
        marks: list[tuple[float, dict[str, float]]] = []

        async def loop() -> None:
            while True:
                started = clock()
                if started >= end:
                    return
                await infer(payload, metadata=meta, timeout=CALL_TIMEOUT)
                finished = clock()
                if begin <= finished <= end:
                    record(finished - started)

        async def mark(probe: Probe) -> None:
            await asyncio.sleep(max(0.0, begin - clock()))
            marks.append((_cpu_self(), probe()))
            await asyncio.sleep(max(0.0, end - clock()))
            marks.append((_cpu_self(), probe()))

        tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
        if probe is not None:
            tasks.append(asyncio.ensure_future(mark(probe)))
        try:
            await asyncio.gather(*tasks)
        except grpc.aio.AioRpcError as exc:
            raise _failed(endpoint, "ModelInfer", exc) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    if not marks:
        return UnaryResult(latencies, duration)
    (cpu0, probe0), (cpu1, probe1) = marks
    probed = {key: value - probe0.get(key, 0.0) for key, value in probe1.items()}
    return UnaryResult(latencies, duration, cpu1 - cpu0, probed)


async def _stream_once(
    stream: grpc.aio.StreamStreamMultiCallable, endpoint: str, payload: bytes, meta: Metadata
) -> tuple[int, float, float, bytes]:
    clock = time.perf_counter
    started = clock()
    first = 0.0
    count = 0
    last = b""
    call = stream(iter((payload,)), metadata=meta, timeout=CALL_TIMEOUT)
    try:
        async for chunk in call:
            if not count:
                first = clock()
            count += 1
            last = chunk
    except grpc.aio.AioRpcError as exc:
        raise _failed(endpoint, "ModelStreamInfer", exc) from None
    return count, clock() - started, first - started, last


async def stream_load(
    endpoint: str, payload: bytes, metadata: Metadata, *, expect: int, repeats: int
) -> StreamResult:
    """Time ``repeats`` ModelStreamInfer calls (one request each, then half-close)
    after one warm-up call, recording each call's chunks/s and time to first chunk.
    Raises LoadFailed when a stream fails or does not bring ``expect`` chunks."""
    async with grpc.aio.insecure_channel(endpoint, options=rpc.grpc_options()) as channel:
        stream = channel.stream_stream(rpc.MODEL_STREAM_INFER)  # bytes in, bytes out
        meta = tuple(metadata)
        rates: list[float] = []
        firsts: list[float] = []
        for attempt in range(repeats + 1):
            count, elapsed, first, last = await _stream_once(stream, endpoint, payload, meta)
            error = ModelStreamInferResponse.FromString(last).error_message if last else ""
            if count != expect or error:
                raise LoadFailed(
                    f"ModelStreamInfer on {endpoint} brought {count} chunks, expected {expect}"
                    + (f"; last chunk is an error: {error}" if error else "")
                )
            if attempt:  # the first call warms up
                rates.append(count / elapsed)
                firsts.append(first * 1000)
    return StreamResult(rates, firsts)
