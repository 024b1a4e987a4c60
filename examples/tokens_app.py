"""Write your first model, part two: a token stream (README walkthrough).

An async generator handler: each ``yield`` is one streamed response, sent to
the client as soon as it is made (one SSE event on ``/infer/stream``, one
message on gRPC ``ModelStreamInfer``, one chunk on OpenAI's
``/v1/chat/completions``). This toy "language model" answers its prompt back
one upper-cased word at a time.

Run it::

    .venv/bin/anyserve run examples.tokens_app:app
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("tokens")


def prompt(request: ModelInferRequest) -> str:
    """The prompt: the ``text_input`` input, or the last message of an
    OpenAI chat request (whose ``messages`` input is the JSON of the list)."""
    if any(tensor.name == "messages" for tensor in request.inputs):
        messages = json.loads(codec.input_text(request, "messages"))
        return str(messages[-1]["content"])
    return codec.input_text(request, "text_input")


@app.capability(type="chat", model="tokens", stream=True)
async def generate(request: ModelInferRequest, context: Context) -> AsyncIterator[str]:
    for word in prompt(request).split():
        await asyncio.sleep(0.05)  # pretend each token takes a while to make
        yield word.upper() + " "  # a str becomes the `text_output` output
