"""The app the replica benchmark serves: handlers that do as little as possible,
so what is measured is anyserve's request path, not user code.

* ``type=echo`` (unary, async): returns the request's first input as its output.
* ``type=tokens`` (stream, async generator): yields ``n`` one-word chunks (request
  parameter ``n``, default :data:`DEFAULT_TOKENS`) as fast as it can.
* ``type=blob`` (unary, ``zero_copy``): returns its one input, taken as the
  read-only numpy view of shared memory that big tensors arrive as (the form
  the README gives for them), so no copy of it is made in the handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest, ModelInferResponse

DEFAULT_TOKENS = 1000

app = AnyServe("benchmarks")


@app.capability(type="echo")
async def echo(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    response = ModelInferResponse()
    if request.inputs:
        first = request.inputs[0]
        output = response.outputs.add()
        output.name = first.name
        output.datatype = first.datatype
        output.shape.extend(first.shape)
        output.contents.CopyFrom(first.contents)
    if request.raw_input_contents:
        response.raw_output_contents.append(request.raw_input_contents[0])
    return response


@app.capability(type="blob", zero_copy=True)
async def blob(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    return dict(codec.decode_inputs(request))


@app.capability(type="tokens", stream=True)
async def tokens(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    n = request.parameters["n"].int64_param if "n" in request.parameters else DEFAULT_TOKENS
    for _ in range(n):
        yield "tok"
