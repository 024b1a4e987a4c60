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

import json
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
    fast = _text_response_json(response)
    if fast is not None:
        return fast
    check_raw_count(response)
    doc = response_head(response)
    doc["outputs"] = [output_json(response, index) for index in range(len(response.outputs))]
    return encode_json(doc).encode("utf-8")


# The generic encoder's string form (ensure_ascii, C-accelerated).
_string = json.encoder.encode_basestring_ascii
_BOOL = {True: "true", False: "false"}


def _text_response_json(response: ModelInferResponse) -> bytes | None:
    """What :func:`response_to_json` makes, built directly as text for the
    commonest answer (every output BYTES of UTF-8 text in typed contents, no
    tensor parameters, response parameters of strings, integers or booleans:
    a token of a stream, an echo), byte for byte the generic encoder's; None
    for any other response. A streamed token then costs no dicts and no
    generic encoder walk (a third of the API server's time on a stream)."""
    if response.raw_output_contents:
        return None
    parts = ['{"model_name":', _string(response.model_name)]
    if response.model_version:
        parts += [',"model_version":', _string(response.model_version)]
    parts += [',"id":', _string(response.id)]
    if response.parameters:
        fields = []
        for key, param in response.parameters.items():
            choice = param.WhichOneof("parameter_choice")
            if choice is None:
                continue
            value = getattr(param, choice)
            if choice == "string_param":
                text = _string(value)
            elif choice == "bool_param":
                text = _BOOL[value]
            elif choice == "double_param":
                return None  # NaN, infinities and float forms: the generic encoder's
            else:
                text = str(value)
            fields.append(f"{_string(key)}:{text}")
        parts += [',"parameters":{', ",".join(fields), "}"]
    sep = ',"outputs":['
    for tensor in response.outputs:
        if tensor.datatype != "BYTES" or tensor.parameters:
            return None
        try:
            items = [_string(item.decode("utf-8")) for item in tensor.contents.bytes_contents]
        except UnicodeDecodeError:
            return None  # base64, flagged by a parameter: the generic path
        shape = ",".join([str(d) for d in tensor.shape])
        parts += [sep, '{"name":', _string(tensor.name), ',"datatype":"BYTES","shape":[', shape]
        parts += ['],"data":[', ",".join(items), "]}"]
        sep = ","
    parts.append("]}" if sep == "," else ',"outputs":[]}')
    return "".join(parts).encode("ascii")


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
