"""HTTP load for the API server benchmarks: ``wrk`` when it is on PATH, else aiohttp.

Whichever client is chosen measures every server of a run, so differences are
the servers'. ``ANYSERVE_BENCH_HTTP_CLIENT`` forces one (``wrk`` or
``aiohttp``; default ``auto``: wrk when installed).

* :func:`unary_load`: ``concurrency`` connections, each sending the same request
  back to back for ``warmup`` then ``duration`` seconds; requests/s, p50 and p99
  of the measured window. The aiohttp client is one ``ClientSession`` (uvloop
  when installed) with a connector limited to ``concurrency`` keep-alive
  connections and one loop per connection; it checks every status and body
  size. wrk runs one thread per two usable cores (at least one).
* :func:`sse_load`: one SSE request at a time (aiohttp, whatever the unary
  client): events until ``event: done``, events/s and time to first event,
  medians over the timed requests.
* :func:`sse_concurrent_load`: ``streams`` SSE requests at once from one
  aiohttp session (one connection each) and one event loop, round after round:
  every stream's time to its first event, and the aggregate events/s of all
  streams together (each round timed from its start until its last stream
  ends).

Each reports the CPU seconds the client itself used while measuring
(``client_cpu``), so a run can tell whether the client, not the server, was
the limit, and the growth of a caller's ``probe`` (e.g. the servers' CPU
seconds by process, read from ``/proc``) over the same window.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import anyio

from benchmarks import procs
from benchmarks.load import percentile

CLIENT_ENV = "ANYSERVE_BENCH_HTTP_CLIENT"
CALL_TIMEOUT = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


class LoadFailed(RuntimeError):
    """A request failed during a benchmark (the message says which and how)."""


@dataclass(frozen=True)
class Request:
    """One HTTP POST, sent again and again. ``min_response``: bytes a good
    answer has at least (checks that e.g. an 8 MiB echo really came back)."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    min_response: int = 1


Probe = Callable[[], dict[str, float]]


def _no_probe() -> dict[str, float]:
    return {}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


@dataclass(frozen=True)
class UnaryResult:
    """``requests`` finished in the ``seconds`` measured; ``client_cpu`` is the
    client's CPU seconds in that window and ``probed`` how much the caller's
    probe (e.g. server CPU seconds by process) grew in it."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu: float
    probed: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")


@dataclass(frozen=True)
class StreamResult:
    """Per timed request: events/s and time to the first event; ``events`` in
    all timed requests, ``client_cpu`` and ``probed`` as in UnaryResult."""

    rates: list[float]
    firsts_ms: list[float]
    events: int
    client_cpu: float
    probed: dict[str, float]

    @property
    def events_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def first_event_ms(self) -> float:
        return statistics.median(self.firsts_ms)


@dataclass(frozen=True)
class ConcurrentStreamResult:
    """Rounds of streams sent at once: each timed stream's time to its first
    event (ms, from when the stream was sent); ``events`` of all timed rounds
    and the ``seconds`` they took (each round from its start until its last
    stream ended); ``client_cpu`` and ``probed`` as in UnaryResult."""

    firsts_ms: list[float]
    events: int
    seconds: float
    client_cpu: float
    probed: dict[str, float]

    @property
    def events_per_s(self) -> float:
        """Aggregate: all streams' events per second of wall time."""
        return self.events / self.seconds if self.seconds else float("nan")


def client_name() -> str:
    """``wrk`` or ``aiohttp``: what :func:`unary_load` uses in this run."""
    wanted = os.environ.get(CLIENT_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "wrk", "aiohttp"):
        raise ValueError(f"{CLIENT_ENV} must be auto, wrk or aiohttp, not {wanted!r}")
    if wanted == "aiohttp":
        return "aiohttp"
    if shutil.which("wrk"):
        return "wrk"
    if wanted == "wrk":
        raise RuntimeError(f"{CLIENT_ENV}=wrk but wrk is not on PATH")
    return "aiohttp"


def describe_client() -> str:
    """One line for a benchmark's notes: which client, where it runs."""
    loop = "uvloop" if procs.event_loop_options() else "asyncio"
    aio = f"aiohttp {aiohttp.__version__} on {loop}"
    if client_name() == "wrk":
        return f"client: wrk ({_wrk_threads()} thread(s)); {aio} for SSE; apart from the servers"
    return f"client: {aio}, one process apart from the servers"


def unary_load(
    request: Request,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    probe: Probe = _no_probe,
) -> UnaryResult:
    """Requests/s and latency of ``concurrency`` back-to-back request loops;
    ``probe`` is called as the measured window opens and closes. Raises
    LoadFailed when a request fails."""
    if client_name() == "wrk":
        return _wrk_load(request, concurrency, duration, warmup, probe)
    return _run(_aiohttp_load, request, concurrency, duration, warmup, probe)


