"""anyserve.api_server.rest: KServe v2 REST JSON, Triton binary and generate extensions."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import serialize_byte_tensor

from anyserve import codec
from anyserve.api_server import rest
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)

Output = ModelInferResponse.InferOutputTensor


def body_of(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def one_input(datatype: str, data: Any, shape: list[int], **extra: Any) -> bytes:
    tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": data, **extra}
    return body_of({"inputs": [tensor]})


def serialized(values: list[bytes]) -> bytes:
    out = serialize_byte_tensor(np.array(values, dtype=object))
    return bytes(out.item() if out.dtype == object else out.tobytes())


# --------------------------------------------------------------------------- JSON requests


@pytest.mark.parametrize(
    ("datatype", "data", "field", "expected"),
    [
        ("BOOL", [True, False], "bool_contents", [True, False]),
        ("UINT8", [0, 255], "uint_contents", [0, 255]),
        ("UINT16", [1, 65535], "uint_contents", [1, 65535]),
        ("UINT32", [1, 2**32 - 1], "uint_contents", [1, 2**32 - 1]),
        ("UINT64", [1, 2**64 - 1], "uint64_contents", [1, 2**64 - 1]),
        ("INT8", [-128, 127], "int_contents", [-128, 127]),
        ("INT16", [-1, 2**15 - 1], "int_contents", [-1, 2**15 - 1]),
        ("INT32", [-(2**31), 5], "int_contents", [-(2**31), 5]),
        ("INT64", [-(2**63), 2**63 - 1], "int64_contents", [-(2**63), 2**63 - 1]),
        ("FP16", [0.5, 2], "fp32_contents", [0.5, 2.0]),
        ("FP32", [0.25, -1], "fp32_contents", [0.25, -1.0]),
        ("FP64", [0.1, 1e300], "fp64_contents", [0.1, 1e300]),
        ("BYTES", ["héllo", ""], "bytes_contents", ["héllo".encode(), b""]),
    ],
)
def test_request_from_json_fills_the_right_field(
    datatype: str, data: list[Any], field: str, expected: list[Any]
) -> None:
    request = rest.request_from_json(one_input(datatype, data, [2]), "model-a")
    assert request.model_name == "model-a"
    tensor = request.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [2])
    assert [f.name for f, _ in tensor.contents.ListFields()] == [field]
    assert list(getattr(tensor.contents, field)) == expected
    assert codec.decode_input(request, "x") == expected


def test_request_from_json_full_document() -> None:
    doc = {
        "id": "42",
        "parameters": {"flag": True, "n": 3, "big": 2**64 - 1, "t": 0.5, "s": "x"},
        "inputs": [
            {"name": "m", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
            {"name": "c", "datatype": "FP32", "shape": [1, 2, 1], "data": [[[1.5], [2.5]]]},
            {"name": "p", "datatype": "BYTES", "shape": [1], "data": ["hi"], "parameters": {}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        "something_else": {"ignored": True},
    }
    request = rest.request_from_json(body_of(doc))
    assert (request.id, request.model_name) == ("42", "")
    params = request.parameters
    assert params["flag"].bool_param is True
    assert params["n"].int64_param == 3
    assert params["big"].uint64_param == 2**64 - 1
    assert params["t"].double_param == 0.5
    assert params["s"].string_param == "x"
    assert codec.decode_inputs(request) == {"m": [1, 2, 3, 4], "c": [1.5, 2.5], "p": b"hi"}
    assert [o.name for o in request.outputs] == ["y", "z"]
    assert request.outputs[0].parameters["binary_data"].bool_param is True
    assert not request.raw_input_contents


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", r"request body is not valid JSON"),
        (b"\xff\xfe\x00", r"request body is not valid JSON"),
        (b"[1, 2]", r"request body must be a JSON object, not an array"),
        (b"{}", r"request needs an 'inputs' array, got null"),
        (body_of({"id": 3, "inputs": []}), r"'id' must be a string, not a number"),
        (body_of({"inputs": [5]}), r"inputs\[0\] must be an object, not a number"),
        (body_of({"inputs": [{"datatype": "FP32"}]}), r"inputs\[0\] needs a 'name'"),
        (body_of({"inputs": [{"name": "x"}]}), r"input 'x' needs a 'datatype' string, got null"),
        (
            body_of({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}),
            r"input 'x' needs a 'shape' array, got null",
        ),
        (one_input("FP32", [1], [-1]), r"input 'x': shape \[-1\] must hold non-negative"),
        (one_input("FP32", [1, 2, 3], [2]), r"input 'x': shape \[2\] needs 2 elements but 'data'"),
        (one_input("FP32", [[1, 2], [3]], [2, 2]), r"input 'x': shape \[2, 2\] needs 4 elements"),
        (one_input("FP32", [[1, 2], 3], [3]), r"input 'x': 'data' mixes arrays and scalars"),
        (one_input("FP32", {"a": 1}, [1]), r"input 'x': 'data' must be an array, not an object"),
        (one_input("FP32", None, [1]), r"input 'x' has no 'data'"),
        (one_input("BF16", [1.0], [1]), r"input 'x': datatype BF16 is unsupported"),
        (one_input("FLOAT", [1.0], [1]), r"input 'x': unknown datatype 'FLOAT'"),
        (one_input("FP32", ["a"], [1]), r"input 'x': data does not fit FP32"),
        (one_input("INT32", [1.5], [1]), r"input 'x': data does not fit INT32"),
        (one_input("UINT32", [-1], [1]), r"input 'x': data does not fit UINT32"),
        (one_input("INT8", [128], [1]), r"input 'x': INT8 data out of range"),
        (one_input("UINT16", [-1], [1]), r"input 'x': UINT16 data out of range"),
        (one_input("INT16", ["a"], [1]), r"input 'x': INT16 data must be integers"),
        (one_input("BYTES", ["a", 1], [2]), r"input 'x': BYTES data elements must be strings"),
        (one_input("BOOL", [1], [1]), r"input 'x': BOOL data elements must be true or false"),
        (
            one_input("FP32", [1], [1], parameters={"p": [1]}),
            r"input 'x' parameters: parameter 'p' is an array; expected a boolean",
        ),
        (
            body_of({"parameters": {"p": 2**64}, "inputs": []}),
            r"request parameters: parameter 'p' is out of the 64-bit range",
        ),
        (
            body_of({"inputs": [], "outputs": [{"parameters": {}}]}),
            r"outputs\[0\] must be an object with a 'name' string",
        ),
        (
            body_of(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "INT8",
                            "shape": [1],
                            "parameters": {"binary_data_size": 1},
                        }
                    ]
                }
            ),
            r"binary_data_size used without a Inference-Header-Content-Length header",
        ),
    ],
)
def test_request_from_json_errors(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        rest.request_from_json(body)


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
    request = rest.request_from_binary(body, length, "m")
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
    assert codec.decode_inputs(request) == {
        "f": [1.0, 2.0, 3.0, 4.0],
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
    request = rest.request_from_binary(body, length)
    assert codec.decode_array(request, "image").tolist() == image.tolist()
    assert codec.decode_input(request, "words") == [b"x", b"yz"]
    assert codec.decode_input(request, "k") == 7
    assert rest.binary_outputs_requested(request)


def test_request_from_binary_without_binary_inputs_stays_typed() -> None:
    body, length = binary_body(
        {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [3]}]}
    )
    request = rest.request_from_binary(body, length)
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
        rest.request_from_binary(body, length)


def test_parse_header_length() -> None:
    assert rest.parse_header_length("12") == 12
    with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length must be an integer"):
        rest.parse_header_length("abc")


# --------------------------------------------------------------------------- responses


def sample_response() -> ModelInferResponse:
    response = codec.to_infer_response(
        {
            "text": "héllo",
            "blob": [b"ok", b"\xff\x00"],
            "matrix": np.arange(6, dtype=np.float32).reshape(2, 3),
            "flags": [True, False],
            "count": 3,
        },
        ModelInferRequest(id="r9", model_name="m"),
    )
    response.model_version = "2"
    response.parameters["seq"].CopyFrom(InferParameter(int64_param=5))
    return response


EXPECTED_OUTPUTS = [
    {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
    {
        "name": "blob",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"content_encoding": "base64"},
        "data": [base64.b64encode(b"ok").decode(), base64.b64encode(b"\xff\x00").decode()],
    },
    {"name": "matrix", "datatype": "FP32", "shape": [2, 3], "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
    {"name": "flags", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    {"name": "count", "datatype": "INT64", "shape": [1], "data": [3]},
]


@pytest.mark.parametrize("raw", [False, True])
def test_response_to_json(raw: bool) -> None:
    response = sample_response()
    if raw:
        codec.use_raw_outputs(response)
    body = rest.response_to_json(response)
    assert b" " not in body.replace(b"\\u", b"")  # compact separators
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "r9",
        "parameters": {"seq": 5},
        "outputs": EXPECTED_OUTPUTS,
    }
    assert list(json.loads(rest.response_to_json(ModelInferResponse(id="a")))) == [
        "model_name",
        "id",
        "outputs",
    ]


def test_response_to_http_plain_json_when_no_binary_asked() -> None:
    request = rest.request_from_json(body_of({"inputs": [], "outputs": [{"name": "matrix"}]}))
    body, length = rest.response_to_http(sample_response(), request)
    assert length is None
    assert json.loads(body)["outputs"] == EXPECTED_OUTPUTS


@pytest.mark.parametrize("raw", [False, True])
def test_response_to_http_binary_outputs_read_by_tritonclient(raw: bool) -> None:
    request = rest.request_from_json(
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
    body, length = rest.response_to_http(response, request)
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
    request = rest.request_from_json(
        body_of({"inputs": [], "outputs": [{"name": "count", "parameters": {"binary_data": True}}]})
    )
    body, length = rest.response_to_http(sample_response(), request)
    assert length is not None
    assert body[length:] == struct.pack("<q", 3)
    outputs = json.loads(body[:length])["outputs"]
    assert [("data" in o) for o in outputs] == [True, True, True, True, False]


def test_malformed_responses_raise_handler_error() -> None:
    unknown = ModelInferResponse(outputs=[Output(name="o", datatype="WHAT")])
    with pytest.raises(HandlerError, match="malformed response: output 'o': unknown datatype"):
        rest.response_to_json(unknown)
    short = ModelInferResponse(
        outputs=[Output(name="a", datatype="INT8"), Output(name="b", datatype="INT8")],
        raw_output_contents=[b"\x01"],
    )
    with pytest.raises(HandlerError, match="1 raw_output_contents for 2 outputs"):
        rest.response_to_json(short)
    overflow = ModelInferResponse(
        outputs=[
            Output(name="o", datatype="INT8", contents=InferTensorContents(int_contents=[999]))
        ]
    )
    request = ModelInferRequest(parameters={"binary_data_output": InferParameter(bool_param=True)})
    with pytest.raises(HandlerError, match="output 'o': data does not fit INT8"):
        rest.response_to_http(overflow, request)


# --------------------------------------------------------------------------- generate


def test_generate_request() -> None:
    body = body_of(
        {
            "id": "g1",
            "text_input": "hello",
            "max_tokens": 16,
            "temperature": 0.5,
            "stream": False,
            "stop": ["a", "b"],
            "ids": [1, 2],
            "parameters": {"top_k": 4},
        }
    )
    request = rest.generate_request(body, "llm")
    assert (request.id, request.model_name) == ("g1", "llm")
    assert request.parameters["top_k"].int64_param == 4
    kinds = {t.name: (t.datatype, list(t.shape)) for t in request.inputs}
    assert kinds == {
        "text_input": ("BYTES", [1]),
        "max_tokens": ("INT64", [1]),
        "temperature": ("FP64", [1]),
        "stream": ("BOOL", [1]),
        "stop": ("BYTES", [2]),
        "ids": ("INT64", [2]),
    }
    assert codec.input_text(request, "text_input") == "hello"
    assert codec.decode_input(request, "stop") == [b"a", b"b"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", r"generate request body is not valid JSON"),
        (b'"text"', r"generate request body must be a JSON object, not a string"),
        (body_of({"x": None}), r"input 'x' is null; expected a scalar or array"),
        (body_of({"x": {"a": 1}}), r"input 'x' is an object"),
        (body_of({"x": [[1]]}), r"input 'x': a list must hold only"),
        (body_of({"x": [1, "a"]}), r"input 'x': a list must hold only"),
        (body_of({"x": 2**64}), r"input 'x': integer out of the INT64 range"),
        (body_of({"id": 1}), r"'id' must be a string"),
        (body_of({"parameters": [1]}), r"request parameters must be an object, not an array"),
    ],
)
def test_generate_request_errors(body: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        rest.generate_request(body, "m")


@pytest.mark.parametrize("raw", [False, True])
def test_generate_response_json(raw: bool) -> None:
    response = codec.to_infer_response(
        {"text_output": "tök", "finish_reason": b"\xffstop", "logprobs": [-0.5, -1.0], "n": 1},
        ModelInferRequest(model_name="llm"),
    )
    if raw:
        codec.use_raw_outputs(response)
    assert json.loads(rest.generate_response_json(response)) == {
        "model_name": "llm",
        "text_output": "tök",
        "finish_reason": "\ufffdstop",
        "logprobs": [-0.5, -1.0],
        "n": 1,
    }
    response.id, response.model_version = "7", "1"
    doc = json.loads(rest.generate_response_json(response))
    assert (doc["id"], doc["model_version"]) == ("7", "1")


def test_large_numeric_payload_round_trip() -> None:
    data = [float(i) for i in range(100_000)]
    request = rest.request_from_json(one_input("FP64", data, [1000, 100]))
    assert codec.decode_array(request, "x").shape == (1000, 100)
    response = codec.to_infer_response({"y": data}, request)
    assert json.loads(rest.response_to_json(response))["outputs"][0]["data"] == data
