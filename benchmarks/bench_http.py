"""The API server issue's speed targets: the whole HTTP chain against a bare Starlette app.

Measured in one run on this machine (not asserted in tests), side by side:

* bare: :mod:`benchmarks.bare_http`, Starlette on uvicorn doing nothing;
* chain (echo rows only): :mod:`benchmarks.bare_chain`, anyserve's shape with
  no features (uvicorn + uvloop + httptools gateway -> one persistent grpc.aio
  channel -> a replica -> one worker over a Unix socketpair, echoing);
* anyserve: HTTP -> API server -> replica -> worker (one worker per handler of
  :mod:`benchmarks.apps`, trivial handlers), started by
  :mod:`benchmarks.cluster_proc`. By default each part runs in its own process
  as in production (``ANYSERVE_BENCH_LAYOUT=split``); ``one`` runs the API
  server and the replica in one process and event loop, as ``anyserve run`` does.

Figures and targets (anyserve / bare):

* ``POST /infer`` echo (small v2 JSON) at concurrency 64: requests/s >= 0.16x
  bare and >= 1.2x chain (issue 15); at concurrency 1: p50 <= the chain's
  (anyserve / chain <= 1.0x);
* one SSE stream of 1,000 chunks (``/infer/stream``, ``type=tokens``) against
  an sse-starlette endpoint: chunks/s >= 0.5x (median of several streams);
* 16 such streams at once (one connection each, sent together from one event
  loop, round after round): time to the first chunk, p50 over every stream of
  every round, <= 1.5x bare (anyserve / bare, at most); aggregate chunks/s of
  all 16 together (all chunks over the rounds' wall time, each round until its
  last stream ends) >= 0.4x. The bare endpoint's generator never waits, so
  uvicorn writes one stream whole before the next gets the loop: its first
  chunks come one stream-length apart and its p50 is about half the 16 streams'
  time, a lenient baseline for the first-chunk ratio (a bare generator that
  yields to the loop after each event measured about 4-6 ms on the 2-core
  development machine);
* 8 MiB binary-extension requests (one UINT8 input of 8 MiB, binary output
  asked for) at concurrency 4: requests/s >= 0.5x. anyserve's handler is
  :mod:`benchmarks.apps`' ``blob``, declared ``zero_copy`` as the README
  advises for big tensors (it echoes the numpy view of shared memory it is
  given; ``echo``, which copies the protobuf's raw bytes in and out, ran at
  0.40-0.52x).

The client (:mod:`benchmarks.http_load`: wrk when on PATH, else aiohttp; SSE
always aiohttp) is the same for both servers and runs in this process, apart
from the servers. Each figure is measured in windows alternating bare, [chain,]
anyserve, anyserve, [chain,] bare (each with its own warm-up), so drift in the
machine's load falls on both alike; requests/s count every window, p50/p99 are
the windows' mean, one stream's chunks/s and first-chunk times the median over
all streams; for the 16 streams, first-chunk p50 and p90 are over every stream
and their chunks/s count every round. Rows ``cpu ms/request`` (or ``/chunk``)
give the CPU time each side spent per request while measuring (from
``/proc``), the client's included, to show where time goes and whether the
client was the limit. ``ANYSERVE_BENCH_DURATION`` (seconds measured per
unary figure and server, default 4) and ``ANYSERVE_BENCH_WARMUP`` (seconds
before each unary window, default 1) change the run time; the SSE figures
count streams (:data:`STREAM_REPEATS`, :data:`STREAMS_REPEATS` rounds).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks import http_load, procs
from benchmarks.load import percentile

DURATION = float(os.environ.get("ANYSERVE_BENCH_DURATION", "4"))
WARMUP = float(os.environ.get("ANYSERVE_BENCH_WARMUP", "1"))
LAYOUT = os.environ.get("ANYSERVE_BENCH_LAYOUT", "split")
CONCURRENCY = 64
LATENCY_CONCURRENCY = 1  # the c=1 p50 row, against the chain
BINARY_CONCURRENCY = 4
BLOB = 8 * 1024 * 1024
STREAM_CHUNKS = 1000
STREAM_REPEATS = 3  # timed streams per server and round (after one warm-up stream)
STREAMS = 16  # SSE streams at once
STREAMS_REPEATS = 3  # timed rounds of STREAMS streams per window (after one warm-up round)
# Measuring windows per figure and server (DURATION is split over them), in the
# order bare, anyserve, anyserve, bare.
ROUNDS = 2

TARGET_ECHO = 0.16
TARGET_SSE = 0.5  # one stream's chunks/s vs bare sse-starlette
TARGET_SSE_FIRST = 1.5  # 16 streams: first-chunk p50, anyserve / bare, at most
TARGET_SSE_CONCURRENT = 0.4  # 16 streams: aggregate chunks/s vs bare
TARGET_BINARY = 0.5  # 8 MiB binary tensors, c=4, vs bare HTTP
TARGET_ECHO_CHAIN = 1.2  # issue 15: anyserve / bare chain at c=64
TARGET_LATENCY_CHAIN = 1.0  # issue 15: c=1 p50, anyserve / bare chain, at most

TITLE = "HTTP -> API server -> replica -> worker vs bare Starlette and a bare chain, same run"


class BenchFailed(RuntimeError):
    """A server failed during the benchmark (the message says which)."""


# -- requests -------------------------------------------------------------------------


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


ECHO_BODY = _json(
    {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
)
STREAM_BODY = _json({"inputs": [], "parameters": {"n": STREAM_CHUNKS}})
BINARY_HEADER = _json(
    {
        "inputs": [
            {
                "name": "blob",
                "datatype": "UINT8",
                "shape": [BLOB],
                "parameters": {"binary_data_size": BLOB},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
)


def _binary_body() -> bytes:
    return BINARY_HEADER + os.urandom(BLOB)


@dataclass(frozen=True)
class Target:
    """The requests of one server (the bare chain serves only ``echo``)."""

    echo: http_load.Request
    pgids: tuple[int, ...]  # process groups whose CPU time counts as the server's
    stream: http_load.Request | None = None
    binary: http_load.Request | None = None


def _bare_target(url: str, pgid: int, blob: bytes) -> Target:
    json_type = {"Content-Type": "application/json"}
    return Target(
        echo=http_load.Request(f"{url}/infer", ECHO_BODY, json_type),
        stream=http_load.Request(f"{url}/stream", STREAM_BODY, json_type),
        binary=http_load.Request(
            f"{url}/binary",
            blob,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(BINARY_HEADER)),
            },
            min_response=BLOB,
        ),
        pgids=(pgid,),
    )


def _chain_target(url: str, pgids: tuple[int, ...]) -> Target:
    return Target(
        echo=http_load.Request(f"{url}/infer", ECHO_BODY, {"Content-Type": "application/json"}),
        pgids=pgids,
    )


def _anyserve_target(url: str, pgids: tuple[int, ...], blob: bytes) -> Target:
    echo = {"Content-Type": "application/json", "X-Capability-Type": "echo"}
    tokens = {"Content-Type": "application/json", "X-Capability-Type": "tokens"}
    binary = {
        "Content-Type": "application/octet-stream",
        "X-Capability-Type": "blob",
        "Inference-Header-Content-Length": str(len(BINARY_HEADER)),
    }
    return Target(
        echo=http_load.Request(f"{url}/infer", ECHO_BODY, echo),
        stream=http_load.Request(f"{url}/infer/stream", STREAM_BODY, tokens),
        binary=http_load.Request(f"{url}/infer", blob, binary, min_response=BLOB),
        pgids=pgids,
    )


@dataclass
class Tally:
    """One server's figures, summed over its measuring windows, and the CPU time
    (seconds) spent while measuring."""

    work: int = 0  # requests (or chunks) served while measuring
    seconds: float = 0.0
    p50s: list[float] = field(default_factory=list)  # ms, one per window
    p99s: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # chunks/s, one per stream
    firsts: list[float] = field(default_factory=list)  # ms to the first chunk, per stream
    client_cpu: float = 0.0
    server_cpu: dict[str, float] = field(default_factory=dict)  # by process

    def add_cpu(self, client: float, server: dict[str, float]) -> None:
        self.client_cpu += client
        for label, seconds in server.items():
            self.server_cpu[label] = self.server_cpu.get(label, 0.0) + seconds

    @property
    def rps(self) -> float:
        return self.work / self.seconds if self.seconds else float("nan")

    def cpu_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.work if self.work else float("nan")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p90(values: list[float]) -> float:
    return percentile(sorted(values), 0.90)


def _unary(name: str, target: Target, request: http_load.Request, c: int, tally: Tally) -> None:
    try:
        result = http_load.unary_load(
            request,
            concurrency=c,
            duration=DURATION / ROUNDS,
            warmup=WARMUP,
            probe=lambda: http_load.cpu_by_process(target.pgids),
        )
    except http_load.LoadFailed as exc:
        raise BenchFailed(f"{name} server, {request.url} at c={c}: {exc}") from None
    tally.work += result.requests
    tally.seconds += result.seconds
    tally.p50s.append(result.p50_ms)
    tally.p99s.append(result.p99_ms)
    tally.add_cpu(result.client_cpu, result.probed)


def _stream(name: str, target: Target, tally: Tally) -> None:
    if target.stream is None:
        raise BenchFailed(f"{name} server has no SSE endpoint")
    try:
        result = http_load.sse_load(
            target.stream,
            expect=STREAM_CHUNKS,
            repeats=STREAM_REPEATS,
            probe=lambda: http_load.cpu_by_process(target.pgids),
        )
    except http_load.LoadFailed as exc:
        raise BenchFailed(f"{name} server, SSE stream: {exc}") from None
    tally.work += result.events
    tally.rates.extend(result.rates)
    tally.firsts.extend(result.firsts_ms)
    tally.add_cpu(result.client_cpu, result.probed)


def _streams(name: str, target: Target, tally: Tally) -> None:
    if target.stream is None:
        raise BenchFailed(f"{name} server has no SSE endpoint")
    try:
        result = http_load.sse_concurrent_load(
            target.stream,
            streams=STREAMS,
            expect=STREAM_CHUNKS,
            repeats=STREAMS_REPEATS,
            probe=lambda: http_load.cpu_by_process(target.pgids),
        )
    except http_load.LoadFailed as exc:
        raise BenchFailed(f"{name} server, {STREAMS} SSE streams: {exc}") from None
    tally.work += result.events
    tally.seconds += result.seconds
    tally.firsts.extend(result.firsts_ms)
    tally.add_cpu(result.client_cpu, result.probed)


def _alternating(
    servers: dict[str, Target], measure: Callable[[str, Target, Tally], None]
) -> dict[str, Tally]:
    """Run ``measure`` ROUNDS times per server, in the order of ``servers``, then
    reversed, ... (bare, chain, anyserve, anyserve, chain, bare) so that drift in
    the machine's load falls on all alike."""
    tallies = {name: Tally() for name in servers}
    for round_no in range(ROUNDS):
        order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
        for name in order:
            measure(name, servers[name], tallies[name])
    return tallies


