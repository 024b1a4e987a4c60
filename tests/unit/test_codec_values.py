"""anyserve.codec.values and .responses: KServe tensors <-> Python values, and handler
results -> responses, cross-checked against tritonclient."""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from anyserve import codec
from anyserve.errors import InvalidArgument
from anyserve.proto import (
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
)
from tests.unit.codec_samples import plain

Input = ModelInferRequest.InferInputTensor
Output = ModelInferResponse.InferOutputTensor

# datatype -> values that survive the datatype exactly
CASES: dict[str, list[Any]] = {
    "BOOL": [True, False, True],
    "UINT8": [0, 7, 255],
    "UINT16": [0, 65535, 3],
    "UINT32": [0, 2**32 - 1, 5],
    "UINT64": [0, 2**64 - 1, 5],
    "INT8": [-128, 0, 127],
    "INT16": [-(2**15), 0, 2**15 - 1],
    "INT32": [-(2**31), 0, 2**31 - 1],
    "INT64": [-(2**63), 0, 2**63 - 1],
    "FP16": [0.5, -2.0, 65504.0],
    "FP32": [0.25, -1.5, 2.0**100],
    "FP64": [0.1, -1e300, 2.5],
    "BYTES": [b"a", b"", b"\xff\x00\xfe"],
}


def typed_request(
    datatype: str, values: list[Any], shape: list[int] | None = None
) -> ModelInferRequest:
    tensor = Input(name="x", datatype=datatype, shape=[len(values)] if shape is None else shape)
    if values:
        getattr(tensor.contents, codec.DATATYPES[datatype][0]).extend(values)
    return ModelInferRequest(id="r", model_name="m", inputs=[tensor])


def triton_raw(datatype: str, values: list[Any]) -> bytes:
    """Raw bytes the way tritonclient builds raw_input_contents."""
    if datatype == "BYTES":
        # tritonclient 2.73 returns a 0-d object array holding the serialized bytes
        serialized = serialize_byte_tensor(np.array(values, dtype=object))
        return bytes(serialized.item() if serialized.dtype == object else serialized.tobytes())
    return np.array(values, dtype=triton_to_np_dtype(datatype)).tobytes()


def raw_request(
    datatype: str, values: list[Any], shape: list[int] | None = None
) -> ModelInferRequest:
    tensor = Input(name="x", datatype=datatype, shape=[len(values)] if shape is None else shape)
    return ModelInferRequest(inputs=[tensor], raw_input_contents=[triton_raw(datatype, values)])


@pytest.mark.parametrize("datatype", CASES)
def test_typed_and_raw_decode_every_datatype(datatype: str) -> None:
    values = CASES[datatype]
    for request in (typed_request(datatype, values), raw_request(datatype, values)):
        decoded = codec.decode_inputs(request)
        assert plain(decoded) == {"x": values}
        assert plain(codec.decode_input(request, "x")) == values
        if datatype == "BYTES":
            assert type(decoded["x"]) is list
        else:
            assert decoded["x"].shape == (3,)
            assert decoded["x"].dtype == triton_to_np_dtype(datatype)


@pytest.mark.parametrize("datatype", CASES)
def test_one_element_of_shape_1_keeps_its_shape_except_bytes(datatype: str) -> None:
    value = CASES[datatype][-1]
    for request in (typed_request(datatype, [value]), raw_request(datatype, [value])):
        decoded = codec.decode_input(request, "x")
        if datatype == "BYTES":
            assert decoded == value and type(decoded) is bytes
        else:
            assert decoded.shape == (1,)
            assert decoded.tolist() == [value]


@pytest.mark.parametrize("datatype", CASES)
def test_empty_shape_decodes_to_a_scalar(datatype: str) -> None:
    value = CASES[datatype][-1]
    for request in (typed_request(datatype, [value], []), raw_request(datatype, [value], [])):
        decoded = codec.decode_input(request, "x")
        if datatype == "BYTES":
            assert decoded == value and type(decoded) is bytes
        else:
            assert decoded.shape == ()
            assert decoded.item() == value


