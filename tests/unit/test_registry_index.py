"""The registry's (key, value) index finds exactly the replicas a full scan finds,
through registrations, refreshes that change capabilities, removals and expiry."""

from __future__ import annotations

import random

import pytest

from anyserve.api_server import registry as registry_module
from anyserve.api_server.registry import Registry
from anyserve.capability import Capability

KEYS = {"type": ["chat", "embed", "rank"], "model": ["a", "b", "c", "d"], "size": ["s", "l"]}


def some_capability(rng: random.Random) -> Capability:
    keys = rng.sample(sorted(KEYS), rng.randint(1, 3))
    return Capability({k: rng.choice(KEYS[k]) for k in keys})


def scanned(registry: Registry, query: dict[str, str], name: str) -> set[str]:
    """What a full scan of every live replica's capabilities finds."""
    return {r.replica_id for r in registry if r.ranked_best(query, name) is not None}


def test_index_agrees_with_a_full_scan() -> None:
    rng = random.Random(7)
    now = [0.0]
    registry = Registry(ttl=10, clock=lambda: now[0])
    for step in range(2000):
        replica_id = f"r{rng.randint(0, 40)}"
        action = rng.random()
        if action < 0.6:
            caps = [some_capability(rng) for _ in range(rng.randint(0, 4))]
            loadable = [some_capability(rng) for _ in range(rng.randint(0, 1))]
            registry.upsert(replica_id, f"{replica_id}:1", caps, loadable)
        elif action < 0.8:
            registry.remove(replica_id)
        elif action < 0.85:
            now[0] += rng.choice([1.0, 6.0])
            registry.expire()
        query = (
            {}
            if step % 3 == 0
            else {k: rng.choice(KEYS[k]) for k in rng.sample(sorted(KEYS), rng.randint(1, 2))}
        )
        name = rng.choice(["chat", "a", "b", "nothing"]) if not query else ""
        found = {r.replica_id for r in registry.candidates(query, name)}
        assert found == scanned(registry, query, name), (step, query, name)


def test_a_refresh_that_drops_a_capability_drops_it_from_routing() -> None:
    registry = Registry(ttl=10)
    registry.upsert("r", "r:1", [Capability(type="chat")])
    assert [r.replica_id for r in registry.candidates({"type": "chat"}, "")] == ["r"]
    registry.upsert("r", "r:1", [Capability(type="embed")])
    assert registry.candidates({"type": "chat"}, "") == []
    assert [r.replica_id for r in registry.candidates({}, "embed")] == ["r"]
    registry.remove("r")
    assert registry.candidates({}, "embed") == []


def test_serving_ranks_as_a_scan_does_through_changes() -> None:
    """What the registry keeps ranked between changes is what ranking every
    replica again gives: the same replicas, best first, each with the
    capability it serves by, least in flight first among equals."""
    rng = random.Random(11)
    registry = Registry(ttl=10)
    for step in range(1000):
        replica_id = f"r{rng.randint(0, 12)}"
        if rng.random() < 0.7:
            caps = [some_capability(rng) for _ in range(rng.randint(0, 3))]
            registry.upsert(replica_id, f"{replica_id}:1", caps)
        else:
            registry.remove(replica_id)
        for replica in registry:
            replica.in_flight = rng.randint(0, 3)
        query = {"type": rng.choice(KEYS["type"])} if step % 2 else {}
        name = "" if query else rng.choice(["chat", "a", "b"])
        served = registry.serving(query, name)
        assert {s.replica.replica_id for s in served} == scanned(registry, query, name)
        for one in served:
            assert (one.rank, one.capability) == one.replica.ranked_best(query, name)
        order = [(s.rank, s.replica.in_flight) for s in served]
        assert order == sorted(order), (step, order)


def test_ranked_queries_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(ttl=10)
    registry.upsert("r", "r:1", [Capability(type="chat")])
    for n in range(1000):
        assert registry.candidates({"type": "chat", "n": str(n)}, "") == []
    assert [r.replica_id for r in registry.candidates({"type": "chat"}, "")] == ["r"]
    assert len(registry._ranked) <= 256
    # So are the replicas listed in all: the same large answer under many
    # orders of its pairs does not pile up.
    monkeypatch.setattr(registry_module, "_RANKED_REPLICAS", 15)
    for i in range(10):
        registry.upsert(f"s{i}", f"s{i}:1", [Capability(type="chat", size="s", n=str(i))])
    pairs = [("type", "chat"), ("size", "s")]
    for n in range(20):
        query = dict(pairs if n % 2 else pairs[::-1])
        found = {r.replica_id for r in registry.candidates(query, "")}
        assert found == {f"s{i}" for i in range(10)}
        assert registry._ranked_replicas <= 15


def test_a_long_model_name_is_ranked_for_its_request_but_not_kept() -> None:
    """A model name comes from the request's bytes and may be of any length:
    the registry must not keep what a client makes up."""
    registry = Registry(ttl=10)
    long_name = "m" * 5000
    registry.upsert("r", "r:1", [Capability(model=long_name)])
    for _ in range(2):
        assert [r.replica_id for r in registry.candidates({}, long_name)] == ["r"]
        assert registry.candidates({}, long_name + "x") == []
    assert registry._ranked == {}
    assert [r.replica_id for r in registry.candidates({"model": long_name}, "")] == ["r"]
