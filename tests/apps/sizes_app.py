"""Handlers whose requests and answers are as large as a test asks (frame limits)."""

from __future__ import annotations

import os
from typing import Any

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("sizes")


@app.capability(type="sized")
def sized(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    """Answers ``n`` bytes (input ``n``), plus the size of what it was sent."""
    inputs = codec.decode_inputs(request)
    blob = inputs.get("blob", b"")
    return {"blob": b"x" * int(inputs["n"][0]), "got": len(blob), "pid": os.getpid()}


@app.capability(type="sized", stream=True)
async def sized_stream(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    """One small chunk, then one of ``n`` bytes, then a small one."""
    n = int(codec.decode_inputs(request)["n"][0])
    yield {"blob": b"a"}
    yield {"blob": b"x" * n}
    yield {"blob": b"z"}
