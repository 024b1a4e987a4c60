"""KServe v2 tensors <-> plain Python values.

Runs inside worker processes on every request, so everything here is table
driven and set up once at import; numpy is only imported when a value already
is a numpy array or when :func:`decode_array` is called.

Reading (``decode_*``): inputs come either in typed ``contents`` or, when the
request carries ``raw_input_contents``, in Triton's raw layout (little-endian,
row-major; BOOL one byte per element; BYTES each element prefixed by its 4-byte
little-endian length). A one-element tensor decodes to a scalar (``bytes``,
``int``, ``float`` or ``bool``), any other to a flat list. Every malformed
tensor raises :class:`~anyserve.errors.InvalidArgument` naming the input.

Writing (``encode_output``, ``to_*_response``): handler results become typed
outputs; :func:`use_raw_outputs` turns them into raw outputs for clients (such
as tritonclient) that only read ``raw_output_contents``.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Any, TypeAlias

from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

__all__ = [
    "DATATYPES",
    "check_shape",
    "decode_array",
    "decode_input",
    "decode_inputs",
    "encode_output",
    "input_text",
    "pack_raw",
    "to_infer_response",
    "to_stream_response",
    "unpack_raw",
    "use_raw_outputs",
]

InputTensor = ModelInferRequest.InferInputTensor
OutputTensor = ModelInferResponse.InferOutputTensor
Tensor: TypeAlias = ModelInferRequest.InferInputTensor | ModelInferResponse.InferOutputTensor

# datatype -> (typed contents field, struct code, element size; 0 = variable)
DATATYPES: dict[str, tuple[str, str, int]] = {
    "BOOL": ("bool_contents", "?", 1),
    "UINT8": ("uint_contents", "B", 1),
    "UINT16": ("uint_contents", "H", 2),
    "UINT32": ("uint_contents", "I", 4),
    "UINT64": ("uint64_contents", "Q", 8),
    "INT8": ("int_contents", "b", 1),
    "INT16": ("int_contents", "h", 2),
    "INT32": ("int_contents", "i", 4),
    "INT64": ("int64_contents", "q", 8),
    "FP16": ("fp32_contents", "e", 2),
    "FP32": ("fp32_contents", "f", 4),
    "FP64": ("fp64_contents", "d", 8),
    "BYTES": ("bytes_contents", "", 0),
}

_U32 = struct.Struct("<I")
# memoryview.cast(...).tolist() skips struct's intermediate tuple, but it reads
# native order and sizes, so it is only used where those equal Triton's layout.
_NATIVE_OK = sys.byteorder == "little" and all(
    struct.calcsize(code) == size for _, code, size in DATATYPES.values() if size
)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# numpy dtype (kind, itemsize) -> datatype
_NUMPY_TYPES = {
    ("b", 1): "BOOL",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}


def spec(datatype: str, what: str) -> tuple[str, str, int]:
    """Return ``(contents field, struct code, element size)`` of a datatype.

    Raises InvalidArgument for BF16 (unsupported) and unknown datatypes.
    """
    try:
        return DATATYPES[datatype]
    except KeyError:
        if datatype == "BF16":
            raise InvalidArgument(f"{what}: datatype BF16 is unsupported") from None
        raise InvalidArgument(
            f"{what}: unknown datatype {datatype!r} (expected one of {', '.join(DATATYPES)})"
        ) from None


def check_shape(what: str, shape: Sequence[int], count: int) -> None:
    """Check that ``count`` elements fill ``shape``.

    An empty shape is not checked: proto3 cannot tell a scalar ``[]`` from a
    shape that was never set, and hand-built requests often leave it out. A
    ``-1`` dimension matches any multiple of the other dimensions. Raises
    InvalidArgument on a mismatch or a dimension below -1.
    """
    if not shape:
        return
    known, wildcard = 1, False
    for dim in shape:
        if dim == -1:
            wildcard = True
        elif dim < 0:
            raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
        else:
            known *= dim
    if wildcard:
        fits = count % known == 0 if known else count == 0
        if not fits:
            raise InvalidArgument(
                f"{what}: {count} elements cannot fill shape {list(shape)}"
                f" (not a multiple of {known})"
            )
    elif count != known:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} needs {known} elements but {count} were given"
        )


def unpack_raw(datatype: str, raw: bytes, what: str) -> list[Any]:
    """Decode one tensor's raw bytes (Triton layout) into a flat list.

    Raises InvalidArgument when the length is not a multiple of the element
    size or a BYTES length prefix is truncated or overruns the data.
    """
    _, code, size = spec(datatype, what)
    if not size:
        return _split_bytes(raw, what)
    count, rest = divmod(len(raw), size)
    if rest:
        raise InvalidArgument(
            f"{what}: raw data of {len(raw)} bytes is not a multiple of the"
            f" {datatype} element size ({size} bytes)"
        )
    if _NATIVE_OK and code != "e":
        view: Any = memoryview(raw)  # typeshed wants a literal format code
        values: list[Any] = view.cast(code).tolist()
        return values
    return list(struct.unpack(f"<{count}{code}", raw))


def _split_bytes(raw: bytes, what: str) -> list[bytes]:
    out: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 4:
            raise InvalidArgument(
                f"{what}: BYTES data is truncated: {end - offset} bytes left at offset"
                f" {offset}, too few for a 4-byte length prefix"
            )
        (length,) = _U32.unpack_from(raw, offset)
        offset += 4
        if length > end - offset:
            raise InvalidArgument(
                f"{what}: BYTES element {len(out)} declares {length} bytes but only"
                f" {end - offset} remain"
            )
        out.append(raw[offset : offset + length])
        offset += length
    return out


def pack_raw(datatype: str, values: Sequence[Any], what: str) -> bytes:
    """Encode a flat sequence of values into Triton's raw layout.

    BYTES values must be ``bytes``. Raises InvalidArgument when a value does not
    fit the datatype (wrong type, out of range).
    """
    _, code, size = spec(datatype, what)
    if not size:
        parts: list[bytes] = []
        for item in values:
            parts.append(_U32.pack(len(item)))
            parts.append(item)
        return b"".join(parts)
    try:
        return struct.pack(f"<{len(values)}{code}", *values)
    except (struct.error, OverflowError, TypeError) as exc:
        raise InvalidArgument(f"{what}: data does not fit {datatype}: {exc}") from None


# --------------------------------------------------------------------------- decoding


def _raw_entries(request: ModelInferRequest) -> Sequence[bytes]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(raw)} raw_input_contents entries for {len(request.inputs)}"
            " inputs; when raw_input_contents is used every input must be in it"
        )
    return raw


def _no_typed_contents(tensor: InputTensor, what: str) -> None:
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        raise InvalidArgument(f"{what} has typed contents but the request uses raw_input_contents")


def _values(tensor: InputTensor, raw: Sequence[bytes], index: int) -> list[Any]:
    what = f"input {tensor.name!r}"
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


def _as_bytes(name: str, item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    wire = _wire(item)
    if wire is None:
        raise TypeError(f"output {name!r}: cannot encode {type(item).__name__} as BYTES")
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


def _set_ints(tensor: Tensor, name: str, values: Sequence[int]) -> None:
    if min(values) < _INT64_MIN or max(values) > _INT64_MAX:
        raise ValueError(f"output {name!r}: integer out of the INT64 range")
    tensor.contents.int64_contents.extend(values)


def _encode_list(tensor: Tensor, name: str, values: Sequence[Any]) -> None:
    # Classify by distinct element type, not per element: big lists stay cheap.
    kinds = {_kind(cls) for cls in {type(v) for v in values}}
    if kinds == {"BYTES"}:
        _set(tensor, name, "BYTES", [len(values)])
        if all(type(v) is bytes for v in values):
            tensor.contents.bytes_contents.extend(values)
        else:
            tensor.contents.bytes_contents.extend([_as_bytes(name, v) for v in values])
    elif kinds == {"BOOL"}:
        _set(tensor, name, "BOOL", [len(values)])
        tensor.contents.bool_contents.extend(values)
    elif kinds == {"INT"}:
        _set(tensor, name, "INT64", [len(values)])
        _set_ints(tensor, name, values)
    elif kinds <= {"INT", "FP"}:
        _set(tensor, name, "FP64", [len(values)])
        tensor.contents.fp64_contents.extend(values)
    else:
        raise TypeError(
            f"output {name!r}: a list must hold only str/bytes, only bools, or only"
            f" numbers; got {', '.join(sorted(kinds))} (use a numpy array for nested data)"
        )


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape")


def _encode_numpy(tensor: Tensor, name: str, array: Any) -> None:
    dtype = array.dtype
    shape = list(array.shape) if array.ndim else [1]
    flat = array.ravel().tolist()
    if dtype.kind in "SUO":
        _set(tensor, name, "BYTES", shape)
        tensor.contents.bytes_contents.extend([_as_bytes(name, v) for v in flat])
        return
    datatype = _NUMPY_TYPES.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"output {name!r}: numpy dtype {dtype} has no KServe datatype")
    _set(tensor, name, datatype, shape)
    getattr(tensor.contents, DATATYPES[datatype][0]).extend(flat)


def encode_into(tensor: Tensor, name: str, value: Any) -> None:
    """Fill an empty input or output tensor from a Python value (see encode_output)."""
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
        _set_ints(tensor, name, [value])
    elif isinstance(value, float):
        _set(tensor, name, "FP64", [1])
        tensor.contents.fp64_contents.append(value)
    elif isinstance(value, list | tuple):
        if value:
            _encode_list(tensor, name, value)
        else:
            _set(tensor, name, "BYTES", [0])
    elif _is_numpy(value):
        _encode_numpy(tensor, name, value)
    else:
        wire = _wire(value)
        if wire is None:
            raise TypeError(
                f"output {name!r}: cannot encode a value of type {type(value).__qualname__}"
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
    anything else and ValueError for ints outside INT64.
    """
    tensor = OutputTensor()
    encode_into(tensor, name, value)
    return tensor


