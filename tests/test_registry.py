"""Registry matching and expiry, and the routing facts parsed from headers."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from anyserve.api_server.meta import RequestMeta, http_timeout, parse_meta
from anyserve.api_server.registry import Registry, ReplicaEntry
from anyserve.capability import Capability
from anyserve.errors import InvalidArgument


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def caps(*items: dict[str, object]) -> list[Capability]:
    return [Capability(item) for item in items]


def ids(replicas: Sequence[ReplicaEntry]) -> list[str]:
    return [r.replica_id for r in replicas]


def test_query_is_a_subset_and_the_closest_match_wins() -> None:
    reg = Registry(ttl=10)
    reg.upsert("big", "h:1", caps({"type": "chat", "model": "big", "gpu": "a100"}))
    reg.upsert("mid", "h:2", caps({"type": "chat", "model": "big"}))
    reg.upsert("plain", "h:3", caps({"type": "chat"}))
    reg.upsert("embed", "h:4", caps({"type": "embed", "dim": 768}))
    assert ids(reg.candidates({"type": "chat"}, "")) == ["plain", "mid", "big"]
    assert ids(reg.candidates({"model": "big"}, "")) == ["mid", "big"]
    assert ids(reg.candidates({"type": "chat", "gpu": "a100"}, "")) == ["big"]
    assert ids(reg.candidates({"dim": "768"}, "")) == ["embed"]  # numbers compare as strings
    assert reg.candidates({"type": "chat", "model": "other"}, "") == []
    assert ids(reg.candidates({"type": "chat"}, "", exclude={"plain", "mid"})) == ["big"]


def test_loaded_before_loadable_then_least_in_flight() -> None:
    reg = Registry(ttl=10)
    cold, _ = reg.upsert("cold", "h:1", [], loadable=caps({"type": "chat"}))
    a, _ = reg.upsert("a", "h:2", caps({"type": "chat"}))
    b, _ = reg.upsert("b", "h:3", caps({"type": "chat"}))
    a.in_flight = 3
    assert ids(reg.candidates({"type": "chat"}, "")) == ["b", "a", "cold"]
    b.in_flight = 5
    assert ids(reg.candidates({"type": "chat"}, "")) == ["a", "b", "cold"]
    a.in_flight = b.in_flight = 0
    firsts = {ids(reg.candidates({"type": "chat"}, ""))[0] for _ in range(200)}
    assert firsts == {"a", "b"}  # ties at random
    assert cold.ranked_best({"type": "chat"}, "") == ((0, 0, 1), Capability(type="chat"))


def test_model_names_address_model_then_type() -> None:
    reg = Registry(ttl=10)
    reg.upsert("typed", "h:1", caps({"type": "llama"}))
    reg.upsert("modelled", "h:2", caps({"type": "chat", "model": "llama"}))
    reg.upsert("other", "h:3", caps({"type": "chat"}))
    assert ids(reg.candidates({}, "llama")) == ["modelled", "typed"]
    assert ids(reg.candidates({}, "chat")) == ["other", "modelled"]  # fewer keys first
    assert reg.candidates({}, "nothing") == []


def test_upsert_replaces_and_entries_expire() -> None:
    clock = Clock()
    reg = Registry(ttl=6, clock=clock)
    replica, created = reg.upsert("r", "h:1", caps({"type": "a"}), workers=[{"id": 1}])
    assert created
    replica.in_flight = 2
    again, created = reg.upsert("r", "h:2", caps({"type": "b"}))
    assert again is replica and not created
    assert replica.endpoint == "h:2" and replica.in_flight == 2
    assert reg.candidates({"type": "a"}, "") == [] and len(reg) == 1

    clock.now += 7
    assert len(reg) == 0 and reg.candidates({"type": "b"}, "") == []  # lazily skipped
    assert reg.get("r") is None
    assert ids(reg.expire()) == ["r"] and reg.endpoints() == set()

    reg.upsert("s", "h:3", caps({"type": "x"}))
    clock.now += 5
    reg.upsert("s", "h:3", caps({"type": "x"}))  # heartbeat
    clock.now += 5
    assert reg.expire() == [] and reg.get("s") is not None
    assert reg.remove("s") is not None and reg.remove("s") is None


def test_shuffled_skips_excluded_and_stale() -> None:
    clock = Clock()
    reg = Registry(ttl=1, clock=clock)
    reg.upsert("old", "h:1", [])
    clock.now += 2
    reg.upsert("a", "h:2", [])
    reg.upsert("b", "h:3", [])
    assert sorted(ids(reg.shuffled())) == ["a", "b"]
    assert ids(reg.shuffled(exclude={"a"})) == ["b"]


def test_json_view() -> None:
    reg = Registry(ttl=10)
    replica, _ = reg.upsert("r", "h:1", caps({"type": "a"}), caps({"type": "b"}), [{"id": "w"}])
    doc = replica.to_json(replica.last_heartbeat + 1.5)
    assert doc["capabilities"] == [{"type": "a"}] and doc["loadable"] == [{"type": "b"}]
    assert doc["workers"] == [{"id": "w"}] and doc["last_heartbeat_age"] == 1.5


def meta(pairs: list[tuple[str, str]]) -> RequestMeta:
    return parse_meta(pairs, model_name="m", timeout=5)


def test_meta_from_headers() -> None:
    m = meta([("X-Capability-Type", "chat"), ("X-Capability-Foo-Bar", " 1 "), ("Other", "x")])
    assert m.query == {"type": "chat", "foo_bar": "1"}
    assert len(m.request_id) == 32 and m.visited == ()
    assert m.describe() == "capability foo_bar=1,type=chat"
    assert meta([]).describe() == "model 'm'"
    assert meta([("x-request-id", "abc")]).request_id == "abc"
    assert meta([("x-request-id", "é")]).request_id != "é"

    # Visited only counts for delegated requests and always holds the delegator.
    assert meta([("x-anyserve-visited", "a,b")]).visited == ()
    delegated = meta([("x-delegated-from", "c"), ("x-anyserve-visited", "a, b,,")])
    assert delegated.visited == ("a", "b", "c")
    assert meta([("x-delegated-from", "b"), ("x-anyserve-visited", "a,b")]).visited == ("a", "b")
    md = dict(delegated.metadata())
    assert md["x-anyserve-visited"] == "a,b,c" and md["x-delegated-from"] == "c"
    assert md["x-request-id"] == delegated.request_id

    with pytest.raises(InvalidArgument):
        meta([("x-capability-type", "caf\u00e9")])


def test_http_timeout() -> None:
    assert http_timeout(None, 300) == 300
    assert http_timeout("1.5", 300) == 1.5
    for bad in ("x", "0", "-1", "inf", "nan"):
        with pytest.raises(InvalidArgument):
            http_timeout(bad, 300)
