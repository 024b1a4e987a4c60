"""The worker's Batcher in isolation (no processes, no sockets): a fake "run
this batch" callable records the batches it is given.

Waits are bounded (``anyio.fail_after``) and readiness is polled
(``eventually``). Two tests involve time on purpose: the timeout flush checks
the batch did not go before ``batch_timeout``, and a far deadline is given 50 ms
to (wrongly) hurry its batch. The last tests run real handler forms through
``handler_batcher`` (what the worker builds), still without processes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from anyserve import AnyServe, Context
from anyserve.capability import Capability
from anyserve.errors import HandlerError, InvalidArgument, Unavailable
from anyserve.proto import ModelInferRequest
from anyserve.replica.batching import Batcher, check_results, handler_batcher, handler_error
from anyserve.sync_pool import SyncPool, call_limiter
from tests.support import eventually

pytestmark = pytest.mark.anyio

LONG = 60.0  # a batch_timeout that never fires within a test


class Recorder:
    """A "run this batch" callable: records each batch, answers ``item * 10``
    (or what ``answer`` makes of the batch), optionally held at a gate."""

    def __init__(self, answer: Callable[[list[Any]], object] | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.running = 0
        self.peak = 0
        self.gate: anyio.Event | None = None
        self._answer = answer or (lambda items: [item * 10 for item in items])

    async def __call__(self, items: list[Any]) -> object:
        self.batches.append(list(items))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self._answer(items)
        finally:
            self.running -= 1


def batcher(
    run: Callable[[list[Any]], Awaitable[object]],
    *,
    size: int = 4,
    timeout: float = LONG,
    in_flight: int = 1,
) -> Batcher[Any]:
    return Batcher(run, max_batch_size=size, batch_timeout=timeout, max_in_flight=in_flight)


async def submit_all(b: Batcher[Any], items: list[Any]) -> list[Any]:
    """Submit ``items`` concurrently, in order; each one's result or exception."""
    outcomes: list[Any] = [None] * len(items)

    async def one(index: int, item: Any) -> None:
        try:
            outcomes[index] = await b.submit(item)
        except Exception as exc:
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(items):
            tg.start_soon(one, index, item)
            await anyio.lowlevel.checkpoint()  # arrive in order
    return outcomes


async def test_requests_are_gathered_until_the_batch_is_full() -> None:
    run = Recorder()
    b = batcher(run, size=4)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            outcomes = await submit_all(b, list(range(8)))
            tg.cancel_scope.cancel()
    assert run.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert outcomes == [i * 10 for i in range(8)]  # each its own answer, in order


async def test_a_partial_batch_goes_when_its_oldest_has_waited_batch_timeout() -> None:
    run = Recorder()
    b = batcher(run, size=100, timeout=0.05)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            started = anyio.current_time()
            outcomes = await submit_all(b, [1, 2, 3])
            waited = anyio.current_time() - started
            tg.cancel_scope.cancel()
    assert run.batches == [[1, 2, 3]]
    assert outcomes == [10, 20, 30]
    assert waited >= 0.05


async def test_an_urgent_deadline_sends_the_batch_it_is_in_at_once() -> None:
    run = Recorder()
    b = batcher(run, size=100, timeout=LONG)
    results: dict[str, Any] = {}

    async def submit(name: str, deadline: float) -> None:
        results[name] = await b.submit(name, deadline)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            tg.start_soon(submit, "relaxed", math.inf)
            await eventually(lambda: b.queued == 1)
            # Its deadline would pass long before the batch's timeout.
            tg.start_soon(submit, "urgent", anyio.current_time() + 1.0)
            await eventually(lambda: len(results) == 2)
            tg.cancel_scope.cancel()
    assert run.batches == [["relaxed", "urgent"]]
    assert results == {"relaxed": "relaxed" * 10, "urgent": "urgent" * 10}


async def test_a_deadline_after_the_flush_time_does_not_hurry_the_batch() -> None:
    run = Recorder()
    b = batcher(run, size=100, timeout=LONG)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            tg.start_soon(b.submit, 1, anyio.current_time() + 2 * LONG)
            await eventually(lambda: b.queued == 1)
            await anyio.sleep(0.05)  # the collector had every chance to send it
            assert run.batches == []
            tg.cancel_scope.cancel()


