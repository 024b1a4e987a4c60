"""Big KServe v2 JSON request bodies, parsed in pieces so the event loop keeps serving.

``json.loads`` of a 63 MiB body holds the loop (and the GIL: a thread does
not help) for seconds, and builds a Python float per number: every other
request and the replicas' heartbeats wait, and memory grows by ~9x the
body. :func:`request_from_big_json` instead

1. scans the body for the ``"data"`` arrays of inputs (string-aware, with
   ``re``/``bytes.find`` doing the per-byte work in C), yielding to the loop
   every few thousand tokens;
2. parses what is left (names, shapes, parameters: a few bytes, a
   "skeleton" where each data array became a marker) with the usual
   :func:`~anyserve.codec.v2json.parse_request_doc`;
3. converts each data array in bounded pieces, yielding between pieces:
   numbers read by the body's JSON parser (orjson, a piece of the array at
   a time) and made numpy arrays in Triton's raw little-endian layout;
   strings (BYTES) piece by piece, and one
   huge string without escapes by slicing the body (UTF-8 checked in pieces);
4. puts every input in ``raw_input_contents`` (as the binary extension
   does) and writes the serialized request around those blobs, the body
   released first, so memory peaks near twice the body.

What it does not speed up it still parses correctly, only inline: a data
array of booleans, nested strings, UINT64, or a huge string with escapes.
Numbers are read as ``json.loads`` reads them (``+1``, ``.5`` and ``1.`` are
refused). The one leniency: nested rows of a numeric array are not checked to
be regular (the element count must still fill the shape).
"""

from __future__ import annotations

import asyncio
import codecs
import re
import secrets
import struct
import warnings
from dataclasses import dataclass, field
from math import prod
from typing import Any

from anyserve import rpc
from anyserve.codec.datatypes import pack_raw, spec
from anyserve.codec.json_tensors import jtype, load_object, loads, parse_shape, unicode_problem
from anyserve.codec.v2json import parse_request_doc
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

__all__ = ["PIECE", "request_from_big_json"]

#: Bytes of text converted between two yields to the loop (a few ms of work).
PIECE = 256 * 1024
#: Data arrays shorter than this stay in the skeleton (json.loads is fast there).
_MIN_REGION = 64 * 1024
#: Tokens scanned between two yields.
_TOKENS_PER_YIELD = 4096

_TOKEN = re.compile(rb'["\[]')
_DATA_VALUE = re.compile(rb"\s*:\s*\[\s*")
_NOT_NUMERIC = re.compile(rb"[^0-9eE+\-.,\s\[\]]")
_CONTROL = re.compile(rb"[\x00-\x1f]")
_WS = b" \t\r\n"
_U32 = struct.Struct("<I")
_RAW_INPUT_TAG = b"\x3a"  # field 7 (raw_input_contents), length-delimited

# Datatypes whose numeric data numpy reads: (dtype parsed as, little-endian result, bounds).
_NUMERIC: dict[str, tuple[str, str, tuple[int, int] | None]] = {
    "FP16": ("f8", "<f2", None),
    "FP32": ("f8", "<f4", None),
    "FP64": ("f8", "<f8", None),
    "INT8": ("i8", "<i1", (-(2**7), 2**7 - 1)),
    "INT16": ("i8", "<i2", (-(2**15), 2**15 - 1)),
    "INT32": ("i8", "<i4", (-(2**31), 2**31 - 1)),
    "INT64": ("i8", "<i8", None),
    "UINT8": ("i8", "<u1", (0, 2**8 - 1)),
    "UINT16": ("i8", "<u2", (0, 2**16 - 1)),
    "UINT32": ("i8", "<u4", (0, 2**32 - 1)),
}


@dataclass
class _Region:
    """A ``"data"`` array of the body: ``body[start:end]`` (brackets included)."""

    kind: str  # "numbers" or "strings"
    start: int
    end: int
    # strings: (first, last) byte spans of whole elements, quotes included,
    # each at most about PIECE long unless it is one long string.
    pieces: list[tuple[int, int]] = field(default_factory=list)


