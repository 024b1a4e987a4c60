"""Scenario 5: workers that start on demand and switch within limited resources.

`chat` starts at boot. `heavy` is not preloaded: the replica registers it as
loadable and starts its worker when the first heavy request arrives. Both need
the replica's one GPU (`anyserve start --resources gpu=1`), so serving `heavy`
stops the idle `chat` worker to make room, and the other way round.
"""

from __future__ import annotations

import os

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

app = AnyServe("dynamic")


@app.capability(type="chat", resources={"gpu": 1})
def chat(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return {"text_output": "chat here", "pid": os.getpid()}


@app.capability(type="heavy", resources={"gpu": 1}, preload=False)
def heavy(request: ModelInferRequest, context: Context) -> dict[str, object]:
    return {"text_output": "heavy work done (started on demand)", "pid": os.getpid()}
