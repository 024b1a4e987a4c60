"""A preloaded handler whose worker never finishes loading, for
tests/test_worker_start.py: the replica's own start timeout
(``--start-timeout``) is the only thing that ends it. Only the worker of
``stuck`` hangs (``ANYSERVE_HANDLER``); the describe process imports at once.
"""

from __future__ import annotations

import os
import time

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

if os.environ.get("ANYSERVE_HANDLER") == "stuck":
    time.sleep(3600)  # a model load that never finishes (the replica kills it)

app = AnyServe("stuck")


@app.capability(type="ok")
def ok(request: ModelInferRequest, context: Context) -> str:
    return "fine"


@app.capability(type="stuck")
def stuck(request: ModelInferRequest, context: Context) -> str:
    return "unreachable: the worker never finishes importing"
