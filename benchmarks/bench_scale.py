"""Scale: an API server holding 1,000 replicas x 10 capabilities, and two API
servers sharing Redis against one.

(a) A registry of ``REPLICAS`` (1,000) replicas with ``CAPABILITIES`` (10)
capabilities each (``{"type": "type<j>", "model": "m<i % 100>"}``: each
type+model pair is served by 10 replicas, each type by all 1,000), registered
through the real ``POST /register`` of an API server process
(:mod:`benchmarks.api_proc`), once with ``--registry memory`` and once with
``--registry redis://...`` (a private redis-server; that column is n/a when
redis-server is not installed). The registered endpoints are live gRPC ports
(:mod:`benchmarks.grpc_sink`), so the API server's channels come up as with
real replicas. In the Redis column a second API server on the same Redis
applies every change too, on the same cores. Figures:

* first registration of all replicas (c=32): seconds;
* heartbeats: re-registrations of the same replicas (each the whole
  registration body, as replicas send it) per second at c=32, p50/p99;
* Redis only: seconds from the last registration answered by one API server
  until a second one on the same Redis lists every replica;
* a request no replica serves, end to end (``/infer``, c=1, answered 404): its
  p50/p99 with the registry empty and with it full. The 404 comes after the
  router has scanned the whole registry (candidates, then failed capabilities),
  so the difference is what a full registry adds to a routing decision, the
  HTTP path around it being the same;
* the routing decision alone: ``Registry.candidates`` (what the router ranks
  replicas with before it takes the first with room) in this process, on a
  registry rebuilt from the server's ``GET /registry``: p50/p99 in
  milliseconds for a query 10 replicas match, one all 1,000 match, one none
  matches. (Every capability of every replica is ranked on each decision.)

(b) Two API servers on one Redis and one real replica (:mod:`benchmarks.apps`,
the ``echo`` handler, one worker; it registers with the first server only, the
second learns it through Redis). ``POST /infer`` echo at c=64 from one aiohttp
client, round-robin over both servers against all to the first, in windows
alternating one, two, two, one: requests/s and the ratio. On a 2-core machine
the replica, its worker, both servers and the client share the cores, so the
ratio says what a second API server costs or gains there, not what it gains
on separate machines.

``ANYSERVE_BENCH_SCALE_WINDOW`` (seconds per measured window, default 3) changes
the run time (about 50 s in all by default).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from anyserve.api_server.registry import Registry
from anyserve.capability import Capability
from benchmarks import http_load, procs, redis_proc
from benchmarks.load import percentile
from benchmarks.rotating_load import Call, LoadResult, rotating_load, send_each

TITLE = "1,000 replicas x 10 capabilities (memory vs Redis registry); 1 vs 2 API servers"

REPLICAS = 1000
CAPABILITIES = 10
MODELS = 100
WINDOW = float(os.environ.get("ANYSERVE_BENCH_SCALE_WINDOW", "3"))
WARMUP = 0.5
HEARTBEAT_CONCURRENCY = 32
CONCURRENCY = 64
NO_MATCH_SECONDS = 1.0
DECISIONS = 200  # Registry.candidates calls timed per query (~6 ms each when full)
# Fake replicas must not expire while measured: heartbeats every 30 s (TTL 90 s).
HEARTBEAT_INTERVAL = 30.0
SYNC_TIMEOUT = 30.0

JSON = {"Content-Type": "application/json"}
ECHO = json.dumps(
    {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
).encode()


def registration(index: int, endpoint: str) -> bytes:
    """The ``/register`` body of fake replica ``index``."""
    caps = [{"type": f"type{j}", "model": f"m{index % MODELS}"} for j in range(CAPABILITIES)]
    body = {"replica_id": f"r{index:04d}", "endpoint": endpoint, "capabilities": caps}
    return json.dumps({**body, "workers": []}).encode()


def registry_size(url: str) -> int:
    response = httpx.get(f"{url}/registry", timeout=30)
    response.raise_for_status()
    return len(response.json()["replicas"])


def wait_for_size(url: str, wanted: int, timeout: float) -> float:
    """Seconds until ``url``'s registry lists ``wanted`` replicas (polled every 20 ms)."""
    started = time.perf_counter()
    while registry_size(url) < wanted:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"{url} did not list {wanted} replicas within {timeout:.0f}s")
        time.sleep(0.02)
    return time.perf_counter() - started


def no_match(url: str) -> LoadResult:
    call = Call("POST", f"{url}/infer", ECHO, {**JSON, "X-Capability-Type": "nosuch"}, 404)
    return rotating_load([call], concurrency=1, duration=NO_MATCH_SECONDS, warmup=0.2)


@dataclass
class Column:
    """The (a) figures of one registry backend."""

    register_s: float = float("nan")
    heartbeat: LoadResult | None = None
    sync_s: float = float("nan")
    empty: LoadResult | None = None
    full: LoadResult | None = None


