"""Dynamic batching: the same costly handler batched and unbatched, through a
real replica, in one run.

The cost model is one device (a GPU, say): a call holds it (a lock in the
worker process) for 5 ms plus 0.1 ms per request it carries (``time.sleep``),
so one call of 32 requests costs 8.2 ms where 32 single calls cost 163 ms.
The replica runs as its own process (``python -m benchmarks.replica_proc
benchmarks.bench_batching:app``, protocol in :mod:`benchmarks.procs`) and serves
this module's ``app``:

* ``type=cost, batched=no``: a plain sync handler, one request per call;
* ``type=cost, batched=yes``: ``max_batch_size=64, batch_timeout=0.004``.

The unbatched handler takes ``max_concurrency=16`` (the replica admits
``max_concurrency x 4`` calls per worker and the load keeps 64 in flight; its
threads queue for the device); the batched one ``max_concurrency=1``, one batch
on the device at a time, as on a real GPU (the replica admits ``max_concurrency
x max_batch_size x 4`` calls), so requests that arrive while it runs form the
next batch. The client is :mod:`benchmarks.load`
(grpc.aio, opaque bytes) straight to the replica's ModelInfer, at concurrency
64 and 1, the two variants alternating. Targets: batched requests/s at c=64 at
least 8x unbatched, and batched p50 at c=1 at most 2x unbatched (a lone request
waits up to ``batch_timeout`` for company). ``ANYSERVE_BENCH_DURATION`` (seconds
measured per figure and variant, default 4) and ``ANYSERVE_BENCH_WARMUP``
change the run time.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import anyio

from anyserve import AnyServe
from anyserve.proto import InferParameter, ModelInferRequest

TITLE = "dynamic batching: 5 ms + 0.1 ms/request handler, batched vs unbatched, same run"
APP = "benchmarks.bench_batching:app"
DURATION = float(os.environ.get("ANYSERVE_BENCH_DURATION", "4"))
WARMUP = float(os.environ.get("ANYSERVE_BENCH_WARMUP", "0.5"))
ROUNDS = 2
PER_CALL = 0.005
PER_ITEM = 0.0001
MAX_BATCH = 64
BATCH_TIMEOUT = 0.004
CONCURRENCIES = (64, 1)
TARGET_THROUGHPUT = 8.0  # batched / unbatched requests/s at c=64, at least
TARGET_LATENCY = 2.0  # batched / unbatched p50 at c=1, at most
VARIANTS = ("unbatched", "batched")
METADATA = {
    "unbatched": (("x-capability-type", "cost"), ("x-capability-batched", "no")),
    "batched": (("x-capability-type", "cost"), ("x-capability-batched", "yes")),
}

# --------------------------------------------------------------------------- the app

app = AnyServe("bench-batching")
_device = threading.Lock()
_counts = {"batches": 0, "requests": 0}


def _occupy_device(requests: int) -> None:
    with _device:
        time.sleep(PER_CALL + PER_ITEM * requests)


@app.capability(type="cost", batched="no", max_concurrency=16)
def unbatched(request: ModelInferRequest) -> str:
    _occupy_device(1)
    return "ok"


@app.capability(
    type="cost",
    batched="yes",
    max_batch_size=MAX_BATCH,
    batch_timeout=BATCH_TIMEOUT,
    max_concurrency=1,
)
def batched(requests: list[ModelInferRequest]) -> list[Any]:
    if any("counts" in r.parameters for r in requests):  # the benchmark asks
        return [dict(_counts) for _ in requests]
    _occupy_device(len(requests))
    with _device:
        _counts["batches"] += 1
        _counts["requests"] += len(requests)
    return ["ok"] * len(requests)


# --------------------------------------------------------------------------- measuring


class BenchFailed(RuntimeError):
    """A call failed during the benchmark (the message says which)."""


def _payload(counts: bool = False) -> bytes:
    request = ModelInferRequest(model_name="cost", id="bench")
    request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    if counts:
        request.parameters["counts"].CopyFrom(InferParameter(bool_param=True))
    return request.SerializeToString()


async def _counts_of(endpoint: str) -> tuple[int, int]:
    """(batches, requests) the batched handler has run so far."""
    from anyserve import codec
    from anyserve.testing import GrpcClient

    async with GrpcClient(endpoint) as client:
        request = ModelInferRequest.FromString(_payload(counts=True))
        answer = codec.decode_outputs(
            await client.infer(request, capability={"type": "cost", "batched": "yes"})
        )
    # INT64 [1] outputs: arrays of one element
    return int(answer["batches"][0]), int(answer["requests"][0])


async def _measure(endpoint: str) -> list[dict[str, Any]]:
    from benchmarks import load

    payload = _payload()
    results: dict[tuple[str, int], load.UnaryResult] = {}
    sizes: dict[int, float] = {}
    for concurrency in CONCURRENCIES:
        windows: dict[str, list[load.UnaryResult]] = {v: [] for v in VARIANTS}
        batches_before, requests_before = await _counts_of(endpoint)
        for round_no in range(ROUNDS):
            for variant in VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]:
                try:
                    result = await load.unary_load(
                        endpoint,
                        payload,
                        METADATA[variant],
                        concurrency=concurrency,
                        duration=DURATION / ROUNDS,
                        warmup=WARMUP,
                    )
                except load.LoadFailed as exc:
                    raise BenchFailed(f"{variant}, c={concurrency}: {exc}") from None
                windows[variant].append(result)
        batches_after, requests_after = await _counts_of(endpoint)
        sizes[concurrency] = (requests_after - requests_before) / max(
            1, batches_after - batches_before
        )
        for variant, found in windows.items():
            results[variant, concurrency] = load.UnaryResult.merge(found)
    return _rows(results, sizes)


def _row(metric: str, unbatched: float, batched: float, note: str = "") -> dict[str, Any]:
    return {
        "metric": metric,
        "unbatched": unbatched,
        "batched": batched,
        "batched/unbatched": batched / unbatched if unbatched else float("nan"),
        "note": note,
    }


def _rows(results: dict[tuple[str, int], Any], sizes: dict[int, float]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for concurrency in CONCURRENCIES:
        u, b = results["unbatched", concurrency], results["batched", concurrency]
        rps_note = p50_note = ""
        if concurrency == 64:
            met = b.rps >= TARGET_THROUGHPUT * u.rps
            rps_note = f"target >= {TARGET_THROUGHPUT:.0f}x: {'met' if met else 'NOT met'}"
        if concurrency == 1:
            met = b.p50_ms <= TARGET_LATENCY * u.p50_ms
            p50_note = f"target <= {TARGET_LATENCY:.0f}x: {'met' if met else 'NOT met'}"
        rows.append(_row(f"c={concurrency} requests/s", u.rps, b.rps, rps_note))
        rows.append(_row(f"c={concurrency} p50 ms", u.p50_ms, b.p50_ms, p50_note))
        rows.append(_row(f"c={concurrency} p99 ms", u.p99_ms, b.p99_ms, "lower is better"))
        rows.append(
            _row(f"c={concurrency} requests per call", 1.0, sizes[concurrency], "mean batch size")
        )
    return rows


def run() -> list[dict[str, Any]]:
    """Start the replica, measure both variants, stop it; one row per figure."""
    from benchmarks import procs

    with procs.ServerProcess("benchmarks.replica_proc", APP) as replica:
        rows: list[dict[str, Any]] = anyio.run(
            _measure, replica.endpoint, backend_options=procs.event_loop_options()
        )
    return rows