# -- rows -----------------------------------------------------------------------------


def _ratio(bare: float, anyserve: float) -> float:
    return anyserve / bare if bare else float("nan")


def _figure(
    metric: str,
    bare: float,
    anyserve: float,
    target: float | None = None,
    *,
    chain: float | None = None,
    chain_target: float | None = None,
) -> dict[str, Any]:
    """One row. ``target`` is the least anyserve/bare and ``chain_target`` the
    least anyserve/chain, or for a latency (``ms``) row the most."""
    ratio = _ratio(bare, anyserve)
    lower_better = "ms" in metric.split()
    targets: list[str] = []
    notes: list[str] = []
    if target is not None:
        if lower_better:
            targets.append(f"<= {target:.2f}x bare")
            met = ratio <= target
        else:
            targets.append(f">= {target:.2f}x bare")
            met = ratio >= target
        notes.append(f"vs bare {'met' if met else 'NOT met'}")
    chain_ratio = float("nan") if chain is None else _ratio(chain, anyserve)
    if chain_target is not None:
        if lower_better:
            targets.append(f"<= {chain_target:.2f}x chain")
            met = chain_ratio <= chain_target
        else:
            targets.append(f">= {chain_target:.2f}x chain")
            met = chain_ratio >= chain_target
        notes.append(f"vs chain {'met' if met else 'NOT met'}")
    if not notes and lower_better:
        notes.append("lower is better")
    return {
        "metric": metric,
        "bare": bare,
        "chain": "" if chain is None else chain,
        "anyserve": anyserve,
        "anyserve/bare": ratio,
        "anyserve/chain": "" if chain is None else chain_ratio,
        "target ratio": ", ".join(targets),
        "note": "; ".join(notes),
    }


