"""Cold start of an on-demand (``preload=False``) capability against a warm request.

A replica runs in this process (its workers are real processes) serving the
trivial ``type=coldstart`` handler defined below. Each repetition stops the
handler's worker through the manager, then times one request from the moment
it is sent until its answer arrives: the replica starts a fresh worker process
(interpreter, imports, the app, hello on the socket), waits for it, and runs
the call. Warm requests to the running worker are timed alongside.

For context, the last row times what no framework can avoid: a fresh
interpreter importing the worker module (``python -c "import
anyserve.replica.worker"``).

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


async def _measure(repeats: int) -> tuple[list[float], list[float]]:
    from anyserve import codec
    from anyserve.replica.slot import State
    from anyserve.testing import GrpcClient, start_replica

    request = ModelInferRequest(id="bench")
    capability = {"type": "coldstart"}
    cold: list[float] = []
    warm: list[float] = []
    async with start_replica(APP, log_level="warning") as replica:
        manager = replica.manager
        assert manager is not None
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

    from anyserve.replica.worker import event_loop_options

    # The floor first: before gRPC has threads running in this process.
    floor = _interpreter_import_ms(REPEATS)
    cold, warm = anyio.run(_measure, REPEATS, backend_options=event_loop_options())
    overhead = statistics.median(cold) - statistics.median(warm)
    return [
        _row(
            "cold: request sent -> answer (worker started on demand)",
            cold,
            f"start cost ~{overhead:.0f} ms over warm",
        ),
        _row("warm: request sent -> answer", warm),
        _row("floor: fresh interpreter importing the worker module", floor, "no serving"),
    ]


if __name__ == "__main__":
    from benchmarks.__main__ import format_table

    print(format_table(run()))
