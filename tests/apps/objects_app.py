"""Handlers that use the object store and call other capabilities (issue: objects)."""

from __future__ import annotations

from typing import Any

import anyserve
from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest, ModelInferResponse

app = AnyServe("objects")


@app.capability(type="store", style="seed")
def store_seed(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    """Seed style: module-level anyserve.objects and anyserve.call in a sync handler."""
    text = codec.input_text(request, "text")
    ref = anyserve.objects.create({"text": text, "words": text.split()})
    result: ModelInferResponse = anyserve.call(capability={"type": "read"}, inputs={"ref": ref})
    result.outputs.append(codec.encode_output("ref", ref))
    return result


@app.capability(type="store", style="async")
async def store_async(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    data = codec.decode_input(request, "blob")
    ref = await context.objects.create(data)
    assert await context.objects.exists(ref)
    result: ModelInferResponse = await context.call({"type": "read"}, {"ref": ref})
    result.outputs.append(codec.encode_output("ref", ref))
    return result


@app.capability(type="read")
async def read(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    """Reads the object named by the `ref` input (which came over the network)."""
    data = await context.objects.get(codec.decode_input(request, "ref"))
    if isinstance(data, dict):
        return {"text": data["text"], "count": len(data["words"]), "replica": context.replica_id}
    return {"size": len(data), "kind": type(data).__name__, "replica": context.replica_id}


@app.capability(type="stream-call")
async def stream_call(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    chunks = [
        codec.decode_outputs(chunk)["text_output"]
        async for chunk in context.call_stream({"type": "words"}, {"text": "one two three"})
    ]
    return {"text_output": b"|".join(chunks)}


@app.capability(type="words", stream=True)
async def words(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    for word in codec.input_text(request, "text").split():
        yield word


@app.capability(type="cycle", step="a")
async def cycle_a(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    response: ModelInferResponse = await context.call({"type": "cycle", "step": "b"}, {"x": 1})
    return response


@app.capability(type="cycle", step="b")
def cycle_b(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    response: ModelInferResponse = context.call({"type": "cycle", "step": "a"}, {"x": 2})
    return response
