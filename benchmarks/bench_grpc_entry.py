"""Unary ModelInfer through the API server's gRPC entry against a bare grpc.aio echo.

Measured in one run on this machine (not asserted in tests), side by side:

* bare: :mod:`benchmarks.bare_echo`, the cheapest grpc.aio server at anyserve's
  method paths (one fixed, pre-serialized answer; nothing parsed);
* replica (for reference): a replica like the one anyserve routes to, called
  directly, as :mod:`benchmarks.bench_replica` does, so ``anyserve/replica``
  is what the API server's hop costs. It runs in processes of its own (its
  own API server, which it registers with, idle): when the chain's own
  replica took the direct windows too, the chain's windows after them ran
  slower for a few seconds (CPU per request up in all three of its
  processes), and the chain measured 0.46-0.49x of bare where it measures
  0.55-0.66x alone, same code, same session;
* anyserve: gRPC -> API server's gRPC entry
  (:mod:`anyserve.api_server.grpc_entry`, routed by ``x-capability-type: echo``)
  -> replica -> worker (:mod:`benchmarks.apps`' echo handler), started by
  :mod:`benchmarks.cluster_proc` as in production: the API server and the
  replica in their own processes.

Figure and target: requests/s at concurrency 64 >= 0.5x bare; the p50 and
p99 latency rows are for reference. The client (:mod:`benchmarks.load`) is
grpc.aio in this process (uvloop when installed): 64 callers on one channel
sending the same serialized ModelInferRequest bytes, nothing (de)serialized on
the measured path (it still spends more per request on a server whose answers
come back one by one: see the cpu row). Each server is measured in eight
windows alternating bare, replica, anyserve, anyserve, replica, bare, ... (each
with its own warm-up), so drift in the machine's load falls on all alike;
requests/s count every window, p50/p99 are over all calls, and the note gives
the lowest and highest ratio of single windows. The ``cpu
ms/request`` row gives the CPU time each side spent per request while
measuring (from ``/proc``): the note splits anyserve's by process and gives
the client's, to show where time goes and whether the client was the limit.
``ANYSERVE_BENCH_DURATION`` (seconds measured per server, default 8) and
``ANYSERVE_BENCH_WARMUP`` (seconds before each window, default 0.5) change the
run time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import anyio

from benchmarks import http_load, load, payloads, procs

DURATION = float(os.environ.get("ANYSERVE_BENCH_DURATION", "8"))
WARMUP = float(os.environ.get("ANYSERVE_BENCH_WARMUP", "0.5"))
CONCURRENCY = 64
# Measuring windows per server (DURATION is split over them), in the order
# bare, replica, anyserve, anyserve, replica, bare, ...: one window's ratio
# strays by up to +-25% on the 2-core machine, eight pairs of them far less.
ROUNDS = 8
TARGET = 0.5  # anyserve / bare requests/s at c=64, at least

TITLE = "gRPC -> API server's gRPC entry -> replica -> worker vs a bare grpc.aio echo, same run"

# name -> (gRPC endpoint, process groups whose CPU time counts as the server's)
Servers = dict[str, tuple[str, tuple[int, ...]]]


class BenchFailed(RuntimeError):
    """A server failed during the benchmark (the message says which)."""


async def _unary(servers: Servers) -> dict[str, list[load.UnaryResult]]:
    echo = payloads.echo_request()
    windows: dict[str, list[load.UnaryResult]] = {name: [] for name in servers}
    for round_no in range(ROUNDS):
        order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
        for name in order:
            endpoint, pgids = servers[name]
            try:
                result = await load.unary_load(
                    endpoint,
                    echo,
                    payloads.ECHO_METADATA,
                    concurrency=CONCURRENCY,
                    duration=DURATION / ROUNDS,
                    warmup=WARMUP,
                    probe=functools.partial(http_load.cpu_by_process, pgids),
                )
            except load.LoadFailed as exc:
                raise BenchFailed(f"{name} server, unary c={CONCURRENCY}: {exc}") from None
            windows[name].append(result)
    return windows


def _ratio(base: float, value: float) -> float:
    return value / base if base else float("nan")


def _row(
    metric: str, bare: float, replica: float, anyserve: float, target: str = "", note: str = ""
) -> dict[str, Any]:
    return {
        "metric": metric,
        "bare": bare,
        "replica": replica,
        "anyserve": anyserve,
        "anyserve/bare": _ratio(bare, anyserve),
        "anyserve/replica": _ratio(replica, anyserve),
        "target ratio": target,
        "note": note,
    }


def _cpu_ms(result: load.UnaryResult, seconds: float) -> float:
    return seconds * 1000 / result.requests if result.requests else float("nan")


def _cpu_row(
    metric: str, b: load.UnaryResult, r: load.UnaryResult, a: load.UnaryResult
) -> dict[str, Any]:
    """Server CPU ms per request; the note splits anyserve's by process and
    gives the client's (bare / replica / anyserve)."""
    parts = [
        f"{label} {_cpu_ms(a, seconds):.3f}"
        for label, seconds in sorted(a.probed.items(), key=lambda kv: -kv[1])
        if seconds > 0
    ]
    clients = " / ".join(f"{_cpu_ms(x, x.client_cpu):.3f}" for x in (b, r, a))
    return _row(
        metric,
        _cpu_ms(b, sum(b.probed.values())),
        _cpu_ms(r, sum(r.probed.values())),
        _cpu_ms(a, sum(a.probed.values())),
        note=f"{'; '.join(parts)}; client {clients}",
    )


