"""KServe v2 JSON tensors and parameter maps, shared by the JSON, binary and
generate formats.

A tensor is ``{"name","datatype","shape","parameters"?,"data"}``; ``data``
may be nested (flattened row-major) or flat; BYTES data are JSON strings,
base64-encoded with ``"parameters": {"content_encoding": "base64"}`` in a
response when an element is not UTF-8. A tensor whose parameters give
``binary_data_size`` (Triton's binary tensor data extension) has its data
after the JSON header instead: parsing leaves it pending
(:data:`Pending`) for :mod:`anyserve.codec.binary`.

Malformed JSON raises :class:`~anyserve.errors.InvalidArgument`; reading an
output that cannot be rendered raises :class:`~anyserve.errors.HandlerError`.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Callable, Mapping, MutableMapping
from itertools import chain
from math import prod
from typing import Any, ParamSpec, TypeAlias, TypeVar

import orjson

from anyserve.codec.datatypes import DATATYPES, spec, unpack_raw
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import InferParameter, ModelInferRequest, ModelInferResponse
from anyserve.shm import REGION

__all__ = [
    "Pending",
    "check_raw_count",
    "encode_json",
    "fill_typed",
    "jtype",
    "load_object",
    "output_json",
    "output_values",
    "params_json",
    "parse_shape",
    "parse_tensors",
    "set_params",
    "string_field",
    "unicode_problem",
]

Tensor: TypeAlias = ModelInferRequest.InferInputTensor | ModelInferResponse.InferOutputTensor
#: A parsed tensor whose data is not in it yet: (tensor, flat JSON values, or
#: None and the binary_data_size of its data in the body).
Pending: TypeAlias = tuple[Tensor, list[Any] | None, int | None]

#: One compact encoder for the process (json.dumps builds one per call).
encode_json = json.JSONEncoder(separators=(",", ":")).encode
_SMALL_INTS = {"INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1)}
_SMALL_INTS.update({"UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1)})


def jtype(value: Any) -> str:
    """How a JSON value is named in error messages ("a number", "null"...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def unicode_problem(exc: UnicodeEncodeError) -> InvalidArgument:
    """What a client is told about a string no UTF-8 can carry (a lone surrogate)."""
    return InvalidArgument(
        f"the body holds a string that is not valid Unicode ({exc.reason}:"
        f" {exc.object[exc.start : exc.end]!a})"
    )


def client_text(parse: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a parser of client bodies: a string no UTF-8 can carry (JSON
    may spell a lone surrogate, ``"\\ud800"``) is the client's mistake, an
    InvalidArgument, wherever in the body it sits."""

    @functools.wraps(parse)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return parse(*args, **kwargs)
        except UnicodeEncodeError as exc:
            raise unicode_problem(exc) from None

    return checked


# 20 digits in a row, not after a "." or an exponent's "e": maybe an integer
# past 64 bits, which orjson would turn into a float (json keeps it exact). In
# bytes they are found in the body mapped byte by byte ("1" a digit, "." any of
# ".eE", "0" the rest) as "0" then twenty "1": a tenth of a regular
# expression's time on a body of numbers, and the digits of a fraction such as
# 0.00025383813065349425 do not count (the regular expression sent every body
# of random floats to json).
_DIGIT_MAP = bytes(
    0x31 if 0x30 <= byte <= 0x39 else 0x2E if byte in b".eE" else 0x30 for byte in range(256)
)
_LONG_INTEGER = b"0" + b"1" * 20
_LONG_DIGITS_TEXT = re.compile(r"(?<![0-9.eE])[0-9]{20}")


def loads(body: bytes | str) -> Any:
    """``json.loads(body)``, by orjson when it can (3-5x faster). What orjson
    refuses (NaN and Infinity, lone surrogates, UTF-16 bodies, invalid JSON)
    or would read otherwise (integers past 64 bits) goes to ``json``, which
    then decides and words any error: the result is the same either way."""
    if isinstance(body, str):
        long_digits = _LONG_DIGITS_TEXT.search(body) is not None
    else:
        marked = body.translate(_DIGIT_MAP)
        long_digits = _LONG_INTEGER in marked or marked.startswith(_LONG_INTEGER[1:])
    if not long_digits:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # json, below, decides and words the error
    return json.loads(body)


def load_object(body: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object; InvalidArgument naming ``what`` if it is not one."""
    try:
        doc = loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} nests too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object, not {jtype(doc)}")
    return doc


def set_params(target: MutableMapping[str, InferParameter], params: Any, what: str) -> None:
    """Copy a JSON ``parameters`` object into a protobuf parameter map."""
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what} must be an object, not {jtype(params)}")
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
                f"{what}: parameter {key!r} is {jtype(value)}; expected a boolean, number or string"
            )


