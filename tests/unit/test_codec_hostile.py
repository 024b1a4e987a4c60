"""Bodies no well-behaved client sends are 400s naming the problem, not 500s."""

from __future__ import annotations

import pytest

from anyserve import codec
from anyserve.codec.openai import chat_request
from anyserve.errors import InvalidArgument

BYTES_INPUT = b'{"name":"t","datatype":"BYTES","shape":[1],"data":["%s"]}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs":[' + BYTES_INPUT % b"\\ud800" + b"]}",
        b'{"id":"\\ud800","inputs":[]}',
        b'{"model_name":"\\udfff","inputs":[]}',
        b'{"parameters":{"k":"\\ud800"},"inputs":[]}',
    ],
)
def test_a_lone_surrogate_anywhere_is_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not valid Unicode"):
        codec.request_from_json(body)


def test_a_lone_surrogate_in_an_openai_body_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not valid Unicode"):
        chat_request(b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}')


def test_a_deeply_nested_body_is_invalid_argument() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidArgument, match="nests too deeply"):
        codec.request_from_json(b'{"inputs":' + deep + b"}")
    with pytest.raises(InvalidArgument, match="nests too deeply"):
        codec.request_from_json(deep)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_an_integer_too_big_for_any_float_is_invalid_argument(datatype: str) -> None:
    huge = b"1" + b"0" * 400  # json reads it as a Python int; float() of it overflows
    body = b'{"inputs":[{"name":"x","datatype":"%s","shape":[1],"data":[%s]}]}' % (
        datatype.encode(),
        huge,
    )
    with pytest.raises(InvalidArgument, match=f"does not fit {datatype}"):
        codec.request_from_json(body)
