"""Capabilities for the worker-management tests (tests/test_workers.py).

``a`` and ``b`` each need the replica's one GPU: serving one means stopping the
other (switching); ``huge`` needs two, more than any test replica has. Only
``a`` starts at boot. Every handler waits for a gate
file named by its input (if any) before answering, so a test holds calls in
flight for exactly as long as it wants (no sleeps): the file appearing
releases them.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("workers")


async def _gated(request: ModelInferRequest, context: Context, answer: str) -> dict[str, object]:
    gate = codec.input_text(request, "text_input") if request.inputs else ""
    if gate:
        with anyio.fail_after(30):
            while not Path(gate).exists():
                await anyio.sleep(0.01)
    return {"text_output": answer, "pid": os.getpid()}


@app.capability(type="a", resources={"gpu": 1})
async def a(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return await _gated(request, context, "a")


@app.capability(type="b", resources={"gpu": 1}, preload=False)
async def b(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return await _gated(request, context, "b")


@app.capability(type="huge", resources={"gpu": 2}, preload=False)
async def huge(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return await _gated(request, context, "huge")  # never runs on a one-GPU replica
