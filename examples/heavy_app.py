"""Scenario 2: a replica with a `heavy` capability that others delegate to."""

from __future__ import annotations

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

app = AnyServe("heavy")


@app.capability(type="heavy")
async def heavy(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return {"text_output": "heavy work done", "replica": context.replica_id}
