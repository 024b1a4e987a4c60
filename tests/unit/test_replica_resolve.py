"""Which handler serves a request: the dispatcher's resolution (capability query
or model name, closest match, stream preference) and the admin service's."""

from __future__ import annotations

import pytest

from anyserve.app import HandlerInfo
from anyserve.errors import InvalidArgument, NotFound
from anyserve.proto import InferParameter, ModelInferRequest
from anyserve.replica.admin import AdminServicer
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.manager import Manager
from anyserve.replica.processes import WorkerConfig
from anyserve.sequence import SequenceFlags
from tests.unit.replica_fakes import handler

HANDLERS = [
    # type=llama-70b: addressed by the name "llama-70b" through its type only.
    handler("odd", type="llama-70b"),
    handler("big", type="chat", model="llama-70b"),
    handler("chat", type="chat"),
    handler("chat_stream", stream=True, type="chat"),
    handler("tokens", stream=True, type="chat", model="tiny"),
    handler("embed", type="embed"),
    handler("embed_fast", type="embed", speed="fast"),
    handler("gen", stream=True, type="gen"),
]


def manager_of(handlers: list[HandlerInfo]) -> Manager:
    return Manager(handlers, WorkerConfig(app="unit:app"))


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher(HANDLERS, manager_of(HANDLERS))


def resolved(
    dispatcher: Dispatcher, query: dict[str, str], name: str = "", *, stream: bool = False
) -> str:
    return dispatcher.resolver.resolve(query, name, stream=stream).name


# -- capability query ---------------------------------------------------------------


def test_query_picks_the_closest_capability(dispatcher: Dispatcher) -> None:
    assert resolved(dispatcher, {"type": "chat"}) == "chat"
    assert resolved(dispatcher, {"type": "chat", "model": "llama-70b"}) == "big"
    assert resolved(dispatcher, {"type": "embed"}) == "embed"
    assert resolved(dispatcher, {"speed": "fast"}) == "embed_fast"


def test_of_equally_close_handlers_the_first_wins() -> None:
    twins = [handler("one", type="x", a="1"), handler("two", type="x", b="2")]
    assert resolved(Dispatcher(twins, manager_of(twins)), {"type": "x"}) == "one"


def test_query_wins_over_the_model_name(dispatcher: Dispatcher) -> None:
    assert resolved(dispatcher, {"type": "embed"}, "llama-70b") == "embed"


def test_query_that_nothing_matches_is_not_found(dispatcher: Dispatcher) -> None:
    with pytest.raises(NotFound, match="no handler for type=nope on this replica"):
        resolved(dispatcher, {"type": "nope"})
    with pytest.raises(NotFound, match="no handler for model=tiny,type=embed"):
        resolved(dispatcher, {"type": "embed", "model": "tiny"})


# -- model name -----------------------------------------------------------------------


def test_name_matches_model_before_type(dispatcher: Dispatcher) -> None:
    # "odd" comes first and has fewer keys, but matches by type only.
    assert resolved(dispatcher, {}, "llama-70b") == "big"


def test_name_by_type_picks_the_fewest_keys(dispatcher: Dispatcher) -> None:
    assert resolved(dispatcher, {}, "chat") == "chat"
    assert resolved(dispatcher, {}, "embed") == "embed"


def test_name_that_nothing_answers_to_is_not_found(dispatcher: Dispatcher) -> None:
    with pytest.raises(NotFound, match="no handler for model 'nope' on this replica"):
        resolved(dispatcher, {}, "nope")


def test_neither_query_nor_name_is_invalid(dispatcher: Dispatcher) -> None:
    with pytest.raises(InvalidArgument, match="no capability metadata"):
        resolved(dispatcher, {}, "")
    with pytest.raises(InvalidArgument):
        resolved(dispatcher, {}, "", stream=True)


# -- streams ----------------------------------------------------------------------------


def test_stream_requests_prefer_stream_handlers(dispatcher: Dispatcher) -> None:
    assert resolved(dispatcher, {"type": "chat"}, stream=True) == "chat_stream"
    assert resolved(dispatcher, {}, "chat", stream=True) == "chat_stream"
    assert resolved(dispatcher, {}, "tiny", stream=True) == "tokens"


def test_stream_requests_fall_back_to_unary_handlers(dispatcher: Dispatcher) -> None:
    assert resolved(dispatcher, {"type": "embed"}, stream=True) == "embed"
    # "tokens" (stream) does not match model=llama-70b; "big" (unary) does.
    assert resolved(dispatcher, {"type": "chat", "model": "llama-70b"}, stream=True) == "big"
    assert resolved(dispatcher, {}, "llama-70b", stream=True) == "big"


def test_unary_requests_never_reach_stream_handlers(dispatcher: Dispatcher) -> None:
    # Served on the streaming endpoint; a unary request is told to go there.
    assert resolved(dispatcher, {"model": "tiny", "type": "chat"}, stream=True) == "tokens"
    with pytest.raises(NotFound) as info:
        resolved(dispatcher, {"type": "chat", "model": "tiny"})
    assert info.value.message.startswith(
        "model=tiny,type=chat is served by a streaming handler only: send it to the"
        " streaming endpoint (/infer/stream"
    )
    with pytest.raises(NotFound, match="model 'gen' is served by a streaming handler"):
        resolved(dispatcher, {}, "gen")


# -- routing a serialized request -----------------------------------------------------


def test_a_request_is_routed_as_resolved_and_its_resolution_remembered(
    dispatcher: Dispatcher,
) -> None:
    route = dispatcher.resolver.route
    body = ModelInferRequest(model_name="llama-70b").SerializeToString()
    seq = ModelInferRequest(
        model_name="embed", parameters={"sequence_id": InferParameter(int64_param=3)}
    ).SerializeToString()
    for _ in range(2):  # resolved, then remembered
        assert route(body, {"x-request-id": "r"}, stream=False) == (HANDLERS[1], None)
        # Capability headers (read as query_from_headers reads them) win over the name.
        for key in ("x-capability-type", "x-Capability-Type", "X-CAPABILITY-TYPE"):
            assert route(body, {key: " embed"}, stream=False)[0].name == "embed"
        assert route(body, {"x-capability-speed": "fast"}, stream=True)[0].name == "embed_fast"
        assert route(seq, {}, stream=False)[1] == SequenceFlags(3)
        with pytest.raises(InvalidArgument, match="empty capability key"):
            route(body, {"x-capability-": "x"}, stream=False)
        with pytest.raises(InvalidArgument, match="malformed ModelInferRequest"):
            route(body[:-1], {"x-capability-type": "embed"}, stream=False)


# -- the admin service ------------------------------------------------------------------


@pytest.fixture
def admin() -> AdminServicer:
    return AdminServicer(manager_of(HANDLERS), "replica-1", None)


def test_admin_takes_a_handler_name_or_the_closest_capability(admin: AdminServicer) -> None:
    assert admin.handler_for("tokens") == "tokens"
    assert admin.handler_for("type=embed") == "embed"
    assert admin.handler_for("model=llama-70b") == "big"
    assert admin.handler_for("type=gen") == "gen"


def test_admin_refuses_an_ambiguous_capability(admin: AdminServicer) -> None:
    with pytest.raises(InvalidArgument) as info:
        admin.handler_for("type=chat")
    assert info.value.message == (
        "'type=chat' matches several handlers ['chat', 'chat_stream']; name one"
    )


def test_admin_names_the_handlers_when_nothing_matches(admin: AdminServicer) -> None:
    with pytest.raises(NotFound, match=r"no handler for 'type=nope'; handlers: \['big'"):
        admin.handler_for("type=nope")