@pytest.mark.parametrize("datatype", CASES)
def test_decode_array_matches_shape_and_dtype(datatype: str) -> None:
    values = CASES[datatype] * 2
    expected = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(2, 3)
    for request in (
        typed_request(datatype, values, [2, 3]),
        raw_request(datatype, values, [2, 3]),
    ):
        array = codec.decode_array(request, "x")
        assert array.shape == (2, 3)
        assert array.dtype == expected.dtype
        assert array.tolist() == expected.tolist()


def test_decode_array_scalar_and_wildcard_shapes() -> None:
    assert codec.decode_array(typed_request("INT64", [4], []), "x").shape == ()
    assert codec.decode_array(typed_request("INT64", [1, 2], []), "x").shape == (2,)
    assert codec.decode_array(typed_request("INT64", [1, 2, 3, 4], [-1, 2]), "x").shape == (2, 2)


def test_raw_fp16_and_bool_layout() -> None:
    request = ModelInferRequest(
        inputs=[Input(name="h", datatype="FP16", shape=[2]), Input(name="b", datatype="BOOL")],
        raw_input_contents=[struct.pack("<2e", 1.5, -2.0), b"\x00\x01\x02"],
    )
    decoded = codec.decode_inputs(request)
    assert plain(decoded) == {"h": [1.5, -2.0], "b": [False, True, True]}
    assert (decoded["h"].dtype, decoded["b"].dtype) == (np.float16, np.bool_)


