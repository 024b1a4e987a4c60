"""Plain Python values -> KServe v2 tensors (the ``encode_*`` half of
:mod:`anyserve.codec.values`, which re-exports it).

A Python value becomes a typed tensor: str/bytes-like -> BYTES, bool -> BOOL,
int -> INT64, float -> FP64 (one element, shape ``[1]``), a flat list or tuple
of one kind -> shape ``[n]``, a numpy array -> its datatype and shape, an
``ObjRef`` (any class defining ``__anyserve_wire__``) -> BYTES. The tensor
being filled says what it is, so errors name an ``input`` or an ``output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from anyserve.codec.datatypes import DATATYPES, numpy_datatype
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = ["encode_input", "encode_into", "encode_output", "is_numpy"]

InputTensor = ModelInferRequest.InferInputTensor
OutputTensor = ModelInferResponse.InferOutputTensor
Tensor: TypeAlias = InputTensor | OutputTensor

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _what(tensor: Tensor, name: str) -> str:
    return f"{'input' if isinstance(tensor, InputTensor) else 'output'} {name!r}"


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
