"""What a replica reports about its handlers and workers (registration, admin)."""

from __future__ import annotations

from anyserve.replica import status
from anyserve.replica.manager import Manager
from anyserve.replica.processes import WorkerConfig
from anyserve.replica.slot import Slot
from tests.unit.replica_fakes import handler, ready_slot

GPU = {"gpu": 1.0}
CHAT = handler("chat", type="chat")
HEAVY = handler("heavy", resources=GPU, type="heavy")
HUGE = handler("huge", resources={"gpu": 4.0}, type="huge")


def manager() -> Manager:
    return Manager([CHAT, HEAVY, HUGE], WorkerConfig(app="unit:app"), resources=GPU)


def add(manager: Manager, slot: Slot) -> Slot:
    manager.slots[slot.handler.name].append(slot)
    return slot


def test_availability() -> None:
    m = manager()
    assert status.availability(m, "chat") == "loadable"  # a request may start it
    assert status.availability(m, "huge") == "unfit"
    add(m, ready_slot(CHAT)[0])
    assert status.availability(m, "chat") == "loaded"

    starting = add(m, Slot("heavy-0", HEAVY))
    starting.start()
    assert status.availability(m, "heavy") == "loadable"
    starting.mark_failed("crashed")
    assert status.availability(m, "heavy") == "failed"
    m.disabled.add("heavy")
    assert status.availability(m, "heavy") == "failed"  # failed says more than stopped
    m.slots["heavy"].clear()
    assert status.availability(m, "heavy") == "stopped"


def test_registration_body_offers_loaded_and_loadable_capabilities() -> None:
    m = manager()
    chat = add(m, ready_slot(CHAT)[0])
    chat.spawned(321)
    history = add(m, Slot("chat-1", CHAT))  # never started: history, not a worker
    body = status.registration_body(m, "replica-1", "127.0.0.1:50051")
    assert body["replica_id"] == "replica-1" and body["endpoint"] == "127.0.0.1:50051"
    assert body["capabilities"] == [{"type": "chat"}]
    assert body["loadable"] == [{"type": "heavy"}]  # huge is unfit
    assert body["workers"] == [
        {
            "id": "chat-0",
            "handler": "chat",
            "capability": {"type": "chat"},
            "pid": 321,
            "state": "ready",
            "inflight": 0,
            "restarts": 0,
            "error": None,
            "recycles": 0,
            "last_recycle": None,
        }
    ]
    assert history.id not in {w["id"] for w in body["workers"]}


def test_the_admin_reply_lists_every_slot() -> None:
    m = manager()
    add(m, ready_slot(CHAT)[0])
    failed = add(m, Slot("heavy-0", HEAVY))
    failed.start()
    failed.mark_failed("crashed 5 times")
    reply = status.workers_reply(m, "replica-1")
    assert reply.replica_id == "replica-1"
    assert [(w.id, w.state, w.pid, w.error) for w in reply.workers] == [
        ("chat-0", "ready", 0, ""),
        ("heavy-0", "failed", 0, "crashed 5 times"),
    ]