def test_empty_and_wildcard_shapes() -> None:
    # proto3 cannot tell a scalar shape from an unset one: empty shapes are not checked
    assert codec.decode_input(typed_request("INT32", [1, 2], []), "x").tolist() == [1, 2]
    wildcard = codec.decode_input(typed_request("INT32", [1, 2, 3, 4], [-1, 2]), "x")
    assert wildcard.tolist() == [[1, 2], [3, 4]]
    assert codec.decode_input(typed_request("INT32", [], [0, 3]), "x").shape == (0, 3)
    with pytest.raises(InvalidArgument, match=r"input 'x': 3 elements cannot fill shape \[-1, 2\]"):
        codec.decode_input(typed_request("INT32", [1, 2, 3], [-1, 2]), "x")
    with pytest.raises(InvalidArgument, match="negative dimension"):
        codec.decode_input(typed_request("INT32", [1], [-2]), "x")


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (typed_request("FP32", [1.0, 2.0], [3]), r"input 'x': shape \[3\] needs 3 elements but 2"),
        (raw_request("FP32", [1.0, 2.0], [3]), r"input 'x': shape \[3\] needs 3 elements but 2"),
        (
            ModelInferRequest(
                inputs=[Input(name="x", datatype="INT32")], raw_input_contents=[b"12345"]
            ),
            r"input 'x': raw data of 5 bytes is not a multiple of the INT32 element size \(4",
        ),
        (
            ModelInferRequest(
                inputs=[Input(name="x", datatype="BYTES")], raw_input_contents=[b"\x01\x00"]
            ),
            r"input 'x': BYTES data is truncated: 2 bytes left at offset 0",
        ),
        (
            ModelInferRequest(
                inputs=[Input(name="x", datatype="BYTES")],
                raw_input_contents=[b"\x01\x00\x00\x00a\x09\x00\x00\x00abc"],
            ),
            r"input 'x': BYTES element 1 declares 9 bytes but only 3 remain",
        ),
        (
            ModelInferRequest(
                inputs=[Input(name="x", datatype="INT8"), Input(name="y", datatype="INT8")],
                raw_input_contents=[b"\x01"],
            ),
            r"1 raw_input_contents entries for 2 inputs",
        ),
        (typed_request("BF16", []), r"input 'x': datatype BF16 is unsupported"),
        (typed_request("COMPLEX", []), r"input 'x': unknown datatype 'COMPLEX'"),
        (
            ModelInferRequest(
                inputs=[
                    Input(
                        name="x",
                        datatype="INT32",
                        shape=[1],
                        contents=InferTensorContents(int64_contents=[1]),
                    )
                ]
            ),
            r"input 'x' has datatype INT32, whose data belongs in int_contents, but its data is"
            r" in int64_contents",
        ),
        (
            ModelInferRequest(
                inputs=[
                    Input(name="x", datatype="INT8", contents=InferTensorContents(int_contents=[1]))
                ],
                raw_input_contents=[b"\x01"],
            ),
            r"input 'x' has typed contents but the request uses raw_input_contents",
        ),
    ],
)
def test_malformed_inputs_raise_invalid_argument(request_: ModelInferRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_inputs(request_)


def test_duplicate_and_missing_inputs() -> None:
    request = ModelInferRequest(inputs=[Input(name="a", datatype="BYTES")] * 2)
    with pytest.raises(InvalidArgument, match="input 'a' appears more than once"):
        codec.decode_inputs(request)
    with pytest.raises(InvalidArgument, match=r"no input 'b' \(inputs present: 'a', 'a'\)"):
        codec.decode_input(request, "b")
    with pytest.raises(InvalidArgument, match=r"no input 'b' \(inputs present: none\)"):
        codec.decode_array(ModelInferRequest(), "b")


def test_input_text() -> None:
    request = raw_request("BYTES", ["héllo".encode()])
    assert codec.input_text(request, "x") == "héllo"
    assert codec.input_text(typed_request("BYTES", [b"hi"]), "x") == "hi"
    with pytest.raises(InvalidArgument, match="input 'x' must hold exactly one element, it has 2"):
        codec.input_text(typed_request("BYTES", [b"a", b"b"]), "x")
    with pytest.raises(
        InvalidArgument, match="input 'x' must be BYTES to be read as text, not INT32"
    ):
        codec.input_text(typed_request("INT32", [1]), "x")
    with pytest.raises(InvalidArgument, match="input 'x' is not valid UTF-8"):
        codec.input_text(typed_request("BYTES", [b"\xff"]), "x")


def test_decode_array_raw_is_read_only_view() -> None:
    array = codec.decode_array(raw_request("FP32", [1.0, 2.0]), "x")
    assert not array.flags.writeable
    assert array.dtype == np.float32


def test_numpy_is_optional() -> None:
    script = (
        "import sys; sys.modules['numpy'] = None\n"
        "from anyserve import codec\n"
        "from anyserve.proto import ModelInferRequest\n"
        "r = ModelInferRequest(inputs=[{'name': 'x', 'datatype': 'INT8', 'shape': [1]}],"
        " raw_input_contents=[b'\\x05'])\n"
        "assert codec.decode_inputs(r) == {'x': [5]}\n"
        "m = ModelInferRequest(inputs=[{'name': 'm', 'datatype': 'INT8', 'shape': [2, 2]},"
        " {'name': 's', 'datatype': 'INT8', 'shape': []}],"
        " raw_input_contents=[b'\\x01\\x02\\x03\\x04', b'\\x07'])\n"
        "assert codec.decode_inputs(m) == {'m': [[1, 2], [3, 4]], 's': 7}\n"
        "assert codec.encode_output('y', [1, 2]).datatype == 'INT64'\n"
        "try:\n    codec.decode_array(r, 'x')\nexcept ImportError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "decode_array needs numpy" in done.stdout


# --------------------------------------------------------------------------- encoding


def contents_of(tensor: Input | Output) -> list[Any]:
    return list(getattr(tensor.contents, codec.DATATYPES[tensor.datatype][0]))


class Ref:
    def __anyserve_wire__(self) -> str:
        return "obj-" + "0" * 32


@pytest.mark.parametrize(
    ("value", "datatype", "shape", "data"),
    [
        ("héllo", "BYTES", [1], ["héllo".encode()]),
        (b"\xff", "BYTES", [1], [b"\xff"]),
        (bytearray(b"ab"), "BYTES", [1], [b"ab"]),
        (memoryview(b"cd"), "BYTES", [1], [b"cd"]),
        (True, "BOOL", [1], [True]),
        (7, "INT64", [1], [7]),
        (2.5, "FP64", [1], [2.5]),
        (["a", b"b", Ref()], "BYTES", [3], [b"a", b"b", b"obj-" + b"0" * 32]),
        ([True, False], "BOOL", [2], [True, False]),
        ((1, 2, 3), "INT64", [3], [1, 2, 3]),
        ([1, 2.5], "FP64", [2], [1.0, 2.5]),
        ([], "BYTES", [0], []),
        (Ref(), "BYTES", [1], [b"obj-" + b"0" * 32]),
        (np.arange(6, dtype=np.int16).reshape(2, 3), "INT16", [2, 3], [0, 1, 2, 3, 4, 5]),
        (np.array([1.5], dtype=np.float16), "FP16", [1], [1.5]),
        (np.array([[True], [False]]), "BOOL", [2, 1], [True, False]),
        (np.array([2**64 - 1], dtype=np.uint64), "UINT64", [1], [2**64 - 1]),
        (np.array(["a", "é"]), "BYTES", [2], [b"a", "é".encode()]),
        (np.array([b"x", "y"], dtype=object), "BYTES", [2], [b"x", b"y"]),
        (np.float32(0.5), "FP32", [1], [0.5]),
        (np.float64(0.5), "FP64", [1], [0.5]),
    ],
)
def test_encode_output(value: Any, datatype: str, shape: list[int], data: list[Any]) -> None:
    tensor = codec.encode_output("out", value)
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("out", datatype, shape)
    assert contents_of(tensor) == data


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({1: 2}, TypeError, r"output 'out': cannot encode a value of type dict"),
        (None, TypeError, r"output 'out': cannot encode a value of type NoneType"),
        ([1, "a"], TypeError, r"output 'out': a list must hold only .*got BYTES, INT"),
        ([True, 1], TypeError, r"output 'out': a list .*got BOOL, INT"),
        ([[1, 2]], TypeError, r"output 'out': a list .*got list"),
        (np.array([1j]), TypeError, r"output 'out': numpy dtype complex128 has no KServe"),
        (2**63, ValueError, r"output 'out': integer out of the INT64 range"),
    ],
)
def test_encode_output_rejects(value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        codec.encode_output("out", value)


def test_to_infer_response() -> None:
    request = ModelInferRequest(id="req-1", model_name="chat")
    response = codec.to_infer_response("hi", request)
    assert (response.id, response.model_name) == ("req-1", "chat")
    assert [(o.name, o.datatype, list(o.contents.bytes_contents)) for o in response.outputs] == [
        ("text_output", "BYTES", [b"hi"])
    ]
    assert codec.to_infer_response(b"\x00", request).outputs[0].contents.bytes_contents == [b"\x00"]

    ready = codec.encode_output("ignored", 1)
    response = codec.to_infer_response(
        {"a": 1.5, "b": ready, "c": Output(datatype="BOOL")}, request
    )
    assert [(o.name, o.datatype) for o in response.outputs] == [
        ("a", "FP64"),
        ("ignored", "INT64"),
        ("c", "BOOL"),
    ]

    given = ModelInferResponse(id="own")
    assert codec.to_infer_response(given, request) is given
    assert (given.id, given.model_name) == ("own", "chat")

    with pytest.raises(TypeError, match="handler returned None"):
        codec.to_infer_response(None, request)
    with pytest.raises(TypeError, match="handler returned int; expected ModelInferResponse"):
        codec.to_infer_response(3, request)
    with pytest.raises(TypeError, match="output names must be str"):
        codec.to_infer_response({1: "x"}, request)


def test_to_stream_response() -> None:
    request = ModelInferRequest(id="r", model_name="m")
    chunk = codec.to_stream_response({"text_output": "tok"}, request)
    assert (chunk.infer_response.id, chunk.infer_response.model_name) == ("r", "m")
    assert chunk.infer_response.outputs[0].contents.bytes_contents == [b"tok"]

    given = ModelStreamInferResponse(infer_response=ModelInferResponse(model_name="x"))
    assert codec.to_stream_response(given, request) is given
    assert (given.infer_response.id, given.infer_response.model_name) == ("r", "x")

    error = ModelStreamInferResponse(error_message="boom")
    assert codec.to_stream_response(error, request) is error
    assert not error.HasField("infer_response")

    wrapped = codec.to_stream_response(ModelInferResponse(), request)
    assert wrapped.infer_response.id == "r"


@pytest.mark.parametrize("datatype", CASES)
def test_use_raw_outputs_matches_tritonclient(datatype: str) -> None:
    values = CASES[datatype] * 2
    tensor = Output(name="y", datatype=datatype, shape=[3, 2])
    getattr(tensor.contents, codec.DATATYPES[datatype][0]).extend(values)
    response = ModelInferResponse(
        outputs=[
            codec.encode_output("first", "z"),
            tensor,
            Output(name="e", datatype="FP32", shape=[0]),
        ]
    )
    codec.use_raw_outputs(response)
    assert len(response.raw_output_contents) == 3
    assert all(not o.HasField("contents") for o in response.outputs)

    theirs = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    result = InferResult(theirs)
    expected = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(3, 2)
    assert result.as_numpy("y").tolist() == expected.tolist()
    assert result.as_numpy("first").tolist() == [b"z"]
    assert result.as_numpy("e").size == 0
    if datatype == "BYTES":
        assert deserialize_bytes_tensor(response.raw_output_contents[1]).tolist() == values


def test_use_raw_outputs_keeps_existing_raw_and_fails_atomically() -> None:
    response = ModelInferResponse(
        outputs=[Output(name="y", datatype="INT8", contents=InferTensorContents(int_contents=[1]))],
        raw_output_contents=[b"\x07"],
    )
    codec.use_raw_outputs(response)
    assert list(response.raw_output_contents) == [b"\x07"]
    assert response.outputs[0].contents.int_contents == [1]

    bad = ModelInferResponse(
        outputs=[
            Output(name="ok", datatype="INT8", contents=InferTensorContents(int_contents=[1])),
            Output(name="big", datatype="INT8", contents=InferTensorContents(int_contents=[300])),
        ]
    )
    with pytest.raises(ValueError, match="output 'big': data does not fit INT8"):
        codec.use_raw_outputs(bad)
    assert not bad.raw_output_contents
    assert bad.outputs[0].contents.int_contents == [1]


# --------------------------------------------------------------------------- input/output wording


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({1: 2}, TypeError, r"^input 'in': cannot encode a value of type dict"),
        ([1, "a"], TypeError, r"^input 'in': a list must hold only"),
        ([object()], TypeError, r"^input 'in': a list must hold only"),
        (np.array([1j]), TypeError, r"^input 'in': numpy dtype complex128 has no KServe"),
        (np.array([object()], dtype=object), TypeError, r"^input 'in': cannot encode object"),
        (2**63, ValueError, r"^input 'in': integer out of the INT64 range"),
    ],
)
def test_encode_input_errors_name_the_input(
    value: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        codec.encode_input("in", value)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            ModelInferResponse(
                outputs=[
                    Output(
                        name="y",
                        datatype="INT32",
                        shape=[3],
                        contents=InferTensorContents(int_contents=[1, 2]),
                    )
                ]
            ),
            r"^output 'y': shape \[3\] needs 3 elements but 2",
        ),
        (
            ModelInferResponse(
                outputs=[Output(name="a", datatype="INT8"), Output(name="b", datatype="INT8")],
                raw_output_contents=[b"\x01"],
            ),
            r"^response has 1 raw_output_contents entries for 2 outputs",
        ),
        (
            ModelInferResponse(
                outputs=[
                    Output(
                        name="y", datatype="INT8", contents=InferTensorContents(int_contents=[1])
                    )
                ],
                raw_output_contents=[b"\x01"],
            ),
            r"^output 'y' has typed contents but the response uses raw_output_contents",
        ),
        (
            ModelInferResponse(
                outputs=[Output(name="y", datatype="INT32")], raw_output_contents=[b"1"]
            ),
            r"^output 'y': raw data of 1 bytes is not a multiple",
        ),
    ],
)
def test_decode_outputs_errors_name_the_output(response: ModelInferResponse, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_outputs(response)


# --------------------------------------------------------------------------- numpy -> raw outputs

MATRIX = np.arange(6, dtype=np.float32).reshape(2, 3) / 4


def test_numpy_output_makes_every_output_raw() -> None:
    request = ModelInferRequest(id="n1", model_name="m")
    result = {
        "text": "hi",
        "matrix": MATRIX,
        "count": 3,
        "ready": codec.encode_output("ready", [True, False]),
        "words": np.array(["a", "é"]),
    }
    response = codec.to_infer_response(result, request)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("text", "BYTES", [1]),
        ("matrix", "FP32", [2, 3]),
        ("count", "INT64", [1]),
        ("ready", "BOOL", [2]),
        ("words", "BYTES", [2]),
    ]
    assert len(response.raw_output_contents) == len(response.outputs)
    assert all(not o.HasField("contents") for o in response.outputs)
    assert response.raw_output_contents[1] == struct.pack("<6f", *MATRIX.ravel().tolist())

    decoded = codec.decode_outputs(response)
    assert decoded["matrix"].shape == (2, 3) and decoded["matrix"].dtype == np.float32
    assert plain(decoded) == {
        "text": b"hi",
        "matrix": MATRIX.tolist(),
        "count": [3],
        "ready": [True, False],
        "words": [b"a", "é".encode()],
    }

    theirs = InferResult(service_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    matrix = theirs.as_numpy("matrix")
    assert matrix.shape == (2, 3) and matrix.dtype == np.float32
    assert matrix.tolist() == MATRIX.tolist()
    assert theirs.as_numpy("words").tolist() == [b"a", "é".encode()]
    assert theirs.as_numpy("count").tolist() == [3]

    codec.use_raw_outputs(response)  # already raw: left alone
    assert len(response.raw_output_contents) == len(response.outputs)


@pytest.mark.parametrize(
    ("array", "datatype", "shape", "raw"),
    [
        (np.arange(3, dtype=">i4"), "INT32", [3], struct.pack("<3i", 0, 1, 2)),
        (
            np.arange(6, dtype=np.int16).reshape(2, 3).T,
            "INT16",
            [3, 2],
            struct.pack("<6h", 0, 3, 1, 4, 2, 5),
        ),
        (np.array([True, False]), "BOOL", [2], b"\x01\x00"),
        (np.array([1.5], dtype=np.float16), "FP16", [1], struct.pack("<e", 1.5)),
        (np.float32(0.5), "FP32", [1], struct.pack("<f", 0.5)),
        (np.array(2**64 - 1, dtype=np.uint64), "UINT64", [1], struct.pack("<Q", 2**64 - 1)),
        (np.zeros((0, 4), dtype=np.float64), "FP64", [0, 4], b""),
    ],
)
def test_numpy_output_raw_layout(array: Any, datatype: str, shape: list[int], raw: bytes) -> None:
    response = codec.to_infer_response({"y": array}, ModelInferRequest())
    tensor = response.outputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("y", datatype, shape)
    assert list(response.raw_output_contents) == [raw]


def test_numpy_bytes_outputs_stay_typed() -> None:
    response = codec.to_infer_response({"s": np.array(["a", "b"]), "n": 1}, ModelInferRequest())
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.bytes_contents) == [b"a", b"b"]


def test_numpy_raw_in_streams_and_failures() -> None:
    request = ModelInferRequest(id="s1")
    chunk = codec.to_stream_response({"m": MATRIX, "t": "tok"}, request)
    assert chunk.infer_response.id == "s1"
    assert plain(codec.decode_outputs(chunk.infer_response)) == {"m": MATRIX.tolist(), "t": b"tok"}
    assert len(chunk.infer_response.raw_output_contents) == 2

    bad = Output(name="bad", datatype="INT8", contents=InferTensorContents(int_contents=[300]))
    with pytest.raises(ValueError, match="output 'bad': data does not fit INT8"):
        codec.to_infer_response({"m": MATRIX, "bad": bad}, request)
    with pytest.raises(TypeError, match="output 'c': numpy dtype complex128 has no KServe"):
        codec.to_infer_response({"c": np.array([1j])}, request)