def _string_end(body: bytearray, quote: int) -> int:
    """Index of the quote closing the string opened at ``quote``."""
    end = body.find(b'"', quote + 1)
    while end != -1:
        slashes = 0
        while body[end - 1 - slashes] == 0x5C:
            slashes += 1
        if slashes % 2 == 0:
            return end
        end = body.find(b'"', end + 1)
    raise InvalidArgument("request body is not valid JSON: a string is not closed")


async def _strings_region(body: bytearray, start: int, first: int) -> _Region | None:
    """The string array opened at ``start`` (its first element at ``first``),
    cut into pieces; None when it holds anything but strings."""
    region = _Region("strings", start, start)
    piece_start, pos, count, previous_end = first, first, 0, first
    while True:
        if body[pos] != 0x22:
            return None
        end = _string_end(body, pos) + 1
        if end - pos > PIECE and piece_start != pos:
            # A long string gets a piece of its own (it is sliced, not parsed).
            region.pieces.append((piece_start, previous_end))
            piece_start = pos
        pos = previous_end = end
        while pos < len(body) and body[pos] in _WS:
            pos += 1
        if pos >= len(body):
            return None
        closing = body[pos] == 0x5D
        if closing or end - piece_start >= PIECE:
            region.pieces.append((piece_start, end))
            piece_start = -1
        if closing:
            region.end = pos + 1
            return region
        if body[pos] != 0x2C:
            return None
        pos += 1
        while pos < len(body) and body[pos] in _WS:
            pos += 1
        if pos >= len(body):
            return None
        if piece_start == -1:
            piece_start = pos
        count += 1
        if count % _TOKENS_PER_YIELD == 0:
            await asyncio.sleep(0)


async def _numbers_region(body: bytearray, start: int) -> _Region:
    """The numeric run from ``start``: up to the last ``]`` before the first
    byte that cannot be part of a number array (searched a piece at a time)."""
    end = start + 1
    while end < len(body):
        found = _NOT_NUMERIC.search(body, end, end + PIECE)
        if found is not None:
            end = found.start()
            break
        end = min(end + PIECE, len(body))
        await asyncio.sleep(0)
    while end > start and (body[end - 1] in _WS or body[end - 1] == 0x2C):
        end -= 1
    return _Region("numbers", start, end)


async def _scan(body: bytearray) -> list[_Region]:
    """The big ``"data"`` arrays of the body, in order."""
    regions: list[_Region] = []
    pos, tokens = 0, 0
    while (token := _TOKEN.search(body, pos)) is not None:
        at = token.start()
        pos = at + 1
        tokens += 1
        if tokens % _TOKENS_PER_YIELD == 0:
            await asyncio.sleep(0)
        if body[at] != 0x22:
            continue
        end = _string_end(body, at)
        pos = end + 1
        if end - at != 5 or body[at + 1 : end] != b"data":
            continue
        value = _DATA_VALUE.match(body, pos)
        if value is None:
            continue
        start, first = body.index(b"[", pos), value.end()
        if first < len(body) and body[first] == 0x22:
            region = await _strings_region(body, start, first)
        else:
            region = await _numbers_region(body, start)
            if region.end <= start or body[region.end - 1] != 0x5D:
                region = None
        if region is not None and region.end - region.start >= _MIN_REGION:
            regions.append(region)
            pos = region.end
    return regions


def _numbers_text(body: bytearray, pos: int, end: int) -> tuple[bytes, int]:
    """The next piece of a number array's text (brackets dropped) and where the next starts."""
    stop = min(pos + PIECE, end)
    if stop < end:
        comma = body.find(b",", stop, end)
        stop = end if comma == -1 else comma
    return bytes(body[pos:stop]).translate(None, b"[]"), stop + 1


