"""Cold start of an on-demand (``preload=False``) capability against a warm request.

A replica runs in this process (its workers are real processes) serving the
trivial ``type=coldstart`` handler defined below. Each repetition stops the
handler's worker through the manager, then times one request from the moment
it is sent until its answer arrives: the replica starts a new worker process,
waits for its hello, and runs the call. Warm requests to the running worker
are timed alongside.

It runs twice: with the replica's fork server (the default on Linux: the
worker is a fork of a process that has anyserve imported, so only the app's
import and the hello remain; timed once the fork server is ready), and with
``fork_server=False`` (``anyserve start --no-fork-server``: a new interpreter
and all its imports per worker). The last row times what that second way
cannot avoid: a fresh interpreter importing the worker module (``python -c
"import anyserve.replica.worker"``).

``ANYSERVE_BENCH_COLDSTART_REPEATS`` (default 5) sets the cold repetitions;
the median is the figure to quote.

Run: ``python -m benchmarks coldstart`` or ``python -m benchmarks.bench_coldstart``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

TITLE = "cold start of a preload=False capability vs a warm request (in-process replica)"
REPEATS = int(os.environ.get("ANYSERVE_BENCH_COLDSTART_REPEATS", "5"))
WARM_PER_REPEAT = 20
APP = "benchmarks.bench_coldstart:app"
HANDLER = "coldstart"

# The workers import this module: keep its top level light (what it imports
# counts in the cold start).
app = AnyServe("coldstart")


@app.capability(type="coldstart", preload=False)
async def coldstart(request: ModelInferRequest, context: Context) -> str:
    return "ok"


def _row(metric: str, samples_ms: list[float], note: str = "") -> dict[str, Any]:
    return {
        "metric": metric,
        "median ms": statistics.median(samples_ms),
        "min ms": min(samples_ms),
        "max ms": max(samples_ms),
        "n": len(samples_ms),
        "note": note,
    }


async def _measure(repeats: int, fork_server: bool) -> tuple[list[float], list[float]]:
    from anyserve import codec
    from anyserve.replica.slot import State
    from anyserve.testing import GrpcClient, start_replica

    request = ModelInferRequest(id="bench")
    capability = {"type": "coldstart"}
    cold: list[float] = []
    warm: list[float] = []
    options = {"log_level": "warning", "fork_server": fork_server}
    async with start_replica(APP, **options) as replica:
        manager = replica.manager
        # The replica reports started before its fork server is ready (it
        # starts beside the workers): the first request would wait for it.
        if fork_server and await manager.spawner.ready() is None:
            raise RuntimeError("the fork server did not start (see the log)")
        async with GrpcClient(replica.endpoint) as client:
            for _ in range(repeats):
                for slot in manager.slots[HANDLER]:
                    # Not "disable": the next request must start it on demand again.
                    await manager.stop_worker(slot.id, disable=False)
                if any(s.state is not State.STOPPED for s in manager.slots[HANDLER]):
                    raise RuntimeError("the worker did not stop between repetitions")
                started = time.perf_counter()
                response = await client.infer(request, capability=capability, timeout=60)
                cold.append((time.perf_counter() - started) * 1000)
                if codec.decode_outputs(response)["text_output"] != b"ok":
                    raise RuntimeError(f"unexpected answer {response}")
                for _ in range(WARM_PER_REPEAT):
                    started = time.perf_counter()
                    await client.infer(request, capability=capability, timeout=10)
                    warm.append((time.perf_counter() - started) * 1000)
    return cold, warm


def _interpreter_import_ms(repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import anyserve.replica.worker"], check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def run() -> list[dict[str, Any]]:
    """Measure; one row each for cold, warm and the bare interpreter import."""
    import anyio

    from anyserve.replica.spawning import FORK_SERVER_SUPPORTED
    from anyserve.replica.worker import event_loop_options

    # The floor first: before gRPC has threads running in this process.
    floor = _interpreter_import_ms(REPEATS)
    rows = []
    for fork_server in (True, False) if FORK_SERVER_SUPPORTED else (False,):
        how = "forked by the fork server" if fork_server else "a new interpreter"
        options = event_loop_options()
        cold, warm = anyio.run(_measure, REPEATS, fork_server, backend_options=options)
        overhead = statistics.median(cold) - statistics.median(warm)
        rows += [
            _row(
                f"cold: request sent -> answer (worker started on demand, {how})",
                cold,
                f"start cost ~{overhead:.0f} ms over warm",
            ),
            _row(f"warm: request sent -> answer ({how})", warm),
        ]
    floor_row = _row("floor: fresh interpreter importing the worker module", floor, "no serving")
    return [*rows, floor_row]


if __name__ == "__main__":
    from benchmarks.__main__ import format_table

    print(format_table(run()))
