"""Serving without the command line's libraries in memory.

The serving commands parse and check their options with Typer, which loads
click and pydantic: about 8 MiB resident that a server would carry for its
whole life. So once a command has built its configuration (:class:`Plan`),
:func:`launch` replaces the process (``os.execv``: same pid, descriptors,
terminal and signals) with ``python -m anyserve.launch``, which reads the
plan from an inherited pipe and loads only the server. The original command
line follows ``--`` in the new one, so ``ps`` still shows it, and the
interpreter's own options (``-X importtime``...) are kept.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import anyio
import anyio.abc

from anyserve import memory
from anyserve.errors import InvalidArgument, StartupError

#: Libraries whose own debug/info lines drown anyserve's: warnings only, unless
#: --log-level trace. (httpx alone would log every heartbeat at INFO.)
LIBRARIES = ("httpx", "httpcore", "grpc", "hpack", "asyncio", "multipart", "sse_starlette")


@dataclass
class Plan:
    """What a serving command serves: ``kind`` ``replica`` (``config``: a
    ReplicaConfig), ``api`` (an ApiServerConfig) or ``run`` (an ApiServerConfig
    and ``apps``, ``object_store``, ``replica_options`` for start_cluster)."""

    kind: Literal["replica", "api", "run"]
    config: Any
    log_level: str  # as --log-level gave it (trace included)
    log_format: str
    apps: list[str] = field(default_factory=list)
    object_store: str | None = None
    replica_options: dict[str, Any] = field(default_factory=dict)


def configure_logging(level: str, log_format: str) -> str:
    """Configure logging for a checked ``--log-level`` and ``--log-format``;
    returns the level handed to child processes (``trace`` is ``debug`` with
    the libraries' lines)."""
    from anyserve import logs

    effective = "debug" if level == "trace" else level
    logs.configure(effective.upper(), log_format)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "trace" else logging.WARNING)
    return effective


def launch(plan: Plan) -> NoReturn:
    """Serve ``plan`` in a fresh interpreter that replaces this process (module
    docstring); never returns."""
    read, write = os.pipe()
    data = pickle.dumps(plan)
    # The plan is small (well under a pipe's buffer): written whole before the exec.
    with os.fdopen(write, "wb") as pipe:
        pipe.write(data)
    os.set_inheritable(read, True)
    sys.stdout.flush()
    sys.stderr.flush()
    command = [*_interpreter_options(), "-m", "anyserve.launch", str(read), "--", *sys.argv]
    os.execv(sys.executable, [sys.executable, *command])


def _interpreter_options() -> list[str]:
    # sys.orig_argv is [python, <its options>, <script, or -m module>, <args>].
    options: list[str] = []
    words = iter(sys.orig_argv[1:])
    for word in words:
        if word in ("-m", "-c") or not word.startswith("-"):
            break
        options.append(word)
        if word in ("-X", "-W"):  # their value is the next word
            options.append(next(words, ""))
    return options


def serve(plan: Plan) -> None:
    """Serve ``plan`` until SIGINT/SIGTERM (see :func:`run_until_signal`)."""
    if plan.kind == "replica":
        from anyserve.replica.server import Replica

        run_until_signal(Replica(plan.config).run)
        return
    stop = anyio.Event()
    if plan.kind == "api":
        from anyserve.api_server.server import ApiServer

        async def serve_api(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            async with ApiServer(plan.config):  # leaving it drains requests (--grace)
                task_status.started()
                await stop.wait()

        run_until_signal(serve_api, stop)
        return
    from anyserve.cluster import start_cluster

    async def serve_all(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with start_cluster(
            plan.apps,
            api=plan.config,
            object_store=plan.object_store,
            replica_options=plan.replica_options,
        ) as cluster:
            print(cluster.describe(), flush=True)
            print(cluster.workers_hint(), flush=True)
            print("anyserve is running; press Ctrl-C to stop.", flush=True)
            task_status.started()
            await stop.wait()  # leaving the block drains replicas, then the API server

    run_until_signal(serve_all, stop)


def run_until_signal(
    serve: Callable[..., Coroutine[Any, Any, Any]], stop: anyio.Event | None = None
) -> None:
    """Run ``serve`` (an anyio task function) until SIGINT/SIGTERM, then let it
    shut down gracefully: by setting ``stop`` when given (``serve`` returns
    once its in-flight work is done; a second signal cuts it short), else by
    cancelling it (a replica's shutdown is shielded). A start-up failure or a
    bad setting is one line on stderr and exit code 1 (2 for a bad setting)."""
    from anyserve.replica.worker import event_loop_options

    async def main() -> None:
        log = logging.getLogger("anyserve")
        async with anyio.create_task_group() as tg:

            async def run_serve(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
                await serve(task_status=task_status)
                tg.cancel_scope.cancel()  # it drained and returned: stop listening

            await tg.start(run_serve)
            memory.settle_gc()  # started: what is there now stays
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if stop is not None and not stop.is_set():
                        log.info(
                            "received %s, draining (again to stop at once)",
                            signal.Signals(signum).name,
                        )
                        stop.set()
                        continue
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
            tg.cancel_scope.cancel()

    try:
        anyio.run(main, backend_options=event_loop_options())
    except Exception as exc:
        # Task groups wrap a start-up failure in exception groups: find it.
        expected = _expected_failure(exc)
        if expected is None:
            raise  # a bug: the whole traceback helps
        print(f"anyserve: {expected}", file=sys.stderr)
        if isinstance(expected, StartupError) and expected.detail:
            print(expected.detail, file=sys.stderr)
        raise SystemExit(2 if isinstance(expected, InvalidArgument) else 1) from None


def _expected_failure(exc: BaseException) -> StartupError | InvalidArgument | None:
    """The start-up failure or bad setting inside ``exc`` (possibly nested in
    exception groups), or None when ``exc`` is something else."""
    if isinstance(exc, StartupError | InvalidArgument):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _expected_failure(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str]) -> None:
    """``python -m anyserve.launch FD -- <original command line>``."""
    from anyserve import memory

    memory.skip_httpx_cli()  # the replica's registration client, without httpx's command line
    try:
        with os.fdopen(int(argv[0]), "rb") as pipe:
            plan: Plan = pickle.load(pipe)
    except (IndexError, ValueError, OSError, EOFError, pickle.UnpicklingError):
        print(
            "anyserve.launch serves what a serving command (anyserve api-server, start,"
            " run) hands it; start one of those instead",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    configure_logging(plan.log_level, plan.log_format)
    try:
        serve(plan)
    except KeyboardInterrupt:  # Ctrl-C before the server took signals over (start-up)
        print("anyserve: aborted", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
