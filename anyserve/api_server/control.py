"""The control plane over HTTP: ``/register``, ``/unregister``, ``/registry``, ``/health``.

A replica POSTs the same ``/register`` body as its heartbeat (an upsert that
replaces its capabilities), so an API server that restarted learns every live
replica again within one heartbeat interval (and a Redis registry that was
emptied, likewise). Each change goes to this server's view first, then to the
registry backend, which shares it with other API servers without making the
caller wait.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anyserve import shm
from anyserve.api_server import guard
from anyserve.api_server.responses import json_response, read_body
from anyserve.api_server.state import ApiState
from anyserve.capability import Capability
from anyserve.errors import InvalidArgument

logger = logging.getLogger(__name__)

_MAX_CONTROL_BODY = 4 * 1024 * 1024
_MAX_ID = 256
_SCALARS = (str, int, float, bool)


async def _json_object(request: Request) -> dict[str, Any]:
    body = await read_body(request, _MAX_CONTROL_BODY)
    try:
        doc = json.loads(body)
    except RecursionError:
        raise InvalidArgument("body nests too deeply") from None
    except ValueError as exc:
        raise InvalidArgument(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("body must be a JSON object")
    return doc


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{key!r} must be a non-empty string")
    value = value.strip()
    # Ids travel in gRPC metadata and in the comma-separated visited list.
    if len(value) > _MAX_ID or not value.isascii() or not value.isprintable() or "," in value:
        raise InvalidArgument(f"{key!r} must be printable ASCII without commas")
    return value


def _endpoint(state: ApiState, doc: dict[str, Any]) -> str:
    return guard.check_endpoint(_text(doc, "endpoint"), state.config.networks)


def _capabilities(doc: dict[str, Any], key: str, required: bool) -> list[Capability]:
    items = doc.get(key)
    if items is None and not required:
        return []
    if not isinstance(items, list):
        raise InvalidArgument(f"{key!r} must be a list of objects")
    if len(items) > guard.MAX_CAPABILITIES:
        raise InvalidArgument(f"{key!r} lists more than {guard.MAX_CAPABILITIES} capabilities")
    caps: list[Capability] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not item:
            raise InvalidArgument(f"{key}[{index}] must be a non-empty object")
        guard.check_capability_size(key, index, item)
        for name, value in item.items():
            if not isinstance(value, _SCALARS):
                raise InvalidArgument(f"{key}[{index}].{name} must be a string, number or bool")
        caps.append(Capability(item))
    return caps


async def register(state: ApiState, request: Request) -> Response:
    """Register or refresh a replica (see the module docstring)."""
    guard.authorize_control(state.config.token, request)
    doc = await _json_object(request)
    replica_id = _text(doc, "replica_id")
    endpoint = _endpoint(state, doc)
    capabilities = _capabilities(doc, "capabilities", required=True)
    loadable = _capabilities(doc, "loadable", required=False)
    failed = _capabilities(doc, "failed", required=False)
    workers = doc.get("workers", [])
    if not isinstance(workers, list):
        raise InvalidArgument("'workers' must be a list")
    old = state.registry.get(replica_id)
    before = None if old is None else (old.endpoint, old.capabilities, old.loadable)
    host = doc.get("host", "")
    if not isinstance(host, str) or len(host) > 200:
        raise InvalidArgument("'host' must be a string of at most 200 characters")
    lane = doc.get("lane", "")
    if not isinstance(lane, str) or len(lane) > 200:
        raise InvalidArgument("'lane' must be a string of at most 200 characters")
    replica, created = state.registry.upsert(
        replica_id, endpoint, capabilities, loadable, workers, failed, host=host, lane=lane
    )
    state.backend.stored(replica)
    state.pool.refresh(endpoint)
    if created or before != (replica.endpoint, replica.capabilities, replica.loadable):
        # Heartbeats repeat the same body: only news is logged.
        logger.info(
            "replica %s %s at %s: %s%s",
            replica_id,
            "registered" if created else "updated",
            endpoint,
            _caps_text(replica.capabilities),
            f"; loadable: {_caps_text(replica.loadable)}" if replica.loadable else "",
        )
    cfg = state.config
    return json_response(
        {
            "ok": True,
            "grpc_endpoint": state.grpc_endpoint(request.url.hostname),
            "heartbeat_interval": cfg.heartbeat_interval,
            "ttl": cfg.effective_ttl,
            # A replica on this host delegates through it (anyserve.calls.ApiChannel).
            **_lane(state),
        }
    )


def _caps_text(caps: Sequence[Capability]) -> str:
    return "; ".join(str(c) for c in caps) or "(none)"


async def unregister(state: ApiState, request: Request) -> Response:
    """Remove a replica (its channel closes once its last call ends)."""
    guard.authorize_control(state.config.token, request)
    doc = await _json_object(request)
    replica_id = _text(doc, "replica_id")
    removed = state.registry.remove(replica_id)
    state.backend.removed(replica_id)
    if removed is not None:
        logger.info("replica %s unregistered", replica_id)
        await state.pool.prune(state.registry.endpoints())
    return json_response({"ok": True, "removed": removed is not None})


async def registry(state: ApiState, request: Request) -> Response:
    """Every live replica with capabilities, workers, heartbeat age and load.
    With a token set, endpoints and pids are shown only to callers that send it."""
    now = time.time()
    entries = [r.to_json(now) for r in state.registry]
    token = state.config.token
    if token and not guard.has_token(token, request):
        for entry in entries:
            entry.pop("endpoint", None)
            for worker in entry.get("workers", []):
                if isinstance(worker, dict):
                    worker.pop("pid", None)
    return json_response({"replicas": entries})


async def health(state: ApiState, request: Request) -> Response:
    """200 while the process serves, with the replica count, the gRPC entry's
    endpoint (how ``context.call`` clients find it) and the registry backend's
    state (``{"backend": "redis", "connected": false, "error": ...}`` while
    Redis is out of reach: routing goes on with the last known replicas)."""
    body = {
        "status": "ok",
        "replicas": len(state.registry),
        "grpc_endpoint": state.grpc_endpoint(request.url.hostname),
        "registry": state.backend.status(),
    }
    body.update(_lane(state))  # context.call on this host may use it (lane_client)
    return json_response(body)


def _lane(state: ApiState) -> dict[str, Any]:
    """``{"lane": {"path", "name", "host"}}`` when this server has a local
    lane (:func:`anyserve.lane_slot.lane_on_this_host` reads it), else {}."""
    if state.lane is None:
        return {}
    return {"lane": {"path": state.lane[0], "name": state.lane[1], "host": shm.host_id()}}
