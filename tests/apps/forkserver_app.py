"""Workers for tests/test_fork_server.py: each handler tells what its worker
process looks like from inside (so a forked worker can be compared with one
started as a new interpreter), or misbehaves.

``ANYSERVE_HANDLER`` is read when this module is imported: a worker must have
it before the import.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

HANDLER_AT_IMPORT = os.environ.get("ANYSERVE_HANDLER")

app = AnyServe("forked")


def _descriptor(fd: str) -> str:
    """What descriptor ``fd`` is, without an inode number (``socket``, ``pipe``,
    ``anon_inode:[eventpoll]``...)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "gone"  # the listing's own descriptor
    kind, _, rest = target.partition(":[")
    return kind if rest.rstrip("]").isdigit() else target


def facts() -> dict[str, object]:
    """This worker process as it sees itself."""
    fds = os.listdir("/proc/self/fd")
    args = list(sys.argv)
    args[args.index("--fd") + 1] = "N"  # its number differs between the two ways
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "handler_at_import": HANDLER_AT_IMPORT,
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "argv": args,
        "path": sys.path,
        "descriptors": sorted(_descriptor(fd) for fd in fds),
        "signals": {
            name: str(signal.getsignal(getattr(signal, name)))
            for name in ("SIGINT", "SIGTERM", "SIGCHLD", "SIGPIPE", "SIGHUP", "SIGUSR1")
        },
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    }


@app.capability(type="facts")
def preloaded(request: ModelInferRequest, context: Context) -> str:
    return json.dumps(facts())


@app.capability(type="lazy", preload=False)
def lazy(request: ModelInferRequest, context: Context) -> str:
    return json.dumps(facts())


@app.capability(type="shout", preload=False)
def shout(request: ModelInferRequest, context: Context) -> str:
    print("worker stdout line", flush=True)
    print("worker stderr line", file=sys.stderr, flush=True)
    return "said"


@app.capability(type="killed", preload=False)
def killed(request: ModelInferRequest, context: Context) -> str:
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


@app.capability(type="exits", preload=False)
def exits(request: ModelInferRequest, context: Context) -> str:
    os._exit(7)
