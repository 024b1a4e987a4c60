"""Triton sequences and model versions, piece by piece: the parameters peeked
from serialized requests, the API server's sequence/session table, the
replica's sequence -> worker table, the worker's per-sequence state, and
version resolution."""

from __future__ import annotations

import dataclasses
import tracemalloc
from typing import Any

import anyio
import pytest

from anyserve import AnyServe, versions
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry
from anyserve.api_server.sequences import Sequences
from anyserve.capability import Capability
from anyserve.errors import InvalidArgument, NotFound, Unavailable
from anyserve.proto import InferParameter, ModelInferRequest
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.manager import Manager
from anyserve.replica.processes import WorkerConfig
from anyserve.replica.sequences import SequenceSlots
from anyserve.replica.slot import Slot, State
from anyserve.sequence import (
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_MARK,
    SEQUENCE_START,
    SequenceFlags,
    SequenceStates,
    from_parameters,
    peek_request,
)
from tests.unit.replica_fakes import handler

pytestmark = pytest.mark.anyio


def request(version: str = "", **params: Any) -> ModelInferRequest:
    message = ModelInferRequest(model_name="m", model_version=version)
    for key, value in params.items():
        param = message.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        else:
            param.string_param = value
    return message


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, None),
        ({"sequence_id": 7}, SequenceFlags(7)),
        ({"sequence_id": -3, "sequence_end": True}, SequenceFlags(-3, end=True)),
        ({"sequence_id": "a-b", "sequence_start": True}, SequenceFlags("a-b", start=True)),
        ({"sequence_id": 0}, None),
        ({"sequence_id": ""}, None),
        ({"other": 1}, None),
    ],
)
def test_sequence_flags_are_peeked_and_parsed_alike(params: dict[str, Any], expected: Any) -> None:
    message = request("2", **params)
    message.raw_input_contents.append(b"x" * 10_000)  # a large field is skipped, not read
    assert peek_request(message.SerializeToString()) == ("m", "2", expected)
    assert from_parameters(message.parameters) == expected


@pytest.mark.parametrize(
    "message",
    [
        ModelInferRequest(),
        ModelInferRequest(model_name="m"),
        ModelInferRequest(model_version="3"),
        ModelInferRequest(model_version="2", inputs=[{"name": "t" * 300}], model_name="m"),
        ModelInferRequest(id="x", model_version="3", model_name="m", raw_input_contents=[b"x"] * 9),
        request("1", sequence_id="s", sequence_end=True),
    ],
)
def test_the_peek_reads_what_a_parser_reads(message: ModelInferRequest) -> None:
    data = message.SerializeToString()
    parsed = ModelInferRequest.FromString(data)
    expected = (parsed.model_name, parsed.model_version, from_parameters(parsed.parameters))
    assert peek_request(data) == expected
    # A field given twice: the last one counts, as for a parser.
    again = ModelInferRequest(model_name="n", model_version="4").SerializeToString()
    assert peek_request(data + again)[:2] == ("n", "4")


def test_flags_without_an_id_and_malformed_bytes_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="need a non-zero"):
        peek_request(request(sequence_start=True).SerializeToString())
    whole = request("1", sequence_id=5).SerializeToString()
    bad_entry = b"\x22\x0f\x0a\x0bsequence_id\x12\x05\x08"  # its value is cut short
    for malformed in (b"\x0a\x05ab", b"\x0f", whole[:-3], b"\x12\xff", bad_entry):
        with pytest.raises(InvalidArgument, match=r"^malformed ModelInferRequest: "):
            peek_request(malformed)


def test_a_uint64_id_is_taken_too() -> None:
    message = ModelInferRequest()
    message.parameters["sequence_id"].CopyFrom(InferParameter(uint64_param=2**63 + 1))
    assert peek_request(message.SerializeToString())[2] == SequenceFlags(2**63 + 1)


# --------------------------------------------------------------------------- worker state


def test_worker_state_lives_from_start_to_end_or_idle_timeout() -> None:
    clock = Clock()
    states = SequenceStates(idle_timeout=10, clock=clock)
    first = states.open(request(sequence_id=1, sequence_start=True).parameters)
    assert first is not None and first.start
    first.state["n"] = 1
    states.close(first)
    second = states.open(request(sequence_id=1).parameters)
    assert second is not None and second.state == {"n": 1}
    states.close(second)
    restart = states.open(request(sequence_id=1, sequence_start=True).parameters)
    assert restart is not None and restart.state == {}  # a start begins afresh
    states.close(restart)
    last = states.open(request(sequence_id=1, sequence_end=True).parameters)
    states.close(last)
    assert len(states) == 0
    states.close(states.open(request(sequence_id=2).parameters))
    clock.now += 11
    assert states.open(request().parameters) is None
    states.close(states.open(request(sequence_id=3).parameters))  # expires idle ones
    assert len(states) == 1


