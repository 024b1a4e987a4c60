"""The OpenAI-compatible API: a chat model, a completion model and an embedding model.

Run it and point any OpenAI client at ``http://localhost:8080/v1``::

    .venv/bin/anyserve run examples.openai_app:app

* ``echo-chat`` (``/v1/chat/completions``): a streaming handler that answers
  "You said: <the last user message>" one word at a time. It reads the
  ``messages`` input (the JSON of OpenAI's messages list) and the
  ``max_tokens`` parameter, and reports ``finish_reason`` and token usage on
  its last chunk. It serves ``stream: true`` and ``stream: false`` alike.
* ``echo-complete`` (``/v1/completions``): a unary handler that continues each
  prompt (the ``text_input`` input, one element per prompt) with its words in
  reverse order. Being unary, the same handler also answers
  ``POST /v2/models/echo-complete/generate``.
* ``toy-embed`` (``/v1/embeddings``): one FP32 vector of ``DIMS`` per input
  string, as the ``embedding`` output of shape ``[n, DIMS]``.

Token counts here are words: a real model would report its tokenizer's.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from anyserve import AnyServe, Context, codec
from anyserve.errors import InvalidArgument
from anyserve.proto import InferTensorContents, ModelInferRequest, ModelInferResponse

app = AnyServe("openai")

DIMS = 8


def parameter(request: ModelInferRequest, name: str, default: Any = None) -> Any:
    """A request parameter's value (OpenAI's sampling fields arrive as these)."""
    if name not in request.parameters:  # indexing a protobuf map would add the key
        return default
    param = request.parameters[name]
    choice = param.WhichOneof("parameter_choice")
    return default if choice is None else getattr(param, choice)


def words(text: str) -> list[str]:
    """``text`` as tokens: its words, each but the first with its leading space."""
    return [word if i == 0 else " " + word for i, word in enumerate(text.split())]


def limit(tokens: list[str], request: ModelInferRequest) -> tuple[list[str], str]:
    """At most ``max_tokens`` tokens, and the finish reason that says whether it cut."""
    most = parameter(request, "max_tokens")
    if most is not None and len(tokens) > most:
        return tokens[:most], "length"
    return tokens, "stop"


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text: ``content`` as a string, or its text parts joined."""
    content = message.get("content") or ""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


@app.capability(type="chat", model="echo-chat", stream=True)
async def chat(request: ModelInferRequest, context: Context) -> AsyncIterator[dict[str, Any]]:
    messages = json.loads(codec.input_text(request, "messages"))
    said = [message_text(m) for m in messages if m.get("role") == "user"]
    if not said:
        raise InvalidArgument("echo-chat needs at least one user message")
    tokens, finish = limit(words(f"You said: {said[-1]}"), request)
    prompt_tokens = sum(len(message_text(m).split()) for m in messages)
    for i, token in enumerate(tokens):
        if i < len(tokens) - 1:
            yield {"text_output": token}
        else:  # the last chunk also says why it ended and what it cost
            yield {
                "text_output": token,
                "finish_reason": finish,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
            }


def continuation(prompt: str, request: ModelInferRequest) -> tuple[str, str]:
    """What echo-complete continues ``prompt`` with (its words in reverse order,
    at most ``max_tokens`` of them) and the finish reason."""
    tokens, finish = limit([" " + word for word in reversed(prompt.split())], request)
    return "".join(tokens), finish


@app.capability(type="completion", model="echo-complete")
def complete(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    prompts = codec.decode_input(request, "text_input")
    if isinstance(prompts, bytes):
        prompts = [prompts]
    answers = [continuation(prompt.decode(), request) for prompt in prompts]
    return {
        "text_output": [text for text, _ in answers],  # one element per prompt: one choice each
        "finish_reason": [finish for _, finish in answers],
        "prompt_tokens": sum(len(p.split()) for p in prompts),
        "completion_tokens": sum(len(text.split()) for text, _ in answers),
    }


def embed_text(text: str) -> list[float]:
    """A toy deterministic embedding (character histogram, normalised)."""
    vector = [0.0] * DIMS
    for i, ch in enumerate(text):
        vector[(ord(ch) + i) % DIMS] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


@app.capability(type="embed", model="toy-embed")
def embed(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    inputs = codec.decode_input(request, "text_input")
    texts = [t.decode() for t in ([inputs] if isinstance(inputs, bytes) else inputs)]
    vectors = [x for text in texts for x in embed_text(text)]
    # A numpy float32 array of shape [n, DIMS] works as well (and travels raw).
    embedding = ModelInferResponse.InferOutputTensor(
        name="embedding",
        datatype="FP32",
        shape=[len(texts), DIMS],
        contents=InferTensorContents(fp32_contents=vectors),
    )
    return {"embedding": embedding, "prompt_tokens": sum(len(t.split()) for t in texts)}
