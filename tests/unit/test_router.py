"""The router's choices, against fake connections (no sockets, no processes)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio
import pytest

from anyserve import rpc
from anyserve.api_server.meta import RequestMeta, parse_meta
from anyserve.api_server.registry import Registry
from anyserve.api_server.router import Router
from anyserve.capability import Capability
from anyserve.errors import (
    DeadlineExceeded,
    LoopDetected,
    NotFound,
    Overloaded,
    Unavailable,
)
from anyserve.lane_client import Refused

pytestmark = pytest.mark.anyio


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeConnection:
    """A replica connection that answers from a script: ``reachable`` says
    whether connecting succeeds, ``answers`` what each unary call returns or
    raises (the default echoes the replica's endpoint)."""

    def __init__(self, endpoint: str, *, reachable: bool = True) -> None:
        self.endpoint = endpoint
        self.calls = 0
        self.reachable = reachable
        self.answers: list[bytes | BaseException] = []
        self.sent: list[tuple[bytes, list[tuple[str, str]]]] = []
        self.lane: FakeLane | None = None  # an open local lane (lane_client.Lane)

    async def connect(self, within: float) -> bool:
        return self.reachable

    # Any: a FakeLane stands in for a lane_client.Lane.
    def open_lane(self, replica: Any) -> Any:
        assert replica.lane, "only replicas that registered a lane are asked for it"
        return self.lane

    async def local(self, replica: Any, within: float) -> Any:
        assert replica.lane, "only replicas that registered a lane are asked for it"
        return self.lane

    def unary(self, path: str) -> Any:
        connection = self

        class _Call:
            def __init__(self, body: bytes, metadata: list[tuple[str, str]]) -> None:
                connection.sent.append((body, metadata))

            def __await__(self) -> Any:
                return self._answer().__await__()

            async def _answer(self) -> bytes:
                if connection.answers:
                    answer = connection.answers.pop(0)
                    if isinstance(answer, BaseException):
                        raise answer
                    return answer
                return connection.endpoint.encode()

            def cancel(self) -> bool:
                return False

            def done(self) -> bool:  # its answer is ready when awaited
                return True

        def call(body: bytes, *, timeout: float, metadata: Any, wait_for_ready: bool) -> _Call:
            return _Call(body, list(metadata))

        return call

    def stream(self) -> Any:
        raise NotImplementedError("these tests route unary calls only")


class FakeLane:
    """An open local lane that answers every call with ``answer`` (or raises it)."""

    def __init__(self, answer: bytes | BaseException) -> None:
        self.answer = answer
        self.sent: list[tuple[bytes, dict[str, str], float | None]] = []
        self.in_flight_seen: list[int] = []  # the replica's count during each call
        self.gathered: list[bool] = []
        self.replica: Any = None

    async def unary(
        self, body: bytes, metadata: Any, timeout: float | None, *, gather: bool = False
    ) -> bytes:
        self.sent.append((body, dict(metadata), timeout))
        self.gathered.append(gather)
        self.in_flight_seen.append(self.replica.in_flight)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class FakeConnections:
    def __init__(self) -> None:
        self.by_endpoint: dict[str, FakeConnection] = {}

    def get(self, endpoint: str) -> FakeConnection:
        if endpoint not in self.by_endpoint:
            self.by_endpoint[endpoint] = FakeConnection(endpoint)
        return self.by_endpoint[endpoint]


def make_router(
    replicas: Iterable[tuple[str, list[dict[str, str]]]], **options: Any
) -> tuple[Router, Registry, FakeConnections]:
    registry = Registry(ttl=60)
    for replica_id, caps in replicas:
        registry.upsert(replica_id, f"{replica_id}:1", [Capability(c) for c in caps])
    pool = FakeConnections()
    return Router(registry, pool, **options), registry, pool


def meta(query: dict[str, str] | None = None, *, model: str = "", **headers: str) -> RequestMeta:
    pairs = [(f"x-capability-{k}", v) for k, v in (query or {}).items()]
    pairs += [(k.replace("_", "-"), v) for k, v in headers.items()]
    return parse_meta(pairs, model_name=model, timeout=5.0)


async def send(router: Router, request: RequestMeta) -> str:
    return (await router.unary(rpc.MODEL_INFER, b"req", request)).decode()


async def test_closest_match_wins_then_least_in_flight() -> None:
    router, registry, _ = make_router(
        [
            ("wide", [{"type": "chat", "model": "x"}]),
            ("exact1", [{"type": "chat"}]),
            ("exact2", [{"type": "chat"}]),
        ]
    )
    exact1 = registry.get("exact1")
    assert exact1 is not None
    exact1.in_flight = 3
    assert await send(router, meta({"type": "chat"})) == "exact2:1"
    assert await send(router, meta({"type": "chat", "model": "x"})) == "wide:1"


async def test_model_name_addresses_model_before_type() -> None:
    router, _, _ = make_router([("typed", [{"type": "llama"}]), ("named", [{"model": "llama"}])])
    assert await send(router, meta(model="llama")) == "named:1"


async def test_no_match_is_not_found_naming_the_query() -> None:
    router, _, _ = make_router([("a", [{"type": "chat"}])])
    with pytest.raises(NotFound, match="capability type=embed"):
        await send(router, meta({"type": "embed"}))


async def test_delegated_request_skips_visited_replicas() -> None:
    router, _, pool = make_router([("a", [{"type": "chat"}]), ("b", [{"type": "chat"}])])
    request = meta({"type": "chat"}, x_delegated_from="a", x_anyserve_visited="a")
    for _ in range(10):
        assert await send(router, request) == "b:1"
    sent_md = dict(pool.by_endpoint["b:1"].sent[-1][1])
    assert sent_md[rpc.VISITED] == "a"


async def test_hop_limit_and_going_round_are_loops() -> None:
    router, _, _ = make_router([("a", [{"type": "chat"}]), ("b", [{"type": "chat"}])], hop_limit=3)
    with pytest.raises(LoopDetected, match="hop limit 3"):
        await send(router, meta({"type": "chat"}, x_delegated_from="z", x_anyserve_visited="x,y"))
    with pytest.raises(LoopDetected, match="went round"):
        await send(router, meta({"type": "chat"}, x_delegated_from="a", x_anyserve_visited="b"))


async def test_random_policy_forwards_unmatched_requests_to_an_unvisited_replica() -> None:
    router, _, _ = make_router(
        [("a", [{"type": "chat"}]), ("b", [{"type": "x"}])], no_match="random"
    )
    request = meta({"type": "embed"}, x_delegated_from="a", x_anyserve_visited="a")
    assert await send(router, request) == "b:1"


async def test_every_replica_at_its_cap_is_overloaded() -> None:
    router, registry, _ = make_router([("a", [{"type": "chat"}])], max_inflight=2)
    entry = registry.get("a")
    assert entry is not None
    entry.in_flight = 2
    with pytest.raises(Overloaded) as caught:
        await send(router, meta({"type": "chat"}))
    assert caught.value.retry_after == 1.0


async def test_unreachable_replica_is_skipped_and_all_unreachable_is_unavailable() -> None:
    router, _, pool = make_router([("down", [{"type": "chat"}]), ("up", [{"type": "chat"}])])
    pool.get("down:1").reachable = False
    for _ in range(5):
        assert await send(router, meta({"type": "chat"})) == "up:1"
    pool.get("up:1").reachable = False
    with pytest.raises(Unavailable, match="unreachable: "):
        await send(router, meta({"type": "chat"}))


async def test_a_call_that_never_left_is_retried_once_elsewhere_and_others_are_final() -> None:
    router, registry, pool = make_router([("a", [{"type": "chat"}]), ("b", [{"type": "chat"}])])
    entry_b = registry.get("b")
    assert entry_b is not None
    entry_b.in_flight = 1  # "a" is tried first
    never_sent = _rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    pool.get("a:1").answers = [never_sent]
    assert await send(router, meta({"type": "chat"})) == "b:1"
    assert len(pool.get("a:1").sent) == 1 and len(pool.get("b:1").sent) == 1

    # A failure after the call left is the replica's answer: never retried.
    died = _rpc_error(grpc.StatusCode.UNAVAILABLE, "worker exited with code 9")
    pool.get("a:1").answers = [died]
    pool.get("b:1").answers = [died]
    before = len(pool.get("a:1").sent) + len(pool.get("b:1").sent)
    with pytest.raises(Unavailable, match="worker exited with code 9"):
        await send(router, meta({"type": "chat"}))
    assert len(pool.get("a:1").sent) + len(pool.get("b:1").sent) == before + 1


async def test_in_flight_counts_are_released_after_each_call() -> None:
    router, registry, pool = make_router([("a", [{"type": "chat"}])])
    pool.get("a:1").answers = [_rpc_error(grpc.StatusCode.INTERNAL, "boom")]
    with pytest.raises(Exception, match="boom"):
        await send(router, meta({"type": "chat"}))
    await send(router, meta({"type": "chat"}))
    entry = registry.get("a")
    assert entry is not None and entry.in_flight == 0
    assert pool.get("a:1").calls == 0


async def test_a_request_with_no_time_left_never_reaches_a_replica() -> None:
    router, _, pool = make_router([("a", [{"type": "chat"}])])
    request = meta({"type": "chat"})
    request.timeout = 0.0
    with pytest.raises(DeadlineExceeded):
        await send(router, request)
    assert pool.get("a:1").sent == []


async def test_a_capability_that_exists_but_is_down_is_unavailable_not_unknown() -> None:
    router, registry, _ = make_router([("ok", [{"type": "chat"}])])
    registry.upsert("sick", "sick:1", [], failed=[Capability(type="heavy")])
    with pytest.raises(Unavailable, match="is down on sick"):
        await send(router, meta({"type": "heavy"}))
    with pytest.raises(NotFound):
        await send(router, meta({"type": "never-heard-of"}))
    assert await send(router, meta({"type": "chat"})) == "ok:1"
    with pytest.raises(Unavailable) as info:
        await send(router, meta({"type": "heavy"}))
    assert info.value.retry_after == 30.0


async def test_the_replica_is_told_when_it_is_the_only_candidate() -> None:
    # An overloaded replica then answers 429 itself instead of bouncing the
    # call back through the API server for nothing.
    router, _, pool = make_router([("a", [{"type": "chat"}]), ("b", [{"type": "embed"}])])
    await send(router, meta({"type": "chat"}))
    assert dict(pool.by_endpoint["a:1"].sent[-1][1])[rpc.SOLE_CANDIDATE] == "1"
    router, _, pool = make_router([("a", [{"type": "chat"}]), ("b", [{"type": "chat"}])])
    for _ in range(4):
        await send(router, meta({"type": "chat"}))
    for conn in pool.by_endpoint.values():
        assert all(rpc.SOLE_CANDIDATE not in dict(md) for _, md in conn.sent)


async def test_an_open_lane_carries_the_call_and_one_refused_unrun_goes_elsewhere() -> None:
    router, registry, pool = make_router([])
    decisions: list[str] = []
    router.on_decision = decisions.append
    for replica_id in ("a", "b"):  # on this host, each with its lane open
        registry.upsert(
            replica_id, f"{replica_id}:1", [Capability(type="chat")], host=router.host, lane="/l"
        )
    a, b = registry.get("a"), registry.get("b")
    assert a is not None and b is not None
    b.in_flight = 1  # a is chosen first
    pool.get("a:1").lane = lane_a = FakeLane(Refused())  # stopping: not taken
    pool.get("b:1").lane = lane_b = FakeLane(b"from b's lane")
    lane_a.replica, lane_b.replica = a, b
    request = meta({"type": "chat"}, x_request_id="r-1")
    answer = await router.unary(rpc.MODEL_INFER, b"req", request, gather=True)
    assert answer.decode() == "from b's lane"
    assert [body for body, _, _ in lane_a.sent + lane_b.sent] == [b"req", b"req"]
    assert lane_a.gathered == lane_b.gathered == [True]  # the caller's choice, passed on
    assert lane_a.in_flight_seen == [1] and lane_b.in_flight_seen == [2]  # held during the call
    _, metadata, timeout = lane_b.sent[0]
    assert metadata[rpc.REQUEST_ID] == "r-1" and metadata[rpc.CALL_ID]
    assert timeout is not None and 0 < timeout <= 5.0
    assert decisions == ["chosen", "retried", "chosen"]
    assert (a.in_flight, b.in_flight) == (0, 1) and pool.get("a:1").calls == 0
    assert pool.get("a:1").sent == pool.get("b:1").sent == []  # nothing over gRPC
