"""Handler responses -> OpenAI answers (anyserve.codec.openai_responses)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import pytest

from anyserve import codec
from anyserve.codec.openai_responses import (
    Chunks,
    Completion,
    embedding_document,
    read_piece,
)
from anyserve.errors import HandlerError
from anyserve.proto import InferTensorContents, ModelInferRequest, ModelInferResponse

REQUEST = ModelInferRequest(id="r1", model_name="m")


def response(result: Any) -> ModelInferResponse:
    return codec.to_infer_response(result, REQUEST)


def test_read_piece_from_typed_and_raw_outputs() -> None:
    result = {"text_output": "hi", "finish_reason": "length", "prompt_tokens": np.int64(3)}
    raw = response(result)  # a numpy value makes every output raw
    assert raw.raw_output_contents
    for message in (raw, response({**result, "prompt_tokens": 3})):
        piece = read_piece(message)
        assert (piece.texts, piece.finish, piece.prompt_tokens) == ([b"hi"], ["length"], 3)
        assert piece.completion_tokens is None


@pytest.mark.parametrize("tokens", ["many", -1])
def test_bad_usage_is_a_handler_error(tokens: Any) -> None:
    with pytest.raises(HandlerError, match="completion_tokens"):
        read_piece(response({"completion_tokens": tokens}))


def test_a_completion_joins_every_response() -> None:
    answer = Completion("chat", "m", "r1")
    for result in ("Hel", "lo", {"text_output": "!", "finish_reason": "length"}):
        answer.add(response(result))
    answer.add(response({"prompt_tokens": 3, "completion_tokens": 2}))
    doc = answer.document()
    assert doc["id"] == "chatcmpl-r1" and doc["object"] == "chat.completion"
    assert doc["model"] == "m" and isinstance(doc["created"], int)
    assert doc["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_completion_without_reports_stops_and_counts_zero() -> None:
    answer = Completion("completion", "m", "r1")
    doc = answer.document()  # the handler said nothing at all
    assert doc["id"] == "cmpl-r1" and doc["object"] == "text_completion"
    assert doc["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]
    assert doc["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_several_choices_are_the_elements_of_text_output() -> None:
    answer = Completion("completion", "m", "r1")
    answer.add(response({"text_output": ["a", "b"], "finish_reason": ["stop", "length"]}))
    texts = [(c["index"], c["text"], c["finish_reason"]) for c in answer.document()["choices"]]
    assert texts == [(0, "a", "stop"), (1, "b", "length")]
    # One finish_reason element applies to every choice of its response.
    answer = Completion("completion", "m", "r1")
    answer.add(response({"text_output": ["a", "b"], "finish_reason": "length"}))
    assert [c["finish_reason"] for c in answer.document()["choices"]] == ["length", "length"]


def test_chat_chunks_then_tail() -> None:
    chunks = Chunks("chat", "m", "r1", include_usage=False)
    first = chunks.chunk(response("Hel"))
    assert first is not None
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r1"
    assert "usage" not in first
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "Hel"},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    second = chunks.chunk(response("lo"))
    assert second is not None and second["choices"][0]["delta"] == {"content": "lo"}
    assert chunks.chunk(response({"prompt_tokens": 1})) is None  # nothing to show
    [tail] = chunks.tail()
    assert tail["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


def test_a_finished_choice_is_not_closed_twice_and_usage_comes_last() -> None:
    chunks = Chunks("completion", "m", "r1", include_usage=True)
    doc = chunks.chunk(response({"text_output": "x", "finish_reason": "stop", "prompt_tokens": 2}))
    assert doc is not None and doc["usage"] is None
    assert doc["choices"] == [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "stop"}]
    [usage] = chunks.tail()
    assert usage["choices"] == [] and usage["object"] == "text_completion"
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}


def test_an_empty_stream_still_answers_one_choice() -> None:
    [tail] = Chunks("chat", "m", "r1", include_usage=False).tail()
    assert tail["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert tail["choices"][0]["finish_reason"] == "stop"


def test_a_character_split_between_responses_arrives_whole() -> None:
    chunks = Chunks("completion", "m", "r1", include_usage=False)
    encoded = "é!".encode()
    first = chunks.chunk(response(encoded[:1]))
    second = chunks.chunk(response(encoded[1:]))
    assert first is None  # nothing decodable yet
    assert second is not None and second["choices"][0]["text"] == "é!"


# --------------------------------------------------------------------------- embeddings


def fp32(rows: list[list[float]], shape: list[int]) -> ModelInferResponse.InferOutputTensor:
    flat = [x for row in rows for x in row]
    return ModelInferResponse.InferOutputTensor(
        name="embedding",
        datatype="FP32",
        shape=shape,
        contents=InferTensorContents(fp32_contents=flat),
    )


ROWS = [[0.5, -1.0, 2.0], [0.25, 0.0, 1.0]]


def unpack(text: str) -> list[float]:
    data = base64.b64decode(text)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def test_embeddings_from_typed_contents() -> None:
    message = response({"embedding": fp32(ROWS, [2, 3]), "prompt_tokens": 4})
    doc = embedding_document(message, "e", 2, "float")
    assert doc["object"] == "list" and doc["model"] == "e"
    assert doc["data"] == [
        {"object": "embedding", "index": 0, "embedding": ROWS[0]},
        {"object": "embedding", "index": 1, "embedding": ROWS[1]},
    ]
    assert doc["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    encoded = embedding_document(message, "e", 2, "base64")
    assert [unpack(item["embedding"]) for item in encoded["data"]] == ROWS


def test_embeddings_from_numpy_travel_raw() -> None:
    array = np.array(ROWS, dtype=np.float32)
    message = response({"embedding": array})
    assert message.raw_output_contents
    encoded = embedding_document(message, "e", 2, "base64")
    assert encoded["data"][1]["embedding"] == base64.b64encode(array[1].tobytes()).decode()
    assert embedding_document(message, "e", 2, "float")["data"][0]["embedding"] == ROWS[0]
    assert embedding_document(message, "e", 2, "float")["usage"]["prompt_tokens"] == 0


def test_one_input_may_be_a_flat_vector_of_any_float_type() -> None:
    message = response({"embedding": [0.5, 1.5]})  # a list of floats is FP64 [2]
    assert embedding_document(message, "e", 1, "float")["data"][0]["embedding"] == [0.5, 1.5]
    assert unpack(embedding_document(message, "e", 1, "base64")["data"][0]["embedding"]) == [
        0.5,
        1.5,
    ]


@pytest.mark.parametrize(
    ("result", "count", "match"),
    [
        ({"text_output": "x"}, 1, "no 'embedding' output"),
        ({"embedding": "x"}, 1, "must be FP32"),
        ({"embedding": fp32(ROWS, [2, 3])}, 3, r"3 inputs need \[3, dims\]"),
        ({"embedding": fp32(ROWS, [6])}, 2, "shape"),
        ({"embedding": [1e39]}, 1, "float32"),
    ],
)
def test_embeddings_that_do_not_fit(result: dict[str, Any], count: int, match: str) -> None:
    with pytest.raises(HandlerError, match=match):
        embedding_document(response(result), "e", count, "base64")
