"""The baseline: the cheapest grpc.aio server at anyserve's method paths.

``ModelInfer`` answers every call with one fixed, pre-serialized
ModelInferResponse (bytes in, bytes out, nothing parsed); ``ModelStreamInfer``
reads one request and yields :data:`~benchmarks.payloads.STREAM_CHUNKS`
pre-serialized chunks. Run as ``python -m benchmarks.bare_echo`` (see
:mod:`benchmarks.procs` for the start/stop protocol); it uses the same gRPC
options and event loop as a replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from anyserve import rpc
from benchmarks import payloads, procs


def generic_handler() -> grpc.GenericRpcHandler:
    response = payloads.echo_response()
    chunk = payloads.token_chunk()
    chunks = payloads.STREAM_CHUNKS

    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def model_stream_infer(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            for _ in range(chunks):
                yield chunk

    handlers = {
        # No (de)serializers: the handlers see and return bytes.
        "ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(model_stream_infer),
    }
    return grpc.method_handlers_generic_handler(rpc.SERVICE, handlers)


async def main() -> None:
    server = grpc.aio.server(options=rpc.grpc_options())
    server.add_generic_rpc_handlers((generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs.announce(f"127.0.0.1:{port}")
    try:
        await procs.wait_for_exit()
    finally:
        await server.stop(0)


if __name__ == "__main__":
    procs.run_child(main)