def _cpu_row(
    metric: str, bare: Tally, anyserve: Tally, chain: Tally | None = None
) -> dict[str, Any]:
    """Server CPU ms per request (or chunk); the note splits anyserve's (and the
    chain's, labelled ``chain ...``) by process and gives the client's."""
    b = bare.cpu_ms(sum(bare.server_cpu.values()))
    a = anyserve.cpu_ms(sum(anyserve.server_cpu.values()))
    c = None if chain is None else chain.cpu_ms(sum(chain.server_cpu.values()))

    def split(tally: Tally) -> list[str]:
        return [
            f"{label} {tally.cpu_ms(seconds):.3f}"
            for label, seconds in sorted(tally.server_cpu.items(), key=lambda kv: -kv[1])
            if seconds > 0
        ]

    parts = split(anyserve) + ([] if chain is None else split(chain))
    client = (
        f"client {bare.cpu_ms(bare.client_cpu):.3f} / {anyserve.cpu_ms(anyserve.client_cpu):.3f}"
    )
    return {
        "metric": metric,
        "bare": b,
        "chain": "" if c is None else c,
        "anyserve": a,
        "anyserve/bare": _ratio(b, a),
        "anyserve/chain": "" if c is None else _ratio(c, a),
        "target ratio": "",
        "note": f"{'; '.join(parts)}; {client}",
    }


