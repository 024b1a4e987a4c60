"""Decoded tensors keep their shape: numpy arrays (or nested lists without
numpy), bytes for one BYTES element, and missing names that say what is there."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from anyserve import codec
from anyserve.codec import shapes
from anyserve.codec.values import Inputs, MissingInput, MissingOutput, Outputs
from anyserve.errors import InvalidArgument
from anyserve.proto import InferTensorContents, ModelInferRequest, ModelInferResponse

Input = ModelInferRequest.InferInputTensor
Output = ModelInferResponse.InferOutputTensor


def typed(name: str, datatype: str, shape: list[int], values: list[Any]) -> Input:
    tensor = Input(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, codec.DATATYPES[datatype][0]).extend(values)
    return tensor


def request_of(*tensors: Input) -> ModelInferRequest:
    return ModelInferRequest(id="r", inputs=list(tensors))


def one(datatype: str, shape: list[int], values: list[Any]) -> Any:
    return codec.decode_input(request_of(typed("x", datatype, shape, values)), "x")


@pytest.fixture
def without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode as if numpy were not installed."""
    monkeypatch.setattr(shapes, "numpy_or_none", lambda: None)


# --------------------------------------------------------------------------- with numpy


def test_fp32_1x4_is_an_array_of_that_shape() -> None:
    probs = one("FP32", [1, 4], [0.1, 0.7, 0.15, 0.05])
    assert isinstance(probs, np.ndarray)
    assert (probs.shape, probs.dtype) == ((1, 4), np.float32)
    assert probs[0].argmax() == 1  # on a flat list this would index element 0
    assert probs.argmax(axis=1).tolist() == [1]


def test_raw_contents_decode_to_read_only_views() -> None:
    data = struct.pack("<6i", 0, 1, 2, 3, 4, 5)
    request = ModelInferRequest(
        inputs=[Input(name="m", datatype="INT32", shape=[2, 3])], raw_input_contents=[data]
    )
    matrix = codec.decode_inputs(request)["m"]
    assert (matrix.shape, matrix.dtype) == ((2, 3), np.int32)
    assert matrix.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not matrix.flags.writeable and not matrix.flags.owndata  # no copy
    assert codec.decode_array(request, "m").tolist() == matrix.tolist()


@pytest.mark.parametrize(
    ("datatype", "dtype"),
    [
        ("BOOL", np.bool_),
        ("UINT8", np.uint8),
        ("UINT64", np.uint64),
        ("INT8", np.int8),
        ("INT64", np.int64),
        ("FP16", np.float16),
        ("FP64", np.float64),
    ],
)
def test_each_datatype_has_its_dtype(datatype: str, dtype: Any) -> None:
    value = True if datatype == "BOOL" else 1
    array = one(datatype, [2, 1], [value, value])
    assert (array.shape, array.dtype) == ((2, 1), dtype)


def test_one_element_and_scalar_shapes() -> None:
    assert one("INT64", [1], [7]).shape == (1,)
    assert one("INT64", [1], [7]).tolist() == [7]
    scalar = one("INT64", [], [7])
    assert (scalar.shape, scalar.item()) == ((), 7)
    assert one("INT64", [1, 1], [7]).shape == (1, 1)
    assert one("INT64", [], [1, 2, 3]).shape == (3,)  # an unset shape holding several: 1-d


def test_typed_values_that_do_not_fit_their_datatype_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="input 'x': data does not fit INT8"):
        one("INT8", [1], [300])


# --------------------------------------------------------------------------- without numpy


def test_int64_2x2_without_numpy_is_nested_lists(without_numpy: None) -> None:
    assert one("INT64", [2, 2], [1, 2, 3, 4]) == [[1, 2], [3, 4]]


def test_shapes_without_numpy(without_numpy: None) -> None:
    assert one("FP32", [1, 4], [0.5, 1.0, 1.5, 2.0]) == [[0.5, 1.0, 1.5, 2.0]]
    assert one("INT32", [2, 1, 2], [1, 2, 3, 4]) == [[[1, 2]], [[3, 4]]]
    assert one("INT64", [1], [7]) == [7]
    scalar = one("INT64", [], [7])
    assert scalar == 7 and type(scalar) is int
    assert one("BOOL", [], [True]) is True
    assert one("INT32", [-1, 2], [1, 2, 3, 4]) == [[1, 2], [3, 4]]
    assert one("INT32", [2, 0], []) == [[], []]
    assert one("INT32", [0, 2], []) == []
    raw = ModelInferRequest(
        inputs=[Input(name="x", datatype="INT16", shape=[2, 2])],
        raw_input_contents=[struct.pack("<4h", 1, 2, 3, 4)],
    )
    assert codec.decode_inputs(raw) == {"x": [[1, 2], [3, 4]]}


