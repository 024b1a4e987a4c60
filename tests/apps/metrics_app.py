"""Handlers for tests/test_metrics.py: a unary one that fails on request, a
stream, one that counts in a handler-defined metric, and one that answers
only once the test lets it."""

from __future__ import annotations

import os

import anyio

from anyserve import AnyServe, Context, codec
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

app = AnyServe("metrics")


def _text(request: ModelInferRequest) -> str:
    return codec.input_text(request, "text_input")


@app.capability(model="alpha", type="echo")
def alpha(request: ModelInferRequest, context: Context) -> str:
    text = _text(request)
    if text == "fail":
        raise InvalidArgument("asked to fail")
    return text


@app.capability(model="beta", type="echo")
async def beta(request: ModelInferRequest, context: Context) -> str:
    text = _text(request)
    if text == "fail":
        raise ValueError("asked to fail")
    return text.upper()


@app.capability(model="words", type="stream", stream=True)
async def words(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
    for word in _text(request).split():
        yield word


@app.capability(model="counted", type="echo")
def counted(request: ModelInferRequest, context: Context) -> str:
    text = _text(request)
    words = context.metrics.counter("app_words", "Words seen by the counted handler.", ["kind"])
    words.labels(kind="seen").inc(len(text.split()))
    context.metrics.histogram("app_text_chars", "Text sizes.", buckets=[1, 10, 100]).observe(
        len(text)
    )
    return str(os.getpid())


@app.capability(model="held", type="echo")
async def held(request: ModelInferRequest, context: Context) -> str:
    # Says it started (<path>.started), then answers once <path> exists: a
    # request the test holds in flight while it scrapes /metrics.
    path = anyio.Path(_text(request))
    await anyio.Path(f"{path}.started").touch()
    with anyio.fail_after(30):
        while not await path.exists():
            await anyio.sleep(0.01)
    return "released"