# --------------------------------------------------------------------------- API server table


def meta() -> RequestMeta:
    return RequestMeta(query={}, model_name="m", request_id="r", timeout=5.0)


def payload(**params: Any) -> bytes:
    return request(**params).SerializeToString()


def registry_with(*ids: str) -> Registry:
    registry = Registry(ttl=60)
    for replica_id in ids:
        registry.upsert(replica_id, f"{replica_id}:1", [Capability(model="m")])
    return registry


async def test_a_sequence_is_pinned_ordered_and_ended() -> None:
    registry = registry_with("r1", "r2")
    table = Sequences(registry)
    seen: list[int] = []

    async def one(index: int) -> None:
        m = meta()
        async with table.route(payload(sequence_id=5, sequence_start=index == 0), m):
            assert m.pin is not None
            if m.pin.replica_id is None:
                replica = registry.get("r2")
                assert replica is not None
                m.pin.chose(replica)
            assert m.pin.replica_id == "r2"
            seen.append(index)
            await anyio.sleep(0.01 * (3 - index))  # later ones would finish first

    async with anyio.create_task_group() as tg:
        for index in (0, 1, 2):
            tg.start_soon(one, index)
    assert seen == [0, 1, 2]
    async with table.route(payload(sequence_id=5, sequence_end=True), meta()):
        pass
    assert len(table) == 0
    with pytest.raises(InvalidArgument, match="must specify the START flag"):
        async with table.route(payload(sequence_id=5), meta()):
            pass


async def test_a_sequence_whose_replica_left_fails_until_it_starts_again() -> None:
    registry = registry_with("r1", "r2")
    table = Sequences(registry)
    m = meta()
    async with table.route(payload(sequence_id="s", sequence_start=True), m):
        assert m.pin is not None
        replica = registry.get("r1")
        assert replica is not None
        m.pin.chose(replica)
    registry.remove("r1")
    m = meta()
    with pytest.raises(Unavailable, match="replica r1, which is gone"):
        async with table.route(payload(sequence_id="s"), m):
            assert m.pin is not None
            m.pin.replica(registry, [])
    m = meta()
    async with table.route(payload(sequence_id="s", sequence_start=True), m):
        assert m.pin is not None and m.pin.replica(registry, []) is None  # choose afresh


async def test_sessions_stick_then_move_and_idle_entries_expire() -> None:
    registry = registry_with("r1", "r2")
    clock = Clock()
    table = Sequences(registry, idle_timeout=30, clock=clock)
    m = meta()
    async with table.route(b"", m, session="chat-1"):
        assert m.pin is not None and not m.pin.strict
        replica = registry.get("r1")
        assert replica is not None
        m.pin.chose(replica)
    m = meta()
    async with table.route(b"", m, session="chat-1"):
        assert m.pin is not None and m.pin.replica_id == "r1"
    registry.remove("r1")
    m = meta()
    async with table.route(b"", m, session="chat-1"):
        assert m.pin is not None and m.pin.replica(registry, []) is None  # it moves
    clock.now += 31
    async with table.route(b"", meta(), session="other"):
        pass
    assert len(table) == 1
    with pytest.raises(InvalidArgument, match="X-Session-Id"):
        async with table.route(b"", meta(), session="x" * 300):
            pass


# --------------------------------------------------------------------------- replica table


async def test_a_sequence_keeps_its_worker_and_fails_when_that_worker_was_replaced() -> None:
    info = handler("acc", model="acc")
    slots = [Slot("acc-0", info), Slot("acc-1", info)]
    for pid, slot in enumerate(slots, start=10):
        slot.start()
        slot.spawned(pid)
        slot.connect(_FakeWriter())  # type: ignore[arg-type]
    assert all(s.state is State.READY for s in slots)
    table = SequenceSlots()
    picks = iter(slots)

    async def acquire() -> Slot:
        return next(picks)

    async with table.hold("acc", SequenceFlags(1, start=True), acquire) as slot:
        assert slot is slots[0]
    async with table.hold("acc", SequenceFlags(1), acquire) as slot:
        assert slot is slots[0]
    slots[0].spawned(99)  # a new process in the slot: the state is gone
    with pytest.raises(Unavailable, match="worker acc-0, which held its state"):
        async with table.hold("acc", SequenceFlags(1), acquire):
            pass
    async with table.hold("acc", SequenceFlags(1, start=True, end=True), acquire) as slot:
        assert slot is slots[1]
    assert len(table) == 0


