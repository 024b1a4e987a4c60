"""response_to_json's direct rendering of text answers is byte for byte the
generic encoder's, and leaves everything else to it."""

from __future__ import annotations

import json

import pytest

from anyserve.codec import json_tensors, v2json
from anyserve.proto import ModelInferResponse


def generic(response: ModelInferResponse) -> bytes:
    doc = v2json.response_head(response)
    doc["outputs"] = [json_tensors.output_json(response, i) for i in range(len(response.outputs))]
    return json_tensors.encode_json(doc).encode("utf-8")


def text_response(*texts: str, **params: object) -> ModelInferResponse:
    response = ModelInferResponse(model_name="chat", id="r-1")
    out = response.outputs.add(name="text_output", datatype="BYTES", shape=[len(texts)])
    out.contents.bytes_contents.extend(t.encode() for t in texts)
    for key, value in params.items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        elif isinstance(value, str):
            response.parameters[key].string_param = value
    return response


CASES = [
    text_response("hello"),
    text_response("tok ", anyserve_served_by="replica-1"),
    text_response('quote " back \\ slash', "new\nline\ttab", "é ü 漢字 😀", "\x00\x1f"),
    text_response(),
    text_response("a", "b", "c", n=-7, flag=True, off=False, name="ü"),
]


@pytest.mark.parametrize("response", CASES, ids=range(len(CASES)))
def test_text_answers_render_as_the_generic_encoder_does(response: ModelInferResponse) -> None:
    fast = v2json._text_response_json(response)
    assert fast is not None
    assert fast == generic(response)
    assert v2json.response_to_json(response) == fast
    json.loads(fast)  # and it is JSON


def test_versions_several_outputs_and_no_outputs_too() -> None:
    response = text_response("x")
    response.model_version = "2"
    second = response.outputs.add(name="other", datatype="BYTES", shape=[1, 1])
    second.contents.bytes_contents.append(b"y")
    assert v2json._text_response_json(response) == generic(response)
    empty = ModelInferResponse(model_name="m", id="")
    assert v2json._text_response_json(empty) == generic(empty)
    unset = text_response("x")
    unset.parameters["empty"].Clear()  # a parameter with no value set
    assert v2json._text_response_json(unset) == generic(unset)


def _with_double() -> ModelInferResponse:
    response = text_response("x")
    response.parameters["score"].double_param = float("nan")
    return response


def _not_utf8() -> ModelInferResponse:
    response = text_response()
    response.outputs[0].contents.bytes_contents.append(b"\xff\xfe")
    return response


def _numbers() -> ModelInferResponse:
    response = ModelInferResponse(model_name="m", id="1")
    response.outputs.add(name="y", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.5)
    return response


def _tensor_params() -> ModelInferResponse:
    response = text_response("x")
    response.outputs[0].parameters["k"].string_param = "v"
    return response


def _raw() -> ModelInferResponse:
    response = ModelInferResponse(model_name="m", id="1")
    response.outputs.add(name="y", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(b"\x01\x00\x00\x00z")
    return response


@pytest.mark.parametrize("make", [_with_double, _not_utf8, _numbers, _tensor_params, _raw])
def test_everything_else_goes_the_generic_way(make: object) -> None:
    response = make()  # type: ignore[operator]
    assert v2json._text_response_json(response) is None
    assert v2json.response_to_json(response) == generic(response)
