"""The on-disk object format, and encoding and decoding of stored values.

An object ``obj-<hex>`` lives in ``<root>/obj-<hex>.bin``: a fixed 32-byte ASCII header
line, then the payload::

    b"anyserve-object/1 " + kind.ljust(13) + b"\\n"      (18 + 13 + 1 = 32 bytes)

``kind`` (and the payload after the header) is one of

``bytes``      the raw bytes (also used for ``memoryview`` data; ``get`` returns ``bytes``)
``bytearray``  the raw bytes; ``get`` returns a ``bytearray``
``str``        UTF-8 with ``surrogatepass`` (every Python ``str`` round-trips)
``json``       UTF-8 JSON of ``dict``/``list``/``int``/``float``/``bool``/``None`` values
               (dict keys must be ``str``; tuples come back as lists)
``npy``        a numpy array in ``.npy`` format, written and read with
               ``allow_pickle=False`` (object arrays are refused)

Nothing is ever pickled. numpy is optional: it is only imported to read an ``npy``
object, and an array is recognised by ``isinstance`` against an already imported numpy.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
from typing import Any

import anyio
import anyio.to_thread

from anyserve.errors import AnyServeError, InvalidArgument
from anyserve.objects.ref import ObjRef, _show

__all__ = ["HEADER_LEN"]

_MAGIC = b"anyserve-object/1 "
_KIND_WIDTH = 13
HEADER_LEN = len(_MAGIC) + _KIND_WIDTH + 1  # 32
_KINDS = frozenset({"bytes", "bytearray", "str", "json", "npy"})

# Encoding/decoding a value bigger than this runs in a worker thread, not on the loop.
_OFFLOAD_BYTES = 1 << 20


def _numpy() -> Any:
    return importlib.import_module("numpy")


def _is_ndarray(data: object) -> bool:
    # An array can only exist if numpy was imported; never import it just to check.
    np = sys.modules.get("numpy")
    return np is not None and isinstance(data, np.ndarray)


def _encode_npy(arr: Any) -> memoryview:
    buf = io.BytesIO()
    try:
        _numpy().save(buf, arr, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle
        raise InvalidArgument(f"cannot store this numpy array without pickle: {exc}") from None
    return buf.getbuffer()


def _check_json_keys(value: Any) -> None:
    # Runs after json.dumps succeeded, so the structure is known to be acyclic.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidArgument(
                        f"JSON object keys must be str, not {type(key).__name__} ({_show(key)})"
                    )
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _encode_json(data: Any) -> bytes:
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"value is not JSON-serialisable: {exc}") from None
    _check_json_keys(data)
    return text.encode("utf-8", "surrogatepass")


async def _encode(data: Any) -> tuple[str, bytes | bytearray | memoryview]:
    """Turn ``data`` into ``(kind, payload)``; ``InvalidArgument`` for unsupported data."""
    if isinstance(data, bytes):
        return "bytes", data
    if isinstance(data, bytearray):
        return "bytearray", data
    if isinstance(data, memoryview):
        view = data if data.c_contiguous else memoryview(data.tobytes())
        return "bytes", view.cast("B")
    if isinstance(data, str):
        if len(data) > _OFFLOAD_BYTES:
            encoded = await anyio.to_thread.run_sync(data.encode, "utf-8", "surrogatepass")
        else:
            encoded = data.encode("utf-8", "surrogatepass")
        return "str", encoded
    if _is_ndarray(data):
        if data.nbytes > _OFFLOAD_BYTES:
            return "npy", await anyio.to_thread.run_sync(_encode_npy, data)
        return "npy", _encode_npy(data)
    if data is None or isinstance(data, bool | int | float | dict | list | tuple):
        return "json", _encode_json(data)
    raise InvalidArgument(
        f"cannot store a {type(data).__name__}: objects hold bytes, str, "
        "JSON values (dict/list/int/float/bool/None) or numpy arrays"
    )


def _header(kind: str) -> bytes:
    """The 32-byte header line for an object of ``kind``."""
    return _MAGIC + kind.encode("ascii").ljust(_KIND_WIDTH) + b"\n"


def _parse_header(ref: ObjRef, header: bytes) -> str:
    """The kind named by ``header``; ``AnyServeError`` (object is corrupt) if it is bad."""
    if len(header) == HEADER_LEN and header.startswith(_MAGIC) and header.endswith(b"\n"):
        kind = header[len(_MAGIC) : -1].rstrip(b" ").decode("ascii", "replace")
        if kind in _KINDS:
            return kind
    raise AnyServeError(f"object {ref.id} is corrupt: bad header")


def _decode_sync(ref: ObjRef, kind: str, payload: bytes | memoryview) -> Any:
    try:
        if kind == "bytes":
            return bytes(payload)  # no copy when it already is bytes
        if kind == "bytearray":
            return bytearray(payload)
        if kind == "str":
            return str(payload, "utf-8", "surrogatepass")
        if kind == "json":
            return json.loads(str(payload, "utf-8", "surrogatepass"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AnyServeError(f"object {ref.id} is corrupt: {exc}") from None
    try:
        np = _numpy()
    except ImportError:
        raise InvalidArgument(
            f"object {ref.id} holds a numpy array but numpy is not installed"
        ) from None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise AnyServeError(f"object {ref.id} is corrupt: {exc}") from None


async def _decode(ref: ObjRef, kind: str, payload: bytes | memoryview) -> Any:
    """The value of a ``kind`` payload; big non-``bytes`` payloads decode in a thread.

    Raises ``AnyServeError`` when the payload is corrupt and ``InvalidArgument`` for an
    ``npy`` object when numpy is not installed.
    """
    if kind != "bytes" and len(payload) > _OFFLOAD_BYTES:
        return await anyio.to_thread.run_sync(_decode_sync, ref, kind, payload)
    return _decode_sync(ref, kind, payload)
