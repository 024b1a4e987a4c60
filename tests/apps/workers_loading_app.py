"""Workers that take long to start, for tests/test_worker_start.py.

The replica learns the handlers by importing this module in a throwaway
describe process (``ANYSERVE_HANDLER`` unset there), then every worker imports
it again with ``ANYSERVE_HANDLER`` naming its handler, so the module-level
code below slows down only the workers of ``slow_load`` and ``stuck``:

* ``slow_load``: its worker "loads its model" until the file named by
  ``$LOADING_APP_GATE`` exists, so a test ends the load when it wants (no sleeps);
* ``stuck``: its worker never finishes loading; its own ``start_timeout``
  (0.5 s) ends it, whatever the replica's default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

GATE = "LOADING_APP_GATE"
STUCK_START_TIMEOUT = 0.5

_HANDLER = os.environ.get("ANYSERVE_HANDLER")
if _HANDLER == "slow_load" and os.environ.get(GATE):
    _gate, _give_up = Path(os.environ[GATE]), time.monotonic() + 60
    while not _gate.exists() and time.monotonic() < _give_up:
        time.sleep(0.01)
if _HANDLER == "stuck":
    time.sleep(3600)  # a model load that never finishes (the replica kills it)

app = AnyServe("loading")


@app.capability(type="ok")
def ok(request: ModelInferRequest, context: Context) -> str:
    return "fine"


@app.capability(type="slow_load", preload=False)
def slow_load(request: ModelInferRequest, context: Context) -> str:
    return "loaded"


@app.capability(type="stuck", preload=False, start_timeout=STUCK_START_TIMEOUT)
def stuck(request: ModelInferRequest, context: Context) -> str:
    return "unreachable: the worker never finishes importing"
