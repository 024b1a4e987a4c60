"""The KServe v2 datatypes and Triton's raw tensor layout.

One table (:data:`DATATYPES`) says, for every datatype, which typed
``contents`` field holds it and how one element is laid out in raw bytes:
little-endian, row-major; BOOL one byte per element; BYTES each element
prefixed by its 4-byte little-endian length. :func:`pack_raw` and
:func:`unpack_raw` convert between flat lists and that layout.

``what`` arguments name the tensor in error messages (``"input 'x'"``,
``"output 'y'"``): every malformed tensor raises
:class:`~anyserve.errors.InvalidArgument` saying which one is wrong.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from typing import Any

from anyserve.errors import InvalidArgument

__all__ = [
    "DATATYPES",
    "NUMPY_DATATYPES",
    "check_shape",
    "numpy_datatype",
    "pack_raw",
    "spec",
    "unpack_raw",
]

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

#: numpy dtype ``(kind, itemsize)`` -> datatype, for the numeric datatypes.
NUMPY_DATATYPES: dict[tuple[str, int], str] = {
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

_U32 = struct.Struct("<I")
# memoryview.cast(...).tolist() skips struct's intermediate tuple, but it reads
# native order and sizes, so it is only used where those equal Triton's layout.
_NATIVE_OK = sys.byteorder == "little" and all(
    struct.calcsize(code) == size for _, code, size in DATATYPES.values() if size
)


def numpy_datatype(dtype: Any, what: str) -> str:
    """The datatype of a numpy dtype: BYTES for string and object dtypes.

    Raises TypeError for dtypes without a KServe datatype (complex, datetime...).
    """
    if dtype.kind in "SUO":
        return "BYTES"
    datatype = NUMPY_DATATYPES.get((dtype.kind, dtype.itemsize))
    if datatype is None:
        raise TypeError(f"{what}: numpy dtype {dtype} has no KServe datatype")
    return datatype


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
