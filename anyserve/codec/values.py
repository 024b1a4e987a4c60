"""KServe v2 tensors <-> plain Python values.

Runs inside worker processes on every request, so everything here is table
driven and set up once at import; numpy is only imported when a value already
is a numpy array or when :func:`decode_array` is called.

Reading (``decode_*``): tensors come either in typed ``contents`` or, when the
message carries ``raw_input_contents``/``raw_output_contents``, in Triton's
raw layout (:mod:`anyserve.codec.datatypes`). A one-element tensor decodes to
a scalar (``bytes``, ``int``, ``float`` or ``bool``), any other to a flat
list. Every malformed tensor raises :class:`~anyserve.errors.InvalidArgument`
naming the input or output.

Writing (``encode_*``): a Python value becomes a typed tensor. The tensor
being filled says what it is, so errors name an ``input`` or an ``output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from anyserve.codec.datatypes import DATATYPES, check_shape, numpy_datatype, spec, unpack_raw
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = [
    "decode_array",
    "decode_input",
    "decode_inputs",
    "decode_outputs",
    "encode_input",
    "encode_into",
    "encode_output",
    "input_text",
    "is_numpy",
]

InputTensor = ModelInferRequest.InferInputTensor
OutputTensor = ModelInferResponse.InferOutputTensor
Tensor: TypeAlias = InputTensor | OutputTensor

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _what(tensor: Tensor, name: str) -> str:
    return f"{'input' if isinstance(tensor, InputTensor) else 'output'} {name!r}"


# --------------------------------------------------------------------------- decoding


def _raw_entries(message: ModelInferRequest | ModelInferResponse) -> Sequence[bytes]:
    if isinstance(message, ModelInferRequest):
        raw, count, owner, kind = (
            message.raw_input_contents,
            len(message.inputs),
            "request",
            "input",
        )
    else:
        raw, count = message.raw_output_contents, len(message.outputs)
        owner, kind = "response", "output"
    if raw and len(raw) != count:
        raise InvalidArgument(
            f"{owner} has {len(raw)} raw_{kind}_contents entries for {count}"
            f" {kind}s; when raw_{kind}_contents is used every {kind} must be in it"
        )
    return raw


def _no_typed_contents(tensor: Tensor, what: str) -> None:
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        owner, kind = ("request", "input") if what.startswith("input") else ("response", "output")
        raise InvalidArgument(f"{what} has typed contents but the {owner} uses raw_{kind}_contents")


def _values(tensor: Tensor, raw: Sequence[bytes], index: int) -> list[Any]:
    what = _what(tensor, tensor.name)
    field, _, _ = spec(tensor.datatype, what)
    if raw:
        _no_typed_contents(tensor, what)
        values = unpack_raw(tensor.datatype, raw[index], what)
    else:
        values = list(getattr(tensor.contents, field))
        if not values and tensor.contents.ByteSize():
            present = ", ".join(f.name for f, _ in tensor.contents.ListFields())
            raise InvalidArgument(
                f"{what} has datatype {tensor.datatype}, whose data belongs in {field},"
                f" but its data is in {present}"
            )
    check_shape(what, tensor.shape, len(values))
    return values


def _scalar_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def decode_inputs(request: ModelInferRequest) -> dict[str, Any]:
    """Decode every input, keyed by name.

    One-element tensors become scalars (``bytes`` for BYTES, else int/float/
    bool), others flat lists in row-major order. Raises InvalidArgument for
    unsupported datatypes, element counts that do not fill the shape, malformed
    raw data, a raw_input_contents count that differs from the inputs, or a
    repeated input name.
    """
    raw = _raw_entries(request)
    result: dict[str, Any] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in result:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        result[tensor.name] = _scalar_or_list(_values(tensor, raw, index))
    return result


def decode_outputs(response: ModelInferResponse) -> dict[str, Any]:
    """Decode every output of a response, keyed by name, from typed contents or
    raw_output_contents (rules of :func:`decode_inputs`). Raises
    InvalidArgument for malformed outputs or a raw_output_contents count that
    differs from the outputs."""
    raw = _raw_entries(response)
    result: dict[str, Any] = {}
    for index, tensor in enumerate(response.outputs):
        result[tensor.name] = _scalar_or_list(_values(tensor, raw, index))
    return result


def _find(request: ModelInferRequest, name: str) -> tuple[int, InputTensor]:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return index, tensor
    present = ", ".join(repr(t.name) for t in request.inputs) or "none"
    raise InvalidArgument(f"request has no input {name!r} (inputs present: {present})")


def decode_input(request: ModelInferRequest, name: str) -> Any:
    """Decode the input called ``name`` with the rules of :func:`decode_inputs`.

    Raises InvalidArgument when the input is missing (listing those present)
    or malformed.
    """
    index, tensor = _find(request, name)
    return _scalar_or_list(_values(tensor, _raw_entries(request), index))


def input_text(request: ModelInferRequest, name: str) -> str:
    """Return a one-element BYTES input decoded as UTF-8.

    Raises InvalidArgument when the input is missing, not BYTES, does not hold
    exactly one element, or is not valid UTF-8.
    """
    index, tensor = _find(request, name)
    what = f"input {name!r}"
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"{what} must be BYTES to be read as text, not {tensor.datatype}")
    values = _values(tensor, _raw_entries(request), index)
    if len(values) != 1:
        raise InvalidArgument(f"{what} must hold exactly one element, it has {len(values)}")
    try:
        text: str = values[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid UTF-8: {exc}") from None
    return text


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise ImportError("decode_array needs numpy; install it with `pip install numpy`") from exc
    return numpy


def decode_array(request: ModelInferRequest, name: str) -> Any:
    """Decode the input called ``name`` into a numpy array of its shape and dtype.

    BYTES inputs become object arrays of ``bytes``. Arrays decoded from raw
    data are read-only views of the request's bytes (as in tritonclient); copy
    them to modify. An empty shape gives a 0-d array for one element, else 1-d.
    Raises ImportError without numpy, InvalidArgument for a missing or
    malformed input.
    """
    np = _numpy()
    index, tensor = _find(request, name)
    raw = _raw_entries(request)
    what = f"input {name!r}"
    _, code, size = spec(tensor.datatype, what)
    if raw and size:
        _no_typed_contents(tensor, what)
        if len(raw[index]) % size:
            unpack_raw(tensor.datatype, raw[index], what)  # raises with the precise message
        array = np.frombuffer(raw[index], dtype=np.dtype(code).newbyteorder("<"))
        check_shape(what, tensor.shape, array.size)
    else:
        values = _values(tensor, raw, index)
        if size:
            array = np.array(values, dtype=np.dtype(code))
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = values
    shape = list(tensor.shape)
    if not shape:
        return array.reshape(()) if array.size == 1 else array
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: cannot shape data as {shape}: {exc}") from None


# --------------------------------------------------------------------------- encoding


def _wire(value: Any) -> str | None:
    method = getattr(type(value), "__anyserve_wire__", None)
    return None if method is None else str(method(value))


def _as_bytes(what: str, item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    wire = _wire(item)
    if wire is None:
        raise TypeError(f"{what}: cannot encode {type(item).__name__} as BYTES")
    return wire.encode("utf-8")


def _kind(cls: type) -> str:
    if issubclass(cls, bool):
        return "BOOL"
    if issubclass(cls, int):
        return "INT"
    if issubclass(cls, float):
        return "FP"
    if issubclass(cls, str | bytes | bytearray | memoryview) or hasattr(cls, "__anyserve_wire__"):
        return "BYTES"
    return cls.__name__


def _set(tensor: Tensor, name: str, datatype: str, shape: Sequence[int]) -> None:
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)


def _set_ints(tensor: Tensor, what: str, values: Sequence[int]) -> None:
    if min(values) < _INT64_MIN or max(values) > _INT64_MAX:
        raise ValueError(f"{what}: integer out of the INT64 range")
    tensor.contents.int64_contents.extend(values)


def _encode_list(tensor: Tensor, name: str, what: str, values: Sequence[Any]) -> None:
    # Classify by distinct element type, not per element: big lists stay cheap.
    kinds = {_kind(cls) for cls in {type(v) for v in values}}
    if kinds == {"BYTES"}:
        _set(tensor, name, "BYTES", [len(values)])
        if all(type(v) is bytes for v in values):
            tensor.contents.bytes_contents.extend(values)
        else:
            tensor.contents.bytes_contents.extend([_as_bytes(what, v) for v in values])
    elif kinds == {"BOOL"}:
        _set(tensor, name, "BOOL", [len(values)])
        tensor.contents.bool_contents.extend(values)
    elif kinds == {"INT"}:
        _set(tensor, name, "INT64", [len(values)])
        _set_ints(tensor, what, values)
    elif kinds <= {"INT", "FP"}:
        _set(tensor, name, "FP64", [len(values)])
        tensor.contents.fp64_contents.extend(values)
    else:
        raise TypeError(
            f"{what}: a list must hold only str/bytes, only bools, or only"
            f" numbers; got {', '.join(sorted(kinds))} (use a numpy array for nested data)"
        )


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a numpy array or scalar (without importing numpy)."""
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape")


