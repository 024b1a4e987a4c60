"""Handler responses -> OpenAI API answers (JSON documents, as dicts).

What a handler's responses mean here (each output is optional):

* ``text_output`` (BYTES): the text, one element per choice; streamed
  responses carry the next piece of each choice's text;
* ``finish_reason`` (BYTES): ``"stop"``, ``"length"``, ... per choice (one
  element applies to every choice of that response); empty means "not yet".
  A choice the handler never finished ends with ``"stop"``;
* ``prompt_tokens``, ``completion_tokens`` (integers): token usage; the last
  value reported wins, counts never reported are 0;
* ``embedding`` (FP32, or FP16/FP64): shape ``[n, dims]`` for n inputs, or
  ``[dims]`` for one.

:class:`Completion` joins a whole answer (``stream: false``: every response
of the handler is read, whether it streamed or not); :class:`Chunks` turns
each response into a ``chat.completion.chunk`` / ``text_completion`` chunk
and ends the stream (:meth:`Chunks.tail`). :func:`embedding_document`
renders an embedding list, as floats or base64 (little-endian float32, what
OpenAI sends). A response that does not fit raises HandlerError.
"""

from __future__ import annotations

import base64
import codecs
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from anyserve.codec.json_tensors import check_raw_count, output_values
from anyserve.codec.openai import EncodingFormat
from anyserve.errors import HandlerError
from anyserve.proto import ModelInferResponse

__all__ = ["Chunks", "Completion", "Kind", "Piece", "embedding_document", "read_piece"]

Kind = Literal["chat", "completion"]
_FLOATS = ("FP32", "FP16", "FP64")


@dataclass(slots=True)
class Piece:
    """What one response says: text and finish reason per choice, usage."""

    texts: list[bytes] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _count(name: str, value: Any) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise HandlerError(f"output {name!r} must be an integer, got {value!r}") from None
    if count < 0:
        raise HandlerError(f"output {name!r} must not be negative, got {count}")
    return count


def read_piece(response: ModelInferResponse) -> Piece:
    """The text, finish reasons and usage a response carries (module docstring)."""
    check_raw_count(response)
    piece = Piece()
    for index, tensor in enumerate(response.outputs):
        name = tensor.name
        if name == "text_output":
            piece.texts = [_as_bytes(v) for v in output_values(response, index)]
        elif name == "finish_reason":
            values = output_values(response, index)
            piece.finish = [_as_bytes(v).decode("utf-8", "replace") for v in values]
        elif name == "prompt_tokens" or name == "completion_tokens":
            values = output_values(response, index)
            if values:
                setattr(piece, name, _count(name, values[0]))
    return piece


class _Answer:
    """What a chat or text completion has said so far: finish reasons, usage."""

    def __init__(self, kind: Kind, model: str, request_id: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model
        self.finish: list[str | None] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def _take(self, response: ModelInferResponse) -> list[tuple[int, bytes, str | None]]:
        """``(choice, text, finish reason or None)`` for each choice in a response."""
        piece = read_piece(response)
        if piece.prompt_tokens is not None:
            self.prompt_tokens = piece.prompt_tokens
        if piece.completion_tokens is not None:
            self.completion_tokens = piece.completion_tokens
        texts, finish = piece.texts, piece.finish
        count = max(len(texts), len(finish))
        self.finish.extend([None] * (count - len(self.finish)))
        found: list[tuple[int, bytes, str | None]] = []
        for index in range(count):
            text = texts[index] if index < len(texts) else b""
            reason = finish[0] if len(finish) == 1 else finish[index] if index < len(finish) else ""
            if reason:
                self.finish[index] = reason
            found.append((index, text, reason or None))
        return found

    def usage(self) -> dict[str, int]:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


class Completion(_Answer):
    """A whole ``chat.completion`` / ``text_completion``, joined from every response."""

    def __init__(self, kind: Kind, model: str, request_id: str) -> None:
        super().__init__(kind, model, request_id)
        self._texts: list[bytearray] = []

    def add(self, response: ModelInferResponse) -> None:
        for index, text, _ in self._take(response):
            self._texts.extend(bytearray() for _ in range(index + 1 - len(self._texts)))
            self._texts[index] += text

    def document(self) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for index in range(max(len(self.finish), 1)):
            raw = self._texts[index] if index < len(self._texts) else b""
            text = raw.decode("utf-8", "replace")
            finish = (self.finish[index] if index < len(self.finish) else None) or "stop"
            choice: dict[str, Any] = {"index": index}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = None
            choice["finish_reason"] = finish
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}


