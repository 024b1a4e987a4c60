"""One API server as its own process, with the settings the scale benchmark
varies (protocol in :mod:`benchmarks.procs`)::

    python -m benchmarks.api_proc [--registry memory|redis://...] [--heartbeat-interval S]

It announces ``URL GRPC_HOST:PORT``. No token: registration is taken from this
machine only, as ``anyserve api-server`` does on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from benchmarks import procs


async def run(registry: str, heartbeat_interval: float) -> None:
    config = ApiServerConfig(
        port=0,
        grpc_port=0,
        token=None,
        registry=registry,
        heartbeat_interval=heartbeat_interval,
    )
    async with ApiServer(config) as api:
        procs.announce(f"{api.url} {api.grpc_endpoint}")
        await procs.wait_for_exit()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_proc")
    parser.add_argument("--registry", default="memory")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    procs.run_child(lambda: run(args.registry, args.heartbeat_interval))


if __name__ == "__main__":
    main(sys.argv[1:])