def test_decode_array_needs_numpy(without_numpy: None) -> None:
    with pytest.raises(ImportError, match="decode_array needs numpy"):
        codec.decode_array(request_of(typed("x", "INT64", [1], [1])), "x")


# --------------------------------------------------------------------------- BYTES


@pytest.mark.parametrize("numpy_installed", [True, False])
def test_bytes_tensors(monkeypatch: pytest.MonkeyPatch, numpy_installed: bool) -> None:
    if not numpy_installed:
        monkeypatch.setattr(shapes, "numpy_or_none", lambda: None)
    assert one("BYTES", [1], [b"hi"]) == b"hi"
    assert one("BYTES", [], [b"hi"]) == b"hi"
    assert one("BYTES", [2], [b"a", b"b"]) == [b"a", b"b"]
    assert one("BYTES", [2, 1], [b"a", b"b"]) == [[b"a"], [b"b"]]
    assert one("BYTES", [1, 1], [b"a"]) == [[b"a"]]
    assert one("BYTES", [0], []) == []


def test_text_handlers_keep_reading_bytes() -> None:
    request = request_of(typed("text", "BYTES", [1], ["héllo".encode()]))
    assert codec.decode_inputs(request)["text"].decode() == "héllo"


# --------------------------------------------------------------------------- missing names


def test_a_missing_input_is_invalid_argument_naming_the_inputs_present() -> None:
    inputs = codec.decode_inputs(
        request_of(typed("text", "BYTES", [1], [b"a"]), typed("n", "INT64", [1], [1]))
    )
    assert isinstance(inputs, Inputs) and isinstance(inputs, dict)
    with pytest.raises(
        InvalidArgument,
        match=r"request has no input 'missing' \(inputs present:"
        r" 'text', 'n'\)",
    ) as caught:
        inputs["missing"]
    assert caught.value.http_status == 400
    assert isinstance(caught.value, MissingInput)
    assert str(caught.value) == "request has no input 'missing' (inputs present: 'text', 'n')"
    with pytest.raises(KeyError):  # code that caught KeyError keeps working
        inputs["missing"]
    assert inputs.get("missing") is None and "missing" not in inputs
    with pytest.raises(InvalidArgument, match=r"inputs present: none"):
        codec.decode_inputs(ModelInferRequest())["x"]
    with pytest.raises(MissingInput, match=r"no input 'missing' \(inputs present: 'text'\)"):
        codec.decode_input(request_of(typed("text", "BYTES", [1], [b"a"])), "missing")


def test_a_missing_output_is_a_key_error_naming_the_outputs_present() -> None:
    response = ModelInferResponse(
        outputs=[Output(name="y", datatype="INT8", contents=InferTensorContents(int_contents=[1]))]
    )
    outputs = codec.decode_outputs(response)
    assert isinstance(outputs, Outputs)
    with pytest.raises(MissingOutput) as caught:
        outputs["z"]
    assert isinstance(caught.value, KeyError)
    assert str(caught.value) == "response has no output 'z' (outputs present: 'y')"


# --------------------------------------------------------------------------- outputs


def test_outputs_decode_with_the_same_rules() -> None:
    response = codec.to_infer_response(
        {"text": "hi", "n": 8, "m": np.arange(6, dtype=np.float32).reshape(2, 3)},
        ModelInferRequest(),
    )
    outputs = codec.decode_outputs(response)
    assert outputs["text"] == b"hi"
    assert outputs["n"].tolist() == [8]  # a Python int goes out as INT64 [1]
    assert (outputs["m"].shape, outputs["m"].dtype) == ((2, 3), np.float32)
    assert outputs["m"][1].argmax() == 2


# --------------------------------------------------------------------------- shapes helpers


def test_dims_resolve_empty_and_wildcard_shapes() -> None:
    assert shapes.dims("x", [], 1) == ()
    assert shapes.dims("x", [], 3) == (3,)
    assert shapes.dims("x", [], 0) == (0,)
    assert shapes.dims("x", [2, 3], 6) == (2, 3)
    assert shapes.dims("x", [-1, 3], 6) == (2, 3)
    assert shapes.dims("x", [0, -1], 0) == (0, 0)
    with pytest.raises(InvalidArgument, match=r"x: shape \[-1, -1\] has more than one -1"):
        shapes.dims("x", [-1, -1], 4)


def test_several_wildcards_are_refused_when_decoding() -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x': shape .* more than one -1"):
        one("INT32", [-1, -1], [1, 2, 3, 4])


def test_nest() -> None:
    assert shapes.nest([1, 2, 3, 4, 5, 6], (2, 3)) == [[1, 2, 3], [4, 5, 6]]
    assert shapes.nest([1, 2, 3, 4, 5, 6], (3, 1, 2)) == [[[1, 2]], [[3, 4]], [[5, 6]]]
    assert shapes.nest([1, 2], (2,)) == [1, 2]
