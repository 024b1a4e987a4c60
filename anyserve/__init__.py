"""anyserve: capability-routed model serving in plain Python.

The public API::

    from anyserve import AnyServe, Context, Stream, ObjRef, Client

    app = AnyServe()

    @app.capability(type="chat", model="demo")
    def chat(request, context):
        return "hello"
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

# Replicas start worker processes with fork+exec while gRPC threads run. gRPC's
# own fork support only logs "skipping fork() handlers" then (the child execs at
# once and never touches gRPC): turn it off before grpc is first imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

from anyserve import objects
from anyserve.app import AnyServe
from anyserve.capability import Capability
from anyserve.context import Context, Stream, StreamClosed, call, current
from anyserve.objects import ObjectStore, ObjRef
from anyserve.signature import Tensor

if TYPE_CHECKING:
    from anyserve.client import Client


def __getattr__(name: str) -> Any:
    # Client pulls in httpx: loaded on first use, so a worker process that never
    # uses it does not pay for it at start.
    if name == "Client":
        from anyserve.client import Client

        return Client
    raise AttributeError(f"module 'anyserve' has no attribute {name!r}")


__all__ = [
    "AnyServe",
    "Capability",
    "Client",
    "Context",
    "ObjRef",
    "ObjectStore",
    "Stream",
    "StreamClosed",
    "Tensor",
    "__version__",
    "call",
    "current",
    "objects",
]
