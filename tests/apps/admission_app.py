"""Handlers for the admission tests in tests/test_admission.py.

``echo`` is a sync handler with the default settings that takes 5 ms (so
calls pile up behind its eight threads); ``gated`` runs one
call at a time, holds two more and waits for a gate file named by its input
(no sleeps in the tests); ``paced`` runs one call at a time for the number of
seconds its input says, so the replica learns its speed.
"""

from __future__ import annotations

import time
from pathlib import Path

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("admission")


@app.capability(type="echo")
def echo(request: ModelInferRequest, context: Context) -> str:
    time.sleep(0.005)
    return codec.input_text(request, "text_input")


@app.capability(type="gated", max_concurrency=1, max_queue=2)
def gated(request: ModelInferRequest, context: Context) -> str:
    gate = Path(codec.input_text(request, "text_input"))
    deadline = time.monotonic() + 30
    while not gate.exists() and not context.cancelled and time.monotonic() < deadline:
        time.sleep(0.005)
    return "passed"


@app.capability(type="paced", max_concurrency=1)
def paced(request: ModelInferRequest, context: Context) -> str:
    time.sleep(float(codec.input_text(request, "text_input")))
    return "done"
