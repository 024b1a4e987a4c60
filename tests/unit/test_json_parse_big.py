"""Big JSON request bodies parsed in pieces (anyserve/api_server/json_bodies.py):
the same request as the one-shot parser, the same errors, and a loop that
keeps running while they are parsed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest

from anyserve import codec
from anyserve.api_server import json_bodies
from anyserve.api_server.json_bodies import request_from_big_json
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny pieces and regions: every boundary case shows up in small bodies.
    monkeypatch.setattr(json_bodies, "PIECE", 64)
    monkeypatch.setattr(json_bodies, "_MIN_REGION", 16)


async def big(doc: Any, model_name: str = "") -> ModelInferRequest:
    body = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
    payload, parsed = await request_from_big_json([bytearray(body)], model_name)
    assert not parsed.raw_input_contents  # the answer is rendered without the data
    return ModelInferRequest.FromString(payload)


def same_inputs(got: ModelInferRequest, want: ModelInferRequest) -> None:
    assert (got.model_name, got.id) == (want.model_name, want.id)
    assert [(t.name, t.datatype, list(t.shape)) for t in got.inputs] == [
        (t.name, t.datatype, list(t.shape)) for t in want.inputs
    ]
    assert got.parameters == want.parameters
    a, b = codec.decode_inputs(got), codec.decode_inputs(want)
    assert a.keys() == b.keys()
    for name, value in b.items():
        if isinstance(value, np.ndarray):
            assert a[name].dtype == value.dtype, name
            np.testing.assert_array_equal(a[name], value)
        else:
            assert a[name] == value, name


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


SAMPLES: dict[str, dict[str, Any]] = {
    "fp32 flat": {"inputs": [tensor("x", "FP32", [100], [i / 7 for i in range(100)])]},
    "fp64 nested": {
        "id": "n",
        "inputs": [
            tensor("x", "FP64", [10, 10], [[i * 10 + j / 3 for j in range(10)] for i in range(10)])
        ],
    },
    "ints": {
        "inputs": [
            tensor("a", "INT64", [60], [2**60 - i for i in range(60)]),
            tensor("b", "INT8", [60], [(i % 256) - 128 for i in range(60)]),
            tensor("c", "UINT32", [40], [2**32 - 1 - i for i in range(40)]),
            tensor("d", "FP16", [40], [i / 4 for i in range(40)]),
        ]
    },
    "bytes, mixed sizes": {
        "inputs": [
            tensor(
                "s",
                "BYTES",
                [5],
                ["short", "x" * 300, 'quote " and \\ and \u00e9', "", "\u4e2d" * 50],
            ),
            tensor("t", "BYTES", [1], ["plain " * 100]),
        ],
        "parameters": {"p": 1, "q": "data"},
    },
    "small and big inputs": {
        "inputs": [
            tensor("small", "INT32", [2], [1, 2]),
            tensor("flag", "BOOL", [2], [True, False]),
            tensor("big", "FP32", [80], [float(i) for i in range(80)]),
        ],
        "outputs": [{"name": "o", "parameters": {"binary_data": True}}],
    },
    "data not converted in pieces": {
        "inputs": [
            tensor("b", "BOOL", [40], [i % 3 == 0 for i in range(40)]),
            tensor("u", "UINT64", [30], [2**64 - 1 - i for i in range(30)]),
            tensor("n", "BYTES", [2, 2], [["a" * 20, "b" * 20], ["c" * 20, "d" * 20]]),
        ]
    },
    "a data key inside a string": {
        "inputs": [tensor("s", "BYTES", [2], ['"data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]', "x" * 40])]
    },
}


@pytest.mark.parametrize("name", SAMPLES)
async def test_same_request_as_the_one_shot_parser(name: str) -> None:
    doc = SAMPLES[name]
    same_inputs(await big(doc, "m"), codec.request_from_json(json.dumps(doc).encode(), "m"))


async def test_whitespace_and_spacing_of_numbers() -> None:
    body = (
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],'
        b' "data" :\n [ [1, 2.5e1 ,-3] ,\n [4,5,6E-1] ] }]}'
    )
    got = codec.decode_inputs(await big(body))["x"]
    np.testing.assert_array_equal(got, np.array([[1, 25, -3], [4, 5, 0.6]], np.float32))


async def test_numbers_read_as_the_one_shot_parser_reads_them() -> None:
    # Written as bytes: json.dumps has no 1e400 (an overflow, read as inf) or -0.
    data = b"1e400, -1e400, -0, 1E5, 2.5e-3, 7" + b", 1" * 40
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [46], "data": [%s]}]}' % data
    same_inputs(await big(body), codec.request_from_json(body))


async def test_one_long_string_is_sliced_from_the_body() -> None:
    text = "h\u00e9llo world " * 1000
    got = await big({"inputs": [tensor("s", "BYTES", [1], [text])]})
    assert codec.decode_inputs(got)["s"] == text.encode()


BAD: dict[str, tuple[Any, str]] = {
    "not a number": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[30],"data":['
        + b"1," * 29
        + b"1.2.3]}]}",
        "FP32 data must be numbers",
    ),
    "a word among numbers": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[30],"data":[' + b"1," * 29 + b"x]}]}",
        "not valid JSON",
    ),
    "float for an int": (
        {"inputs": [tensor("x", "INT32", [30], [1.5] * 30)]},
        "INT32 data must be integers",
    ),
    "out of range": (
        {"inputs": [tensor("x", "INT8", [30], [1] * 29 + [300])]},
        "out of range",
    ),
    "an integer too big for a float": (
        b'{"inputs":[{"name":"x","datatype":"FP64","shape":[30],"data":['
        + b"1," * 29
        + b"1"
        + b"0" * 400
        + b"]}]}",
        "FP64 data out of range of a 64-bit float",
    ),
    "an integer past 64 bits": (
        {"inputs": [tensor("x", "INT64", [30], [1] * 29 + [2**64 + 5])]},
        "INT64 data out of range of a 64-bit signed integer",
    ),
    "an integer past int64": (
        {"inputs": [tensor("x", "INT64", [30], [1] * 29 + [2**63])]},
        "INT64 data out of range of a 64-bit signed integer",
    ),
    "a whole float for an int": (
        {"inputs": [tensor("x", "INT32", [30], [1.0] * 30)]},
        "INT32 data must be integers",
    ),
    "a number JSON does not allow": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[30],"data":[' + b"1," * 29 + b"+1]}]}",
        "FP32 data must be numbers",
    ),
    "count": (
        {"inputs": [tensor("x", "FP32", [31], [1.0] * 30)]},
        "needs 31 elements but 'data' has 30",
    ),
    "trailing comma": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[30],"data":[' + b"1," * 30 + b"]}]}",
        "FP32 data must be numbers",
    ),
    "unbalanced": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[30],"data":[[' + b"1," * 29 + b"1]}]}",
        "not a well-formed array",
    ),
    "no datatype": (
        {"inputs": [{"name": "x", "shape": [30], "data": [1] * 30}]},
        "needs a 'datatype'",
    ),
    "data outside inputs": (
        {"inputs": [], "parameters": {"data": [1] * 30}},
        "may only be an input's",
    ),
    "control character": (
        b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["'
        + b"a" * 100
        + b'\x01"]}]}',
        "control character",
    ),
    "bad utf-8": (
        b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[1],"data":["'
        + b"a" * 100
        + b'\xff"]}]}',
        "not valid JSON",
    ),
    "unclosed string": (b'{"inputs":[{"name":"s","data":["' + b"a" * 100, "not closed"),
    "lone surrogate": (
        {"inputs": [tensor("s", "BYTES", [2], ["\ud800", "x" * 100])]},
        "not valid Unicode",
    ),
}


@pytest.mark.parametrize("name", BAD)
async def test_bad_bodies_are_invalid_arguments(name: str) -> None:
    doc, message = BAD[name]
    with pytest.raises(InvalidArgument, match=message):
        await big(doc)


async def test_the_loop_keeps_running_while_a_big_body_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(json_bodies, "PIECE", 256 * 1024)
    monkeypatch.setattr(json_bodies, "_MIN_REGION", 64 * 1024)
    rng = np.random.default_rng(1)
    values = rng.random(1_500_000).astype(np.float32)
    body = json.dumps({"inputs": [tensor("x", "FP32", [len(values)], values.tolist())]}).encode()
    assert len(body) > 20_000_000
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        try:
            got = await big(body)
        finally:
            done.set()
    np.testing.assert_array_equal(codec.decode_inputs(got)["x"], values)
    # json.loads of this body holds the loop for well over 200 ms.
    assert len(gaps) > 20
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps) * 1000:.0f} ms"