def encode_input(name: str, value: Any) -> InputTensor:
    """Build a typed input tensor from a Python value (rules of encode_output);
    what clients and ``context.call`` use to send plain values."""
    tensor = InputTensor()
    encode_into(tensor, name, value)
    return tensor


def decode_outputs(response: ModelInferResponse) -> dict[str, Any]:
    """Decode every output of a response, keyed by name, from typed contents or
    raw_output_contents (rules of :func:`decode_inputs`). Raises
    InvalidArgument for malformed outputs."""
    raw = response.raw_output_contents
    result: dict[str, Any] = {}
    for index, tensor in enumerate(response.outputs):
        result[tensor.name] = _scalar_or_list(_values(tensor, raw, index))  # type: ignore[arg-type]
    return result


def _stamp(response: ModelInferResponse, request: ModelInferRequest) -> None:
    if not response.id:
        response.id = request.id
    if not response.model_name:
        response.model_name = request.model_name


def _build(response: ModelInferResponse, result: Any) -> None:
    if isinstance(result, str | bytes):
        encode_into(response.outputs.add(), "text_output", result)
    elif isinstance(result, dict):
        for key, value in result.items():
            if not isinstance(key, str):
                raise TypeError(f"output names must be str, got {type(key).__name__} {key!r}")
            if isinstance(value, OutputTensor):
                tensor = response.outputs.add()
                tensor.CopyFrom(value)
                if not tensor.name:
                    tensor.name = key
            else:
                encode_into(response.outputs.add(), key, value)
    elif isinstance(result, OutputTensor):
        response.outputs.add().CopyFrom(result)
    elif result is None:
        raise TypeError("handler returned None; return a response, str, bytes or dict")
    else:
        raise TypeError(
            f"handler returned {type(result).__qualname__}; expected ModelInferResponse,"
            " str, bytes or a dict of output name -> value"
        )


