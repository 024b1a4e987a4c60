"""A handler for tests/test_metrics_objects.py: stores its input and reads it back."""

from __future__ import annotations

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("objects-metrics")


@app.capability(type="roundtrip")
async def roundtrip(request: ModelInferRequest, context: Context) -> str:
    """One object created and one read per call."""
    ref = await context.objects.create(codec.input_text(request, "text_input"))
    text: str = await context.objects.get(ref)
    return text