def measure_backend(api_url: str, second_url: str | None, endpoints: list[str]) -> Column:
    column = Column(empty=no_match(api_url))
    bodies = [registration(i, endpoints[i % len(endpoints)]) for i in range(REPLICAS)]
    calls = [Call("POST", f"{api_url}/register", body, JSON) for body in bodies]
    column.register_s = send_each(calls, concurrency=HEARTBEAT_CONCURRENCY)
    if second_url is not None:
        column.sync_s = wait_for_size(second_url, REPLICAS, SYNC_TIMEOUT)
    if registry_size(api_url) != REPLICAS:
        raise RuntimeError(f"{api_url} lists {registry_size(api_url)} replicas, not {REPLICAS}")
    column.heartbeat = rotating_load(
        calls, concurrency=HEARTBEAT_CONCURRENCY, duration=WINDOW, warmup=WARMUP
    )
    column.full = no_match(api_url)
    return column


def api_server(registry: str, heartbeat_interval: float) -> procs.ServerProcess:
    args = ["--registry", registry, "--heartbeat-interval", str(heartbeat_interval)]
    return procs.ServerProcess("benchmarks.api_proc", *args)


def url_of(server: procs.ServerProcess) -> str:
    return server.endpoint.split()[0]


# -- the routing decision, in process -------------------------------------------------


def rebuilt_registry(api_url: str) -> Registry:
    """A Registry holding what ``api_url``'s ``GET /registry`` lists."""
    response = httpx.get(f"{api_url}/registry", timeout=30)
    response.raise_for_status()
    registry = Registry(ttl=3600.0)
    for entry in response.json()["replicas"]:
        caps = [Capability(c) for c in entry["capabilities"]]
        registry.upsert(entry["replica_id"], entry["endpoint"], caps)
    return registry


def decision_times(registry: Registry, query: dict[str, str]) -> tuple[int, float, float]:
    """``(candidates found, p50 ms, p99 ms)`` of ``registry.candidates(query)``."""
    clock = time.perf_counter_ns
    found = len(registry.candidates(query, ""))
    samples: list[float] = []
    for _ in range(DECISIONS):
        started = clock()
        registry.candidates(query, "")
        samples.append((clock() - started) / 1e6)
    samples.sort()
    return found, percentile(samples, 0.50), percentile(samples, 0.99)


# -- (b) one vs two API servers -------------------------------------------------------


@contextmanager
def two_api_servers(redis_url: str) -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """Two API servers on ``redis_url`` and one echo replica registered with the
    first; yields their URLs once both route to it, and the process groups."""
    with ExitStack() as stack:
        servers = [stack.enter_context(api_server(redis_url, 2.0)) for _ in range(2)]
        urls = [url_of(s) for s in servers]
        replica = stack.enter_context(
            procs.ServerProcess("benchmarks.cluster_proc", "replica", "--api-server", urls[0])
        )
        wait_for_size(urls[1], 1, SYNC_TIMEOUT)
        yield urls, (*(s.pid for s in servers), replica.pid)


def one_vs_two(urls: list[str], pgids: tuple[int, ...]) -> tuple[LoadResult, LoadResult]:
    """Alternating windows (one, two, two, one); the merged figures of each."""
    layouts = {
        "one": [Call("POST", f"{urls[0]}/infer", ECHO, {**JSON, "X-Capability-Type": "echo"})],
        "two": [
            Call("POST", f"{u}/infer", ECHO, {**JSON, "X-Capability-Type": "echo"}) for u in urls
        ],
    }
    results: dict[str, list[LoadResult]] = {"one": [], "two": []}
    for name in ("one", "two", "two", "one"):
        results[name].append(
            rotating_load(
                layouts[name],
                concurrency=CONCURRENCY,
                duration=WINDOW / 2,
                warmup=WARMUP,
                probe=lambda: http_load.cpu_by_process(pgids),
            )
        )
    return merged(results["one"]), merged(results["two"])


def merged(results: list[LoadResult]) -> LoadResult:
    cpu: dict[str, float] = {}
    for result in results:
        for key, value in result.probed.items():
            cpu[key] = cpu.get(key, 0.0) + value
    return LoadResult(
        sum(r.requests for r in results),
        sum(r.seconds for r in results),
        statistics.fmean(r.p50_ms for r in results),
        statistics.fmean(r.p99_ms for r in results),
        cpu,
    )


# -- rows -----------------------------------------------------------------------------

NAN = float("nan")


def _get(column: Column | None, pick: Callable[[Column], float]) -> float:
    return NAN if column is None else pick(column)


def _row(
    figure: str, memory: Column, redis: Column | None, pick: Callable[[Column], float], note: str
) -> dict[str, Any]:
    return {"figure": figure, "memory": pick(memory), "redis": _get(redis, pick), "note": note}


def _load(result: LoadResult | None, pick: Callable[[LoadResult], float]) -> float:
    return NAN if result is None else pick(result)