def sse_load(
    request: Request, *, expect: int, repeats: int, probe: Probe = _no_probe
) -> StreamResult:
    """``repeats`` timed SSE requests (after one warm-up), one at a time; each
    must bring ``expect`` data events and then ``event: done``. ``probe`` is
    called before the first and after the last timed request."""
    return _run(_sse_load, request, expect, repeats, probe)


def sse_concurrent_load(
    request: Request, *, streams: int, expect: int, repeats: int, probe: Probe = _no_probe
) -> ConcurrentStreamResult:
    """``repeats`` timed rounds (after one warm-up round) of ``streams`` SSE
    requests sent at once, each over its own connection; every stream must bring
    ``expect`` data events and then ``event: done``. ``probe`` is called before
    the first and after the last timed round."""
    return _run(_sse_concurrent_load, request, streams, expect, repeats, probe)


def _run(func: Callable[..., Awaitable[T]], *args: object) -> T:
    """Run ``func(*args)`` in a fresh event loop (uvloop when installed)."""
    return anyio.run(functools.partial(func, *args), backend_options=procs.event_loop_options())


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- CPU time of server processes, from /proc ---------------------------------


def _label(cmdline: list[str], comm: str) -> str:
    if "anyserve.replica.worker" in cmdline:
        handler = cmdline[cmdline.index("--handler") + 1] if "--handler" in cmdline else "?"
        return f"worker {handler}"
    if "anyserve.replica.forkserver" in cmdline:
        # A worker it forked has the fork server's command line and its own name.
        return "fork server" if comm.startswith("python") else f"worker {comm}"
    if "benchmarks.cluster_proc" in cmdline:
        mode = cmdline[cmdline.index("benchmarks.cluster_proc") + 1]
        return {"all": "api server + replica", "api": "api server"}.get(mode, mode)
    if "benchmarks.bare_chain" in cmdline:
        rest = cmdline[cmdline.index("benchmarks.bare_chain") + 1 :]
        return f"chain {rest[0] if rest else 'gateway'}"
    if "benchmarks.bare_http" in cmdline or "benchmarks.bare_echo" in cmdline:
        return "bare"
    return os.path.basename(cmdline[0]) if cmdline else "?"


def cpu_by_process(pgids: tuple[int, ...]) -> dict[str, float]:
    """Cumulative CPU seconds (user + system) of every live process in ``pgids``,
    by label (``api server``, ``replica``, ``worker echo``, ...)."""
    wanted = set(pgids)
    found: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) not in wanted:  # field 5, pgrp
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        label = _label(cmdline, comm)
        found[label] = found.get(label, 0.0) + seconds
    return found


# -- aiohttp ------------------------------------------------------------------


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
        auto_decompress=False,
    )


async def _aiohttp_load(
    request: Request, concurrency: int, duration: float, warmup: float, probe: Probe
) -> UnaryResult:
    url, body, headers = request.url, request.body, dict(request.headers)
    minimum = request.min_response

    async with _session(concurrency) as session:
        post = session.post

        async def once() -> None:
            async with post(url, data=body, headers=headers) as response:
                data = await response.read()
                if response.status != 200 or len(data) < minimum:
                    raise LoadFailed(
                        f"POST {url} answered {response.status} with {len(data)} bytes"
                        f" (want 200 and at least {minimum}): {data[:300]!r}"
                    )

        try:
            await once()  # connect; fail fast
        except aiohttp.ClientError as exc:
            raise LoadFailed(f"POST {url} failed: {exc!r}") from None
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
                await once()
                finished = clock()
                if begin <= finished <= end:
                    record(finished - started)

        async def mark() -> None:
            await asyncio.sleep(max(0.0, begin - clock()))
            marks.append((_cpu_self(), probe()))
            await asyncio.sleep(max(0.0, end - clock()))
            marks.append((_cpu_self(), probe()))

        tasks = [asyncio.ensure_future(loop()) for _ in range(concurrency)]
        tasks.append(asyncio.ensure_future(mark()))
        try:
            await asyncio.gather(*tasks)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise LoadFailed(f"POST {url} failed: {exc!r}") from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    (cpu0, probe0), (cpu1, probe1) = marks
    return UnaryResult(
        len(latencies),
        duration,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.99) * 1000,
        cpu1 - cpu0,
        _delta(probe1, probe0),
    )


