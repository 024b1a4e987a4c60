"""Scenario 1 and 3: an embed replica.

Takes ``text`` (a string) or ``embedding`` (an ObjRef to a vector another
replica put in the shared object store) and returns a small embedding summary.
"""

from __future__ import annotations

import math

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("embed")


def embed_text(text: str, dims: int = 8) -> list[float]:
    """A toy deterministic embedding (character histogram, normalised)."""
    vector = [0.0] * dims
    for i, ch in enumerate(text):
        vector[(ord(ch) + i) % dims] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


@app.capability(type="embed")
def embed(request: ModelInferRequest, context: Context) -> dict[str, object]:
    inputs = codec.decode_inputs(request)
    if "embedding" in inputs:
        # Scenario 3: the data comes by reference through the object store.
        vector = context.objects.get(inputs["embedding"])
        source = "object"
    elif "text" in inputs:
        vector = embed_text(inputs["text"].decode())
        source = "text"
    else:
        raise ValueError("send an input named 'text' or 'embedding' (an object reference)")
    return {
        "dims": len(vector),
        "norm": math.sqrt(sum(float(v) * float(v) for v in vector)),
        "source": source,
        "replica": context.replica_id,
    }
