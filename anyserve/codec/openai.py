"""OpenAI API request bodies -> KServe v2 ``ModelInferRequest`` (validated).

Each body is parsed once (stdlib json) and becomes one request for the
handler of its ``model``:

* chat completions: input ``messages``, BYTES [1], the JSON of the
  ``messages`` list (re-encoded compactly, ASCII);
* completions: input ``text_input``, BYTES [n], one element per prompt;
* embeddings: input ``text_input``, BYTES [n], one element per input string.

Every other field becomes a request parameter: ``temperature``, ``top_p``,
``presence_penalty``, ``frequency_penalty`` (checked against OpenAI's
ranges), ``max_tokens`` (``max_completion_tokens`` is passed as
``max_tokens``), ``n``, ``seed``, ``dimensions`` (integers), ``stop`` (always
the JSON text of a list of strings), ``user``; other scalars as they are,
other arrays and objects as their JSON text. Nulls are left out. A streamed
request carries the bool parameter ``stream``.

A malformed body raises InvalidArgument; :func:`error_param` gives the
offending field (OpenAI's error ``param``) when one is at fault. The answers are
built by :mod:`anyserve.codec.openai_responses`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from anyserve.codec.json_tensors import client_text, jtype, load_object
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

__all__ = [
    "EncodingFormat",
    "OpenAIRequest",
    "chat_request",
    "completion_request",
    "embedding_request",
    "error_param",
    "field_error",
]

EncodingFormat = Literal["float", "base64"]

# Fields with a range in OpenAI's API reference, passed as double parameters.
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
# Integer fields and their least value, passed as int64 parameters.
_INT64_MIN, _INT64_END = -(2**63), 2**63
_INTS: dict[str, int] = {
    "max_tokens": 0,
    "max_completion_tokens": 0,
    "n": 1,
    "dimensions": 1,
    "seed": _INT64_MIN,
}
_CHAT = frozenset({"model", "messages", "stream", "stream_options"})
_COMPLETION = frozenset({"model", "prompt", "stream", "stream_options"})
_EMBEDDING = frozenset({"model", "input", "encoding_format"})

_dump = json.JSONEncoder(separators=(",", ":")).encode  # ASCII: always valid UTF-8
_PARAM = "openai_param"


def field_error(param: str, message: str) -> InvalidArgument:
    """An InvalidArgument naming the malformed field (OpenAI's ``param``).

    A plain InvalidArgument (the error tree of :mod:`anyserve.errors` stays
    whole); :func:`error_param` reads the field back.
    """
    exc = InvalidArgument(message)
    setattr(exc, _PARAM, param)  # an attribute InvalidArgument does not declare
    return exc


def error_param(exc: BaseException) -> str | None:
    """The field :func:`field_error` named, or None."""
    param = getattr(exc, _PARAM, None)
    return param if isinstance(param, str) else None


@dataclass(slots=True)
class OpenAIRequest:
    """A validated OpenAI request and the ``ModelInferRequest`` made of it."""

    model: str
    request: ModelInferRequest
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage (streams only)
    encoding_format: EncodingFormat = "float"  # embeddings
    count: int = 1  # embeddings: how many input strings


@client_text
def chat_request(body: bytes) -> OpenAIRequest:
    """A ``POST /v1/chat/completions`` body; raises InvalidArgument."""
    doc = load_object(body, "request body")
    model = _model(doc)
    messages = doc.get("messages")
    _check_messages(messages)
    request = ModelInferRequest(model_name=model)
    _bytes_input(request, "messages", [_dump(messages).encode("ascii")])
    return _finish(doc, _CHAT, OpenAIRequest(model, request))


@client_text
def completion_request(body: bytes) -> OpenAIRequest:
    """A ``POST /v1/completions`` body; raises InvalidArgument."""
    doc = load_object(body, "request body")
    model = _model(doc)
    prompts = _strings(doc.get("prompt"), "prompt")
    request = ModelInferRequest(model_name=model)
    _bytes_input(request, "text_input", _utf8(prompts, "prompt"))
    return _finish(doc, _COMPLETION, OpenAIRequest(model, request))


@client_text
def embedding_request(body: bytes) -> OpenAIRequest:
    """A ``POST /v1/embeddings`` body; raises InvalidArgument."""
    doc = load_object(body, "request body")
    model = _model(doc)
    texts = _strings(doc.get("input"), "input")
    encoding: EncodingFormat = "float"
    given = doc.get("encoding_format")
    if given == "base64":
        encoding = "base64"
    elif given is not None and given != "float":
        raise field_error(
            "encoding_format", f"'encoding_format' must be 'float' or 'base64', not {given!r}"
        )
    request = ModelInferRequest(model_name=model)
    _bytes_input(request, "text_input", _utf8(texts, "input"))
    _parameters(doc, _EMBEDDING, request)
    return OpenAIRequest(model, request, encoding_format=encoding, count=len(texts))


# --------------------------------------------------------------------------- fields


def _model(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        got = "it is missing" if model is None else f"got {jtype(model)}"
        raise field_error("model", f"'model' must name a model (a non-empty string); {got}")
    return model


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise field_error("messages", "'messages' is required: an array of message objects")
    if not isinstance(messages, list) or not messages:
        what = "empty" if isinstance(messages, list) else jtype(messages)
        raise field_error(
            "messages", f"'messages' must be a non-empty array of messages, not {what}"
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise field_error(where, f"'{where}' must be an object, not {jtype(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise field_error(f"{where}.role", f"'{where}.role' must be a non-empty string")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise field_error(
                f"{where}.content",
                f"'{where}.content' must be a string or an array of content parts,"
                f" not {jtype(content)}",
            )


def _strings(value: Any, name: str) -> list[str]:
    """A string or a non-empty array of strings (``prompt``, ``input``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and value and all(isinstance(item, int | list) for item in value):
        raise field_error(name, f"'{name}' as token ids is not supported: send the text")
    what = "missing" if value is None else "an empty array" if value == [] else jtype(value)
    raise field_error(
        name, f"'{name}' must be a string or a non-empty array of strings, not {what}"
    )


def _utf8(texts: Iterable[str], name: str) -> list[bytes]:
    try:
        return [text.encode("utf-8") for text in texts]
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") in the JSON
        raise field_error(name, f"'{name}' is not valid Unicode text") from None


def _bytes_input(request: ModelInferRequest, name: str, values: list[bytes]) -> None:
    tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(values)])
    tensor.contents.bytes_contents.extend(values)


