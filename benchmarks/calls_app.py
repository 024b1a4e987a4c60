"""The app of :mod:`benchmarks.bench_calls`: one capability calling another
through the API server, over gRPC (``context.call``) or over HTTP.

* ``type=echo``: :func:`benchmarks.apps.echo`, the callee.
* ``type=via-grpc``: ``await context.call({"type": "echo"}, {"x": "hi"})``, which
  goes through the API server's gRPC entry on one persistent channel per
  worker (:mod:`anyserve.calls`).
* ``type=via-http``: the same call by hand over HTTP: the same serialized
  ``ModelInferRequest`` (request id and call chain carried as headers, the
  deadline as ``X-Request-Timeout``) posted to the API server's ``/infer`` as
  ``application/x-protobuf``, with one ``httpx.AsyncClient`` per worker process
  (created on first use, kept). The API server's URL comes from
  ``BENCH_API_URL``, which :mod:`benchmarks.cluster_proc` sets before the
  workers start.
* ``type=via-aiohttp``: ``via-http`` with one ``aiohttp.ClientSession`` per
  worker process instead of httpx (which costs much more CPU per request).

The via-* handlers return the callee's response as theirs.
"""

from __future__ import annotations

import os

import aiohttp
import httpx

from anyserve import AnyServe, Context, codec, rpc
from anyserve.proto import ModelInferRequest, ModelInferResponse
from benchmarks import apps

API_URL_ENV = "BENCH_API_URL"
CALLEE = {"type": "echo"}

app = AnyServe("bench-calls")
app.capability(type="echo")(apps.echo)

_httpx: httpx.AsyncClient | None = None
_aiohttp: aiohttp.ClientSession | None = None


def _api_url() -> str:
    url = os.environ.get(API_URL_ENV)
    if not url:
        raise RuntimeError(f"{API_URL_ENV} is not set: start with benchmarks.cluster_proc")
    return url


def _http() -> httpx.AsyncClient:
    global _httpx
    if _httpx is None:
        _httpx = httpx.AsyncClient(base_url=_api_url(), timeout=30.0)
    return _httpx


def _session() -> aiohttp.ClientSession:
    global _aiohttp
    if _aiohttp is None:
        _aiohttp = aiohttp.ClientSession(
            base_url=_api_url(), timeout=aiohttp.ClientTimeout(total=30.0)
        )
    return _aiohttp


def _http_call(context: Context) -> tuple[bytes, dict[str, str]]:
    """The serialized request ``context.call(CALLEE, {"x": "hi"})`` sends, and
    the HTTP headers that carry what it sends as gRPC metadata."""
    call = ModelInferRequest(id=context.request_id)
    call.inputs.append(codec.encode_input("x", "hi"))
    headers = {
        "content-type": "application/x-protobuf",
        "x-capability-type": CALLEE["type"],
        rpc.REQUEST_ID: context.request_id,
        rpc.CALL_CHAIN: str(context.capability),
    }
    remaining = context.time_remaining()
    if remaining:
        headers["x-request-timeout"] = f"{remaining:.3f}"
    return call.SerializeToString(), headers


@app.capability(type="via-grpc")
async def via_grpc(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    response: ModelInferResponse = await context.call(CALLEE, {"x": "hi"})
    return response


@app.capability(type="via-http")
async def via_http(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    body, headers = _http_call(context)
    answer = await _http().post("/infer", content=body, headers=headers)
    if answer.status_code != 200:
        raise RuntimeError(f"/infer answered {answer.status_code}: {answer.text[:300]}")
    return ModelInferResponse.FromString(answer.content)


@app.capability(type="via-aiohttp")
async def via_aiohttp(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    body, headers = _http_call(context)
    async with _session().post("/infer", data=body, headers=headers) as answer:
        data = await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"/infer answered {answer.status}: {data[:300]!r}")
    return ModelInferResponse.FromString(data)
