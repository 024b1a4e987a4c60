"""Triton's binary tensor data extension over HTTP.

A body is a JSON header of ``Inference-Header-Content-Length`` bytes (the
v2 JSON document of :mod:`anyserve.codec.v2json`) followed by the raw data
(Triton's layout) of every tensor whose parameters give ``binary_data_size``,
in tensor order. Once one tensor is binary, every tensor of the message goes
to ``raw_input_contents``/``raw_output_contents`` (JSON ones packed). Outputs
are answered this way when asked for with ``binary_data`` (per output) or
``binary_data_output`` (request parameter); explicit per-output values win.

A malformed request raises :class:`~anyserve.errors.InvalidArgument`; a
response that cannot be rendered or parsed raises
:class:`~anyserve.errors.HandlerError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from anyserve.codec.datatypes import pack_raw, spec
from anyserve.codec.json_tensors import (
    Pending,
    check_raw_count,
    client_text,
    encode_json,
    fill_typed,
    load_object,
    output_json,
    params_json,
)
from anyserve.codec.v2json import (
    parse_request_doc,
    parse_response_doc,
    response_head,
    response_to_json,
)
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse
from anyserve.shm import REGION

__all__ = [
    "HEADER_LENGTH",
    "binary_outputs_requested",
    "parse_header_length",
    "request_from_binary",
    "response_from_binary",
    "response_pieces",
    "response_to_http",
]

HEADER_LENGTH = "Inference-Header-Content-Length"


def parse_header_length(value: str) -> int:
    """Parse an ``Inference-Header-Content-Length`` header; InvalidArgument if not an int."""
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None


# A body: bytes, or a bytearray / memoryview of one read in pieces (no copy to bytes).
Body = bytes | bytearray | memoryview


def _header(body: Body, header_length: int) -> dict[str, Any]:
    if not 0 < header_length <= len(body):
        raise InvalidArgument(
            f"{HEADER_LENGTH} {header_length} is outside the {len(body)}-byte body"
        )
    return load_object(bytes(body[:header_length]), "JSON header")


def _fill_raw(
    pending: list[Pending],
    raw: Any,
    body: Body,
    offset: int,
    kind: str,
    aside: tuple[int, dict[int, memoryview]] | None = None,
) -> None:
    """Fill ``raw`` (raw_*_contents) from the body after the header, or the
    typed contents when no tensor is binary. With ``aside`` ``(minimum,
    found)``, binary data of at least ``minimum`` bytes is not copied: its
    entry stays empty and ``found[index]`` is a view of it in the body."""
    if any(size is not None for _, _, size in pending):
        for index, (tensor, flat, size) in enumerate(pending):
            what = f"{kind} {tensor.name!r}"
            if size is None:
                assert flat is not None
                raw.append(pack_raw(tensor.datatype, flat, what))
                continue
            if offset + size > len(body):
                raise InvalidArgument(
                    f"{what}: binary_data_size {size} runs past the end of the body"
                    f" ({len(body) - offset} bytes left)"
                )
            if aside is not None and size >= aside[0]:
                aside[1][index] = memoryview(body)[offset : offset + size]
                raw.append(b"")
            else:
                raw.append(bytes(body[offset : offset + size]))
            offset += size
    else:
        fill_typed(pending)
    if offset != len(body):
        raise InvalidArgument(f"body has {len(body) - offset} bytes after the last binary {kind}")


@client_text
def request_from_binary(body: Body, header_length: int, model_name: str = "") -> ModelInferRequest:
    """Parse a request using Triton's binary tensor data extension.

    ``body[:header_length]`` is the JSON header; the rest holds, in input order,
    the data of each input with a ``binary_data_size`` parameter. When any input
    is binary, every input (JSON ones converted) is put in raw_input_contents.
    Raises InvalidArgument as :func:`~anyserve.codec.v2json.request_from_json`
    does, and when the header length is out of range, sizes run past the body,
    or bytes are left.
    """
    request, pending = parse_request_doc(_header(body, header_length), model_name)
    _fill_raw(pending, request.raw_input_contents, body, header_length, "input")
    return request


@client_text
def request_from_binary_aside(
    body: Body, header_length: int, model_name: str, minimum: int
) -> tuple[ModelInferRequest, dict[int, memoryview]]:
    """:func:`request_from_binary`, leaving binary inputs of at least
    ``minimum`` bytes out of the message (their ``raw_input_contents`` entry
    is empty): returned by input index as views of ``body`` (no copy), for
    the caller to put where they go. ``minimum`` 0: nothing is left out."""
    request, pending = parse_request_doc(_header(body, header_length), model_name)
    found: dict[int, memoryview] = {}
    aside = (minimum, found) if minimum > 0 else None
    _fill_raw(pending, request.raw_input_contents, body, header_length, "input", aside)
    return request, found


def response_from_binary(body: bytes, header_length: int) -> ModelInferResponse:
    """Parse a response in the binary form (what :func:`response_to_http` renders).

    Raises HandlerError (``malformed response: ...``) for a malformed body.
    """
    try:
        response, pending = parse_response_doc(_header(body, header_length))
        _fill_raw(pending, response.raw_output_contents, body, header_length, "output")
    except InvalidArgument as exc:
        raise HandlerError(f"malformed response: {exc.message}") from None
    return response


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


def response_to_http(
    response: ModelInferResponse,
    request: ModelInferRequest,
    blobs_by_index: Mapping[int, Any] | None = None,
) -> tuple[bytes, int | None]:
    """:func:`response_pieces` as one body: ``(body, header_length or None)``."""
    pieces, header_length = response_pieces(response, request, blobs_by_index)
    return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), header_length


def response_pieces(
    response: ModelInferResponse,
    request: ModelInferRequest,
    blobs_by_index: Mapping[int, Any] | None = None,
) -> tuple[list[Any], int | None]:
    """Render a response for the HTTP edge: ``(body pieces, header_length or
    None)``, the body being the pieces one after another: the JSON, then the
    binary outputs as they are (``blobs_by_index``' buffers are not copied).

    Outputs the request asked for as binary (``binary_data`` per output, else
    the ``binary_data_output`` request parameter) are sent after the JSON header
    with a ``binary_data_size`` parameter and no ``data``; the second element is
    then the header length (for ``Inference-Header-Content-Length``), else None
    and the body is plain JSON. ``blobs_by_index``: outputs' raw bytes kept out
    of the message (any buffer; their entries are empty). Raises HandlerError
    for a malformed response.
    """
    aside = blobs_by_index or {}
    default, explicit = _binary_choice(request)
    if not aside and not default and not any(explicit.values()):
        return [response_to_json(response)], None  # plain JSON (text answers: built directly)
    check_raw_count(response)
    doc = response_head(response)
    outputs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    for index, tensor in enumerate(response.outputs):
        if not explicit.get(tensor.name, default) or REGION in tensor.parameters:
            if index in aside:  # JSON is built from the message
                response.raw_output_contents[index] = bytes(aside[index])
            outputs.append(output_json(response, index))
            continue
        blobs.append(aside[index] if index in aside else _output_blob(response, index))
        params = params_json(tensor.parameters)
        params["binary_data_size"] = len(blobs[-1])
        outputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": params,
            }
        )
    doc["outputs"] = outputs
    header = encode_json(doc).encode("utf-8")
    if not blobs:
        return [header], None
    return [header, *blobs], len(header)
