"""Small apps for the API server's end-to-end routing tests (tests/test_e2e_routing.py).

Two apps in one module (``tests.apps.e2e_apps:demo`` and ``:big``) so one
cluster can hold replicas whose capabilities overlap: a query matches both,
and the closest match must win.
"""

from __future__ import annotations

from anyserve import AnyServe, Context
from anyserve.proto import ModelInferRequest

demo = AnyServe("demo")
big = AnyServe("big")


@demo.capability(type="chat", model="demo")
async def demo_chat(request: ModelInferRequest, context: Context) -> dict[str, str]:
    return {"text_output": "demo", "replica": context.replica_id}


@demo.capability(type="tool", version=2)  # an int: registered, and matched, as "2"
async def tool_v2(request: ModelInferRequest, context: Context) -> dict[str, str]:
    return {"text_output": "tool v2", "replica": context.replica_id}


@big.capability(type="chat", model="demo", size="big")
async def big_chat(request: ModelInferRequest, context: Context) -> dict[str, str]:
    return {"text_output": "big", "replica": context.replica_id}
