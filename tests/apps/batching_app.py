"""Batched handlers for tests/test_batching.py.

Every handler takes one declared input, ``text`` (BYTES [1]), and answers each
request of its batch with ``echo`` (``echo:<text>``), ``request_id`` (its own
context's), ``batch`` (a number per batch, counted in this worker process) and
``batch_size``. It records which batch every request it saw was in; the text
``?seen`` answers with that record as JSON in ``echo``. Other texts:

* ``fail``: the whole batch raises ValueError (every request of it: 500);
* ``refuse``: the batch raises InvalidArgument (every request of it: 400);
* ``short``: the batch returns one response too few;
* ``unencodable``: this request's ``echo`` cannot be encoded (only it fails);
* ``undeclared``: this request's answer carries an undeclared output (fails only
  where ``ANYSERVE_CHECK_OUTPUTS=1``);
* ``gone``: this request's answer is an exception (only it fails, 400).

Capabilities: ``type=batch, form=sync`` (16 a batch, 50 ms), ``type=batch,
form=async`` (the same, async), ``type=batch, form=long`` (2 a batch, 30 s: a
lone request waits unless its deadline is near), and the stream ``type=words``
(the same declared input; one chunk per word). The sync ones take
``max_concurrency=16``, so several batches run at once while the tests send 64
requests together.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio.lowlevel

from anyserve import AnyServe, Context, Tensor, codec
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

app = AnyServe("batching")

INPUTS = [Tensor("text", "BYTES", [1])]
OUTPUTS = [
    Tensor("echo", "BYTES", [1]),
    Tensor("request_id", "BYTES", [1]),
    Tensor("batch", "INT64", [1]),
    Tensor("batch_size", "INT64", [1]),
]

_lock = threading.Lock()
_batches = 0
_seen: dict[str, int] = {}


def _answer(requests: list[ModelInferRequest], contexts: list[Context]) -> list[Any]:
    global _batches
    texts = [codec.input_text(r, "text") for r in requests]
    with _lock:
        _batches += 1
        number = _batches
        _seen.update((c.request_id, number) for c in contexts)
        seen = json.dumps(_seen)
    if "fail" in texts:
        raise ValueError(f"batch {number} was asked to fail")
    if "refuse" in texts:
        raise InvalidArgument(f"batch {number} refused")
    answers: list[Any] = []
    for text, context in zip(texts, contexts, strict=True):
        answer: dict[str, Any] = {
            "echo": seen if text == "?seen" else f"echo:{text}",
            "request_id": context.request_id,
            "batch": number,
            "batch_size": len(requests),
        }
        if text == "unencodable":
            answer["echo"] = object()
        elif text == "undeclared":
            answer["extra"] = 1
        answers.append(InvalidArgument(f"{text} is gone") if text == "gone" else answer)
    return answers[:-1] if "short" in texts else answers


@app.capability(
    type="batch",
    form="sync",
    max_batch_size=16,
    batch_timeout=0.05,
    max_concurrency=16,
    inputs=INPUTS,
    outputs=OUTPUTS,
)
def batch_sync(requests: list[ModelInferRequest], contexts: list[Context]) -> list[Any]:
    return _answer(requests, contexts)


@app.capability(
    type="batch",
    form="async",
    max_batch_size=16,
    batch_timeout=0.05,
    inputs=INPUTS,
    outputs=OUTPUTS,
)
async def batch_async(requests: list[ModelInferRequest], contexts: list[Context]) -> list[Any]:
    await anyio.lowlevel.checkpoint()
    return _answer(requests, contexts)


@app.capability(
    type="batch",
    form="long",
    max_batch_size=2,
    batch_timeout=30.0,
    max_concurrency=16,
    inputs=INPUTS,
    outputs=OUTPUTS,
)
def batch_long(requests: list[ModelInferRequest], contexts: list[Context]) -> list[Any]:
    return _answer(requests, contexts)


@app.capability(type="words", stream=True, inputs=INPUTS)
async def words(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    for word in codec.input_text(request, "text").split():
        yield word
