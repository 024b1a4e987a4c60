"""codec.json_tensors.loads: orjson where it can, the same result as json.loads always."""

from __future__ import annotations

import json
import math

import pytest

from anyserve.codec.json_tensors import load_object, loads
from anyserve.errors import InvalidArgument

SAME = [
    b'{"inputs":[{"name":"t","datatype":"BYTES","shape":[1],"data":["hello"]}]}',
    b'{"a": 1, "a": 2}',  # the last of a repeated key
    b'{"big": 18446744073709551615, "bigger": 340282366920938463463374607431768211456}',
    b'{"f": [1.5e-300, -0.0, 1e400, 1e-400, 0.1, -0, 12345678901234567.5]}',
    b'{"nan": NaN, "inf": [Infinity, -Infinity]}',  # json's extension
    b'{"s": "\\ud800 lone surrogate", "e": "\\u00e9\\n"}',
    '{"utf16": "body"}'.encode("utf-16"),
    '{"text": "caf\u00e9"}',
    b"[" * 5000 + b"]" * 5000,  # deeper than orjson goes
]


@pytest.mark.parametrize("body", SAME, ids=range(len(SAME)))
def test_the_same_document_as_json_loads(body: bytes | str) -> None:
    try:
        expected = json.loads(body)
    except RecursionError:
        with pytest.raises(RecursionError):
            loads(body)
        return
    got = loads(body)
    assert repr(got) == repr(expected)  # repr: NaN != NaN, and -0.0 == 0.0
    if isinstance(got, dict) and "nan" in got:
        assert math.isnan(got["nan"])


@pytest.mark.parametrize("body", [b'{"a": }', b"\xff\xfe{", b'{"a": 1} trailing', b""])
def test_errors_are_worded_by_json(body: bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(body)
    with pytest.raises(InvalidArgument) as got:
        load_object(body, "the body")
    assert got.value.message == f"the body is not valid JSON: {expected.value}"
