"""Triton's generate extension: flat JSON requests and responses.

A request is one JSON object whose keys are the inputs (plus ``id`` and
``parameters``); a response is ``{"model_name", "model_version"?, "id"?,
<output>: value, ...}``. Used by ``/v2/models/{name}/generate`` and, one
response per SSE event, ``/generate_stream``.
"""

from __future__ import annotations

from typing import Any

from anyserve.codec.json_tensors import (
    check_raw_count,
    client_text,
    encode_json,
    jtype,
    load_object,
    output_values,
    set_params,
)
from anyserve.codec.values import encode_into
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = ["generate_request", "generate_response_json"]


@client_text
def generate_request(body: bytes, model_name: str) -> ModelInferRequest:
    """Parse a Triton generate request (flat JSON object) into a ModelInferRequest.

    ``id`` and ``parameters`` are the request's; every other key is an input:
    strings -> BYTES [1], booleans -> BOOL [1], integers -> INT64 [1], other
    numbers -> FP64 [1], arrays of one kind -> shape [n]. Raises InvalidArgument
    for malformed JSON, nulls, objects and nested or mixed arrays.
    """
    doc = load_object(body, "generate request body")
    request = ModelInferRequest(model_name=model_name)
    for key, value in doc.items():
        if key == "id":
            if not isinstance(value, str):
                raise InvalidArgument(f"'id' must be a string, not {jtype(value)}")
            request.id = value
        elif key == "parameters":
            set_params(request.parameters, value, "request parameters")
        elif value is None or isinstance(value, dict):
            raise InvalidArgument(f"input {key!r} is {jtype(value)}; expected a scalar or array")
        else:
            try:
                encode_into(request.inputs.add(), key, value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(str(exc)) from None
    return request


def generate_response_json(response: ModelInferResponse) -> bytes:
    """Render a response in Triton's flat generate form.

    ``{"model_name", "model_version"?, "id"?, <output>: value, ...}``: a
    one-element output becomes a scalar, others a list; BYTES are decoded as
    UTF-8 (invalid sequences replaced: this format has no way to flag base64).
    An output named like a metadata key overrides it. Raises HandlerError for a
    malformed response.
    """
    check_raw_count(response)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    if response.id:
        doc["id"] = response.id
    for index, tensor in enumerate(response.outputs):
        values = output_values(response, index)
        if tensor.datatype == "BYTES":
            values = [item.decode("utf-8", "replace") for item in values]
        doc[tensor.name] = values[0] if len(values) == 1 else values
    return encode_json(doc).encode("utf-8")