def backend_rows(memory: Column, redis: Column | None, redis_note: str) -> list[dict[str, Any]]:
    n = f"{REPLICAS:,} x {CAPABILITIES}"
    c = HEARTBEAT_CONCURRENCY
    rows = [
        _row(
            f"register {n}, s",
            memory,
            redis,
            lambda col: col.register_s,
            f"first POST /register of each, c={c}",
        ),
        _row(
            "heartbeats/s",
            memory,
            redis,
            lambda col: _load(col.heartbeat, lambda r: r.rps),
            f"re-registrations through /register, c={c}",
        ),
        _row(
            "heartbeat p50 ms",
            memory,
            redis,
            lambda col: _load(col.heartbeat, lambda r: r.p50_ms),
            "",
        ),
        _row(
            "heartbeat p99 ms",
            memory,
            redis,
            lambda col: _load(col.heartbeat, lambda r: r.p99_ms),
            "",
        ),
        _row(
            "2nd API server lists all, s",
            memory,
            redis,
            lambda col: col.sync_s,
            "from the last /register answer, via Redis" + redis_note,
        ),
    ]
    no_match_figures: list[tuple[str, Callable[[Column], float]]] = [
        ("p50 ms, empty", lambda col: _load(col.empty, lambda r: r.p50_ms)),
        ("p99 ms, empty", lambda col: _load(col.empty, lambda r: r.p99_ms)),
        ("p50 ms, full", lambda col: _load(col.full, lambda r: r.p50_ms)),
        ("p99 ms, full", lambda col: _load(col.full, lambda r: r.p99_ms)),
    ]
    for label, pick in no_match_figures:
        note = "404 after scanning the registry, c=1" if label.startswith("p50") else ""
        rows.append(_row(f"no-match /infer {label}", memory, redis, pick, note))
    return rows


def decision_rows(registry: Registry) -> list[dict[str, Any]]:
    """The in-process routing decision; the router's view is in memory with
    either backend, so the figures are in the memory column only."""
    rows = []
    queries = {
        "type+model": {"type": "type3", "model": "m42"},
        "type": {"type": "type3"},
        "no match": {"type": "nosuch"},
    }
    for label, query in queries.items():
        found, p50, p99 = decision_times(registry, query)
        for stat, value in (("p50", p50), ("p99", p99)):
            rows.append(
                {
                    "figure": f"Registry.candidates {stat} ms, {label}",
                    "memory": value,
                    "redis": "",
                    "note": f"in process; {found:,} candidates ranked" if stat == "p50" else "",
                }
            )
    return rows


def scale_rows(one: LoadResult, two: LoadResult) -> list[dict[str, Any]]:
    def cpu(result: LoadResult) -> str:
        total = sum(result.probed.values()) * 1000 / result.requests if result.requests else NAN
        return f"server CPU {total:.2f} ms/request"

    ratio = two.rps / one.rps if one.rps else NAN
    return [
        {
            "figure": f"echo c={CONCURRENCY} requests/s, 1 API server",
            "memory": "",
            "redis": one.rps,
            "note": f"p99 {one.p99_ms:.1f} ms; {cpu(one)}",
        },
        {
            "figure": f"echo c={CONCURRENCY} requests/s, 2 API servers",
            "memory": "",
            "redis": two.rps,
            "note": f"round-robin; p99 {two.p99_ms:.1f} ms; {cpu(two)}",
        },
        {
            "figure": "2 API servers / 1",
            "memory": "",
            "redis": f"{ratio:.2f}x",
            "note": "one replica, one worker; all on this machine's cores",
        },
    ]


def run() -> list[dict[str, Any]]:
    """Start the servers, measure (a) and (b), stop them."""
    has_redis = redis_proc.available()
    print(
        f"{http_load.describe_client()}; {REPLICAS:,} fake replicas on live gRPC ports;"
        " redis column: two API servers on one Redis, sharing these cores."
        + ("" if has_redis else "\nredis-server is not installed: the redis column is n/a"),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with procs.ServerProcess("benchmarks.grpc_sink", str(REPLICAS)) as sink:
        endpoints = sink.endpoint.split(",")
        with api_server("memory", HEARTBEAT_INTERVAL) as api:
            memory = measure_backend(url_of(api), None, endpoints)
            registry = rebuilt_registry(url_of(api))
        redis: Column | None = None
        if has_redis:
            with redis_proc.redis_server() as redis_url, ExitStack() as stack:
                first, second = (
                    stack.enter_context(api_server(redis_url, HEARTBEAT_INTERVAL)) for _ in "ab"
                )
                redis = measure_backend(url_of(first), url_of(second), endpoints)
    rows += backend_rows(memory, redis, "" if has_redis else " (needs redis-server)")
    rows += decision_rows(registry)
    if has_redis:
        with redis_proc.redis_server() as redis_url, two_api_servers(redis_url) as (urls, pgids):
            rows += scale_rows(*one_vs_two(urls, pgids))
    else:
        rows.append({"figure": "2 API servers / 1", "note": "skipped: needs redis-server"})
    return rows