async def _measure(servers: Servers) -> list[dict[str, Any]]:
    windows = await _unary(servers)
    unary = {name: load.UnaryResult.merge(results) for name, results in windows.items()}
    b, r, a = unary["bare"], unary["replica"], unary["anyserve"]
    ratio = _ratio(b.rps, a.rps)
    label = f"unary c={CONCURRENCY}"
    return [
        _row(
            f"{label} requests/s",
            b.rps,
            r.rps,
            a.rps,
            f">= {TARGET:.2f}x bare",
            f"vs bare {'met' if ratio >= TARGET else 'NOT met'};"
            f" {load.window_spread(windows['bare'], windows['anyserve'])}",
        ),
        _row(f"{label} p50 ms", b.p50_ms, r.p50_ms, a.p50_ms, note="lower is better"),
        _row(f"{label} p99 ms", b.p99_ms, r.p99_ms, a.p99_ms, note="lower is better"),
        _cpu_row(f"{label} cpu ms/request", b, r, a),
    ]


def run() -> list[dict[str, Any]]:
    """Start the bare server, the API server and a replica; measure; stop them."""
    print(
        "client: grpc.aio (benchmarks.load), 64 callers on one channel, this process;"
        " anyserve: API server and replica in separate processes, one worker per handler;"
        " replica: another replica like it, called directly.\n"
        "cpu row: server CPU ms per request while measuring (anyserve: all its processes;"
        " the note splits it), then the client's in the bare / replica / anyserve runs",
        flush=True,
    )
    with (
        procs.ServerProcess("benchmarks.bare_echo") as bare,
        procs.ServerProcess("benchmarks.cluster_proc", "api") as api,
        procs.ServerProcess("benchmarks.cluster_proc", "api") as reference_api,
    ):
        url, grpc_endpoint = api.endpoint.split()
        reference_url = reference_api.endpoint.split()[0]
        with (
            procs.ServerProcess("benchmarks.cluster_proc", "replica", "--api-server", url) as chain,
            procs.ServerProcess(
                "benchmarks.cluster_proc", "replica", "--api-server", reference_url
            ) as replica,
        ):
            servers: Servers = {
                "bare": (bare.endpoint, (bare.pid,)),
                "replica": (replica.endpoint, (replica.pid,)),
                "anyserve": (grpc_endpoint, (api.pid, chain.pid)),
            }
            rows: list[dict[str, Any]] = anyio.run(
                _measure, servers, backend_options=procs.event_loop_options()
            )
    return rows