def to_infer_response(result: Any, request: ModelInferRequest) -> ModelInferResponse:
    """Turn a handler's result into a ModelInferResponse.

    A ModelInferResponse is returned itself (not copied); str/bytes becomes
    output ``text_output``; a dict becomes one output per item (values through
    :func:`encode_output`, InferOutputTensor values as they are). ``id`` and
    ``model_name`` are filled from the request when empty. Raises TypeError for
    None and unsupported results.
    """
    if isinstance(result, ModelInferResponse):
        response = result
    else:
        response = ModelInferResponse()
        _build(response, result)
    _stamp(response, request)
    return response


def to_stream_response(chunk: Any, request: ModelInferRequest) -> ModelStreamInferResponse:
    """Turn one streamed chunk into a ModelStreamInferResponse.

    A ModelStreamInferResponse is returned itself, with its infer_response's
    ``id``/``model_name`` filled when it has one; anything else is converted as
    by :func:`to_infer_response` and wrapped.
    """
    if isinstance(chunk, ModelStreamInferResponse):
        if chunk.HasField("infer_response"):
            _stamp(chunk.infer_response, request)
        return chunk
    stream = ModelStreamInferResponse()
    if isinstance(chunk, ModelInferResponse):
        stream.infer_response.CopyFrom(chunk)
    else:
        _build(stream.infer_response, chunk)
    _stamp(stream.infer_response, request)
    return stream


def use_raw_outputs(response: ModelInferResponse) -> None:
    """Move every output's typed contents into ``raw_output_contents``, in place.

    Entries follow the output order, in Triton's raw layout; ``contents`` is
    cleared. A response that already has raw_output_contents is left alone.
    Raises ValueError (and leaves the response untouched) when an output has an
    unknown datatype or values that do not fit it.
    """
    if response.raw_output_contents:
        return
    blobs: list[bytes] = []
    for tensor in response.outputs:
        what = f"output {tensor.name!r}"
        try:
            field, _, _ = spec(tensor.datatype, what)
            blobs.append(pack_raw(tensor.datatype, getattr(tensor.contents, field), what))
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
    for tensor in response.outputs:
        tensor.ClearField("contents")
    response.raw_output_contents.extend(blobs)