def _measure(bare: Target, chain: Target, anyserve: Target) -> list[dict[str, Any]]:
    servers = {"bare": bare, "anyserve": anyserve}
    with_chain = {"bare": bare, "chain": chain, "anyserve": anyserve}
    rows: list[dict[str, Any]] = []

    def echo(name: str, target: Target, tally: Tally) -> None:
        _unary(name, target, target.echo, CONCURRENCY, tally)

    def echo_one(name: str, target: Target, tally: Tally) -> None:
        _unary(name, target, target.echo, LATENCY_CONCURRENCY, tally)

    def binary(name: str, target: Target, tally: Tally) -> None:
        if target.binary is None:
            raise BenchFailed(f"{name} server has no binary endpoint")
        _unary(name, target, target.binary, BINARY_CONCURRENCY, tally)

    t = _alternating(with_chain, echo)
    b, c, a = t["bare"], t["chain"], t["anyserve"]
    label = f"echo c={CONCURRENCY}"
    rows.append(
        _figure(
            f"{label} requests/s",
            b.rps,
            a.rps,
            TARGET_ECHO,
            chain=c.rps,
            chain_target=TARGET_ECHO_CHAIN,
        )
    )
    rows.append(_figure(f"{label} p50 ms", _mean(b.p50s), _mean(a.p50s), chain=_mean(c.p50s)))
    rows.append(_figure(f"{label} p99 ms", _mean(b.p99s), _mean(a.p99s), chain=_mean(c.p99s)))
    rows.append(_cpu_row(f"{label} cpu ms/request", b, a, c))

    t = _alternating(with_chain, echo_one)
    b, c, a = t["bare"], t["chain"], t["anyserve"]
    label = f"echo c={LATENCY_CONCURRENCY}"
    rows.append(_figure(f"{label} requests/s", b.rps, a.rps, chain=c.rps))
    rows.append(
        _figure(
            f"{label} p50 ms",
            _mean(b.p50s),
            _mean(a.p50s),
            chain=_mean(c.p50s),
            chain_target=TARGET_LATENCY_CHAIN,
        )
    )
    rows.append(_cpu_row(f"{label} cpu ms/request", b, a, c))

    t = _alternating(servers, _stream)
    b, a = t["bare"], t["anyserve"]
    label = f"SSE {STREAM_CHUNKS} chunks"
    rows.append(_figure(f"{label} chunks/s", _median(b.rates), _median(a.rates), TARGET_SSE))
    rows.append(_figure(f"{label} first chunk ms", _median(b.firsts), _median(a.firsts)))
    rows.append(_cpu_row(f"{label} cpu ms/chunk", b, a))

    t = _alternating(servers, _streams)
    b, a = t["bare"], t["anyserve"]
    label = f"SSE {STREAMS} streams x {STREAM_CHUNKS} chunks"
    rows.append(
        _figure(
            f"{label} first chunk p50 ms",
            _median(b.firsts),
            _median(a.firsts),
            TARGET_SSE_FIRST,
        )
    )
    rows.append(_figure(f"{label} first chunk p90 ms", _p90(b.firsts), _p90(a.firsts)))
    rows.append(_figure(f"{label} chunks/s (all)", b.rps, a.rps, TARGET_SSE_CONCURRENT))
    rows.append(_cpu_row(f"{label} cpu ms/chunk", b, a))

    t = _alternating(servers, binary)
    b, a = t["bare"], t["anyserve"]
    label = f"8 MiB binary c={BINARY_CONCURRENCY}"
    rows.append(_figure(f"{label} requests/s", b.rps, a.rps, TARGET_BINARY))
    rows.append(_figure(f"{label} p50 ms", _mean(b.p50s), _mean(a.p50s)))
    rows.append(_figure(f"{label} p99 ms", _mean(b.p99s), _mean(a.p99s)))
    rows.append(_cpu_row(f"{label} cpu ms/request", b, a))
    return rows


