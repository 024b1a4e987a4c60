"""Live gRPC endpoints for registrations that no real replica backs:
``python -m benchmarks.grpc_sink N`` (protocol in :mod:`benchmarks.procs`).

One grpc.aio server with no services, listening on ``N`` ports of 127.0.0.1;
it announces them as ``host:port,host:port,...``. The API server dials every
registered endpoint (and replaces a channel that is down on each heartbeat),
so the scale benchmark's 1,000 fake replicas point here: their channels come
up and stay up as real replicas' would, and a heartbeat costs what it costs
for a live replica.
"""

from __future__ import annotations

import logging
import resource
import sys

import grpc.aio

from benchmarks import procs


async def main(count: int) -> None:
    server = grpc.aio.server()
    endpoints = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}" for _ in range(count)]
    await server.start()
    try:
        procs.announce(",".join(endpoints))
        await procs.wait_for_exit()
    finally:
        await server.stop(None)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # One listening socket per port and one connection per API server channel.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    procs.run_child(lambda: main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
