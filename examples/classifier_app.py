"""Write your first model: a tiny linear classifier in numpy (README walkthrough).

Takes ``x``, FP32 ``[n, 4]`` (n rows of four features), and answers ``probs``,
FP32 ``[n, 3]`` (a probability per class for each row). The declared signature
makes anyserve check every request before the handler runs, lets
``anyserve infer -i x=1,2,3,4`` type its input, and is what tritonclient
reads as the model's metadata and config.

Run it::

    .venv/bin/anyserve run examples.classifier_app:app
"""

from __future__ import annotations

import numpy as np

from anyserve import AnyServe, Context, Tensor, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("classifier")

# The "model": loaded once per worker process, when the module is imported.
WEIGHTS = np.array(
    [[0.5, -0.2, 0.1], [0.3, 0.8, -0.5], [-0.4, 0.1, 0.9], [0.2, -0.3, 0.4]],
    dtype=np.float32,
)
BIAS = np.array([0.1, 0.0, -0.1], dtype=np.float32)


@app.capability(
    type="classify",
    model="classifier",
    inputs=[Tensor("x", "FP32", [-1, 4])],
    outputs=[Tensor("probs", "FP32", [-1, 3])],
)
def classify(request: ModelInferRequest, context: Context) -> dict[str, np.ndarray]:
    x = codec.decode_array(request, "x")  # numpy float32 of shape (n, 4)
    logits = x @ WEIGHTS + BIAS
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)  # softmax: each row sums to 1
    return {"probs": probs}  # a numpy array goes out with its dtype and shape
