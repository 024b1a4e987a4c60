"""The app :mod:`benchmarks.bench_memory` serves: one trivial handler (so one
worker process) and nothing else at its top level, so that the worker's memory
is anyserve's own."""

from __future__ import annotations

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

app = AnyServe("idle")


@app.capability(type="idle")
async def idle(request: ModelInferRequest, context: Context) -> str:
    return "ok"