class _FakeWriter:
    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        pass


# --------------------------------------------------------------------------- versions


def test_versions_order_numbers_by_value_and_word_unknown_ones_like_triton() -> None:
    assert versions.latest(["1", "10", "2", "beta"]) == "10"
    assert versions.sorted_versions(["3", "1", "3", "beta"]) == ["beta", "1", "3"]
    assert versions.unknown_model("m") == "Request for unknown model: 'm' is not found"
    assert versions.unknown_model("m", "7", "why") == (
        "Request for unknown model: 'm' version 7 is not found: why"
    )
    assert "from specified version string 'x'" in versions.unknown_model("m", "x")


def test_the_version_key_is_the_handlers_version() -> None:
    app = AnyServe()

    @app.capability(model="m", version=2)
    def two(request: Any, context: Any) -> str:
        return ""

    @app.capability(model="n")
    def one(request: Any, context: Any) -> str:
        return ""

    assert [h.info.version for h in app.handlers] == ["2", "1"]


def test_resolution_takes_the_version_asked_for_else_the_latest() -> None:
    infos = [dataclasses.replace(handler(f"m{v}", model="m"), version=v) for v in ("1", "10", "2")]
    dispatcher = Dispatcher(infos, Manager(infos, WorkerConfig(app="unit:app")))
    assert dispatcher.resolver.resolve({}, "m", stream=False).name == "m10"
    assert dispatcher.resolver.resolve({}, "m", stream=False, version="2").name == "m2"
    with pytest.raises(NotFound, match=r"^Request for unknown model: 'm' version 3 is not found"):
        dispatcher.resolver.resolve({}, "m", stream=False, version="3")
    with pytest.raises(NotFound, match=r"^Request for unknown model: 'x' is not found"):
        dispatcher.resolver.resolve({}, "x", stream=False)


def test_only_parameters_with_the_sequence_mark_are_parsed() -> None:
    # The API server parses a request only when its bytes hold the mark, the
    # replica's peek_request only the parameter entries that hold it.
    assert all(
        k.encode().startswith(SEQUENCE_MARK) for k in (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END)
    )
    with_seq = request(sequence_id=7, sequence_start=True).SerializeToString()
    assert SEQUENCE_MARK in with_seq and peek_request(with_seq)[2] is not None
    assert SEQUENCE_MARK not in request().SerializeToString()
    # A parameter entry without the mark is not read (this one is malformed).
    assert peek_request(b"\x22\x02\x12\x09") == ("", "", None)
    # Nor is the mark outside the parameters (a tensor's bytes).
    elsewhere = ModelInferRequest(raw_input_contents=[b"sequence_id"]).SerializeToString()
    assert peek_request(elsewhere) == ("", "", None)


async def test_a_large_request_is_walked_for_its_sequence_not_searched() -> None:
    # Past 64 KiB the API server walks the fields (skipping tensors) instead
    # of searching every byte for the mark: both ways must find the sequence.
    table = Sequences(registry_with("r1"))
    tensor = bytes(1 << 20)
    big = request(sequence_id=9, sequence_start=True)
    big.raw_input_contents.append(tensor)
    m = meta()
    async with table.route(big.SerializeToString(), m):
        assert m.pin is not None
    plain = request()
    plain.raw_input_contents.append(tensor + b"sequence_id")  # the mark in a tensor only
    m = meta()
    async with table.route(plain.SerializeToString(), m):
        assert m.pin is None


def test_a_long_parameter_entry_is_not_copied_to_be_skipped() -> None:
    # Only short entries can be sequence parameters: a long one (here 4 MiB)
    # is passed over without a copy, which would double the request's memory.
    big = request(sequence_id=3)
    big.parameters["blob"].string_param = "x" * (4 << 20)
    payload = big.SerializeToString()
    tracemalloc.start()
    try:
        flags = peek_request(payload)[2]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert flags is not None and flags.id == 3
    assert peak < 64 * 1024
