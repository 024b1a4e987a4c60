"""Handler registration and normalisation (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from anyserve import AnyServe, Context, Stream, StreamClosed
from anyserve.app import HandlerInfo, load_app
from anyserve.proto import ModelInferRequest

pytestmark = pytest.mark.anyio


def make_context(is_sync: bool) -> Context:
    from anyserve.capability import Capability
    from anyserve.sync_pool import call_limiter

    return Context(
        request_id="r",
        metadata={},
        capability=Capability(type="t"),
        limiter=call_limiter(is_sync, 2),
        is_sync=is_sync,
    )


async def collect(app: AnyServe, name: str) -> list[Any]:
    handler = app.handler(name)
    out: list[Any] = []

    async def emit(value: Any) -> None:
        out.append(value)

    await handler.run(ModelInferRequest(id="r"), make_context(handler.is_sync), emit)
    return out


async def test_every_form_is_normalised_once() -> None:
    app = AnyServe()

    @app.capability(type="a")
    def one_arg(request: ModelInferRequest) -> str:
        return "one"

    @app.capability(type="b")
    async def unary_async(request: ModelInferRequest, context: Context) -> str:
        return "async"

    @app.capability(type="c", stream=True)
    def seed_stream(request: ModelInferRequest, context: Context, stream: Stream) -> None:
        stream.send("x")
        stream.send("y")

    @app.capability(type="d", stream=True)
    async def agen(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    @app.capability(type="e", stream=True)
    def sync_gen(request: ModelInferRequest, context: Context):  # type: ignore[no-untyped-def]
        yield from "pq"

    @app.capability(type="f", stream=True)
    async def async_stream(request: ModelInferRequest, context: Context, stream: Stream) -> None:
        await stream.asend("z")

    assert await collect(app, "one_arg") == ["one"]
    assert await collect(app, "unary_async") == ["async"]
    assert await collect(app, "seed_stream") == ["x", "y"]
    assert await collect(app, "agen") == [1, 2]
    assert await collect(app, "sync_gen") == ["p", "q"]
    assert await collect(app, "async_stream") == ["z"]
    assert [h.is_sync for h in app.handlers] == [True, False, True, False, True, False]


def test_bad_registrations_are_refused() -> None:
    app = AnyServe()
    with pytest.raises(ValueError, match="at least one key"):
        app.capability()(lambda request: None)
    with pytest.raises(ValueError, match="stream=True"):

        @app.capability(type="x")
        def needs_stream(request: Any, context: Any, stream: Any) -> None: ...

    with pytest.raises(ValueError, match="positional"):

        @app.capability(type="x")
        def no_args() -> None: ...

    @app.capability(type="x")
    def dup(request: Any) -> None: ...

    with pytest.raises(ValueError, match="duplicate"):
        app.capability(type="y", name="dup")(lambda request: None)


async def test_stream_send_raises_once_cancelled() -> None:
    context = make_context(is_sync=True)

    async def emit(value: Any) -> None: ...

    stream = Stream(emit, context)
    context.cancelled = True
    with pytest.raises(StreamClosed):
        stream.send("late")


def test_describe_round_trips() -> None:
    app = AnyServe()

    @app.capability(type="chat", model="m", workers=2, resources={"gpu": 1}, preload=False)
    def chat(request: Any) -> str:
        return ""

    [info] = [HandlerInfo.from_dict(d) for d in app.describe()]
    assert info == app.handler("chat").info
    assert (info.workers, info.preload, dict(info.resources)) == (2, False, {"gpu": 1.0})


def test_load_app_errors() -> None:
    with pytest.raises(ValueError, match="no attribute"):
        load_app("examples.chat_app:nope")
    with pytest.raises(ValueError, match="not an AnyServe"):
        load_app("examples.chat_app:ModelInferResponse")
    assert load_app("examples/chat_app.py:app").name == "chat"
