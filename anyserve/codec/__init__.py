"""KServe v2 tensors: Python values, protobuf messages and the HTTP formats.

One codec for the whole of anyserve (handlers, the API server, the client):

* :mod:`~anyserve.codec.datatypes` -- the datatype table and Triton's raw layout;
* :mod:`~anyserve.codec.values` -- tensors <-> plain Python values: ``decode_*``
  (numeric tensors -> numpy arrays of their shape, or nested lists without
  numpy; BYTES -> ``bytes`` or nested lists of ``bytes``; shaping in
  :mod:`~anyserve.codec.shapes`) and ``encode_*`` (from
  :mod:`~anyserve.codec.encoding`);
* :mod:`~anyserve.codec.responses` -- handler results -> responses (numeric
  numpy outputs go out as raw bytes);
* :mod:`~anyserve.codec.json_tensors` -- v2 JSON tensors and parameter maps;
* :mod:`~anyserve.codec.v2json` -- KServe v2 REST JSON <-> protobuf requests
  and responses;
* :mod:`~anyserve.codec.binary` -- Triton's binary tensor data extension;
* :mod:`~anyserve.codec.generate` -- Triton's generate extension (flat JSON).

Everything a handler or client needs is importable from here.
"""

from __future__ import annotations

from anyserve.codec.binary import (
    HEADER_LENGTH,
    Body,
    binary_outputs_requested,
    parse_header_length,
    request_from_binary,
    request_from_binary_aside,
    response_from_binary,
    response_pieces,
    response_to_http,
)
from anyserve.codec.datatypes import DATATYPES, check_shape, pack_raw, spec, unpack_raw
from anyserve.codec.generate import generate_request, generate_response_json
from anyserve.codec.responses import to_infer_response, to_stream_response, use_raw_outputs
from anyserve.codec.v2json import request_from_json, response_from_json, response_to_json
from anyserve.codec.values import (
    attached_inputs,
    decode_array,
    decode_input,
    decode_inputs,
    decode_outputs,
    encode_input,
    encode_into,
    encode_output,
    input_text,
)

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "Body",
    "attached_inputs",
    "binary_outputs_requested",
    "check_shape",
    "decode_array",
    "decode_input",
    "decode_inputs",
    "decode_outputs",
    "encode_input",
    "encode_into",
    "encode_output",
    "generate_request",
    "generate_response_json",
    "input_text",
    "pack_raw",
    "parse_header_length",
    "request_from_binary",
    "request_from_binary_aside",
    "request_from_json",
    "response_from_binary",
    "response_from_json",
    "response_pieces",
    "response_to_http",
    "response_to_json",
    "spec",
    "to_infer_response",
    "to_stream_response",
    "unpack_raw",
    "use_raw_outputs",
]
