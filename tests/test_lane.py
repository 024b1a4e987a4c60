"""The local lane (anyserve/lane_server.py, anyserve/lane_client.py, replica/lane.py):
inference calls to a replica on the same host over its Unix socket, against a
real replica and its workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from anyserve import codec, lane_client, shm
from anyserve._proto.grpc_predict_v2_pb2 import (
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
)
from anyserve.capability import query_to_metadata
from anyserve.errors import DeadlineExceeded, HandlerError, Unavailable
from anyserve.lane_client import Lane, Refused
from anyserve.replica.server import Replica
from anyserve.testing import start_replica
from tests.api_calls import text_body
from tests.fake_replica import running_api
from tests.support import eventually

pytestmark = pytest.mark.anyio

APP = "tests.apps.forms_app:app"


def _request(text: str) -> bytes:
    request = ModelInferRequest(id="r1")
    request.inputs.append(codec.encode_input("text_input", text))
    return request.SerializeToString()


def _metadata(**query: str) -> list[tuple[str, str]]:
    return query_to_metadata(query)


@pytest.fixture(scope="module")
async def replica() -> AsyncIterator[Replica]:
    async with start_replica(APP) as replica:
        yield replica


@pytest.fixture
async def lane(replica: Replica) -> AsyncIterator[Lane]:
    assert replica.lane_path is not None
    lane = await Lane.open(replica.lane_path, replica.replica_id, 5.0)
    try:
        yield lane
    finally:
        lane.close()


async def test_a_replica_serves_a_lane_in_a_private_directory(replica: Replica) -> None:
    assert shm.host_id()  # a host where the lane is used at all
    path = anyio.Path(replica.lane_path or "")
    assert await path.is_socket()
    assert (await path.parent.stat()).st_mode & 0o777 == 0o700
    assert replica.registration_body()["lane"] == str(path)


async def test_unary_calls_and_errors_come_back(lane: Lane) -> None:
    answer = await lane.unary(_request("hi"), _metadata(type="echo", form="async"), 10.0)
    outputs = codec.decode_outputs(ModelInferResponse.FromString(answer))
    assert outputs["text_output"] == b"async:hi"
    with pytest.raises(HandlerError, match="the model is on fire"):
        await lane.unary(_request("x"), _metadata(type="fail"), 10.0)


async def test_gathering_calls_on_a_busy_lane_wait_and_each_get_their_own_answer(
    lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Eight slow calls keep the lane busy; the echo calls sent behind them, one
    # per loop iteration, then wait for company (Lane._may_wait) and leave
    # together. The gap allowed is wide, so that a busy machine cannot
    # space the calls out past it.
    monkeypatch.setattr(lane_client, "_GATHER_GAP", 60.0)
    waited: list[bool] = []
    may_wait = lane._may_wait

    def counted() -> bool:
        waited.append(may_wait())
        return waited[-1]

    monkeypatch.setattr(lane, "_may_wait", counted)
    answers: dict[str, bytes] = {}

    async def call(kind: str, i: int) -> None:
        meta = _metadata(type=kind, form="async")
        answer = await lane.unary(_request(f"call {i}"), meta, 10.0, gather=True)
        answers[f"{kind} {i}"] = codec.decode_outputs(ModelInferResponse.FromString(answer))[
            "text_output"
        ]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(call, "slow", i)
            for i in range(24):
                await anyio.lowlevel.checkpoint()
                tg.start_soon(call, "echo", i)
    assert waited.count(True) >= 24  # the echo calls, at least, waited
    assert answers == {
        **{f"slow {i}": b"done" for i in range(8)},
        **{f"echo {i}": f"async:call {i}".encode() for i in range(24)},
    }


async def test_a_socket_that_is_not_the_replica_named_is_refused(replica: Replica) -> None:
    assert replica.lane_path is not None
    with pytest.raises(ValueError, match="not 'someone-else'"):
        await Lane.open(replica.lane_path, "someone-else", 5.0)
    with pytest.raises(OSError):
        await Lane.open(replica.lane_path + ".missing", replica.replica_id, 5.0)


async def test_a_deadline_ends_the_call_and_cancels_its_handler(lane: Lane, tmp_path: Path) -> None:
    marker = tmp_path / "hang"
    with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
        await lane.unary(_request(str(marker)), _metadata(type="hang"), 0.5)
    await eventually(marker.with_suffix(".stopped").exists, timeout=2.0)


async def test_a_slow_reader_holds_the_stream_back_and_loses_nothing(
    lane: Lane, tmp_path: Path
) -> None:
    from tests.apps.forms_app import FLOOD_CHUNKS

    marker = tmp_path / "flood"
    done = marker.with_suffix(".done")
    stream = lane.stream(_request(str(marker)), _metadata(type="flood"), 60.0)
    assert await stream.read() is not None
    # Nothing more is read: the handler's sends must block on the lane's
    # credit and the worker's (64 chunks each), far from all 1,000.
    with pytest.raises(TimeoutError):
        await eventually(done.exists, timeout=3.0)
    assert int(marker.read_text()) < FLOOD_CHUNKS // 2
    received = 1
    while (batch := await stream.read_batch()) is not None:
        for message in batch:
            assert ModelStreamInferResponse.FromString(message).error_message == ""
        received += len(batch)
    assert received == FLOOD_CHUNKS
    await eventually(done.exists, timeout=5.0)


async def test_a_lane_that_breaks_fails_its_calls_at_once(tmp_path: Path) -> None:
    async with start_replica(APP) as replica:
        assert replica.lane_path is not None and replica.running.lane is not None
        lane = await Lane.open(replica.lane_path, replica.replica_id, 5.0)
        marker = tmp_path / "hang"
        async with anyio.create_task_group() as tg:
            failures: list[Exception] = []

            async def call() -> None:
                try:
                    await lane.unary(_request(str(marker)), _metadata(type="hang"), 60.0)
                except Unavailable as exc:
                    failures.append(exc)

            tg.start_soon(call)
            await eventually(marker.exists)
            with anyio.fail_after(5):
                await replica.running.lane.stop(0.0)  # closes every connection
                await eventually(lambda: failures)
        assert "was lost" in str(failures[0])
        assert not lane.usable


async def test_the_api_server_calls_a_replica_on_this_host_through_its_lane() -> None:
    async with running_api() as api, start_replica(APP, api_server=api.url) as replica:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            headers = {"X-Capability-Type": "echo", "X-Capability-Form": "async"}
            response = await http.post("/infer", headers=headers, json=text_body("text_input", "x"))
            assert response.status_code == 200, response.text
        assert api.state.pool.get(replica.endpoint).lane is not None


async def test_without_its_lane_a_replica_is_called_over_grpc() -> None:
    async with (
        running_api() as api,
        start_replica(APP, api_server=api.url, lane=False) as replica,
        httpx.AsyncClient(base_url=api.url, timeout=30) as http,
    ):
        assert replica.lane_path is None and "lane" not in replica.registration_body()
        headers = {"X-Capability-Type": "echo", "X-Capability-Form": "async"}
        response = await http.post("/infer", headers=headers, json=text_body("text_input", "x"))
        assert response.status_code == 200, response.text
        assert api.state.pool.get(replica.endpoint).lane is None


async def test_a_draining_replica_refuses_new_calls_unrun(tmp_path: Path) -> None:
    async with start_replica(APP) as replica:
        assert replica.lane_path is not None and replica.running.lane is not None
        server = replica.running.lane
        lane = await Lane.open(replica.lane_path, replica.replica_id, 5.0)
        marker = tmp_path / "hang"
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: lane.unary(_request(str(marker)), _metadata(type="hang"), 60.0))
            await eventually(marker.exists)
            tg.start_soon(server.stop, 30.0)  # drains: the hanging call holds it
            with anyio.fail_after(5), pytest.raises(Refused):
                while True:  # once stop() has begun, a call is refused, not run
                    await lane.unary(_request("x"), _metadata(type="echo", form="async"), 5.0)
            assert lane.usable  # refused calls leave the connection up
            tg.cancel_scope.cancel()  # the hanging call is cancelled: the drain ends
        await eventually(marker.with_suffix(".stopped").exists)


def test_directories_of_killed_replicas_are_swept_and_no_others(tmp_path: Path) -> None:
    from anyserve.lane_server import PREFIX, sweep_stale

    dead = tmp_path / f"{PREFIX}{2**22 + 7}-1-abc"  # no such pid (and start time)
    alive = tmp_path / f"{PREFIX}{shm.owner_tag()}-def"  # this process's
    other = tmp_path / "anyserve-lane-not-ours"
    for directory in (dead, alive, other):
        directory.mkdir()
        (directory / "replica.sock").touch()
    assert sweep_stale(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and other.exists()


def test_an_answer_the_api_server_would_not_read_fails_its_call_alone() -> None:
    from anyserve import rpc
    from anyserve.errors import PayloadTooLarge
    from anyserve.lane_server import _check_size

    _check_size(rpc.DEFAULT_MAX_MESSAGE)
    with pytest.raises(PayloadTooLarge, match="larger than the caller's"):
        _check_size(rpc.DEFAULT_MAX_MESSAGE + 1)


async def test_a_call_on_a_lane_already_lost_is_not_sent(replica: Replica) -> None:
    assert replica.lane_path is not None
    lane = await Lane.open(replica.lane_path, replica.replica_id, 5.0)
    lane.close()
    with pytest.raises(Refused):  # the router then sends it elsewhere
        await lane.unary(_request("x"), _metadata(type="echo", form="async"), 5.0)
    with pytest.raises(Refused):
        lane.stream(_request("x"), _metadata(type="flood"), 5.0)
