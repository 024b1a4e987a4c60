"""``context.call`` through the API server: its gRPC entry (what anyserve uses)
against its HTTP entry, measured in one run.

An API server and one replica of :mod:`benchmarks.calls_app` (one worker per
handler), each in its own process (:mod:`benchmarks.cluster_proc`). The client
(:mod:`benchmarks.load`, grpc.aio, this process) sends requests to the API
server's gRPC entry at concurrency 16:

* ``type=echo``: the callee alone, one trip through the API server (reference);
* ``type=via-grpc``: a handler doing ``await context.call({"type": "echo"}, ...)``
  (API server gRPC entry, one persistent channel per worker);
* ``type=via-http``: the same call over HTTP, protobuf body to ``/infer``, one
  httpx.AsyncClient per worker;
* ``type=via-aiohttp``: the same HTTP call with one aiohttp.ClientSession per
  worker instead, to tell the cost of HTTP from the cost of the HTTP client.

So every via-* request crosses the API server twice. Rows give requests/s, p50
and p99, the ratio to via-grpc, and the CPU time each process spent per request
(from ``/proc``). ``ANYSERVE_BENCH_DURATION`` (seconds measured per path,
default 4) and ``ANYSERVE_BENCH_WARMUP`` (default 1) change the run time.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from benchmarks import http_load, load, payloads, procs

DURATION = float(os.environ.get("ANYSERVE_BENCH_DURATION", "4"))
WARMUP = float(os.environ.get("ANYSERVE_BENCH_WARMUP", "1"))
CONCURRENCY = 16
APP = "benchmarks.calls_app:app"
PATHS = ("echo", "via-grpc", "via-http", "via-aiohttp")

TITLE = f"context.call via the API server's gRPC vs HTTP entry, c={CONCURRENCY}"


class BenchFailed(RuntimeError):
    """A path failed during the benchmark (the message says which)."""


async def _measure_path(
    endpoint: str, path: str, pgids: tuple[int, ...]
) -> tuple[load.UnaryResult, dict[str, float]]:
    """One path's load, and the CPU seconds per process over (about) the
    measured window: a side task reads ``/proc`` as the window opens and closes."""
    marks: list[dict[str, float]] = []

    async def probe() -> None:
        await anyio.sleep(WARMUP)
        marks.append(http_load.cpu_by_process(pgids))
        await anyio.sleep(DURATION)
        marks.append(http_load.cpu_by_process(pgids))

    result: load.UnaryResult | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)
        try:
            result = await load.unary_load(
                endpoint,
                payloads.echo_request(),
                (("x-capability-type", path),),
                concurrency=CONCURRENCY,
                duration=DURATION,
                warmup=WARMUP,
            )
        except load.LoadFailed as exc:
            tg.cancel_scope.cancel()
            raise BenchFailed(f"type={path}: {exc}") from None
    assert result is not None
    before, after = marks
    return result, {k: v - before.get(k, 0.0) for k, v in after.items()}


async def _measure(endpoint: str, pgids: tuple[int, ...]) -> list[dict[str, Any]]:
    measured = {path: await _measure_path(endpoint, path, pgids) for path in PATHS}
    grpc_rps = measured["via-grpc"][0].rps
    rows: list[dict[str, Any]] = []
    for path, (result, cpu) in measured.items():
        per_request = {k: v * 1000 / result.requests for k, v in cpu.items() if v > 0}
        busiest = sorted(per_request.items(), key=lambda kv: -kv[1])
        rows.append(
            {
                "type": path,
                "requests per s": result.rps,
                "p50 ms": result.p50_ms,
                "p99 ms": result.p99_ms,
                "vs via-grpc ratio": result.rps / grpc_rps if grpc_rps else float("nan"),
                "cpu ms per request": sum(per_request.values()),
                "cpu by process, ms per request": "; ".join(f"{k} {v:.3f}" for k, v in busiest),
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    """Start the API server and the replica, measure each path, stop them."""
    print(
        "client: grpc.aio (benchmarks.load) to the API server's gRPC entry; the via-http"
        " ratio to via-grpc is the HTTP/gRPC comparison",
        flush=True,
    )
    with procs.ServerProcess("benchmarks.cluster_proc", "api") as api:
        url, grpc_endpoint = api.endpoint.split()
        with procs.ServerProcess(
            "benchmarks.cluster_proc", "replica", "--api-server", url, "--app", APP
        ) as replica:
            rows: list[dict[str, Any]] = anyio.run(
                _measure,
                grpc_endpoint,
                (api.pid, replica.pid),
                backend_options=procs.event_loop_options(),
            )
    return rows
