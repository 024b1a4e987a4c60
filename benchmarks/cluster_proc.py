"""The anyserve chain for the HTTP benchmarks, as server processes (protocol in
:mod:`benchmarks.procs`)::

    python -m benchmarks.cluster_proc all [--app APP]        # API server + replica, one process
    python -m benchmarks.cluster_proc api                    # the API server alone
    python -m benchmarks.cluster_proc replica --api-server URL [--app APP]

``all`` is what ``anyserve run APP`` starts (one event loop for the API server
and the replica); ``api`` + ``replica`` is the production layout, each part in
its own process. The API server forms announce ``URL GRPC_HOST:PORT``; the
replica form announces its own endpoint once it has registered. Every replica
runs each handler of ``APP`` (default :mod:`benchmarks.apps`) in one worker
process. ``BENCH_API_URL`` is set to the API server's URL before the workers
start (they inherit the environment), for handlers that call it over HTTP.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import anyio

from anyserve import memory
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from anyserve.replica.server import Replica, ReplicaConfig
from benchmarks import procs

DEFAULT_APP = "benchmarks.apps:app"
API_URL_ENV = "BENCH_API_URL"


def _api_config() -> ApiServerConfig:
    return ApiServerConfig(port=0, grpc_port=0, token=None)


def _replica_config(app: str, api_url: str) -> ReplicaConfig:
    return ReplicaConfig(
        app=app,
        port=0,
        replica_id="bench",
        api_server=api_url,
        object_store=None,
        app_dir=str(procs.ROOT),
        grace=1.0,
        log_level="warning",
    )


async def _start_replica(tg: anyio.abc.TaskGroup, app: str, api_url: str) -> Replica:
    os.environ[API_URL_ENV] = api_url
    replica: Replica = await tg.start(Replica(_replica_config(app, api_url)).run)
    assert replica.registration is not None
    with anyio.fail_after(30):
        await replica.registration.wait_registered()
    return replica


async def run_all(app: str) -> None:
    async with ApiServer(_api_config()) as api, anyio.create_task_group() as tg:
        await _start_replica(tg, app, api.url)
        memory.settle_gc()  # as a served command does (anyserve.launch)
        procs.announce(f"{api.url} {api.grpc_endpoint}")
        await procs.wait_for_exit()
        tg.cancel_scope.cancel()


async def run_api() -> None:
    async with ApiServer(_api_config()) as api:
        memory.settle_gc()  # as a served command does (anyserve.launch)
        procs.announce(f"{api.url} {api.grpc_endpoint}")
        await procs.wait_for_exit()


async def run_replica(app: str, api_url: str) -> None:
    async with anyio.create_task_group() as tg:
        replica = await _start_replica(tg, app, api_url)
        memory.settle_gc()  # as a served command does (anyserve.launch)
        procs.announce(replica.endpoint)
        await procs.wait_for_exit()
        tg.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster_proc")
    parser.add_argument("mode", choices=["all", "api", "replica"])
    parser.add_argument("--app", default=DEFAULT_APP)
    parser.add_argument("--api-server", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.mode == "all":
        procs.run_child(lambda: run_all(args.app))
    elif args.mode == "api":
        procs.run_child(run_api)
    else:
        if not args.api_server:
            parser.error("replica needs --api-server URL")
        procs.run_child(lambda: run_replica(args.app, args.api_server))


if __name__ == "__main__":
    main(sys.argv[1:])
