"""The lightest app there is, for tests/test_process_imports.py: its one handler
answers with the modules its worker process has imported (``sys.modules``)."""

from __future__ import annotations

import sys

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

app = AnyServe("lean")


@app.capability(type="lean")
async def modules(request: ModelInferRequest, context: Context) -> str:
    """The worker's imported modules, one name per line (not the names blocked
    with None, such as ``httpx._main``: see ``anyserve/__init__.py``)."""
    return "\n".join(sorted(name for name, module in sys.modules.items() if module is not None))