class Chunks(_Answer):
    """The chunks of a streamed completion, one per response, then :meth:`tail`.

    Chat chunks carry ``delta`` (``role`` in each choice's first one), text
    chunks ``text``; text is decoded incrementally, so a UTF-8 character split
    between two responses arrives whole. With ``include_usage`` every chunk
    has ``"usage": null`` and the tail ends with a chunk of empty ``choices``
    and the usage.
    """

    def __init__(self, kind: Kind, model: str, request_id: str, include_usage: bool) -> None:
        super().__init__(kind, model, request_id)
        self.include_usage = include_usage
        self._decoders: list[codecs.IncrementalDecoder] = []
        self._started: list[bool] = []
        self._object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(self, response: ModelInferResponse) -> dict[str, Any] | None:
        """The chunk for one response, or None when it says nothing new."""
        choices: list[dict[str, Any]] = []
        for index, text, reason in self._take(response):
            self._grow(index)
            content = self._decoders[index].decode(text, final=reason is not None)
            opening = self.kind == "chat" and not self._started[index]  # the role
            if content or reason is not None or opening:
                choices.append(self._choice(index, content, reason))
        return self._chunk(choices) if choices else None

    def tail(self) -> list[dict[str, Any]]:
        """The chunks that end the stream: ``finish_reason: "stop"`` for each
        choice the handler left open, then the usage chunk if asked for."""
        chunks: list[dict[str, Any]] = []
        count = max(len(self.finish), 1)
        self._grow(count - 1)
        self.finish.extend([None] * (count - len(self.finish)))
        open_ = [
            self._choice(index, self._decoders[index].decode(b"", final=True), "stop")
            for index in range(count)
            if self.finish[index] is None
        ]
        if open_:
            chunks.append(self._chunk(open_))
        if self.include_usage:
            chunks.append({**self._head(self._object), "choices": [], "usage": self.usage()})
        return chunks

    def _grow(self, index: int) -> None:
        while len(self._decoders) <= index:
            self._decoders.append(codecs.getincrementaldecoder("utf-8")("replace"))
            self._started.append(False)

    def _choice(self, index: int, content: str, reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            delta: dict[str, str] = {}
            if not self._started[index]:
                delta["role"] = "assistant"
            if content or delta:
                delta["content"] = content
            choice["delta"] = delta
        else:
            choice["text"] = content
        self._started[index] = True
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        return choice

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {**self._head(self._object), "choices": choices}
        if self.include_usage:
            doc["usage"] = None
        return doc


# --------------------------------------------------------------------------- embeddings


def embedding_document(
    response: ModelInferResponse, model: str, count: int, encoding: EncodingFormat
) -> dict[str, Any]:
    """OpenAI's embedding list for ``count`` inputs from the ``embedding`` output."""
    check_raw_count(response)
    index = next((i for i, t in enumerate(response.outputs) if t.name == "embedding"), None)
    if index is None:
        raise HandlerError("the handler's response has no 'embedding' output (FP32 [n, dims])")
    tensor = response.outputs[index]
    if tensor.datatype not in _FLOATS:
        raise HandlerError(f"output 'embedding' must be FP32 (or FP16/FP64), not {tensor.datatype}")
    shape = list(tensor.shape)
    if len(shape) == 2 and shape[0] == count:
        dims = shape[1]
    elif len(shape) == 1 and count == 1:
        dims = shape[0]
    else:
        single = " or [dims]" if count == 1 else ""
        raise HandlerError(
            f"output 'embedding' has shape {shape}; {count} inputs need [{count}, dims]{single}"
        )
    rows: list[Any]
    raw = response.raw_output_contents
    if encoding == "base64" and raw and tensor.datatype == "FP32":
        blob = raw[index]  # already little-endian float32: no per-element work
        if len(blob) != count * dims * 4:
            raise HandlerError(f"output 'embedding': {len(blob)} bytes do not fill {shape}")
        rows = [_b64(blob[i * dims * 4 : (i + 1) * dims * 4]) for i in range(count)]
    else:
        values = output_values(response, index)
        if len(values) != count * dims:
            raise HandlerError(f"output 'embedding': {len(values)} values do not fill {shape}")
        rows = [values[i * dims : (i + 1) * dims] for i in range(count)]
        if encoding == "base64":
            rows = [_b64(_pack(row)) for row in rows]
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    prompt = read_piece(response).prompt_tokens or 0
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _pack(row: list[float]) -> bytes:
    try:
        return struct.pack(f"<{len(row)}f", *row)
    except (OverflowError, struct.error) as exc:
        raise HandlerError(f"output 'embedding' does not fit float32: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
