"""Idle resident memory of API server + replica + one worker, started as a user does.

``anyserve api-server`` and ``anyserve start`` (:mod:`benchmarks.idle_app`: one
trivial handler, so one worker process) run as separate processes from the command
line; once one request has been served through them, they are left idle for
``ANYSERVE_BENCH_SETTLE`` seconds (default 2) and each one's ``/proc/PID/status``
is read: ``VmRSS`` (resident), split into anonymous memory (the Python heap,
objects, C allocations) and file-backed pages (shared libraries and extension
modules, which the processes share on the machine but each counts in full).

The target, from the performance issue: the three together within 150 MiB.
For context, the last row is a bare interpreter that has imported asyncio (what
no anyserve process can go below).

Run: ``python -m benchmarks memory`` or ``python -m benchmarks.bench_memory``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TITLE = "idle resident memory: API server + replica + one worker (anyserve CLI processes)"
TARGET_MIB = 150.0
SETTLE = float(os.environ.get("ANYSERVE_BENCH_SETTLE", "2"))
APP = "benchmarks.idle_app:app"
IDLE = {"X-Capability-Type": "idle"}
ROOT = Path(__file__).resolve().parent.parent


class BenchFailed(RuntimeError):
    """The system did not start or did not answer (the message says why)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _anyserve(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m anyserve.cli ARGS`` in its own process group, killed with it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "anyserve.cli", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)  # a graceful stop first (workers drained)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` (KiB) and ``Threads`` of ``pid``."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            found[key] = int(value.split()[0])
    return found


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in task.read_text().split()]
    return found


def _wait_served(url: str, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """Poll until one request to the handler has been answered (30 s at most)."""
    import httpx

    deadline, last = time.monotonic() + 30, "no answer"
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    raise BenchFailed(f"exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                answer = http.post("/infer", headers=IDLE, json={"inputs": []})
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:300]}"  # not registered yet
            time.sleep(0.1)
    raise BenchFailed(f"not served within 30 s (last: {last})")


def _row(process: str, status: dict[str, int], note: str = "") -> dict[str, Any]:
    return {
        "process": process,
        "resident MiB": status["VmRSS"] / 1024,
        "anonymous MiB": status["RssAnon"] / 1024,
        "file MiB": status["RssFile"] / 1024,
        "threads": status["Threads"],
        "note": note,
    }


def _floor() -> dict[str, int]:
    code = "import asyncio; print(open('/proc/self/status').read())"
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            found[key] = int(value.split()[0])
    return found


def measure() -> list[dict[str, Any]]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    quiet = ("--log-level", "warning")
    with tempfile.TemporaryDirectory(prefix="anyserve-bench-memory-") as tmp:
        logs = [Path(tmp, "api.log"), Path(tmp, "replica.log")]
        api_args = ("api-server", "--port", str(port), "--grpc-port", "0", *quiet)
        replica_args = ("start", "--app", APP, "--port", "0", "--api-server", url, *quiet)
        objects = ("--object-store", str(Path(tmp, "objects")))
        with (
            _anyserve(*api_args, log=logs[0]) as api,
            _anyserve(*replica_args, *objects, log=logs[1]) as replica,
        ):
            _wait_served(url, [api, replica], logs)
            time.sleep(SETTLE)  # idle: let start-up garbage and buffers go
            workers = _children(replica.pid)
            if len(workers) != 1:
                raise BenchFailed(f"expected one worker process, found {workers}")
            measured = {
                "API server": _status(api.pid),
                "replica": _status(replica.pid),
                "worker": _status(workers[0]),
            }
    rows = [_row(name, status) for name, status in measured.items()]
    total = {k: sum(s[k] for s in measured.values()) for k in ("VmRSS", "RssAnon", "RssFile")}
    verdict = "met" if total["VmRSS"] / 1024 <= TARGET_MIB else "NOT met"
    threads = sum(s["Threads"] for s in measured.values())
    rows.append(_row("total", {**total, "Threads": threads}, f"target {TARGET_MIB:g}: {verdict}"))
    rows.append(_row("floor: python -c 'import asyncio'", _floor(), "no serving"))
    return rows


def run() -> list[dict[str, Any]]:
    """Start the system, measure it idle, stop it."""
    return measure()


if __name__ == "__main__":
    from benchmarks.__main__ import format_table

    print(format_table(run()))
