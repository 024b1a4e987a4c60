"""The HTTP baseline: the cheapest Starlette app answering what the API server answers.

Run as ``python -m benchmarks.bare_http`` (start/stop protocol in
:mod:`benchmarks.procs`). It serves with uvicorn exactly as the API server
does (same ``uvicorn.Config``, same event loop: uvloop when installed, the
``auto`` HTTP protocol, i.e. httptools when installed, else h11; no access
log), but does no work of its own:

* ``POST /infer`` reads the body and answers a fixed, pre-encoded KServe v2
  JSON response, about what the API server answers for the echo request;
* ``POST /stream`` answers an sse-starlette ``EventSourceResponse`` of
  :data:`STREAM_EVENTS` small events (each the v2 JSON of one ``"tok"`` chunk,
  as anyserve renders it), then ``event: done`` / ``data: [DONE]``;
* ``POST /binary`` reads a Triton binary-extension request (JSON header of
  ``Inference-Header-Content-Length`` bytes, then the tensor bytes) and answers
  the same shape: a fixed JSON header, then the request's tensor bytes.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import anyio
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks import procs

HEADER_LENGTH = "Inference-Header-Content-Length"
STREAM_EVENTS = 1000

ECHO_RESPONSE = json.dumps(
    {
        "model_name": "echo",
        "id": "bench",
        "outputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}],
    },
    separators=(",", ":"),
).encode()

TOKEN_EVENT = json.dumps(
    {
        "model_name": "tokens",
        "id": "bench-stream",
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["tok"]}],
    },
    separators=(",", ":"),
)


def _binary_header(size: int) -> bytes:
    return json.dumps(
        {
            "model_name": "echo",
            "id": "bench-binary",
            "outputs": [
                {
                    "name": "blob",
                    "datatype": "UINT8",
                    "shape": [size],
                    "parameters": {"binary_data_size": size},
                }
            ],
        },
        separators=(",", ":"),
    ).encode()


async def infer(request: Request) -> Response:
    await request.body()
    return Response(ECHO_RESPONSE, media_type="application/json")


async def _events() -> AsyncIterator[dict[str, str]]:
    for _ in range(STREAM_EVENTS):
        yield {"data": TOKEN_EVENT}
    yield {"event": "done", "data": "[DONE]"}


async def stream(request: Request) -> EventSourceResponse:
    await request.body()
    # The same separator and ping interval as the API server's relay.
    return EventSourceResponse(_events(), sep="\n", ping=15)


async def binary(request: Request) -> Response:
    body = await request.body()
    offset = int(request.headers[HEADER_LENGTH])
    blob = body[offset:]
    header = _binary_header(len(blob))
    return Response(
        header + blob,
        headers={HEADER_LENGTH: str(len(header))},
        media_type="application/octet-stream",
    )


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/infer", infer, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/binary", binary, methods=["POST"]),
        ]
    )


def _listen() -> socket.socket:
    # Like the API server: bound here so port 0 works; IPPROTO_TCP so asyncio
    # sets TCP_NODELAY on accepted sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def main() -> None:
    sock = _listen()
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(),
            lifespan="off",
            log_config=None,
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=1,
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(server._serve, [sock])
        while not server.started:  # noqa: ASYNC110 - uvicorn has no "listening" event
            await anyio.sleep(0.005)
        procs.announce(f"http://127.0.0.1:{sock.getsockname()[1]}")
        await procs.wait_for_exit()
        server.should_exit = True


if __name__ == "__main__":
    procs.run_child(main)
