"""The app the soak run (:mod:`benchmarks.soak`) serves: one handler per kind of
traffic it mixes.

* ``type=echo`` (async unary) and ``type=echo_sync`` (sync unary, thread pool);
* ``type=tokens`` (async generator): ``n`` tokens (parameter, default 50), one
  every millisecond, so a client can leave half-way;
* ``type=slow`` (async unary): sleeps ``ms`` milliseconds (parameter) for
  clients that give up before the answer;
* ``type=sum`` (sync unary): the sum and length of an FP32 tensor, for big bodies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import numpy as np

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("soak")


def _int_param(request: ModelInferRequest, name: str, default: int) -> int:
    return request.parameters[name].int64_param if name in request.parameters else default


@app.capability(type="echo")
async def echo(request: ModelInferRequest, context: Context) -> str:
    return codec.input_text(request, "text")


@app.capability(type="echo_sync")
def echo_sync(request: ModelInferRequest, context: Context) -> str:
    return codec.input_text(request, "text")


@app.capability(type="tokens", stream=True)
async def tokens(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    for i in range(_int_param(request, "n", 50)):
        await anyio.sleep(0.001)
        yield f"t{i} "


@app.capability(type="slow")
async def slow(request: ModelInferRequest, context: Context) -> str:
    await anyio.sleep(_int_param(request, "ms", 200) / 1000)
    return "late"


@app.capability(type="sum")
def total(request: ModelInferRequest, context: Context) -> dict[str, object]:
    values = np.asarray(codec.decode_inputs(request)["x"], dtype=np.float32)
    return {"sum": np.array([values.sum()], dtype=np.float32), "n": np.array([values.size])}
