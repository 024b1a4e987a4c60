"""Misbehaving workers for tests/test_workers.py.

The replica learns the handlers by importing this module in a throwaway
describe process (``ANYSERVE_HANDLER`` unset there), then every worker
imports it again with ``ANYSERVE_HANDLER`` naming its handler: module-level code
below breaks only the workers of ``broken_import`` and ``never_ready``.
"""

from __future__ import annotations

import os
import time

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

_HANDLER = os.environ.get("ANYSERVE_HANDLER")
if _HANDLER == "broken_import":
    raise RuntimeError("broken_import: this worker cannot load its model")
if _HANDLER == "never_ready":
    time.sleep(3600)  # a model load that never finishes (the replica terminates it)

app = AnyServe("crashy")


@app.capability(type="ok")
def ok(request: ModelInferRequest, context: Context) -> str:
    return "fine"


@app.capability(type="broken_import", preload=False)
def broken_import(request: ModelInferRequest, context: Context) -> str:
    return "unreachable: the worker never imports"


@app.capability(type="crasher", preload=False)
def crasher(request: ModelInferRequest, context: Context) -> str:
    os._exit(7)


@app.capability(type="never_ready", preload=False)
def never_ready(request: ModelInferRequest, context: Context) -> str:
    return "unreachable: the worker never finishes importing"
