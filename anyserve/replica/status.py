"""What a replica reports about its workers: to the API server (the
``/register`` body) and to operators (the admin service's worker rows).

Each handler is offered as one of:

* ``loaded``: a worker is ready;
* ``loadable``: a request may start it, or its workers are starting;
* ``failed``: its workers crash-looped (requests get UNAVAILABLE);
* ``stopped``: stopped by command (not started on demand);
* ``unfit``: one worker needs more than the replica's ``--resources`` in all.

Only ``loaded`` and ``loadable`` capabilities are registered.

A handler's declaration is reported too: its tensors in KServe model metadata
(:func:`tensor_metadata`) and Triton's model config (:func:`model_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anyserve import shm
from anyserve._proto import admin_pb2 as apb
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve._proto import model_config_pb2 as mc
from anyserve.app import HandlerInfo
from anyserve.replica.manager import Manager
from anyserve.replica.slot import Slot, State
from anyserve.signature import Tensor, config_dims, triton_type


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
        # Replaced on purpose (stuck call, memory limit): not crashes.
        "recycles": slot.recycles,
        "last_recycle": slot.last_recycle or None,
    }


def registration_body(
    manager: Manager, replica_id: str, endpoint: str, lane: str | None = None
) -> dict[str, Any]:
    """The /register body: loaded, loadable and failed capabilities (a failed
    one exists here but is down: the API server answers 503 for it, not 404),
    the workers, and the local lane's socket when there is one."""
    loaded: list[dict[str, str]] = []
    loadable: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    for handler in manager.handlers.values():
        cap = handler.capability.to_dict()
        offered = availability(manager, handler.name)
        if offered == "loaded" and cap not in loaded:
            loaded.append(cap)
        elif offered == "loadable" and cap not in loadable:
            loadable.append(cap)
        elif offered == "failed" and cap not in failed:
            failed.append(cap)
    body = {
        "replica_id": replica_id,
        "endpoint": endpoint,
        "host": shm.host_id(),  # tensors may come through shared memory on this host
        "capabilities": loaded,
        "loadable": [c for c in loadable if c not in loaded],
        "failed": [c for c in failed if c not in loaded and c not in loadable],
        # Stopped slots are history, not workers.
        "workers": [worker_row(s) for s in manager.all_slots() if s.state is not State.STOPPED],
    }
    if lane:  # an API server on this host may call through it (anyserve.replica.lane)
        body["lane"] = lane
    return body


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
        recycles=slot.recycles,
        last_recycle=slot.last_recycle,
    )


def workers_reply(manager: Manager, replica_id: str) -> apb.WorkersReply:
    """Every worker slot of the replica, stopped ones included (the admin answer)."""
    return apb.WorkersReply(
        replica_id=replica_id, workers=[worker_info(s) for s in manager.all_slots()]
    )


# --------------------------------------------------------------------------- declarations

TensorMetadata = pb.ModelMetadataResponse.TensorMetadata


def tensor_metadata(tensors: Sequence[Tensor]) -> list[TensorMetadata]:
    """Declared tensors as KServe model metadata lists them (full shapes)."""
    return [TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]


def model_config(handler: HandlerInfo, name: str) -> mc.ModelConfig:
    """Triton's model config of ``handler``, answering to model ``name``.

    Platform and backend ``anyserve``; ``max_batch_size`` from the decorator
    (with it > 0, dims leave out the batch dimension and ``dynamic_batching``
    carries ``batch_timeout``); one instance group of ``workers`` processes
    (``KIND_GPU`` when the handler needs a ``gpu`` resource); a streaming
    handler is ``decoupled``; parameters ``handler`` and ``capability``.
    """
    batch = handler.max_batch_size
    gpu = handler.resources.get("gpu", 0) > 0
    group = mc.ModelInstanceGroup
    config = mc.ModelConfig(
        name=name,
        platform="anyserve",
        backend="anyserve",
        max_batch_size=batch,
        input=[
            mc.ModelInput(
                name=t.name,
                data_type=triton_type(t.datatype),
                dims=config_dims(t, batch),
            )
            for t in handler.inputs
        ],
        output=[
            mc.ModelOutput(
                name=t.name,
                data_type=triton_type(t.datatype),
                dims=config_dims(t, batch),
            )
            for t in handler.outputs
        ],
        instance_group=[
            group(
                name=handler.name,
                kind=group.KIND_GPU if gpu else group.KIND_CPU,
                count=handler.workers,
            )
        ],
        parameters={
            "handler": mc.ModelParameter(string_value=handler.name),
            "capability": mc.ModelParameter(string_value=str(handler.capability)),
        },
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=handler.stream),
    )
    if batch > 0:
        config.dynamic_batching.max_queue_delay_microseconds = round(handler.batch_timeout * 1e6)
    return config


def repository_index(manager: Manager, ready_only: bool = False) -> pb.RepositoryIndexResponse:
    """This replica's handlers by model name (``model``, else ``type``) and
    version: ``READY`` when one of them is loaded, else ``UNAVAILABLE`` with
    its availability as the reason (``loadable``, ``failed``, ``stopped``,
    ``unfit``)."""
    order = ("loaded", "loadable", "failed", "stopped", "unfit")  # best first
    best: dict[tuple[str, str], str] = {}
    for handler in manager.handlers.values():
        key = (handler.capability.name, handler.version)
        offered = availability(manager, handler.name)
        if key not in best or order.index(offered) < order.index(best[key]):
            best[key] = offered
    index = pb.RepositoryIndexResponse.ModelIndex
    models = [
        index(name=name, version=version, state="READY")
        if offered == "loaded"
        else index(name=name, version=version, state="UNAVAILABLE", reason=offered)
        for (name, version), offered in sorted(best.items())
        if offered == "loaded" or not ready_only
    ]
    return pb.RepositoryIndexResponse(models=models)