def params_json(params: Mapping[str, InferParameter]) -> dict[str, Any]:
    """A protobuf parameter map as a JSON object."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def string_field(doc: dict[str, Any], key: str) -> str:
    """``doc[key]`` when it is a string, "" when absent; else InvalidArgument."""
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"'{key}' must be a string, not {jtype(value)}")
    return value


# --------------------------------------------------------------------------- tensors


def _flatten(data: Any, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: 'data' must be an array, not {jtype(data)}")
    # Row-major flattening one nesting level at a time, in C (chain), not per element.
    while data and isinstance(data[0], list):
        if not all(isinstance(row, list) for row in data):
            raise InvalidArgument(f"{what}: 'data' mixes arrays and scalars at the same depth")
        data = list(chain.from_iterable(data))
    flat: list[Any] = data
    return flat


def parse_shape(shape: Any, what: str) -> list[int]:
    """``shape`` when it is an array of non-negative integers; else InvalidArgument."""
    if not isinstance(shape, list):
        raise InvalidArgument(f"{what} needs a 'shape' array, got {jtype(shape)}")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise InvalidArgument(f"{what}: shape {shape} must hold non-negative integers")
    return shape


def _json_values(datatype: str, flat: list[Any], what: str, b64: bool) -> list[Any]:
    if datatype == "BYTES":
        try:
            if b64:
                return [base64.b64decode(item, validate=True) for item in flat]
            return [item.encode("utf-8") for item in flat]
        except (AttributeError, TypeError):
            bad = next(item for item in flat if not isinstance(item, str))
            raise InvalidArgument(
                f"{what}: BYTES data elements must be strings, found {jtype(bad)}"
            ) from None
        except UnicodeEncodeError:
            raise  # the client's text: client_text() answers it, for every field alike
        except ValueError as exc:  # binascii.Error, or non-ASCII text
            raise InvalidArgument(f"{what}: BYTES data is not valid base64: {exc}") from None
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


def _parse_tensor(item: Any, index: int, tensor: Tensor, kind: str) -> Pending:
    """Fill name/datatype/shape/parameters of an ``kind`` ("input"/"output");
    return it with its flat JSON data or its binary_data_size."""
    if not isinstance(item, dict):
        raise InvalidArgument(f"{kind}s[{index}] must be an object, not {jtype(item)}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{kind}s[{index}] needs a 'name' (a non-empty string)")
    what = f"{kind} {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{what} needs a 'datatype' string, got {jtype(datatype)}")
    _, _, size = spec(datatype, what)
    shape = parse_shape(item.get("shape"), what)
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    params = item.get("parameters")
    binary_size, b64 = None, False
    if params is not None:
        set_params(tensor.parameters, params, f"{what} parameters")
        if "binary_data_size" in params:
            binary_size = params["binary_data_size"]
            del tensor.parameters["binary_data_size"]  # transport detail, not for the model
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise InvalidArgument(f"{what}: binary_data_size must be a non-negative integer")
        if kind == "output" and params.get("content_encoding") == "base64":
            b64 = True
            del tensor.parameters["content_encoding"]  # what response_to_json adds
    data = item.get("data")
    if params is not None and REGION in params:
        # Triton's system shared memory: the bytes are in the client's region.
        if data is not None or binary_size is not None:
            raise InvalidArgument(f"{what} has data besides its shared memory region")
        return tensor, [], None
    if binary_size is not None:
        if data is not None:
            raise InvalidArgument(f"{what} has both 'data' and binary_data_size")
        if size and binary_size != prod(shape) * size:
            raise InvalidArgument(
                f"{what}: binary_data_size is {binary_size} bytes but shape {shape} of"
                f" {datatype} needs {prod(shape) * size}"
            )
        return tensor, None, binary_size
    if data is None:
        raise InvalidArgument(f"{what} has no 'data' (nor binary_data_size)")
    flat = _flatten(data, what)
    if len(flat) != prod(shape):
        raise InvalidArgument(
            f"{what}: shape {shape} needs {prod(shape)} elements but 'data' has {len(flat)}"
        )
    return tensor, _json_values(datatype, flat, what, b64), None


def parse_tensors(items: Any, message: ModelInferRequest | ModelInferResponse) -> list[Pending]:
    """Parse a JSON ``inputs`` (request) or ``outputs`` (response) array into
    the message's tensors, their data left pending."""
    if isinstance(message, ModelInferRequest):
        tensors: Any = message.inputs
        kind = "input"
    else:
        tensors, kind = message.outputs, "output"
    if not isinstance(items, list):
        raise InvalidArgument(
            f"{'request' if kind == 'input' else 'response'} needs an '{kind}s' array,"
            f" got {jtype(items)}"
        )
    return [_parse_tensor(item, i, tensors.add(), kind) for i, item in enumerate(items)]