def _numpy_shape(array: Any) -> list[int]:
    return list(array.shape) if array.ndim else [1]


def _encode_numpy(tensor: Tensor, name: str, what: str, array: Any) -> None:
    datatype = numpy_datatype(array.dtype, what)
    _set(tensor, name, datatype, _numpy_shape(array))
    flat = array.ravel().tolist()
    if datatype == "BYTES":
        tensor.contents.bytes_contents.extend([_as_bytes(what, v) for v in flat])
    else:
        getattr(tensor.contents, DATATYPES[datatype][0]).extend(flat)


def encode_into(tensor: Tensor, name: str, value: Any) -> None:
    """Fill an empty input or output tensor from a Python value (see encode_output).

    Errors name the tensor as an input or an output, after its type.
    """
    what = _what(tensor, name)
    if isinstance(value, str):
        _set(tensor, name, "BYTES", [1])
        tensor.contents.bytes_contents.append(value.encode("utf-8"))
    elif isinstance(value, bytes | bytearray | memoryview):
        _set(tensor, name, "BYTES", [1])
        tensor.contents.bytes_contents.append(bytes(value))
    elif isinstance(value, bool):
        _set(tensor, name, "BOOL", [1])
        tensor.contents.bool_contents.append(value)
    elif isinstance(value, int):
        _set(tensor, name, "INT64", [1])
        _set_ints(tensor, what, [value])
    elif isinstance(value, float):
        _set(tensor, name, "FP64", [1])
        tensor.contents.fp64_contents.append(value)
    elif isinstance(value, list | tuple):
        if value:
            _encode_list(tensor, name, what, value)
        else:
            _set(tensor, name, "BYTES", [0])
    elif is_numpy(value):
        _encode_numpy(tensor, name, what, value)
    else:
        wire = _wire(value)
        if wire is None:
            raise TypeError(
                f"{what}: cannot encode a value of type {type(value).__qualname__}"
                " (expected str, bytes, bool, int, float, a list of those, a numpy array"
                " or an ObjRef)"
            )
        _set(tensor, name, "BYTES", [1])
        tensor.contents.bytes_contents.append(wire.encode("utf-8"))


def encode_output(name: str, value: Any) -> OutputTensor:
    """Build a typed output tensor from a Python value.

    str/bytes-like -> BYTES [1]; bool -> BOOL [1]; int -> INT64 [1]; float ->
    FP64 [1]; a list/tuple of one kind -> shape [n] (ints mixed with floats ->
    FP64; str mixed with bytes -> BYTES); empty list -> BYTES [0]; numpy array
    -> its datatype and shape (0-d -> [1]); an object whose class defines
    ``__anyserve_wire__`` -> BYTES [1] of that string. Raises TypeError for
    anything else and ValueError for ints outside INT64, naming ``output
    'name'``.
    """
    tensor = OutputTensor()
    encode_into(tensor, name, value)
    return tensor


def encode_input(name: str, value: Any) -> InputTensor:
    """Build a typed input tensor from a Python value (rules of encode_output,
    errors naming ``input 'name'``); what clients and ``context.call`` use to
    send plain values."""
    tensor = InputTensor()
    encode_into(tensor, name, value)
    return tensor
