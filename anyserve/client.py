"""Async client for the API server's HTTP entry.

``infer`` sends a binary ``ModelInferRequest`` (``application/x-protobuf``) and
gets the response bytes back unparsed by the server; ``stream`` sends the same
to ``/infer/stream``, whose SSE events then carry each ``ModelInferResponse``
base64-encoded: protobuf end to end, no JSON. HTTP error statuses (and SSE
error events) become the matching :mod:`anyserve.errors` class carrying the
server's message.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from anyserve.capability import HEADER_PREFIX, Capability
from anyserve.codec import encode_into
from anyserve.errors import (
    AnyServeError,
    DeadlineExceeded,
    HandlerError,
    InvalidArgument,
    Unavailable,
    from_error_body,
    from_http,
)
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = ["Client"]

PROTOBUF = "application/x-protobuf"


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    raise from_http(response.status_code, response.content, response.headers.get("retry-after"))


class Client:
    """Talks to one API server. Use as ``async with Client(url) as client:``.

    ``timeout`` (seconds) bounds each request and is sent as its deadline
    (``X-Request-Timeout``). Connection failures raise Unavailable, timeouts
    DeadlineExceeded, error answers the matching anyserve error.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        timeout: float = 300.0,
        token: str | None = None,
    ) -> None:
        headers = {"X-Request-Timeout": f"{timeout:g}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _prepare(
        self,
        capability: Mapping[str, Any] | None,
        inputs: Mapping[str, Any] | None,
        model: str | None,
        request: ModelInferRequest | None,
        request_id: str | None,
    ) -> tuple[bytes, dict[str, str]]:
        if request is None:
            request = ModelInferRequest(model_name=model or "", id=request_id or "")
            for name, value in (inputs or {}).items():
                try:
                    encode_into(request.inputs.add(), name, value)
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(str(exc)) from None
        elif inputs:
            raise InvalidArgument("pass either inputs or a request, not both")
        elif model and request.model_name != model:
            request = _copy_with_model(request, model)
        headers = {"Content-Type": PROTOBUF}
        for key, value in Capability(capability or {}).items():
            headers[HEADER_PREFIX + key.replace("_", "-")] = value
        if request_id:
            headers["X-Request-Id"] = request_id
        return request.SerializeToString(), headers

    async def infer(
        self,
        capability: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        request: ModelInferRequest | None = None,
        request_id: str | None = None,
    ) -> ModelInferResponse:
        """Run one unary request on the capability (or KServe model name).

        ``inputs`` are plain values (str, bytes, numbers, lists, numpy arrays,
        ObjRefs) turned into tensors; or pass a ready ``request``.
        """
        body, headers = self._prepare(capability, inputs, model, request, request_id)
        try:
            response = await self._http.post("/infer", content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"no answer from {self.base_url} in time: {exc}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the API server at {self.base_url}: {exc}") from None
        await _raise_for_status(response)
        try:
            return ModelInferResponse.FromString(response.content)
        except Exception as exc:
            raise HandlerError(f"malformed response from the API server: {exc}") from None

    async def stream(
        self,
        capability: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        request: ModelInferRequest | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[ModelInferResponse]:
        """Run one streaming request; yields each response as it arrives.

        Raises the anyserve error of an ``event: error`` (after the responses
        before it), and Unavailable when the connection ends before the
        server's end marker. Leaving the loop early cancels the request.
        """
        body, headers = self._prepare(capability, inputs, model, request, request_id)
        headers["Accept"] = "text/event-stream"
        try:
            async with self._http.stream(
                "POST", "/infer/stream", content=body, headers=headers
            ) as response:
                await _raise_for_status(response)
                async for event, data in _sse_events(response.aiter_lines()):
                    if event == "done":
                        return
                    if event == "error":
                        raise _stream_error(data)
                    yield _stream_response(data)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"stream from {self.base_url} timed out: {exc}") from None
        except httpx.ConnectError as exc:
            raise Unavailable(f"cannot reach the API server at {self.base_url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"stream from {self.base_url} broke: {exc}") from None
        raise Unavailable("stream ended without end marker")

    async def registry(self) -> dict[str, Any]:
        """The API server's registry (``GET /registry``)."""
        try:
            response = await self._http.get("/registry")
        except httpx.HTTPError as exc:
            raise Unavailable(f"cannot reach the API server at {self.base_url}: {exc}") from None
        await _raise_for_status(response)
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise HandlerError(f"malformed registry answer from {self.base_url}")
        return doc

    async def health(self) -> bool:
        """True when the API server answers ``GET /health`` with 200."""
        try:
            response = await self._http.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def _copy_with_model(request: ModelInferRequest, model: str) -> ModelInferRequest:
    copy = ModelInferRequest()
    copy.CopyFrom(request)
    copy.model_name = model
    return copy


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """``(event name, data)`` of each SSE event (default name "message")."""
    event, data = "message", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue  # keep-alive comment
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def _stream_error(data: str) -> AnyServeError:
    try:
        doc = json.loads(data)
    except ValueError:
        return HandlerError(data)
    return from_error_body(doc)


def _stream_response(data: str) -> ModelInferResponse:
    """Decode one SSE event of a protobuf stream: a base64 ModelInferResponse."""
    try:
        return ModelInferResponse.FromString(base64.b64decode(data, validate=True))
    except Exception as exc:  # binascii.Error, protobuf's DecodeError
        raise HandlerError(f"malformed stream event from the API server: {exc}") from None
