"""What a replica reports about its workers: to the API server (the
``/register`` body) and to operators (the admin service's worker rows).

Each handler is offered as one of:

* ``loaded``: a worker is ready;
* ``loadable``: a request may start it, or its workers are starting;
* ``failed``: its workers crash-looped (requests get UNAVAILABLE);
* ``stopped``: stopped by command (not started on demand);
* ``unfit``: one worker needs more than the replica's ``--resources`` in all.

Only ``loaded`` and ``loadable`` capabilities are registered.
"""

from __future__ import annotations

from typing import Any

from anyserve._proto import admin_pb2 as apb
from anyserve.replica.manager import Manager
from anyserve.replica.slot import Slot, State


def availability(manager: Manager, name: str) -> str:
    """How the replica offers handler ``name`` (see the module docstring)."""
    slots = manager.slots.get(name, [])
    if any(s.state is State.READY for s in slots):
        return "loaded"
    if any(s.wanted for s in slots):
        return "loadable"
    if any(s.state is State.FAILED for s in slots):
        return "failed"
    if name in manager.disabled:
        return "stopped"
    if manager.budget.exceeds_total(manager.handler(name)):
        return "unfit"
    return "loadable"


def worker_row(slot: Slot) -> dict[str, Any]:
    """A JSON-able row for /registry."""
    return {
        "id": slot.id,
        "handler": slot.handler.name,
        "capability": slot.handler.capability.to_dict(),
        "pid": slot.pid,
        "state": slot.state.value,
        "inflight": slot.inflight,
        "restarts": slot.restarts,
        "error": slot.failure or None,
    }


def registration_body(manager: Manager, replica_id: str, endpoint: str) -> dict[str, Any]:
    """The /register body: loaded and loadable capabilities, and the workers."""
    loaded: list[dict[str, str]] = []
    loadable: list[dict[str, str]] = []
    for handler in manager.handlers.values():
        cap = handler.capability.to_dict()
        offered = availability(manager, handler.name)
        if offered == "loaded" and cap not in loaded:
            loaded.append(cap)
        elif offered == "loadable" and cap not in loadable:
            loadable.append(cap)
    return {
        "replica_id": replica_id,
        "endpoint": endpoint,
        "capabilities": loaded,
        "loadable": [c for c in loadable if c not in loaded],
        # Stopped slots are history, not workers.
        "workers": [worker_row(s) for s in manager.all_slots() if s.state is not State.STOPPED],
    }


def worker_info(slot: Slot) -> apb.WorkerInfo:
    """The admin message for one worker slot (``anyserve workers list``)."""
    return apb.WorkerInfo(
        id=slot.id,
        handler=slot.handler.name,
        capability=slot.handler.capability.to_dict(),
        pid=slot.pid or 0,
        state=slot.state.value,
        inflight=slot.inflight,
        restarts=slot.restarts,
        error=slot.failure,
    )


def workers_reply(manager: Manager, replica_id: str) -> apb.WorkersReply:
    """Every worker slot of the replica, stopped ones included (the admin answer)."""
    return apb.WorkersReply(
        replica_id=replica_id, workers=[worker_info(s) for s in manager.all_slots()]
    )