def _sse_events(buffer: bytearray) -> tuple[list[bytes], bytearray]:
    """Split complete events (blank-line separated) off the front of ``buffer``."""
    if b"\r" in buffer:
        buffer = bytearray(buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    *events, rest = bytes(buffer).split(b"\n\n")
    return events, bytearray(rest)


async def _sse_once(session: aiohttp.ClientSession, request: Request) -> tuple[int, float, float]:
    """(data events, seconds to ``event: done``, seconds to the first event)."""
    clock = time.perf_counter
    started = clock()
    first = 0.0
    count = 0
    buffer = bytearray()
    async with session.post(request.url, data=request.body, headers=dict(request.headers)) as r:
        if r.status != 200:
            raise LoadFailed(f"POST {request.url} answered {r.status}: {await r.read()!r}")
        async for chunk in r.content.iter_any():
            buffer += chunk
            events, buffer = _sse_events(buffer)
            for event in events:
                lines = event.split(b"\n")
                if b"event: done" in lines:
                    return count, clock() - started, first - started
                if any(line.startswith(b"event: error") for line in lines):
                    raise LoadFailed(f"stream from {request.url} failed: {event[:300]!r}")
                if any(line.startswith(b"data:") for line in lines):
                    if not count:
                        first = clock()
                    count += 1
    raise LoadFailed(f"stream from {request.url} ended after {count} events without done")


async def _sse_load(request: Request, expect: int, repeats: int, probe: Probe) -> StreamResult:
    rates: list[float] = []
    firsts: list[float] = []
    async with _session(1) as session:
        cpu_start, probe_start = 0.0, {}
        for attempt in range(repeats + 1):
            if attempt == 1:
                cpu_start, probe_start = _cpu_self(), probe()
            try:
                count, elapsed, first = await _sse_once(session, request)
            except aiohttp.ClientError as exc:
                raise LoadFailed(f"POST {request.url} failed: {exc!r}") from None
            if count != expect:
                raise LoadFailed(f"stream from {request.url} brought {count} events, not {expect}")
            if attempt:  # the first request warms up
                rates.append(count / elapsed)
                firsts.append(first * 1000)
        cpu_end, probe_end = _cpu_self(), probe()
    return StreamResult(
        rates, firsts, expect * repeats, cpu_end - cpu_start, _delta(probe_end, probe_start)
    )


async def _sse_concurrent_load(
    request: Request, streams: int, expect: int, repeats: int, probe: Probe
) -> ConcurrentStreamResult:
    firsts: list[float] = []
    events = 0
    seconds = 0.0
    clock = time.perf_counter
    async with _session(streams) as session:
        cpu_start, probe_start = 0.0, {}
        for attempt in range(repeats + 1):
            if attempt == 1:
                cpu_start, probe_start = _cpu_self(), probe()
            started = clock()
            tasks = [asyncio.ensure_future(_sse_once(session, request)) for _ in range(streams)]
            try:
                results = await asyncio.gather(*tasks)
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise LoadFailed(f"POST {request.url} failed: {exc!r}") from None
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            elapsed = clock() - started
            counts = [count for count, _, _ in results]
            if any(count != expect for count in counts):
                raise LoadFailed(
                    f"streams from {request.url} brought {counts} events, not {expect} each"
                )
            if attempt:  # the first round warms up (and opens the connections)
                events += sum(counts)
                seconds += elapsed
                firsts.extend(first * 1000 for _, _, first in results)
        cpu_end, probe_end = _cpu_self(), probe()
    return ConcurrentStreamResult(
        firsts, events, seconds, cpu_end - cpu_start, _delta(probe_end, probe_start)
    )


# -- wrk ----------------------------------------------------------------------

_WRK_SCRIPT = """\
wrk.method = "POST"
{headers}
local f = assert(io.open({body}, "rb"))
wrk.body = f:read("*a")
f:close()
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise LoadFailed(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _wrk_run(
    script: Path, url: str, concurrency: int, seconds: int
) -> tuple[int, float, float, float]:
    threads = min(_wrk_threads(), concurrency)
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency"]
    cmd += ["--timeout", f"{int(CALL_TIMEOUT)}s", "-s", str(script), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = done.stdout
    if done.returncode != 0:
        raise LoadFailed(f"wrk exited with {done.returncode}: {done.stderr.strip() or out}")
    for problem in (r"Non-2xx or 3xx responses: \d+", r"Socket errors: .*"):
        found = re.search(problem, out)
        if found:
            raise LoadFailed(f"wrk against {url}: {found.group(0)}")
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    if not (total and p50 and p99):
        raise LoadFailed(f"cannot read wrk's output:\n{out}")
    elapsed = float(total.group(2)) * _UNITS[total.group(3)] / 1000
    return int(total.group(1)), elapsed, _wrk_ms(p50.group(1)), _wrk_ms(p99.group(1))


def _wrk_load(
    request: Request, concurrency: int, duration: float, warmup: float, probe: Probe
) -> UnaryResult:
    # wrk cannot check body sizes; one aiohttp request first checks the answer.
    _run(_aiohttp_load, request, 1, 0.0, 0.0, _no_probe)
    with tempfile.TemporaryDirectory(prefix="anyserve-wrk-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(request.body)
        headers = "\n".join(
            f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in request.headers.items()
        )
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_SCRIPT.format(headers=headers, body=_lua_string(str(body))))
        if warmup > 0:
            _wrk_run(script, request.url, concurrency, max(1, round(warmup)))
        cpu, probed = _cpu_children(), probe()
        requests, elapsed, p50, p99 = _wrk_run(
            script, request.url, concurrency, max(1, round(duration))
        )
        cpu_end, probed_end = _cpu_children(), probe()
    return UnaryResult(requests, elapsed, p50, p99, cpu_end - cpu, _delta(probed_end, probed))
