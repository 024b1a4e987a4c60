"""One replica (one worker per handler) against the bare grpc.aio echo server.

Both servers run as separate processes started here (:mod:`benchmarks.procs`);
this process only generates load (:mod:`benchmarks.load`). Measured in the same
run, side by side:

* unary ModelInfer at concurrency 1 and 64: requests/s, p50 and p99 latency;
* one ModelStreamInfer of 1,000 chunks: tokens (chunks) per second and the time
  to the first chunk.

Each row gives the bare figure, the replica's, and replica / bare. Target: the
replica reaches at least half the bare server's requests/s at concurrency 64.
``ANYSERVE_BENCH_DURATION`` (seconds measured per figure and server, default 4)
and ``ANYSERVE_BENCH_WARMUP`` (seconds before each measured window) change the
run time. The client is one process (uvloop when installed) and so are the
servers: on a small machine they compete for cores, as they would in production
on one host.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from benchmarks import load, payloads, procs

CONCURRENCIES = (1, 64)
# Seconds measured per figure and server, split over windows (UNARY_ROUNDS for
# unary calls, ROUNDS for streams); each window has its own warm-up. Servers
# alternate bare, replica, replica, bare, ... so drift in the machine's load
# falls on both alike. One unary window's ratio strays by up to +-25% on the
# 2-core machine: eight of them give a steadier figure.
DURATION = float(os.environ.get("ANYSERVE_BENCH_DURATION", "4"))
WARMUP = float(os.environ.get("ANYSERVE_BENCH_WARMUP", "0.5"))
ROUNDS = 2
UNARY_ROUNDS = 8
STREAM_REPEATS = 10  # timed streams per server and round (after one warm-up stream)
TARGET_C64 = 0.5

TITLE = "replica (1 worker) vs bare grpc.aio echo, same run"

Servers = dict[str, str]


class BenchFailed(RuntimeError):
    """A server failed during the benchmark (message names which one)."""


def _order(round_no: int) -> tuple[str, str]:
    return ("bare", "replica") if round_no % 2 == 0 else ("replica", "bare")


def _row(metric: str, bare: float, replica: float, note: str = "") -> dict[str, Any]:
    return {
        "metric": metric,
        "bare": bare,
        "replica": replica,
        "replica/bare": replica / bare if bare else float("nan"),
        "note": note,
    }


async def _unary(servers: Servers, concurrency: int) -> dict[str, list[load.UnaryResult]]:
    echo = payloads.echo_request()
    windows: dict[str, list[load.UnaryResult]] = {name: [] for name in servers}
    for round_no in range(UNARY_ROUNDS):
        for name in _order(round_no):
            try:
                result = await load.unary_load(
                    servers[name],
                    echo,
                    payloads.ECHO_METADATA,
                    concurrency=concurrency,
                    duration=DURATION / UNARY_ROUNDS,
                    warmup=WARMUP,
                )
            except load.LoadFailed as exc:
                raise BenchFailed(f"{name} server, unary c={concurrency}: {exc}") from None
            windows[name].append(result)
    return windows


async def _stream(servers: Servers) -> dict[str, load.StreamResult]:
    tokens = payloads.tokens_request(payloads.STREAM_CHUNKS)
    calls: dict[str, list[load.StreamResult]] = {name: [] for name in servers}
    for round_no in range(ROUNDS):
        for name in _order(round_no):
            try:
                result = await load.stream_load(
                    servers[name],
                    tokens,
                    payloads.TOKENS_METADATA,
                    expect=payloads.STREAM_CHUNKS,
                    repeats=STREAM_REPEATS,
                )
            except load.LoadFailed as exc:
                raise BenchFailed(f"{name} server, stream: {exc}") from None
            calls[name].append(result)
    return {name: load.StreamResult.merge(results) for name, results in calls.items()}


async def _measure(servers: Servers) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for concurrency in CONCURRENCIES:
        windows = await _unary(servers, concurrency)
        b, r = (load.UnaryResult.merge(windows[name]) for name in ("bare", "replica"))
        note = ""
        if concurrency == 64:
            verdict = "met" if r.rps >= TARGET_C64 * b.rps else "NOT met"
            spread = load.window_spread(windows["bare"], windows["replica"])
            note = f"target >= {TARGET_C64:.2f}x: {verdict}; {spread}"
        rows.append(_row(f"unary c={concurrency} requests/s", b.rps, r.rps, note))
        rows.append(_row(f"unary c={concurrency} p50 ms", b.p50_ms, r.p50_ms, "lower is better"))
        rows.append(_row(f"unary c={concurrency} p99 ms", b.p99_ms, r.p99_ms, "lower is better"))
    stream = await _stream(servers)
    b_s, r_s = stream["bare"], stream["replica"]
    chunks = payloads.STREAM_CHUNKS
    rows.append(_row(f"stream {chunks} chunks tokens/s", b_s.tokens_per_s, r_s.tokens_per_s))
    rows.append(
        _row("stream first chunk ms", b_s.first_chunk_ms, r_s.first_chunk_ms, "lower is better")
    )
    return rows


def run() -> list[dict[str, Any]]:
    """Start both servers, measure, stop them; one row per figure."""
    with (
        procs.ServerProcess("benchmarks.bare_echo") as bare,
        procs.ServerProcess("benchmarks.replica_proc") as replica,
    ):
        servers = {"bare": bare.endpoint, "replica": replica.endpoint}
        rows: list[dict[str, Any]] = anyio.run(
            _measure, servers, backend_options=procs.event_loop_options()
        )
    return rows