def _stream(doc: dict[str, Any]) -> tuple[bool, bool]:
    stream = doc.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise field_error("stream", f"'stream' must be a boolean, not {jtype(stream)}")
    options = doc.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise field_error(
            "stream_options", f"'stream_options' must be an object, not {jtype(options)}"
        )
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise field_error(
            "stream_options.include_usage",
            f"'stream_options.include_usage' must be a boolean, not {jtype(usage)}",
        )
    return stream, stream and bool(usage)


def _finish(doc: dict[str, Any], reserved: frozenset[str], found: OpenAIRequest) -> OpenAIRequest:
    """Streaming flags and parameters common to chat and text completions."""
    found.stream, found.include_usage = _stream(doc)
    _parameters(doc, reserved, found.request)
    if found.stream:
        found.request.parameters["stream"].bool_param = True
    return found


def _parameters(doc: dict[str, Any], reserved: frozenset[str], request: ModelInferRequest) -> None:
    """Every field not in ``reserved`` as a request parameter (module docstring)."""
    params = request.parameters
    for key, value in doc.items():
        if key in reserved or value is None:
            continue
        if key in _RANGES:
            params[key].double_param = _number(key, value)
        elif key in _INTS:
            if key == "max_tokens" and doc.get("max_completion_tokens") is not None:
                continue  # max_completion_tokens wins
            name = "max_tokens" if key == "max_completion_tokens" else key
            params[name].int64_param = _integer(key, value)
        elif key == "stop":
            params[key].string_param = _stop(value)
        elif key == "user" and not isinstance(value, str):
            raise field_error(key, f"'user' must be a string, not {jtype(value)}")
        elif isinstance(value, bool):
            params[key].bool_param = value
        elif isinstance(value, int):
            params[key].int64_param = _integer(key, value)
        elif isinstance(value, float):
            params[key].double_param = value
        elif isinstance(value, str):
            params[key].string_param = value
        else:  # arrays and objects (tools, logit_bias, response_format, ...)
            params[key].string_param = _dump(value)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise field_error(key, f"'{key}' must be a number, not {jtype(value)}")
    low, high = _RANGES[key]
    if not low <= value <= high:  # also refuses NaN
        raise field_error(key, f"'{key}' must be between {low:g} and {high:g}, got {value}")
    return float(value)


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(key, f"'{key}' must be an integer, not {jtype(value)}")
    least = _INTS.get(key, _INT64_MIN)
    if value < least:
        raise field_error(key, f"'{key}' must be at least {least}, got {value}")
    if value >= _INT64_END:
        raise field_error(key, f"'{key}' is out of the 64-bit integer range")
    return value


def _stop(value: Any) -> str:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
        raise field_error("stop", "'stop' must be a string or an array of strings")
    return _dump(stops)