async def _numbers_blob(body: bytearray, region: _Region, datatype: str, what: str) -> bytearray:
    """A number array in Triton's raw layout of ``datatype``."""
    parse_as, store_as, bounds = _NUMERIC[datatype]
    out = bytearray()
    pos, end, depth = region.start, region.end, 0
    while pos < end:
        text, next_pos = _numbers_text(body, pos, end)
        depth += body.count(b"[", pos, next_pos - 1) - body.count(b"]", pos, next_pos - 1)
        pos = next_pos
        if (depth <= 0) != (pos >= end) or depth < 0:
            raise InvalidArgument(f"{what}: 'data' is not a well-formed array")
        values = _numbers(text, parse_as, f"{what}: {datatype} data")
        if (
            bounds is not None
            and len(values)
            and (values.min() < bounds[0] or values.max() > bounds[1])
        ):
            raise InvalidArgument(f"{what}: {datatype} data out of range {bounds}")
        with warnings.catch_warnings():
            # A float too large for FP16/FP32 becomes inf, as it does through
            # protobuf's typed contents.
            warnings.simplefilter("ignore", RuntimeWarning)
            out += values.astype(store_as).tobytes()
        await asyncio.sleep(0)
    return out


def _numbers(text: bytes, parse_as: str, what: str) -> Any:
    """One piece of a number array (``text``: numbers and commas, no
    brackets) as a numpy array of ``parse_as`` ("f8" or "i8"), read as the
    rest of the body is (``json_tensors.loads``: orjson, in half the time of
    numpy's text parser). Raises InvalidArgument for text that is not JSON
    numbers, and, for "i8", for numbers that are not 64-bit integers."""
    import numpy as np  # here: an API server loads numpy at its first big body only

    kind = "numbers" if parse_as == "f8" else "integers"
    try:
        parsed = loads(b"[" + text + b"]")
    except ValueError:
        raise InvalidArgument(f"{what} must be {kind}") from None
    if parse_as == "f8":
        try:
            return np.array(parsed, dtype=np.float64)
        except OverflowError:  # an integer of hundreds of digits
            raise InvalidArgument(f"{what} out of range of a 64-bit float") from None
    values = np.array(parsed)  # its dtype says whether they all are integers
    if not len(values):
        return values.astype(np.int64)
    if values.dtype.kind == "i":
        return values
    if values.dtype.kind == "u" or all(type(value) is int for value in parsed):
        raise InvalidArgument(f"{what} out of range of a 64-bit signed integer")
    raise InvalidArgument(f"{what} must be {kind}")


def _itemsize(datatype: str) -> int:
    import numpy as np

    return int(np.dtype(_NUMERIC[datatype][1]).itemsize)


