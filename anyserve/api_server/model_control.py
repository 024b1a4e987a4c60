"""Triton's model repository extension: load and unload, as worker start/stop.

A model (a capability's name: ``model``, else ``type``) is not files in a
repository here but a handler on some replica. ``load`` asks every live
replica's admin service (``anyserve workers start``) to start that handler's
workers, and answers once they are ready and the registry lists the model
again; ``unload`` asks them to drain and stop its workers (``anyserve workers
stop``): a stopped handler is not started on demand until the next load. A
replica that has no such handler answers NotFound; when every one does, the
load fails with Triton's ``failed to load`` wording.

Configuration overrides (``config``, ``file:...`` parameters) are refused: a
capability's options are declared in its app.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import grpc.aio
from starlette.requests import Request
from starlette.responses import Response

from anyserve import rpc
from anyserve._proto import admin_pb2 as apb
from anyserve.api_server.registry import ReplicaEntry
from anyserve.api_server.responses import json_response, read_body
from anyserve.api_server.state import ApiState
from anyserve.errors import AnyServeError, InvalidArgument, NotFound, from_rpc_error

_START_WORKER = "/anyserve.admin.Admin/StartWorker"
_STOP_WORKER = "/anyserve.admin.Admin/StopWorker"
# Seconds a load waits for the replica's re-registration to list the model
# (it re-registers at once on a change; this only bounds a lost POST).
_REGISTERED_WITHIN = 5.0
_CONTROL_TIMEOUT = 600.0  # a load waits for model loading (the start timeout)


def _fail(verb: str, name: str, exc: AnyServeError) -> AnyServeError:
    # Triton's wording first: clients match "failed to load".
    return type(exc)(f"failed to {verb} '{name}': {exc.message}")


async def _each_replica(
    state: ApiState, path: str, body: bytes, replicas: list[ReplicaEntry]
) -> tuple[list[ReplicaEntry], list[AnyServeError]]:
    """Send one admin call to every replica at once: (those that did it, errors)."""
    done: list[ReplicaEntry] = []
    errors: list[AnyServeError] = []
    token = state.config.token
    metadata = [(rpc.AUTHORIZATION, f"Bearer {token}")] if token else []

    async def one(replica: ReplicaEntry) -> None:
        conn = state.pool.get(replica.endpoint)
        try:
            await conn.unary(path)(body, timeout=_CONTROL_TIMEOUT, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            errors.append(from_rpc_error(exc))
        else:
            done.append(replica)

    async with anyio.create_task_group() as tg:
        for replica in replicas:
            tg.start_soon(one, replica)
    return done, errors


def _outcome(verb: str, name: str, done: list[ReplicaEntry], errors: list[AnyServeError]) -> None:
    """Raise unless some replica did it; NotFound everywhere is "no such model"."""
    if done:
        return
    real = [e for e in errors if not isinstance(e, NotFound)]
    if real:
        raise _fail(verb, name, real[0])
    raise InvalidArgument(
        f"failed to {verb} '{name}': no registered replica has a capability named {name!r}"
    )


async def load(state: ApiState, name: str) -> None:
    """Start model ``name``'s workers on every replica that has it and wait
    until the registry lists it; raises InvalidArgument when none has it, else
    the replicas' error, each worded ``failed to load '<name>': ...``."""
    body = apb.StartWorkerRequest(capability=name).SerializeToString()
    done, errors = await _each_replica(state, _START_WORKER, body, list(state.registry))
    _outcome("load", name, done, errors)
    ids = {r.replica_id for r in done}
    with anyio.move_on_after(_REGISTERED_WITHIN):
        # The registry has no change notification: poll briefly.
        while not any(  # noqa: ASYNC110
            r.replica_id in ids and any(c.name == name for c in r.capabilities)
            for r in state.registry
        ):
            await anyio.sleep(0.02)


async def unload(state: ApiState, name: str) -> None:
    """Drain and stop model ``name``'s workers on every replica that has it;
    raises like :func:`load` (``failed to unload``)."""
    body = apb.StopWorkerRequest(worker_id=name, drain=True).SerializeToString()
    done, errors = await _each_replica(state, _STOP_WORKER, body, list(state.registry))
    _outcome("unload", name, done, errors)


def check_load_parameters(parameters: Any, name: str) -> None:
    """Refuse configuration overrides (see the module docstring)."""
    if not parameters:
        return
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"failed to load '{name}': parameters must be a JSON object")
    overrides = [k for k in parameters if k == "config" or str(k).startswith("file:")]
    if overrides:
        raise InvalidArgument(
            f"failed to load '{name}': anyserve takes no configuration overrides"
            f" ({', '.join(map(repr, overrides))}); a capability's options are declared"
            " in its app"
        )


async def _body_parameters(state: ApiState, request: Request) -> Any:
    body = await read_body(request, state.config.max_body)
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidArgument("the request body must be JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return doc.get("parameters", {})


async def http_load(state: ApiState, request: Request) -> Response:
    """``POST /v2/repository/models/{name}/load``."""
    name = request.path_params["name"]
    check_load_parameters(await _body_parameters(state, request), name)
    await load(state, name)
    return json_response({})


async def http_unload(state: ApiState, request: Request) -> Response:
    """``POST /v2/repository/models/{name}/unload``."""
    name = request.path_params["name"]
    await _body_parameters(state, request)  # unload_dependents: nothing depends here
    await unload(state, name)
    return json_response({})


def grpc_request(request: bytes) -> tuple[str, list[str]]:
    """``(model_name, parameter keys)`` of a serialized
    RepositoryModelLoadRequest / RepositoryModelUnloadRequest (fields 2 and
    3); raises InvalidArgument for malformed bytes or no name."""
    name, keys = "", []
    try:
        for number, _, value in rpc.message_fields(request):
            if number == 2 and isinstance(value, bytes):
                name = value.decode("utf-8", "replace")
            elif number == 3 and isinstance(value, bytes):
                for inner, _, key in rpc.message_fields(value):
                    if inner == 1 and isinstance(key, bytes):
                        keys.append(key.decode("utf-8", "replace"))
    except ValueError as exc:
        raise InvalidArgument(f"malformed repository request: {exc}") from None
    if not name:
        raise InvalidArgument("the repository request names no model (model_name)")
    return name, keys
