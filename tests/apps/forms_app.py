"""Every handler form of DESIGN.md section 3, plus misbehaving handlers for tests."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from anyserve import AnyServe, Context, Stream, codec
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

app = AnyServe("forms")


def _text(request: ModelInferRequest) -> str:
    return codec.input_text(request, "text_input")


@app.capability(type="echo", form="sync")
def echo_sync(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    return ModelInferResponse(
        outputs=[codec.encode_output("text_output", "sync:" + _text(request))]
    )


@app.capability(type="echo", form="sync1")
def echo_sync_one_arg(request: ModelInferRequest) -> str:
    return "sync1:" + _text(request)


@app.capability(type="deadline", form="sync")
def deadline_sync(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    left = context.time_remaining()
    return {"left": -1.0 if left is None else left}


@app.capability(type="deadline", form="async")
async def deadline_async(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    left = context.time_remaining()
    return {"left": -1.0 if left is None else left}


@app.capability(type="exit3")
def exit_three(request: ModelInferRequest, context: Context) -> str:
    os._exit(3)  # the app imported fine: the replica must not blame the import


@app.capability(type="echo", form="async")
async def echo_async(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    await anyio.lowlevel.checkpoint()
    return {"text_output": "async:" + _text(request), "pid": os.getpid()}


@app.capability(type="gen", form="sync", stream=True)
def gen_sync(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for word in _text(request).split():
        stream.send(
            ModelStreamInferResponse(
                infer_response=ModelInferResponse(
                    outputs=[codec.encode_output("text_output", word)]
                )
            )
        )


@app.capability(type="gen", form="async", stream=True)
async def gen_async(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    for word in _text(request).split():
        yield word


@app.capability(type="gen", form="syncgen", stream=True)
def gen_sync_generator(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    yield from _text(request).split()


@app.capability(type="gen", form="gated", stream=True)
async def gen_gated(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    """Yields one chunk, then waits for a file to appear before finishing: lets a
    test see the first chunk arrive while the handler is still running."""
    gate = Path(_text(request))
    yield "first"
    with anyio.fail_after(10):
        while not gate.exists():
            await anyio.sleep(0.01)
    yield "second"


@app.capability(type="slow", form="async")
async def slow_async(request: ModelInferRequest, context: Context) -> str:
    await anyio.sleep(0.2)
    return "done"


@app.capability(type="cpu", workers=2, max_concurrency=1)
def cpu_bound(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        pass
    return {"pid": os.getpid()}


@app.capability(type="fail")
def fail(request: ModelInferRequest, context: Context) -> str:
    raise ValueError("the model is on fire")


@app.capability(type="bad-input")
def bad_input(request: ModelInferRequest, context: Context) -> str:
    raise InvalidArgument("text_input must not be empty")


@app.capability(type="fail", stream=True)
async def fail_midstream(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    yield "one"
    yield "two"
    raise RuntimeError("stream broke after two tokens")


@app.capability(type="hang")
async def hang(request: ModelInferRequest, context: Context) -> str:
    marker = Path(_text(request))
    marker.write_text(str(os.getpid()))
    try:
        await anyio.sleep_forever()
    finally:
        marker.with_suffix(".stopped").write_text("cancelled")
    return "never"


@app.capability(type="hang_sync")
def hang_sync(request: ModelInferRequest, context: Context) -> str:
    marker = Path(_text(request))
    marker.write_text(str(os.getpid()))
    while not context.cancelled:  # a sync handler learns it was cancelled by polling
        time.sleep(0.01)
    marker.with_suffix(".stopped").write_text("cancelled")
    return "never"


@app.capability(type="ticker", form="async", stream=True)
async def ticker_async(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    """Ticks until cancelled; writes `<path>.stopped` when it stops."""
    marker = Path(_text(request))
    try:
        n = 0
        while True:
            yield str(n)
            n += 1
            await anyio.sleep(0.02)
    finally:
        marker.with_suffix(".stopped").write_text("async")


@app.capability(type="ticker", form="sync", stream=True)
def ticker_sync(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    marker = Path(_text(request))
    try:
        n = 0
        while True:
            stream.send(str(n))
            n += 1
            time.sleep(0.02)
    finally:
        marker.with_suffix(".stopped").write_text("sync")


@app.capability(type="sleepy")
async def sleepy(request: ModelInferRequest, context: Context) -> str:
    await anyio.sleep(float(_text(request)))
    return "rested"


FLOOD_CHUNKS = 1_000


@app.capability(type="flood", stream=True)
def flood(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    """Sends 1,000 chunks of 64 KiB as fast as it may; records progress."""
    marker = Path(_text(request))
    payload = b"x" * 65536
    for n in range(FLOOD_CHUNKS):
        stream.send({"data": payload})
        if n % 20 == 0:
            marker.write_text(str(n))
    marker.with_suffix(".done").write_text("done")
