"""Bodies and responses shared by the codec's JSON and binary tests."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from anyserve import codec
from anyserve.proto import InferParameter, ModelInferRequest, ModelInferResponse

Output = ModelInferResponse.InferOutputTensor


def body_of(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def one_input(datatype: str, data: Any, shape: list[int], **extra: Any) -> bytes:
    tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": data, **extra}
    return body_of({"inputs": [tensor]})


def serialized(values: list[bytes]) -> bytes:
    out = serialize_byte_tensor(np.array(values, dtype=object))
    return bytes(out.item() if out.dtype == object else out.tobytes())


def sample_response() -> ModelInferResponse:
    """A response with typed outputs of several datatypes (the matrix is an
    encoded tensor: a bare numpy array would make the whole response raw)."""
    response = codec.to_infer_response(
        {
            "text": "héllo",
            "blob": [b"ok", b"\xff\x00"],
            "matrix": codec.encode_output("matrix", np.arange(6, dtype=np.float32).reshape(2, 3)),
            "flags": [True, False],
            "count": 3,
        },
        ModelInferRequest(id="r9", model_name="m"),
    )
    response.model_version = "2"
    response.parameters["seq"].CopyFrom(InferParameter(int64_param=5))
    return response


EXPECTED_OUTPUTS: list[dict[str, Any]] = [
    {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
    {
        "name": "blob",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"content_encoding": "base64"},
        "data": [base64.b64encode(b"ok").decode(), base64.b64encode(b"\xff\x00").decode()],
    },
    {"name": "matrix", "datatype": "FP32", "shape": [2, 3], "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
    {"name": "flags", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    {"name": "count", "datatype": "INT64", "shape": [1], "data": [3]},
]


def numpy_response() -> ModelInferResponse:
    """A handler's result with an FP32 [2, 3] numpy array: raw outputs."""
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3) / 2
    return codec.to_infer_response({"matrix": matrix, "label": "x"}, ModelInferRequest(id="np"))


NUMPY_MATRIX = [[0.0, 0.5, 1.0], [1.5, 2.0, 2.5]]


def plain(value: Any) -> Any:
    """A decoded value, or a dict of them, with numpy arrays as (nested) lists,
    so that decoded results compare with ``==``."""
    if isinstance(value, dict):
        return {name: plain(item) for name, item in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value
