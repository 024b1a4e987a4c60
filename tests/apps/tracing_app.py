"""Two apps for tests/test_tracing.py, served by two replicas: ``front``'s
handler calls ``back``'s through the API server (``context.call``), and both
answer with the ``context.trace_id`` they saw."""

from __future__ import annotations

from typing import Any

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

front = AnyServe("tracing_front")
back = AnyServe("tracing_back")


@front.capability(type="front")
async def front_handler(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    answer = codec.decode_outputs(await context.call({"type": "back"}, {"x": 1}))
    return {"front_trace": context.trace_id, "back_trace": answer["back_trace"]}


@back.capability(type="back")
def back_handler(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    # A sync handler (its own thread): context.trace_id works there too.
    return {"back_trace": context.trace_id}