LAYOUTS = {
    "split": "API server and replica in separate processes",
    "one": "API server and replica in one process (as anyserve run)",
}


def run() -> list[dict[str, Any]]:
    """Start the bare server and the anyserve chain, measure, stop them."""
    if LAYOUT not in LAYOUTS:
        raise ValueError(f"ANYSERVE_BENCH_LAYOUT must be one of {sorted(LAYOUTS)}, not {LAYOUT!r}")
    print(
        f"{http_load.describe_client()}; anyserve: {LAYOUTS[LAYOUT]}, one worker per handler.\n"
        "cpu rows: server CPU ms per request or chunk while measuring (anyserve: all its"
        " processes; the note splits it), then the client's in the bare / anyserve runs;"
        " chain: benchmarks.bare_chain (gateway -> grpc.aio -> replica -> worker, no features)",
        flush=True,
    )
    blob = _binary_body()
    with (
        procs.ServerProcess("benchmarks.bare_http") as bare_proc,
        procs.ServerProcess("benchmarks.bare_chain") as chain_proc,
    ):
        bare = _bare_target(bare_proc.endpoint, bare_proc.pid, blob)
        # The chain announces "URL REPLICA_PGID" (its replica and worker run in
        # their own process group).
        chain_url, chain_replica = chain_proc.endpoint.split()
        chain = _chain_target(chain_url, (chain_proc.pid, int(chain_replica)))
        if LAYOUT == "one":
            with procs.ServerProcess("benchmarks.cluster_proc", "all") as cluster:
                url = cluster.endpoint.split()[0]
                return _measure(bare, chain, _anyserve_target(url, (cluster.pid,), blob))
        with procs.ServerProcess("benchmarks.cluster_proc", "api") as api:
            url = api.endpoint.split()[0]
            with procs.ServerProcess(
                "benchmarks.cluster_proc", "replica", "--api-server", url
            ) as replica:
                return _measure(bare, chain, _anyserve_target(url, (api.pid, replica.pid), blob))
