"""anyserve.codec.v2json and .generate: KServe v2 REST JSON and Triton's generate
extension <-> protobuf."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from anyserve import codec
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)
from tests.unit.codec_samples import (
    EXPECTED_OUTPUTS,
    NUMPY_MATRIX,
    Output,
    body_of,
    numpy_response,
    one_input,
    plain,
    sample_response,
)

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
    request = codec.request_from_json(one_input(datatype, data, [2]), "model-a")
    assert request.model_name == "model-a"
    tensor = request.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [2])
    assert [f.name for f, _ in tensor.contents.ListFields()] == [field]
    assert list(getattr(tensor.contents, field)) == expected
    assert plain(codec.decode_input(request, "x")) == expected


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
    request = codec.request_from_json(body_of(doc))
    assert (request.id, request.model_name) == ("42", "")
    params = request.parameters
    assert params["flag"].bool_param is True
    assert params["n"].int64_param == 3
    assert params["big"].uint64_param == 2**64 - 1
    assert params["t"].double_param == 0.5
    assert params["s"].string_param == "x"
    decoded = codec.decode_inputs(request)
    assert plain(decoded) == {"m": [[1, 2], [3, 4]], "c": [[[1.5], [2.5]]], "p": b"hi"}
    assert (decoded["m"].dtype, decoded["c"].shape) == (np.int32, (1, 2, 1))
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
        codec.request_from_json(body)


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize("raw", [False, True])
def test_response_to_json(raw: bool) -> None:
    response = sample_response()
    if raw:
        codec.use_raw_outputs(response)
    body = codec.response_to_json(response)
    assert b" " not in body.replace(b"\\u", b"")  # compact separators
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "2",
        "id": "r9",
        "parameters": {"seq": 5},
        "outputs": EXPECTED_OUTPUTS,
    }
    assert list(json.loads(codec.response_to_json(ModelInferResponse(id="a")))) == [
        "model_name",
        "id",
        "outputs",
    ]


def test_malformed_responses_raise_handler_error() -> None:
    unknown = ModelInferResponse(outputs=[Output(name="o", datatype="WHAT")])
    with pytest.raises(HandlerError, match="malformed response: output 'o': unknown datatype"):
        codec.response_to_json(unknown)
    short = ModelInferResponse(
        outputs=[Output(name="a", datatype="INT8"), Output(name="b", datatype="INT8")],
        raw_output_contents=[b"\x01"],
    )
    with pytest.raises(HandlerError, match="1 raw_output_contents for 2 outputs"):
        codec.response_to_json(short)
    overflow = ModelInferResponse(
        outputs=[
            Output(name="o", datatype="INT8", contents=InferTensorContents(int_contents=[999]))
        ]
    )
    request = ModelInferRequest(parameters={"binary_data_output": InferParameter(bool_param=True)})
    with pytest.raises(HandlerError, match="output 'o': data does not fit INT8"):
        codec.response_to_http(overflow, request)


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
    request = codec.generate_request(body, "llm")
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
        codec.generate_request(body, "m")


@pytest.mark.parametrize("raw", [False, True])
def test_generate_response_json(raw: bool) -> None:
    response = codec.to_infer_response(
        {"text_output": "tök", "finish_reason": b"\xffstop", "logprobs": [-0.5, -1.0], "n": 1},
        ModelInferRequest(model_name="llm"),
    )
    if raw:
        codec.use_raw_outputs(response)
    assert json.loads(codec.generate_response_json(response)) == {
        "model_name": "llm",
        "text_output": "tök",
        "finish_reason": "\ufffdstop",
        "logprobs": [-0.5, -1.0],
        "n": 1,
    }
    response.id, response.model_version = "7", "1"
    doc = json.loads(codec.generate_response_json(response))
    assert (doc["id"], doc["model_version"]) == ("7", "1")


def test_large_numeric_payload_round_trip() -> None:
    data = [float(i) for i in range(100_000)]
    request = codec.request_from_json(one_input("FP64", data, [1000, 100]))
    assert codec.decode_array(request, "x").shape == (1000, 100)
    response = codec.to_infer_response({"y": data}, request)
    assert json.loads(codec.response_to_json(response))["outputs"][0]["data"] == data


# --------------------------------------------------------------------------- parsing responses


@pytest.mark.parametrize("raw", [False, True])
def test_response_from_json_inverts_response_to_json(raw: bool) -> None:
    response = sample_response()
    if raw:
        codec.use_raw_outputs(response)
    parsed = codec.response_from_json(codec.response_to_json(response))
    assert (parsed.model_name, parsed.model_version, parsed.id) == ("m", "2", "r9")
    assert parsed.parameters["seq"].int64_param == 5
    assert plain(codec.decode_outputs(parsed)) == plain(codec.decode_outputs(response))
    assert [(o.name, o.datatype, list(o.shape)) for o in parsed.outputs] == [
        (o.name, o.datatype, list(o.shape)) for o in response.outputs
    ]
    assert "content_encoding" not in parsed.outputs[1].parameters  # base64 undone
    assert list(parsed.outputs[1].contents.bytes_contents) == [b"ok", b"\xff\x00"]
    # text parses from str as well as bytes; nested data is flattened, then decodes shaped
    doc = {"outputs": [{"name": "m", "datatype": "INT32", "shape": [2, 1], "data": [[1], [2]]}]}
    decoded = codec.decode_outputs(codec.response_from_json(json.dumps(doc)))
    assert plain(decoded) == {"m": [[1], [2]]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"nope", r"malformed response: response body is not valid JSON"),
        (b"[]", r"malformed response: response body must be a JSON object, not an array"),
        (b"{}", r"malformed response: response needs an 'outputs' array, got null"),
        (body_of({"id": 1, "outputs": []}), r"'id' must be a string, not a number"),
        (body_of({"outputs": [{"name": "y"}]}), r"output 'y' needs a 'datatype' string"),
        (
            body_of({"outputs": [{"name": "y", "datatype": "INT8", "shape": [1], "data": [999]}]}),
            r"output 'y': INT8 data out of range",
        ),
        (
            body_of({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": ["a"]}]}),
            r"output 'y': data does not fit FP32",
        ),
        (
            body_of(
                {
                    "outputs": [
                        {
                            "name": "y",
                            "datatype": "BYTES",
                            "shape": [1],
                            "parameters": {"content_encoding": "base64"},
                            "data": ["%%%"],
                        }
                    ]
                }
            ),
            r"output 'y': BYTES data is not valid base64",
        ),
        (
            body_of(
                {
                    "outputs": [
                        {
                            "name": "y",
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
def test_response_from_json_errors(body: bytes, message: str) -> None:
    with pytest.raises(HandlerError, match=message):
        codec.response_from_json(body)


# --------------------------------------------------------------------------- numpy outputs


def test_numpy_raw_outputs_render_as_json() -> None:
    response = numpy_response()
    assert len(response.raw_output_contents) == 2
    doc = json.loads(codec.response_to_json(response))
    assert doc["outputs"] == [
        {
            "name": "matrix",
            "datatype": "FP32",
            "shape": [2, 3],
            "data": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5],
        },
        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["x"]},
    ]
    parsed = codec.response_from_json(codec.response_to_json(response))
    values = codec.decode_outputs(parsed)["matrix"]
    assert (values.shape, values.dtype) == ((2, 3), np.float32)
    assert values.tolist() == NUMPY_MATRIX
    assert json.loads(codec.generate_response_json(response))["matrix"] == [
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        2.5,
    ]


def test_request_bytes_keep_content_encoding_as_sent() -> None:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1]}]}
    doc["inputs"][0]["data"] = ["aGk="]
    doc["inputs"][0]["parameters"] = {"content_encoding": "base64"}
    request = codec.request_from_json(body_of(doc))
    # requests keep their parameters and data as sent: base64 is a response convention
    assert request.inputs[0].parameters["content_encoding"].string_param == "base64"
    assert codec.decode_input(request, "x") == b"aGk="
