"""OpenAI request bodies -> ModelInferRequest (anyserve.codec.openai)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from anyserve import codec
from anyserve.codec.json_tensors import params_json
from anyserve.codec.openai import (
    OpenAIRequest,
    chat_request,
    completion_request,
    embedding_request,
    error_param,
)
from anyserve.errors import InvalidArgument

MESSAGES = [{"role": "user", "content": "hi é"}]


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def chat(**fields: Any) -> OpenAIRequest:
    return chat_request(body(**{"model": "m", "messages": MESSAGES, **fields}))


def test_chat_messages_travel_as_one_json_bytes_input() -> None:
    found = chat()
    request = found.request
    assert request.model_name == "m" and found.model == "m"
    [tensor] = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("messages", "BYTES", [1])
    assert json.loads(codec.input_text(request, "messages")) == MESSAGES
    assert not found.stream and not found.include_usage
    assert params_json(request.parameters) == {}


def test_sampling_fields_become_parameters() -> None:
    found = chat(
        temperature=0.5,
        top_p=1,
        presence_penalty=-2,
        max_tokens=10,
        n=2,
        seed=-5,
        stop="END",
        user="u1",
        top_k=40,  # not OpenAI's: passed through as it is
        echo=True,
        logit_bias={"50256": -100},
        tools=[{"type": "function"}],
        frequency_penalty=None,  # null: left out
    )
    assert params_json(found.request.parameters) == {
        "temperature": 0.5,
        "top_p": 1.0,
        "presence_penalty": -2.0,
        "max_tokens": 10,
        "n": 2,
        "seed": -5,
        "stop": '["END"]',
        "user": "u1",
        "top_k": 40,
        "echo": True,
        "logit_bias": '{"50256":-100}',
        "tools": '[{"type":"function"}]',
    }
    assert found.request.parameters["temperature"].WhichOneof("parameter_choice") == "double_param"


def test_stop_lists_and_max_completion_tokens() -> None:
    params = params_json(
        chat(stop=["a", "b"], max_tokens=5, max_completion_tokens=7).request.parameters
    )
    assert params == {"stop": '["a","b"]', "max_tokens": 7}


def test_stream_flags() -> None:
    found = chat(stream=True, stream_options={"include_usage": True})
    assert found.stream and found.include_usage
    assert params_json(found.request.parameters) == {"stream": True}
    # include_usage means nothing without a stream
    found = chat(stream=False, stream_options={"include_usage": True})
    assert not found.stream and not found.include_usage
    assert "stream" not in found.request.parameters


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 3, "messages": MESSAGES}, "model"),
        ({"model": ""}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        (
            {"model": "m", "messages": [MESSAGES[0], {"role": "user", "content": 5}]},
            "messages[1].content",
        ),
        ({"model": "m", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": MESSAGES, "stream_options": True}, "stream_options"),
        (
            {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        ({"model": "m", "messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": MESSAGES, "top_p": True}, "top_p"),
        ({"model": "m", "messages": MESSAGES, "n": 0}, "n"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": MESSAGES, "seed": 2**63}, "seed"),
        ({"model": "m", "messages": MESSAGES, "stop": [1]}, "stop"),
        ({"model": "m", "messages": MESSAGES, "user": 7}, "user"),
        ({"model": "m", "messages": MESSAGES, "top_k": 2**64}, "top_k"),
    ],
)
def test_malformed_chat_bodies_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        chat_request(body(**fields))
    assert error_param(caught.value) == param
    assert type(caught.value) is InvalidArgument  # a 400 everywhere


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff"])
def test_bodies_that_are_not_json_objects(raw: bytes) -> None:
    with pytest.raises(InvalidArgument, match="request body"):
        chat_request(raw)


def test_nan_is_out_of_every_range() -> None:
    with pytest.raises(InvalidArgument, match="temperature"):
        chat_request(b'{"model": "m", "messages": [{"role": "user"}], "temperature": NaN}')


def test_completion_prompts_are_text_input() -> None:
    found = completion_request(body(model="c", prompt="once"))
    assert codec.decode_inputs(found.request) == {"text_input": b"once"}
    found = completion_request(body(model="c", prompt=["a", "b"], stream=True))
    tensor = found.request.inputs[0]
    assert (tensor.name, list(tensor.shape)) == ("text_input", [2])
    assert list(tensor.contents.bytes_contents) == [b"a", b"b"]
    assert found.stream and found.request.parameters["stream"].bool_param


@pytest.mark.parametrize("prompt", [None, [], [1, 2, 3], [[1, 2]], {"text": "x"}, ["a", 1]])
def test_bad_prompts(prompt: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        completion_request(body(model="c", prompt=prompt))
    assert error_param(caught.value) == "prompt"


def test_token_id_prompts_say_so() -> None:
    with pytest.raises(InvalidArgument, match="token ids"):
        completion_request(body(model="c", prompt=[1, 2]))


def test_embedding_inputs_and_format() -> None:
    found = embedding_request(body(model="e", input=["x", "y", "z"], dimensions=4))
    assert found.count == 3 and found.encoding_format == "float"
    assert codec.decode_inputs(found.request) == {"text_input": [b"x", b"y", b"z"]}
    assert params_json(found.request.parameters) == {"dimensions": 4}
    found = embedding_request(body(model="e", input="x", encoding_format="base64"))
    assert found.count == 1 and found.encoding_format == "base64"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "e"}, "input"),
        ({"model": "e", "input": [[1, 2]]}, "input"),
        ({"model": "e", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "e", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_embedding_bodies(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        embedding_request(body(**fields))
    assert error_param(caught.value) == param


def test_a_lone_surrogate_is_not_text() -> None:
    with pytest.raises(InvalidArgument) as caught:
        embedding_request(b'{"model": "e", "input": "\\ud800"}')
    assert error_param(caught.value) == "input"
    # In messages it survives: the JSON handed on escapes it as it came.
    found = chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert json.loads(codec.input_text(found.request, "messages"))[0]["content"] == "\ud800"