async def test_a_cancelled_request_leaves_its_batch_and_never_reaches_the_handler() -> None:
    run = Recorder()
    b = batcher(run, size=2, timeout=LONG)
    caller = anyio.CancelScope()

    async def leaving() -> None:
        with caller:
            await b.submit("leaving")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            tg.start_soon(leaving)
            await eventually(lambda: b.queued == 1)
            caller.cancel()  # its caller went away while it waited for a batch
            await eventually(lambda: b.queued == 0)
            outcomes = await submit_all(b, ["x", "y"])  # a full batch without it
            tg.cancel_scope.cancel()
    assert outcomes == ["x" * 10, "y" * 10]
    assert run.batches == [["x", "y"]]


async def test_a_request_cancelled_while_its_batch_runs_is_dropped_quietly() -> None:
    run = Recorder()
    run.gate = anyio.Event()
    b = batcher(run, size=2, timeout=LONG)
    caller = anyio.CancelScope()
    kept: list[Any] = []

    async def leaving() -> None:
        with caller:
            await b.submit(1)

    async def staying() -> None:
        kept.append(await b.submit(2))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            tg.start_soon(leaving)
            tg.start_soon(staying)
            await eventually(lambda: run.running == 1)
            caller.cancel()
            run.gate.set()
            await eventually(lambda: kept == [20])
            tg.cancel_scope.cancel()
    assert run.batches == [[1, 2]]


async def test_an_exception_fails_exactly_the_requests_of_its_batch() -> None:
    def answer(items: list[Any]) -> object:
        if "boom" in items:
            raise InvalidArgument(f"refused batch {items}")
        return [f"ok {item}" for item in items]

    run = Recorder(answer)
    b = batcher(run, size=2, in_flight=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            outcomes = await submit_all(b, ["a", "boom", "c", "d"])
            tg.cancel_scope.cancel()
    assert run.batches == [["a", "boom"], ["c", "d"]]
    failed, boom, c, d = outcomes
    assert isinstance(failed, InvalidArgument) and failed is boom  # its class kept
    assert failed.message == "refused batch ['a', 'boom']"
    assert (c, d) == ("ok c", "ok d")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda items: items[:-1], "returned 1 responses for 2 requests"),
        (lambda items: tuple(items), "must return a list with one response per request"),
        (lambda items: None, "not NoneType"),
    ],
)
async def test_a_result_of_the_wrong_shape_fails_the_batch(
    answer: Callable[[list[Any]], object], message: str
) -> None:
    b = batcher(Recorder(answer), size=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            outcomes = await submit_all(b, [1, 2])
            tg.cancel_scope.cancel()
    for outcome in outcomes:
        assert isinstance(outcome, HandlerError)
        assert message in outcome.message


async def test_at_most_max_in_flight_batches_run_and_the_next_ones_grow() -> None:
    run = Recorder()
    run.gate = anyio.Event()
    b = batcher(run, size=4, timeout=0.0, in_flight=2)
    outcomes: list[list[Any]] = []

    async def load() -> None:
        outcomes.append(await submit_all(b, list(range(10))))

    def two_running_rest_queued() -> bool:
        return len(run.batches) == 2 and b.queued == 10 - sum(map(len, run.batches))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            tg.start_soon(load)
            await eventually(two_running_rest_queued)
            assert (run.running, b.in_flight) == (2, 2)
            run.gate.set()
            await eventually(lambda: bool(outcomes))
            tg.cancel_scope.cancel()
    assert run.peak == 2
    assert outcomes == [[i * 10 for i in range(10)]]
    # What queued behind the two running batches went out in full batches.
    left = 10 - len(run.batches[0]) - len(run.batches[1])
    assert [len(batch) for batch in run.batches[2:]] == [4] * (left // 4) + (
        [left % 4] if left % 4 else []
    )
    assert [i for batch in run.batches for i in batch] == list(range(10))


async def test_a_batch_cancelled_with_the_batcher_fails_its_requests() -> None:
    run = Recorder()
    run.gate = anyio.Event()
    b = batcher(run, size=1)
    failure: list[BaseException] = []

    async def submit() -> None:
        try:
            await b.submit(1)
        except Unavailable as exc:
            failure.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer:
            outer.start_soon(submit)
            async with anyio.create_task_group() as inner:
                inner.start_soon(b.serve)
                await eventually(lambda: run.running == 1)
                inner.cancel_scope.cancel()
            await eventually(lambda: bool(failure))
    assert "stopped" in str(failure[0])


def test_check_results_and_handler_error() -> None:
    assert check_results([1, 2], 2) == [1, 2]
    with pytest.raises(HandlerError, match="returned 3 responses for 2 requests"):
        check_results([1, 2, 3], 2)
    assert handler_error(ValueError("bad")).message == "ValueError: bad"
    assert handler_error(KeyError()).message == "KeyError"
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch_size=0, batch_timeout=0.1, max_in_flight=1)


