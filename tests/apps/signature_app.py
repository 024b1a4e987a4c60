"""Declared tensor signatures, for tests/test_signatures.py.

* ``type=classify, model=classifier``: a numpy-free FP32 classifier declaring
  ``x`` FP32 [-1, 4] -> ``probs`` FP32 [-1, 3], ``max_batch_size=4`` and two
  workers. ``probs`` is the softmax of ``[x0, x1, x2 + x3]`` per row. It takes
  one request or, once dynamic batching hands it one, a list of requests.
* ``type=echo``: no declaration; answers ``described``: each input's name,
  datatype, shape and values.
* ``type=lazy``: ``preload=False``, so it is registered as loadable only.
"""

from __future__ import annotations

import math
from typing import Any

from anyserve import AnyServe, Tensor, codec
from anyserve.proto import InferTensorContents, ModelInferRequest, ModelInferResponse

app = AnyServe("signature_app")


def scores(row: list[float]) -> list[float]:
    """The classifier's probabilities for one row of 4 features."""
    logits = [row[0], row[1], row[2] + row[3]]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def classify_one(request: ModelInferRequest) -> ModelInferResponse:
    x = codec.decode_inputs(request)["x"]  # FP32 [n, 4]: a float32 array of shape (n, 4)
    rows = [[float(v) for v in row] for row in x]
    probs = [p for row in rows for p in scores(row)]
    return ModelInferResponse(
        model_name="classifier",
        id=request.id,
        outputs=[
            ModelInferResponse.InferOutputTensor(
                name="probs",
                datatype="FP32",
                shape=[len(rows), 3],
                contents=InferTensorContents(fp32_contents=probs),
            )
        ],
    )


@app.capability(
    type="classify",
    model="classifier",
    inputs=[Tensor("x", "FP32", [-1, 4])],
    outputs=[Tensor("probs", "FP32", [-1, 3])],
    max_batch_size=4,
    workers=2,
)
def classify(request: Any, context: Any) -> Any:
    if isinstance(request, list):  # a dynamic batch
        return [classify_one(r) for r in request]
    return classify_one(request)


@app.capability(type="echo")
def echo(request: ModelInferRequest, context: Any) -> dict[str, Any]:
    """What arrived: ``name:DATATYPE[shape]=values`` for each input."""
    values = codec.decode_inputs(request)
    return {
        "described": " ".join(
            f"{t.name}:{t.datatype}{list(t.shape)}={plain(values[t.name])!r}"
            for t in request.inputs
        )
    }


def plain(value: Any) -> Any:
    """A decoded value with numpy arrays as (nested) lists, shape kept."""
    return value.tolist() if hasattr(value, "tolist") else value


@app.capability(type="lazy", preload=False)
def lazy(request: ModelInferRequest, context: Any) -> str:
    return "awake"
