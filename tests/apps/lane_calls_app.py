"""Two apps for tests/test_lane_calls.py: ``outer``'s handlers call ``inner``'s
through the API server (``context.call`` and ``context.call_stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

outer = AnyServe("lane_outer")
inner = AnyServe("lane_inner")


def _text(request: ModelInferRequest) -> str:
    return codec.input_text(request, "text_input")


@outer.capability(type="relay")
async def relay(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    answer = await context.call({"type": "inner"}, {"text_input": _text(request)})
    return {"text_output": codec.decode_outputs(answer)["text_output"]}


@outer.capability(type="relay_stream", stream=True)
async def relay_stream(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    async for chunk in context.call_stream({"type": "ticks"}, {"text_input": _text(request)}):
        yield codec.decode_outputs(chunk)["text_output"].decode()


@inner.capability(type="inner")
async def inner_handler(request: ModelInferRequest, context: Context) -> str:
    text = _text(request)
    if text.startswith("/"):  # a marker path: hang until cancelled
        marker = Path(text)
        marker.write_text("running")
        try:
            await anyio.sleep_forever()
        finally:
            marker.with_suffix(".stopped").write_text("cancelled")
    return f"inner:{text}"


@inner.capability(type="ticks", stream=True)
async def ticks(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    for n in range(3):
        yield f"{_text(request)}-{n}"