# --------------------------------------------------------------------------- handlers


def context(request_id: str, limiter: Any) -> Context:
    return Context(
        request_id=request_id,
        metadata={},
        capability=Capability(type="embed"),
        limiter=limiter,
        is_sync=isinstance(limiter, SyncPool),
    )


async def run_handler(app: AnyServe, name: str, texts: list[str]) -> list[Any]:
    """Submit one request per text to the handler's batcher; the outcomes."""
    handler = app.handler(name)
    b = handler_batcher(handler)
    assert b is not None
    limiter = call_limiter(handler.is_sync, handler.info.max_concurrency)
    items = [(ModelInferRequest(id=text), context(f"req-{text}", limiter)) for text in texts]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)
            outcomes = await submit_all(b, items)
            tg.cancel_scope.cancel()
    return outcomes


async def test_batched_handler_forms_receive_requests_and_contexts() -> None:
    app = AnyServe()

    @app.capability(type="embed", form="sync", max_batch_size=3)
    def embed_sync(requests: list[ModelInferRequest], contexts: list[Context]) -> list[str]:
        return [
            f"{r.id}/{c.request_id}/{len(requests)}"
            for r, c in zip(requests, contexts, strict=True)
        ]

    @app.capability(type="embed", form="async", max_batch_size=3)
    async def embed_async(requests: list[ModelInferRequest]) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return [f"{r.id}/{len(requests)}" for r in requests]

    assert app.handler("embed_sync").is_sync and not app.handler("embed_async").is_sync
    assert await run_handler(app, "embed_sync", ["a", "b", "c"]) == [
        "a/req-a/3",
        "b/req-b/3",
        "c/req-c/3",
    ]
    assert await run_handler(app, "embed_async", ["a", "b", "c", "d"]) == [
        "a/3",
        "b/3",
        "c/3",
        "d/1",
    ]


async def test_a_handler_exception_becomes_a_handler_error_for_its_batch() -> None:
    app = AnyServe()

    @app.capability(type="embed", max_batch_size=2)
    def embed(requests: list[ModelInferRequest]) -> list[str]:
        if any(r.id == "fail" for r in requests):
            raise RuntimeError("asked to fail")
        return [r.id for r in requests]

    outcomes = await run_handler(app, "embed", ["fail", "x", "y", "z"])
    assert [type(o).__name__ for o in outcomes] == ["HandlerError", "HandlerError", "str", "str"]
    assert outcomes[0].message == "RuntimeError: asked to fail"
    assert outcomes[2:] == ["y", "z"]


def test_batched_handlers_must_return_lists_and_take_requests() -> None:
    app = AnyServe()
    with pytest.raises(ValueError, match="must return a list, not yield"):

        @app.capability(type="a", max_batch_size=2)
        def gen(requests: list[ModelInferRequest]):  # type: ignore[no-untyped-def]
            yield from requests

    with pytest.raises(ValueError, match=r"\(requests\) or \(requests, contexts\)"):

        @app.capability(type="b", max_batch_size=2)
        def three(requests: list[Any], contexts: list[Any], extra: Any) -> list[Any]:
            return requests

    unbatched = AnyServe()

    @unbatched.capability(type="c")
    def plain(request: ModelInferRequest) -> str:
        return "plain"

    assert handler_batcher(unbatched.handler("plain")) is None
