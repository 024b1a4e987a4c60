"""anyserve.codec.binary: Triton's binary tensor data extension, checked against tritonclient."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http

from anyserve import codec
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import ModelInferRequest
from tests.unit.codec_samples import (
    EXPECTED_OUTPUTS,
    NUMPY_MATRIX,
    body_of,
    numpy_response,
    plain,
    sample_response,
    serialized,
)

# --------------------------------------------------------------------------- binary requests


def binary_body(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def test_request_from_binary_by_hand() -> None:
    fp32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    text = serialized([b"ab", b"\xff"])
    body, length = binary_body(
        {
            "id": "b1",
            "inputs": [
                {
                    "name": "f",
                    "datatype": "FP32",
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "j", "datatype": "INT16", "shape": [2], "data": [-1, 2]},
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(text)},
                },
                {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["é"]},
                {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            ],
        },
        fp32,
        text,
    )
    request = codec.request_from_binary(body, length, "m")
    assert (request.id, request.model_name) == ("b1", "m")
    # once one input is binary every input is raw, one entry each, in input order
    assert list(request.raw_input_contents) == [
        fp32,
        struct.pack("<2h", -1, 2),
        text,
        serialized(["é".encode()]),
        b"\x01\x00",
    ]
    assert all(not t.HasField("contents") for t in request.inputs)
    assert "binary_data_size" not in request.inputs[0].parameters
    decoded = codec.decode_inputs(request)
    assert not decoded["f"].flags.writeable  # a view of the body's bytes
    assert plain(decoded) == {
        "f": [[1.0, 2.0], [3.0, 4.0]],
        "j": [-1, 2],
        "s": [b"ab", b"\xff"],
        "t": "é".encode(),
        "b": [True, False],
    }


def test_request_from_binary_matches_tritonclient_body() -> None:
    image = np.arange(12, dtype=np.float16).reshape(3, 4)
    words = np.array([b"x", b"yz"], dtype=object)
    inputs = [
        triton_http.InferInput("image", [3, 4], "FP16"),
        triton_http.InferInput("words", [2], "BYTES"),
        triton_http.InferInput("k", [1], "INT64"),
    ]
    inputs[0].set_data_from_numpy(image, binary_data=True)
    inputs[1].set_data_from_numpy(words, binary_data=True)
    inputs[2].set_data_from_numpy(np.array([7], dtype=np.int64), binary_data=False)
    outputs = [triton_http.InferRequestedOutput("out", binary_data=True)]
    body, length = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs, request_id="t1"
    )
    request = codec.request_from_binary(body, length)
    assert codec.decode_array(request, "image").tolist() == image.tolist()
    assert codec.decode_input(request, "words") == [b"x", b"yz"]
    assert codec.decode_input(request, "k").tolist() == [7]
    assert codec.binary_outputs_requested(request)


def test_request_from_binary_without_binary_inputs_stays_typed() -> None:
    body, length = binary_body(
        {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [3]}]}
    )
    request = codec.request_from_binary(body, length)
    assert not request.raw_input_contents
    assert list(request.inputs[0].contents.int_contents) == [3]


def binary_input(size: Any, shape: list[int], datatype: str = "INT32") -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "x",
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": size},
            }
        ]
    }


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{}", 0, r"Inference-Header-Content-Length 0 is outside the 2-byte body"),
        (b"{}", 3, r"Inference-Header-Content-Length 3 is outside the 2-byte body"),
        (*binary_body(binary_input(8, [2]), b"\x00" * 4), r"binary_data_size 8 runs past the end"),
        (*binary_body(binary_input(4, [1]), b"\x00" * 6), r"body has 2 bytes after the last"),
        (*binary_body(binary_input(4, [2]), b"\x00" * 4), r"binary_data_size is 4 bytes but shape"),
        (*binary_body(binary_input(-1, [2])), r"binary_data_size must be a non-negative integer"),
        (*binary_body(binary_input("4", [2])), r"binary_data_size must be a non-negative integer"),
        (
            *binary_body(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "INT8",
                            "shape": [1],
                            "data": [1],
                            "parameters": {"binary_data_size": 1},
                        }
                    ]
                },
                b"\x01",
            ),
            r"input 'x' has both 'data' and binary_data_size",
        ),
        (
            *binary_body(
                {
                    "inputs": [
                        binary_input(1, [1], "INT8")["inputs"][0],
                        {"name": "y", "datatype": "INT8", "shape": [1], "data": [999]},
                    ]
                },
                b"\x01",
            ),
            r"input 'y': INT8 data out of range",
        ),
        (*binary_body({"inputs": []}, b"junk"), r"body has 4 bytes after the last binary input"),
    ],
)
def test_request_from_binary_errors(body: bytes, length: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.request_from_binary(body, length)


def test_parse_header_length() -> None:
    assert codec.parse_header_length("12") == 12
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length must be an integer"):
        codec.parse_header_length("abc")


# --------------------------------------------------------------------------- responses


def test_response_to_http_plain_json_when_no_binary_asked() -> None:
    request = codec.request_from_json(body_of({"inputs": [], "outputs": [{"name": "matrix"}]}))
    body, length = codec.response_to_http(sample_response(), request)
    assert length is None
    assert json.loads(body)["outputs"] == EXPECTED_OUTPUTS


@pytest.mark.parametrize("raw", [False, True])
def test_response_to_http_binary_outputs_read_by_tritonclient(raw: bool) -> None:
    request = codec.request_from_json(
        body_of(
            {
                "parameters": {"binary_data_output": True},
                "inputs": [],
                "outputs": [{"name": "text", "parameters": {"binary_data": False}}],
            }
        )
    )
    response = sample_response()
    if raw:
        codec.use_raw_outputs(response)
    body, length = codec.response_to_http(response, request)
    assert length is not None
    header = json.loads(body[:length])
    by_name = {o["name"]: o for o in header["outputs"]}
    assert by_name["text"]["data"] == ["héllo"]
    assert by_name["matrix"]["parameters"] == {"binary_data_size": 24}
    assert "data" not in by_name["matrix"]
    assert body[length:].startswith(serialized([b"ok", b"\xff\x00"]))

    result = triton_http.InferResult.from_response_body(body, header_length=length)
    assert result.as_numpy("matrix").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert result.as_numpy("blob").tolist() == [b"ok", b"\xff\x00"]
    assert result.as_numpy("flags").tolist() == [True, False]
    assert result.as_numpy("count").tolist() == [3]
    assert result.as_numpy("text").tolist() == ["héllo"]


def test_response_to_http_per_output_binary() -> None:
    request = codec.request_from_json(
        body_of({"inputs": [], "outputs": [{"name": "count", "parameters": {"binary_data": True}}]})
    )
    body, length = codec.response_to_http(sample_response(), request)
    assert length is not None
    assert body[length:] == struct.pack("<q", 3)
    outputs = json.loads(body[:length])["outputs"]
    assert [("data" in o) for o in outputs] == [True, True, True, True, False]


# --------------------------------------------------------------------------- binary responses


def binary_request(**params: Any) -> ModelInferRequest:
    return codec.request_from_json(body_of({"parameters": params, "inputs": []}))


def test_numpy_raw_outputs_render_binary() -> None:
    response = numpy_response()
    body, length = codec.response_to_http(response, binary_request(binary_data_output=True))
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0] == {
        "name": "matrix",
        "datatype": "FP32",
        "shape": [2, 3],
        "parameters": {"binary_data_size": 24},
    }
    assert body[length : length + 24] == response.raw_output_contents[0]

    result = triton_http.InferResult.from_response_body(body, header_length=length)
    matrix = result.as_numpy("matrix")
    assert matrix.shape == (2, 3) and matrix.dtype == np.float32
    assert matrix.tolist() == NUMPY_MATRIX
    assert result.as_numpy("label").tolist() == [b"x"]

    parsed = codec.response_from_binary(body, length)
    assert list(parsed.raw_output_contents) == list(response.raw_output_contents)
    assert plain(codec.decode_outputs(parsed)) == plain(codec.decode_outputs(response))


def test_response_from_binary_round_trip() -> None:
    request = codec.request_from_json(
        body_of({"inputs": [], "outputs": [{"name": "count", "parameters": {"binary_data": True}}]})
    )
    response = sample_response()
    body, length = codec.response_to_http(response, request)
    assert length is not None
    parsed = codec.response_from_binary(body, length)
    # one binary output: every output is raw, JSON ones packed
    assert len(parsed.raw_output_contents) == len(parsed.outputs)
    assert parsed.raw_output_contents[4] == struct.pack("<q", 3)
    assert plain(codec.decode_outputs(parsed)) == plain(codec.decode_outputs(response))
    assert (parsed.id, parsed.model_version) == ("r9", "2")
    # without binary outputs the body is plain JSON and parses typed
    json_body, _ = codec.response_to_http(response, binary_request())
    parsed = codec.response_from_binary(json_body, len(json_body))
    assert not parsed.raw_output_contents
    assert json.loads(codec.response_to_json(parsed))["outputs"] == EXPECTED_OUTPUTS


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{}", 5, r"malformed response: Inference-Header-Content-Length 5 is outside"),
        (
            *binary_body(
                {
                    "outputs": [
                        {
                            "name": "y",
                            "datatype": "INT32",
                            "shape": [1],
                            "parameters": {"binary_data_size": 4},
                        }
                    ]
                },
                b"\x01\x02",
            ),
            r"output 'y': binary_data_size 4 runs past the end of the body",
        ),
        (b'{"outputs":[]}xx', 14, r"body has 2 bytes after the last binary output"),
    ],
)
def test_response_from_binary_errors(body: bytes, length: int, message: str) -> None:
    with pytest.raises(HandlerError, match=message):
        codec.response_from_binary(body, length)


def test_binary_request_errors_stay_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="body has 4 bytes after the last binary input"):
        codec.request_from_binary(b'{"inputs":[]}junk', 13)
