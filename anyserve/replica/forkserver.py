"""The fork server: one process per replica that forks worker processes, so a
worker skips the interpreter's start-up and the imports of anyserve's worker
machinery (a ``preload=False`` handler's cold start drops from about 0.2 s to
a few hundredths).

The replica starts it as ``python -m anyserve.replica.forkserver --fd N`` (the
same interpreter as its workers; see :mod:`anyserve.replica.spawning` for the
replica's side). It imports :mod:`anyserve.replica.worker` and its event loop,
never the user's app, and starts no thread and no event loop, so forking it is
safe. Then it waits on its end of a Unix ``SOCK_SEQPACKET`` socketpair to the
replica. The protocol, one JSON object per message:

* fork server -> replica, once: ``{"ready": pid}`` (or ``{"error": text}``,
  then it exits 1);
* replica -> fork server: ``{"spawn": id, "args": [...], "env": {...},
  "cwd": path}`` with four descriptors (SCM_RIGHTS): the worker's end of its
  dispatcher socketpair, then what its stdin, stdout and stderr are to be.
  ``args`` are the worker's command-line options (what follows
  ``python -m anyserve.replica.worker``); their ``--fd`` is rewritten to the
  socket's number in the child. ``env`` is the worker's whole environment;
* fork server -> replica: ``{"spawned": id, "pid": pid}`` with the child's
  pidfd (signals sent through it cannot reach a recycled pid), or
  ``{"failed": id, "error": text}``;
* fork server -> replica, when a child has exited (it reaps its children):
  ``{"exited": pid, "code": code}``, ``code`` as :mod:`asyncio` reports it
  (negative: killed by that signal).

The child closes the fork server's sockets and descriptors, takes the given
stdio, working directory and environment (so ``ANYSERVE_HANDLER`` and every
other variable are there before the app is imported), and runs the worker's
``main`` as a fresh process would: its exit code, tracebacks and exit handlers
are the same. It stays in the replica's process group (as a spawned worker
does) and keeps SIGINT ignored (a worker ignores it anyway: Ctrl-C reaches the
whole group and the replica decides when workers stop).

The fork server exits when the replica's end closes, however the replica
ended (kill -9 included); its workers then exit when their own sockets close.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

#: What the replica runs (after ``python -m``) to start a fork server.
MODULE = "anyserve.replica.forkserver"
#: The module a worker command runs; only such commands are forked.
WORKER_MODULE = "anyserve.replica.worker"
#: The largest message either side reads. A spawn request carries the worker's
#: environment; one that does not fit fails (the replica then starts that
#: worker as a new interpreter).
MAX_MESSAGE = 1024 * 1024
#: Descriptors a spawn request carries: the worker's socket, stdin, stdout, stderr.
SPAWN_FDS = 4


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one message (and descriptors) as one record; raises OSError
    (BlockingIOError on a full non-blocking socket: nothing was sent)."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the descriptors that came with it (now the caller's to
    close); None when the peer has closed its end. Raises ValueError for a
    truncated or malformed message (its descriptors closed), OSError as
    ``recvmsg`` does (BlockingIOError: nothing to read yet)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, SPAWN_FDS)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("message truncated")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("message is not an object")
    except ValueError:
        close_all(fds)
        raise
    return message, fds


def close_all(fds: list[int]) -> None:
    """Close every descriptor of ``fds`` (received ones are the receiver's)."""
    for fd in fds:
        os.close(fd)


@dataclass
class Job:
    """A spawn request, in the child it was forked for."""

    args: list[str]
    env: dict[str, str]
    cwd: str | None
    # The worker's socket, stdin, stdout, stderr.
    fds: list[int]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m anyserve.replica.forkserver``: returns (the
    process exits) once the replica's end closes; in each forked child it
    runs the worker instead and exits as the worker does."""
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the replica")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the replica decides
    # when this process goes (its socket closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Children must stay waitable: SIG_IGN (inherited across exec) would reap them.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ctl = socket.socket(fileno=args.fd)
    try:
        _preload()
    except Exception as exc:
        send(ctl, {"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    send(ctl, {"ready": os.getpid()})
    try:
        job = serve(ctl)
    except (BrokenPipeError, ConnectionResetError):
        job = None  # the replica is gone
    ctl.close()
    if job is not None:
        _become_worker(job)


def _preload() -> None:
    """Import what every worker imports (not the user's app); raise when this
    system cannot run a fork server."""
    import anyio._backends._asyncio  # noqa: F401  (anyio loads it on its first run)

    from anyserve.replica import worker

    worker.event_loop_options()  # imports uvloop, when installed
    os.close(os.pidfd_open(os.getpid()))  # Linux >= 5.3
    # The imported objects go to the permanent generation: the children's
    # collections then leave their pages shared instead of touching them.
    gc.freeze()


def serve(ctl: socket.socket) -> Job | None:
    """Answer spawn requests and report children's exits until the replica's
    end closes (returns None). In a forked child it returns that child's job,
    with every descriptor of this loop closed."""
    selector = selectors.DefaultSelector()
    children: dict[int, int] = {}  # pidfd -> pid
    selector.register(ctl, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is not ctl:
                    _reap(ctl, key.fd, children, selector)
                    continue
                try:
                    received = receive(ctl)
                except ValueError as exc:
                    send(ctl, {"failed": None, "error": f"bad request: {exc}"})
                    continue
                if received is None:
                    return None
                job = _spawn(ctl, *received, children, selector)
                if job is not None:
                    return job
    finally:
        # In a child these are its parent's: closed before the worker runs.
        selector.close()
        close_all(list(children))


def _spawn(
    ctl: socket.socket,
    request: dict[str, Any],
    fds: list[int],
    children: dict[int, int],
    selector: selectors.BaseSelector,
) -> Job | None:
    """Fork a worker for ``request``; the Job in the child, None here."""
    request_id = request.get("spawn")
    try:
        job = _job(request, fds)
        _check_single_threaded()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except (OSError, ValueError) as exc:
        close_all(fds)
        send(ctl, {"failed": request_id, "error": str(exc)})
        return None
    if pid == 0:
        return job
    close_all(fds)
    try:
        # Opened before this process could reap the child, so it names this child.
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        # Without a pidfd nobody could watch or signal it safely: it goes.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        send(ctl, {"failed": request_id, "error": f"pidfd_open: {exc}"})
        return None
    children[pidfd] = pid
    selector.register(pidfd, selectors.EVENT_READ)
    send(ctl, {"spawned": request_id, "pid": pid}, [pidfd])
    return None


def _job(request: dict[str, Any], fds: list[int]) -> Job:
    """The request as a Job; ValueError when it is not a valid spawn request."""
    args, env, cwd = request.get("args"), request.get("env"), request.get("cwd")
    if len(fds) != SPAWN_FDS:
        raise ValueError(f"a spawn request carries {SPAWN_FDS} descriptors, not {len(fds)}")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("args must be a list of strings")
    if "--fd" not in args[:-1]:
        raise ValueError("args name no --fd")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("env must map strings to strings")
    if cwd is not None and not isinstance(cwd, str):
        raise ValueError("cwd must be a string")
    return Job(list(args), dict(env), cwd, list(fds))


def _check_single_threaded() -> None:
    """Raise OSError when this process has more than one thread: forking it
    could leave the child holding a lock no thread will ever release."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        return
    if threads != 1:
        raise OSError(f"the fork server has {threads} threads; it forks only with one")


def _reap(
    ctl: socket.socket, pidfd: int, children: dict[int, int], selector: selectors.BaseSelector
) -> None:
    """A child's pidfd turned readable (it has exited): reap it and tell the replica."""
    pid = children.pop(pidfd)
    selector.unregister(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)  # returns at once: the child has exited
    send(ctl, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _become_worker(job: Job) -> None:
    """In the forked child: take the job's stdio, directory and environment,
    then run the worker's main as ``python -m anyserve.replica.worker`` would."""
    sock, *stdio = job.fds
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    close_all([fd for fd in stdio if fd not in (sock, 0, 1, 2)])
    # Line-buffered on a terminal only, as a fresh interpreter decides.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
    if job.cwd is not None:
        start = os.getcwd()
        os.chdir(job.cwd)
        # ``python -m`` put the start directory first on sys.path; a fresh
        # worker would have its own directory there.
        if sys.path and sys.path[0] == start:
            sys.path[0] = job.cwd
    os.environ.clear()
    os.environ.update(job.env)
    # Files written since this process imported must be found.
    importlib.invalidate_caches()
    args = list(job.args)
    args[args.index("--fd") + 1] = str(sock)
    from anyserve.replica import worker

    sys.argv = [worker.__file__ or WORKER_MODULE, *args]
    worker.main(args)


if __name__ == "__main__":
    main()
