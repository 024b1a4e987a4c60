"""The models Triton's Python client examples expect, as anyserve capabilities
(for tests/test_triton_*.py). Written for anyserve from the examples' checks:

* ``simple``: INT32 [-1, 16] ``INPUT0``, ``INPUT1`` -> ``OUTPUT0`` (sum),
  ``OUTPUT1`` (difference); numpy outputs go out raw, as Triton's do.
* ``simple_int8``: the same on INT8.
* ``simple_string``: the same on BYTES holding decimal numbers (answered raw
  with :func:`anyserve.codec.use_raw_outputs`, as Triton answers).
* ``simple_sequence``: INT32 [1, 1] ``INPUT`` -> ``OUTPUT``: the input, plus
  one on the sequence's first request (the examples' expectations), with a
  per-sequence request count kept in ``context.sequence.state``.
* ``accumulator``: INT32 [1] ``INPUT`` -> ``SUM`` (running sum of the
  sequence, in ``context.sequence.state``), ``COUNT`` (requests so far) and
  ``PID`` (the worker process): the ordering tests' model. Two workers.
* ``repeat_int32``: decoupled (a stream): ``IN`` INT32 [n], ``DELAY`` UINT32
  [n] (milliseconds), ``WAIT`` UINT32 [1] -> one response per element, ``OUT``
  INT32 [1] and ``IDX`` UINT32 [1], after its delay.
* ``versioned``: versions ``1`` and ``3`` (the capability's ``version`` key),
  answering ``VERSION`` (BYTES).

``sequences_app`` serves the accumulator and ``where`` (which replica answered:
the session tests), for the sequence tests' replicas.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np

from anyserve import AnyServe, Context, Tensor, codec
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

app = AnyServe("triton_models")


def _pair(datatype: str) -> list[Tensor]:
    return [Tensor("INPUT0", datatype, [-1, 16]), Tensor("INPUT1", datatype, [-1, 16])]


def _outputs(datatype: str) -> list[Tensor]:
    return [Tensor("OUTPUT0", datatype, [-1, 16]), Tensor("OUTPUT1", datatype, [-1, 16])]


@app.capability(model="simple", inputs=_pair("INT32"), outputs=_outputs("INT32"))
def simple(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    values = codec.decode_inputs(request)
    a, b = np.asarray(values["INPUT0"], np.int32), np.asarray(values["INPUT1"], np.int32)
    return {"OUTPUT0": a + b, "OUTPUT1": a - b}


@app.capability(model="simple_int8", inputs=_pair("INT8"), outputs=_outputs("INT8"))
def simple_int8(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    values = codec.decode_inputs(request)
    a, b = np.asarray(values["INPUT0"], np.int8), np.asarray(values["INPUT1"], np.int8)
    return {"OUTPUT0": a + b, "OUTPUT1": a - b}


@app.capability(model="simple_string", inputs=_pair("BYTES"), outputs=_outputs("BYTES"))
def simple_string(request: ModelInferRequest, context: Context) -> Any:
    values = codec.decode_inputs(request)

    def numbers(name: str) -> Any:
        return np.vectorize(lambda v: int(v.decode() if isinstance(v, bytes) else v))(
            np.asarray(values[name], dtype=object)
        )

    a, b = numbers("INPUT0"), numbers("INPUT1")

    def text(array: Any) -> Any:
        return np.vectorize(lambda v: str(v).encode(), otypes=[object])(array)

    response = codec.to_infer_response({"OUTPUT0": text(a + b), "OUTPUT1": text(a - b)}, request)
    codec.use_raw_outputs(response)  # Triton answers raw
    return response


@app.capability(
    model="simple_sequence",
    inputs=[Tensor("INPUT", "INT32", [-1, 1])],
    outputs=[Tensor("OUTPUT", "INT32", [-1, 1])],
)
def simple_sequence(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    sequence = context.sequence
    if sequence is None:
        raise InvalidArgument("simple_sequence needs a sequence_id")
    sequence.state["requests"] = sequence.state.get("requests", 0) + 1
    value = np.asarray(codec.decode_inputs(request)["INPUT"], np.int32)
    return {"OUTPUT": value + (1 if sequence.start else 0)}


@app.capability(
    model="accumulator",
    workers=2,
    inputs=[Tensor("INPUT", "INT32", [1])],
    outputs=[
        Tensor("SUM", "INT64", [1]),
        Tensor("COUNT", "INT64", [1]),
        Tensor("PID", "INT64", [1]),
    ],
)
async def accumulator(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    sequence = context.sequence
    if sequence is None:
        raise InvalidArgument("accumulator needs a sequence_id")
    state = sequence.state
    # Yield between reading and writing the state: two requests of one
    # sequence running at once would lose an update here.
    total, count = state.get("sum", 0), state.get("count", 0)
    await anyio.sleep(0)
    state["sum"] = total + int(codec.decode_inputs(request)["INPUT"][0])
    state["count"] = count + 1
    return {
        "SUM": np.array([state["sum"]], np.int64),
        "COUNT": np.array([state["count"]], np.int64),
        "PID": np.array([os.getpid()], np.int64),
    }


@app.capability(
    model="repeat_int32",
    stream=True,
    inputs=[
        Tensor("IN", "INT32", [-1]),
        Tensor("DELAY", "UINT32", [-1]),
        Tensor("WAIT", "UINT32", [1]),
    ],
    outputs=[Tensor("OUT", "INT32", [1]), Tensor("IDX", "UINT32", [1])],
)
async def repeat_int32(request: ModelInferRequest, context: Context) -> AsyncIterator[Any]:
    values = codec.decode_inputs(request)
    delays = list(values["DELAY"])
    for index, value in enumerate(values["IN"]):
        await anyio.sleep(int(delays[index]) / 1000 if index < len(delays) else 0)
        yield {"OUT": np.array([value], np.int32), "IDX": np.array([index], np.uint32)}


def _versioned(version: str) -> Any:
    def versioned(request: ModelInferRequest, context: Context) -> Any:
        response = codec.to_infer_response({"VERSION": version}, request)
        codec.use_raw_outputs(response)  # tritonclient reads typed BYTES badly on numpy 2
        return response

    return versioned


for _version in ("1", "3"):
    app.capability(model="versioned", version=_version, name=f"versioned_v{_version}")(
        _versioned(_version)
    )


# The sequence tests' own app: the accumulator alone (fewer worker processes).
sequences_app = AnyServe("triton_sequences")
sequences_app.capability(
    model="accumulator",
    name="accumulator",
    workers=2,
    inputs=[Tensor("INPUT", "INT32", [1])],
    outputs=[
        Tensor("SUM", "INT64", [1]),
        Tensor("COUNT", "INT64", [1]),
        Tensor("PID", "INT64", [1]),
    ],
)(accumulator)


@sequences_app.capability(model="where")
def where(request: ModelInferRequest, context: Context) -> dict[str, str]:
    """Which replica served it (the session tests)."""
    return {"replica": context.replica_id}
