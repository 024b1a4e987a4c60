"""A replica serving :mod:`benchmarks.apps` (or the app given as the first
argument) with one worker per handler, as its own process: ``python -m
benchmarks.replica_proc [APP]`` (protocol in :mod:`benchmarks.procs`). It is what
``anyserve start --app benchmarks.apps:app --port 0`` runs, minus the object
store and registration.
"""

from __future__ import annotations

import logging
import sys

import anyio

from anyserve.replica.server import Replica, ReplicaConfig
from benchmarks import procs

APP = "benchmarks.apps:app"


async def main() -> None:
    config = ReplicaConfig(
        app=sys.argv[1] if len(sys.argv) > 1 else APP,
        port=0,
        object_store=None,
        app_dir=str(procs.ROOT),
        grace=1.0,
        log_level="warning",
    )
    async with anyio.create_task_group() as tg:
        replica: Replica = await tg.start(Replica(config).run)
        procs.announce(replica.endpoint)
        await procs.wait_for_exit()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    procs.run_child(main)
