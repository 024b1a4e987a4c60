"""Scenario 3: a chat replica that hands data to the embed replica by reference.

The handler computes an intermediate result, puts it in the shared object store
and calls the `embed` capability with only the reference; the embed replica
reads the object from the same directory. Sync style (module-level
``anyserve.objects`` / ``anyserve.call`` work too).
"""

from __future__ import annotations

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest, ModelInferResponse

app = AnyServe("pipeline")


def compute_embedding(text: str) -> list[float]:
    return [float(len(word)) for word in text.split()] or [0.0]


@app.capability(type="chat", model="pipeline")
def chat_handler(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    embedding = compute_embedding(codec.input_text(request, "text"))
    obj_ref = context.objects.create(embedding)

    result: ModelInferResponse = context.call(
        capability={"type": "embed"},
        inputs={"embedding": obj_ref},
    )
    result.outputs.append(codec.encode_output("object_ref", obj_ref))
    return result
