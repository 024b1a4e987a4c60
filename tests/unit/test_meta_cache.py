"""parse_meta parses each distinct set of headers once: requests sending the
same ones share the parsed query, yet each gets its own RequestMeta, its own
request id, and the same errors as without the cache."""

from __future__ import annotations

import pytest

from anyserve.api_server import meta as meta_module
from anyserve.api_server.meta import parse_meta
from anyserve.capability import query_to_metadata
from anyserve.errors import InvalidArgument

PAIRS = (("x-capability-type", "chat"), ("x-capability-Model", " llama "), ("user-agent", "t"))


def test_the_same_headers_give_fresh_metas_with_their_own_ids() -> None:
    first = parse_meta(PAIRS, model_name="a", timeout=1.0)
    second = parse_meta(list(PAIRS), model_name="b", timeout=2.0)
    assert dict(first.query) == dict(second.query) == {"type": "chat", "model": "llama"}
    assert first is not second
    assert first.request_id != second.request_id
    assert (first.model_name, first.timeout) == ("a", 1.0)
    assert (second.model_name, second.timeout) == ("b", 2.0)
    # What one request learns stays on its own meta.
    first.replica_id, first.chunks = "r1", 3
    assert (second.replica_id, second.chunks) == ("", 0)
    # The replica metadata is what the query alone would give.
    assert second.metadata()[:2] == query_to_metadata(second.query)
    assert ("x-request-id", second.request_id) in second.metadata()


def test_a_given_request_id_is_used_every_time_and_not_kept() -> None:
    for request_id in ("id-1", "id-2"):
        pairs = (*PAIRS, ("x-request-id", request_id))
        assert parse_meta(pairs, model_name="", timeout=1.0).request_id == request_id
        assert pairs not in meta_module._parsed


def test_bad_headers_fail_every_time() -> None:
    bad = (("x-capability-type", "caf\u00e9"),)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="printable ASCII"):
            parse_meta(bad, model_name="", timeout=1.0)


def test_delegation_headers_are_read_from_the_cache_too() -> None:
    pairs = (
        ("x-capability-type", "chat"),
        ("x-delegated-from", "r2"),
        ("x-anyserve-visited", "r1"),
    )
    for _ in range(2):
        meta = parse_meta(pairs, model_name="", timeout=1.0)
        assert meta.delegated_from == "r2"
        assert meta.visited == ("r1", "r2")


def test_the_cache_stays_bounded_and_long_headers_are_not_kept() -> None:
    for n in range(1000):
        meta = parse_meta((("x-capability-type", f"t{n}"),), model_name="", timeout=1.0)
        assert meta.query == {"type": f"t{n}"}
    assert len(meta_module._parsed) <= meta_module._CACHE_SIZE
    long = (("x-capability-type", "chat"), ("x-note", "n" * 2000))
    assert parse_meta(long, model_name="", timeout=1.0).query == {"type": "chat"}
    assert long not in meta_module._parsed