async def _checked_text(body: bytearray, start: int, end: int, what: str) -> None:
    """InvalidArgument unless ``body[start:end]`` is UTF-8 text with no control
    character (what JSON allows unescaped in a string); checked in pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for at in range(start, end, PIECE):
        stop = min(at + PIECE, end)
        if _CONTROL.search(body, at, stop):
            raise InvalidArgument(f"{what}: a string holds an unescaped control character")
        try:
            decoder.decode(body[at:stop], final=stop == end)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
        await asyncio.sleep(0)


async def _strings_blob(body: bytearray, region: _Region, what: str) -> tuple[bytearray, int]:
    """A string array as BYTES raw data (each element's UTF-8 after its length)
    and its element count."""
    out, count = bytearray(), 0
    for first, last in region.pieces:
        if last - first > PIECE and body.find(b"\\", first + 1, last - 1) == -1:
            # One long string without escapes: its bytes are the body's.
            await _checked_text(body, first + 1, last - 1, what)
            out += _U32.pack(last - first - 2)
            view = memoryview(body)
            for at in range(first + 1, last - 1, 16 * PIECE):  # memcpy: ~1 ms a piece
                out += view[at : min(at + 16 * PIECE, last - 1)]
                await asyncio.sleep(0)
            del view
            count += 1
            continue
        try:
            values = load_object(b'{"v":[' + body[first:last] + b"]}", "request body")["v"]
        except RecursionError:  # pragma: no cover - strings do not nest
            raise InvalidArgument("request body nests too deeply") from None
        for value in values:
            encoded = value.encode("utf-8")
            out += _U32.pack(len(encoded))
            out += encoded
        count += len(values)
        await asyncio.sleep(0)
    return out, count


def _fallback(body: bytearray, region: _Region) -> Any:
    # Data this module does not convert in pieces: parsed as json.loads would.
    return load_object(b'{"v":' + body[region.start : region.end] + b"}", "request body")["v"]


async def _convert(body: bytearray, item: dict[str, Any], region: _Region) -> bytearray | None:
    """Convert a marked input's data: its raw blob, or None after putting the
    data back into ``item`` as JSON values (checked by the usual parser)."""
    name = item.get("name")
    what = f"input {name!r}"
    datatype = item.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{what} needs a 'datatype' string, got {jtype(datatype)}")
    spec(datatype, what)
    shape = parse_shape(item.get("shape"), what)
    if region.kind == "numbers" and datatype in _NUMERIC:
        blob = await _numbers_blob(body, region, datatype, what)
        count = len(blob) // _itemsize(datatype)
    elif region.kind == "strings" and datatype == "BYTES":
        blob, count = await _strings_blob(body, region, what)
    else:
        item["data"] = _fallback(body, region)
        return None
    if count != prod(shape):
        raise InvalidArgument(
            f"{what}: shape {shape} needs {prod(shape)} elements but 'data' has {count}"
        )
    return blob


async def request_from_big_json(
    holder: list[bytearray], model_name: str = ""
) -> tuple[bytes, ModelInferRequest]:
    """Parse a KServe v2 JSON request body without holding the loop for long.

    ``holder`` holds the body and is emptied (the body is released before
    the answer is assembled). Returns the serialized request, every input in
    ``raw_input_contents``, and the request without that data (what the
    answer is rendered against). Raises InvalidArgument as
    :func:`~anyserve.codec.v2json.request_from_json` does.
    """
    body = holder.pop()
    try:
        regions = await _scan(body)
        nonce = secrets.token_hex(8)
        parts: list[bytes | bytearray | memoryview] = []
        last = 0
        view = memoryview(body)
        for index, region in enumerate(regions):
            parts += (view[last : region.start], f'"\\u0000big:{nonce}:{index}"'.encode())
            last = region.end
        parts.append(view[last:])
        doc = load_object(b"".join(parts), "request body")
        del parts, view
        blobs: dict[int, bytearray] = {}
        inputs = doc.get("inputs")
        used = 0
        prefix = f"\x00big:{nonce}:"
        for index, item in enumerate(inputs if isinstance(inputs, list) else ()):
            data = item.get("data") if isinstance(item, dict) else None
            if not (isinstance(data, str) and data.startswith(prefix)):
                continue
            used += 1
            params = item.get("parameters")
            if isinstance(params, dict) and "binary_data_size" in params:
                raise InvalidArgument(
                    f"input {item.get('name')!r} has both 'data' and binary_data_size"
                )
            blob = await _convert(body, item, regions[int(data[len(prefix) :])])
            if blob is not None:
                del item["data"]
                item["parameters"] = {**(params or {}), "binary_data_size": len(blob)}
                blobs[index] = blob
        blob = None  # the blobs dict holds them, and drops each once copied
        if used != len(regions):
            raise InvalidArgument("request body: a large 'data' array may only be an input's")
        del body
        request, pending = parse_request_doc(doc, model_name)
        del doc
        # One copy into the final bytes (gRPC takes bytes only), from the blobs.
        parts = []
        for index, (tensor, flat, _) in enumerate(pending):
            raw: bytes | bytearray
            if flat is None:
                raw = blobs.pop(index)
            else:
                raw = pack_raw(tensor.datatype, flat, f"input {tensor.name!r}")
            parts += (_RAW_INPUT_TAG + rpc.encode_varint(len(raw)), raw)
        parts.append(request.SerializeToString())
        return b"".join(parts), request
    except UnicodeEncodeError as exc:
        raise unicode_problem(exc) from None
