"""HTTP edge formats: KServe v2 REST JSON, Triton's binary tensor data and generate extensions.

JSON exists only here; everything behind the API server speaks protobuf.

* KServe v2 REST: ``{"id","parameters","inputs":[...],"outputs":[...]}`` <-> proto
  (plus the seed's ``"model_name"`` in the body; a name in the URL wins).
* Binary tensor data (Triton): the body is a JSON header of
  ``Inference-Header-Content-Length`` bytes followed by the raw data of every
  input whose parameters give ``binary_data_size``. Outputs are returned the
  same way when asked for with ``binary_data`` (per output) or
  ``binary_data_output`` (request parameter); explicit per-output values win.
* Generate (Triton): a flat JSON object whose keys are the inputs, and a flat
  response of the outputs.

Every malformed body raises :class:`~anyserve.errors.InvalidArgument` saying
what is wrong; a response that cannot be rendered (a handler bug) raises
:class:`~anyserve.errors.HandlerError`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, MutableMapping
from itertools import chain
from math import prod
from typing import Any

from anyserve.codec import DATATYPES, encode_into, pack_raw, spec, unpack_raw
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import InferParameter, ModelInferRequest, ModelInferResponse

__all__ = [
    "HEADER_LENGTH",
    "binary_outputs_requested",
    "generate_request",
    "generate_response_json",
    "parse_header_length",
    "request_from_binary",
    "request_from_json",
    "response_to_http",
    "response_to_json",
]

HEADER_LENGTH = "Inference-Header-Content-Length"

# One encoder for the process: json.dumps(..., separators=...) builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_SMALL_INTS = {"INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1)}
_SMALL_INTS.update({"UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1)})


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _load(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {_jtype(doc)}")
    return doc


def _set_params(target: MutableMapping[str, InferParameter], params: Any, what: str) -> None:
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what} must be an object, not {_jtype(params)}")
    for key, value in params.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if -(2**63) <= value < 2**63:
                param.int64_param = value
            elif 0 <= value < 2**64:
                param.uint64_param = value
            else:
                raise InvalidArgument(f"{what}: parameter {key!r} is out of the 64-bit range")
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidArgument(
                f"{what}: parameter {key!r} is {_jtype(value)}; expected a boolean,"
                " number or string"
            )


def _params_json(params: Mapping[str, InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


# --------------------------------------------------------------------------- requests


def parse_header_length(value: str) -> int:
    """Parse an ``Inference-Header-Content-Length`` header; InvalidArgument if not an int."""
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None


def _flatten(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: 'data' must be an array, not {_jtype(data)}")
    # Row-major flattening one nesting level at a time, in C (chain), not per element.
    while data and isinstance(data[0], list):
        if not all(isinstance(row, list) for row in data):
            raise InvalidArgument(f"{what}: 'data' mixes arrays and scalars at the same depth")
        data = list(chain.from_iterable(data))
    flat: list[Any] = data
    return flat


def _parse_shape(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, list):
        raise InvalidArgument(f"{what} needs a 'shape' array, got {_jtype(shape)}")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidArgument(f"{what}: shape {shape} must hold non-negative integers")
    return shape


def _json_values(datatype: str, flat: list[Any], what: str) -> list[Any]:
    if datatype == "BYTES":
        try:
            return [item.encode("utf-8") for item in flat]
        except AttributeError:
            bad = next(item for item in flat if not isinstance(item, str))
            raise InvalidArgument(
                f"{what}: BYTES data elements must be strings, found {_jtype(bad)}"
            ) from None
    if datatype == "BOOL":
        if not all(item is True or item is False for item in flat):
            raise InvalidArgument(f"{what}: BOOL data elements must be true or false")
        return flat
    bounds = _SMALL_INTS.get(datatype)
    if bounds is not None and flat:
        try:
            fits = bounds[0] <= min(flat) and max(flat) <= bounds[1]
        except TypeError:
            raise InvalidArgument(f"{what}: {datatype} data must be integers") from None
        if not fits:
            raise InvalidArgument(f"{what}: {datatype} data out of range {bounds}")
    return flat


def _parse_input(
    item: Any, index: int, tensor: ModelInferRequest.InferInputTensor
) -> tuple[list[Any] | None, int | None]:
    """Fill name/datatype/shape/parameters; return (flat JSON data, binary_data_size)."""
    if not isinstance(item, dict):
        raise InvalidArgument(f"inputs[{index}] must be an object, not {_jtype(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"inputs[{index}] needs a 'name' (a non-empty string)")
    what = f"input {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{what} needs a 'datatype' string, got {_jtype(datatype)}")
    _, _, size = spec(datatype, what)
    shape = _parse_shape(item.get("shape"), what)
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    params = item.get("parameters")
    binary_size = None
    if params is not None:
        _set_params(tensor.parameters, params, f"{what} parameters")
        if "binary_data_size" in params:
            binary_size = params["binary_data_size"]
            del tensor.parameters["binary_data_size"]  # transport detail, not for the model
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise InvalidArgument(f"{what}: binary_data_size must be a non-negative integer")
    data = item.get("data")
    if binary_size is not None:
        if data is not None:
            raise InvalidArgument(f"{what} has both 'data' and binary_data_size")
        if size and binary_size != prod(shape) * size:
            raise InvalidArgument(
                f"{what}: binary_data_size is {binary_size} bytes but shape {shape} of"
                f" {datatype} needs {prod(shape) * size}"
            )
        return None, binary_size
    if data is None:
        raise InvalidArgument(f"{what} has no 'data' (nor binary_data_size)")
    flat = _flatten(data, what)
    if len(flat) != prod(shape):
        raise InvalidArgument(
            f"{what}: shape {shape} needs {prod(shape)} elements but 'data' has {len(flat)}"
        )
    return _json_values(datatype, flat, what), None


def _model_name(doc: dict[str, Any], model_name: str) -> str:
    # The URL's name wins; else the body's "model_name" (the seed's /infer
    # bodies carry one; KServe v2 puts it in the URL only).
    in_body = doc.get("model_name")
    if in_body is not None and not isinstance(in_body, str):
        raise InvalidArgument(f"'model_name' must be a string, not {_jtype(in_body)}")
    return model_name or in_body or ""


def _parse_request(
    doc: dict[str, Any], model_name: str, body: bytes | None, offset: int
) -> ModelInferRequest:
    request = ModelInferRequest(model_name=_model_name(doc, model_name))
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidArgument(f"'id' must be a string, not {_jtype(request_id)}")
        request.id = request_id
    if doc.get("parameters") is not None:
        _set_params(request.parameters, doc["parameters"], "request parameters")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument(f"request needs an 'inputs' array, got {_jtype(inputs)}")
    parsed = [(request.inputs.add(), item, i) for i, item in enumerate(inputs)]
    found = [(tensor, *_parse_input(item, i, tensor)) for tensor, item, i in parsed]
    binary = any(size is not None for _, _, size in found)
    if binary and body is None:
        raise InvalidArgument(f"binary_data_size used without a {HEADER_LENGTH} header")
    for tensor, flat, size in found:
        if not binary:
            field = DATATYPES[tensor.datatype][0]
            try:
                getattr(tensor.contents, field).extend(flat)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(
                    f"input {tensor.name!r}: data does not fit {tensor.datatype}: {exc}"
                ) from None
        elif size is None:
            # Triton: once one input is raw, every input travels in raw_input_contents.
            assert flat is not None
            request.raw_input_contents.append(
                pack_raw(tensor.datatype, flat, f"input {tensor.name!r}")
            )
        else:
            assert body is not None
            if offset + size > len(body):
                raise InvalidArgument(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the end of"
                    f" the body ({len(body) - offset} bytes left)"
                )
            request.raw_input_contents.append(body[offset : offset + size])
            offset += size
    if body is not None and offset != len(body):
        raise InvalidArgument(f"body has {len(body) - offset} bytes after the last binary input")
    _parse_outputs(request, doc.get("outputs"))
    return request


def _parse_outputs(request: ModelInferRequest, outputs: Any) -> None:
    if outputs is None:
        return
    if not isinstance(outputs, list):
        raise InvalidArgument(f"'outputs' must be an array, not {_jtype(outputs)}")
    for index, item in enumerate(outputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgument(f"outputs[{index}] must be an object with a 'name' string")
        tensor = request.outputs.add(name=item["name"])
        if item.get("parameters") is not None:
            _set_params(tensor.parameters, item["parameters"], f"output {item['name']!r}")


def request_from_json(body: bytes, model_name: str = "") -> ModelInferRequest:
    """Parse a KServe v2 REST inference request (JSON body) into a ModelInferRequest.

    ``data`` may be nested (flattened row-major) or flat; the inputs land in
    the typed contents field of their datatype. ``model_name`` (from the URL)
    wins when given, else the body's ``"model_name"`` is used. Raises
    InvalidArgument for malformed JSON, wrong types, a ``model_name`` that is
    not a string, a missing name/datatype/shape/data, unknown datatypes,
    out-of-range values and element counts that do not fill the shape.
    """
    return _parse_request(_load(body, "request body"), model_name, None, 0)


def request_from_binary(body: bytes, header_length: int, model_name: str = "") -> ModelInferRequest:
    """Parse a request using Triton's binary tensor data extension.

    ``body[:header_length]`` is the JSON header; the rest holds, in input order,
    the data of each input with a ``binary_data_size`` parameter. When any input
    is binary, every input (JSON ones converted) is put in raw_input_contents.
    Raises InvalidArgument as :func:`request_from_json` does, and when the
    header length is out of range, sizes run past the body, or bytes are left.
    """
    if not 0 < header_length <= len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} {header_length} is outside the {len(body)}-byte body"
        )
    doc = _load(body[:header_length], "JSON header")
    return _parse_request(doc, model_name, body, header_length)


# --------------------------------------------------------------------------- responses


def _binary_choice(request: ModelInferRequest) -> tuple[bool, dict[str, bool]]:
    default = False
    # Membership first: indexing a message map inserts the key.
    if "binary_data_output" in request.parameters:
        default = request.parameters["binary_data_output"].bool_param
    explicit = {
        out.name: out.parameters["binary_data"].bool_param
        for out in request.outputs
        if "binary_data" in out.parameters
    }
    return default, explicit


def binary_outputs_requested(request: ModelInferRequest) -> bool:
    """Whether the response to ``request`` may need the binary form."""
    default, explicit = _binary_choice(request)
    return default or any(explicit.values())


def _check_raw_count(response: ModelInferResponse) -> None:
    raw, outputs = response.raw_output_contents, response.outputs
    if raw and len(raw) != len(outputs):
        raise HandlerError(
            f"malformed response: {len(raw)} raw_output_contents for {len(outputs)} outputs"
        )


def _output_values(response: ModelInferResponse, index: int) -> list[Any]:
    tensor = response.outputs[index]
    what = f"output {tensor.name!r}"
    try:
        field, _, _ = spec(tensor.datatype, what)
        if response.raw_output_contents:
            return unpack_raw(tensor.datatype, response.raw_output_contents[index], what)
    except InvalidArgument as exc:
        raise HandlerError(f"malformed response: {exc.message}") from None
    return list(getattr(tensor.contents, field))


def _output_blob(response: ModelInferResponse, index: int) -> bytes:
    if response.raw_output_contents:
        return response.raw_output_contents[index]
    tensor = response.outputs[index]
    what = f"output {tensor.name!r}"
    try:
        field, _, _ = spec(tensor.datatype, what)
        return pack_raw(tensor.datatype, getattr(tensor.contents, field), what)
    except InvalidArgument as exc:
        raise HandlerError(f"malformed response: {exc.message}") from None


def _render(
    response: ModelInferResponse, request: ModelInferRequest | None
) -> tuple[bytes, int | None]:
    """Return (body, JSON header length or None when no output went binary)."""
    _check_raw_count(response)
    default, explicit = _binary_choice(request) if request is not None else (False, {})
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = _params_json(response.parameters)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    binary = False
    for index, tensor in enumerate(response.outputs):
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        params = _params_json(tensor.parameters)
        if explicit.get(tensor.name, default):
            binary = True
            blobs.append(_output_blob(response, index))
            params["binary_data_size"] = len(blobs[-1])
            out["parameters"] = params
        else:
            data = _output_values(response, index)
            if tensor.datatype == "BYTES":
                try:
                    data = [item.decode("utf-8") for item in data]
                except UnicodeDecodeError:
                    # JSON has no bytes: base64 keeps the data, the parameter says so.
                    data = [base64.b64encode(item).decode("ascii") for item in data]
                    params["content_encoding"] = "base64"
            if params:
                out["parameters"] = params
            out["data"] = data
        outputs.append(out)
    doc["outputs"] = outputs
    header = _encode(doc).encode("utf-8")
    if not binary:
        return header, None
    return b"".join([header, *blobs]), len(header)


def response_to_json(response: ModelInferResponse) -> bytes:
    """Render a response as KServe v2 REST JSON (every output with JSON ``data``).

    Outputs are read from typed contents or raw_output_contents; BYTES become
    UTF-8 strings, or base64 with ``"content_encoding": "base64"`` when any
    element is not UTF-8. Raises HandlerError for a malformed response.
    """
    return _render(response, None)[0]


def response_to_http(
    response: ModelInferResponse, request: ModelInferRequest
) -> tuple[bytes, int | None]:
    """Render a response for the HTTP edge: ``(body, header_length or None)``.

    Outputs the request asked for as binary (``binary_data`` per output, else
    the ``binary_data_output`` request parameter) are sent after the JSON header
    with a ``binary_data_size`` parameter and no ``data``; the second element is
    then the header length (for ``Inference-Header-Content-Length``), else None
    and the body is plain JSON.
    """
    if not binary_outputs_requested(request):
        return response_to_json(response), None
    return _render(response, request)


# --------------------------------------------------------------------------- generate


def generate_request(body: bytes, model_name: str) -> ModelInferRequest:
    """Parse a Triton generate request (flat JSON object) into a ModelInferRequest.

    ``id`` and ``parameters`` are the request's; every other key is an input:
    strings -> BYTES [1], booleans -> BOOL [1], integers -> INT64 [1], other
    numbers -> FP64 [1], arrays of one kind -> shape [n]. Raises InvalidArgument
    for malformed JSON, nulls, objects and nested or mixed arrays.
    """
    doc = _load(body, "generate request body")
    request = ModelInferRequest(model_name=model_name)
    for key, value in doc.items():
        if key == "id":
            if not isinstance(value, str):
                raise InvalidArgument(f"'id' must be a string, not {_jtype(value)}")
            request.id = value
        elif key == "parameters":
            _set_params(request.parameters, value, "request parameters")
        elif value is None or isinstance(value, dict):
            raise InvalidArgument(f"input {key!r} is {_jtype(value)}; expected a scalar or array")
        else:
            try:
                encode_into(request.inputs.add(), key, value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(str(exc).replace("output", "input", 1)) from None
    return request


def generate_response_json(response: ModelInferResponse) -> bytes:
    """Render a response in Triton's flat generate form.

    ``{"model_name", "model_version"?, "id"?, <output>: value, ...}``: a
    one-element output becomes a scalar, others a list; BYTES are decoded as
    UTF-8 (invalid sequences replaced: this format has no way to flag base64).
    An output named like a metadata key overrides it. Raises HandlerError for a
    malformed response.
    """
    _check_raw_count(response)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    if response.id:
        doc["id"] = response.id
    for index, tensor in enumerate(response.outputs):
        values = _output_values(response, index)
        if tensor.datatype == "BYTES":
            values = [item.decode("utf-8", "replace") for item in values]
        doc[tensor.name] = values[0] if len(values) == 1 else values
    return _encode(doc).encode("utf-8")
