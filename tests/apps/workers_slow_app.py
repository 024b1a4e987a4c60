"""One slow capability for the draining test in tests/test_workers.py.

``slow`` waits for a gate file named by its input (if any) before answering,
so a test holds calls in flight for exactly as long as it wants (no sleeps).
"""

from __future__ import annotations

from pathlib import Path

import anyio

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("slow")


@app.capability(type="slow")
async def slow(request: ModelInferRequest, context: Context) -> str:
    gate = codec.input_text(request, "text_input") if request.inputs else ""
    if gate:
        with anyio.fail_after(30):
            while not Path(gate).exists():
                await anyio.sleep(0.01)
    return "slow"
