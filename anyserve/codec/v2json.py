"""KServe v2 REST JSON documents <-> protobuf, for requests and responses.

The API server parses request JSON (:func:`request_from_json`) and renders
response JSON (:func:`response_to_json`); :func:`response_from_json` is the
one parser of response JSON, for whoever holds some (tests, tools, clients of
a JSON endpoint). Tensors are read and written by
:mod:`anyserve.codec.json_tensors`; :mod:`anyserve.codec.binary` reuses the
document parsers for the JSON header of Triton's binary tensor data extension.

A malformed request raises :class:`~anyserve.errors.InvalidArgument` saying
what is wrong; a response that cannot be rendered or parsed (a handler or
server bug) raises :class:`~anyserve.errors.HandlerError`.
"""

from __future__ import annotations

from typing import Any

from anyserve.codec.json_tensors import (
    Pending,
    check_raw_count,
    client_text,
    encode_json,
    fill_typed,
    jtype,
    load_object,
    output_json,
    params_json,
    parse_tensors,
    set_params,
    string_field,
)
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = [
    "parse_request_doc",
    "parse_response_doc",
    "request_from_json",
    "response_from_json",
    "response_head",
    "response_to_json",
]


# --------------------------------------------------------------------------- requests


def parse_request_doc(
    doc: dict[str, Any], model_name: str = ""
) -> tuple[ModelInferRequest, list[Pending]]:
    """Parse a request document, leaving each input's data pending.

    The URL's ``model_name`` wins when given, else the body's (``/infer``
    bodies may carry one; KServe v2 puts it in the URL only).
    """
    in_body = string_field(doc, "model_name")
    request = ModelInferRequest(model_name=model_name or in_body)
    request.id = string_field(doc, "id")
    if doc.get("parameters") is not None:
        set_params(request.parameters, doc["parameters"], "request parameters")
    pending = parse_tensors(doc.get("inputs"), request)
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument(f"'outputs' must be an array, not {jtype(outputs)}")
        for index, item in enumerate(outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidArgument(f"outputs[{index}] must be an object with a 'name' string")
            tensor = request.outputs.add(name=item["name"])
            if item.get("parameters") is not None:
                set_params(tensor.parameters, item["parameters"], f"output {item['name']!r}")
    return request, pending


@client_text
def request_from_json(body: bytes, model_name: str = "") -> ModelInferRequest:
    """Parse a KServe v2 REST inference request (JSON body) into a ModelInferRequest.

    ``data`` may be nested (flattened row-major) or flat; the inputs land in
    the typed contents field of their datatype. ``model_name`` (from the URL)
    wins when given, else the body's ``"model_name"`` is used. Raises
    InvalidArgument for malformed JSON, wrong types, a ``model_name`` that is
    not a string, a missing name/datatype/shape/data, unknown datatypes,
    out-of-range values and element counts that do not fill the shape.
    """
    request, pending = parse_request_doc(load_object(body, "request body"), model_name)
    fill_typed(pending)
    return request


# --------------------------------------------------------------------------- responses


def response_head(response: ModelInferResponse) -> dict[str, Any]:
    """A response document without its outputs (model, version, id, parameters)."""
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = params_json(response.parameters)
    return doc


def response_to_json(response: ModelInferResponse) -> bytes:
    """Render a response as KServe v2 REST JSON (every output with JSON ``data``).

    Outputs are read from typed contents or raw_output_contents; BYTES become
    UTF-8 strings, or base64 with ``"content_encoding": "base64"`` when any
    element is not UTF-8. Raises HandlerError for a malformed response.
    """
    check_raw_count(response)
    doc = response_head(response)
    doc["outputs"] = [output_json(response, index) for index in range(len(response.outputs))]
    return encode_json(doc).encode("utf-8")


def parse_response_doc(doc: dict[str, Any]) -> tuple[ModelInferResponse, list[Pending]]:
    """Parse a response document, leaving each output's data pending.

    Raises InvalidArgument (callers turn it into HandlerError).
    """
    response = ModelInferResponse(model_name=string_field(doc, "model_name"))
    response.model_version = string_field(doc, "model_version")
    response.id = string_field(doc, "id")
    if doc.get("parameters") is not None:
        set_params(response.parameters, doc["parameters"], "response parameters")
    return response, parse_tensors(doc.get("outputs"), response)


def response_from_json(body: bytes | str) -> ModelInferResponse:
    """Parse a KServe v2 REST JSON response into a ModelInferResponse.

    The inverse of :func:`response_to_json`: outputs land in typed contents;
    base64 BYTES (``content_encoding``) are decoded and the parameter dropped.
    Raises HandlerError (``malformed response: ...``) for anything that is not
    a well-formed response.
    """
    try:
        response, pending = parse_response_doc(load_object(body, "response body"))
        fill_typed(pending)
    except InvalidArgument as exc:
        raise HandlerError(f"malformed response: {exc.message}") from None
    return response