def fill_typed(pending: list[Pending]) -> None:
    """Put pending JSON data into typed contents; InvalidArgument when a tensor
    is binary (no body to read it from) or its data do not fit its datatype."""
    if any(flat is None for _, flat, _ in pending):
        raise InvalidArgument(
            "binary_data_size used without a Inference-Header-Content-Length header"
        )
    for tensor, flat, _ in pending:
        try:
            getattr(tensor.contents, DATATYPES[tensor.datatype][0]).extend(flat)
        except (TypeError, ValueError, OverflowError) as exc:  # Overflow: a 400-digit integer
            kind = "input" if isinstance(tensor, ModelInferRequest.InferInputTensor) else "output"
            raise InvalidArgument(
                f"{kind} {tensor.name!r}: data does not fit {tensor.datatype}: {exc}"
            ) from None


# --------------------------------------------------------------------------- outputs


def check_raw_count(response: ModelInferResponse) -> None:
    """HandlerError unless raw_output_contents is empty or has one entry per output."""
    raw, outputs = response.raw_output_contents, response.outputs
    if raw and len(raw) != len(outputs):
        raise HandlerError(
            f"malformed response: {len(raw)} raw_output_contents for {len(outputs)} outputs"
        )


def output_values(response: ModelInferResponse, index: int) -> list[Any]:
    """The flat values of output ``index``, from typed or raw contents."""
    tensor = response.outputs[index]
    what = f"output {tensor.name!r}"
    try:
        field, _, _ = spec(tensor.datatype, what)
        if response.raw_output_contents:
            return unpack_raw(tensor.datatype, response.raw_output_contents[index], what)
    except InvalidArgument as exc:
        raise HandlerError(f"malformed response: {exc.message}") from None
    return list(getattr(tensor.contents, field))


def output_json(response: ModelInferResponse, index: int) -> dict[str, Any]:
    """Output ``index`` as a v2 JSON tensor with ``data`` (BYTES as UTF-8 strings,
    or base64 flagged by ``content_encoding`` when an element is not UTF-8)."""
    tensor = response.outputs[index]
    out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype}
    out["shape"] = list(tensor.shape)
    params = params_json(tensor.parameters)
    if REGION in tensor.parameters:  # written into the client's region: no data here
        out["parameters"] = params
        return out
    data = output_values(response, index)
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
    return out
