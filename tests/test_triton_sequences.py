"""Triton sequences end to end: order, worker affinity and a replica's death.

* 8 sequences of 100 requests, all pipelined on one gRPC stream across 3
  replicas: every answer comes back in order, each sequence runs on one worker
  of one replica, and its state (a running sum) saw every request once, in order.
* A replica killed (SIGKILL, a separate process) in the middle of a sequence:
  that sequence fails with an error naming what happened, until it starts
  again; a sequence on the other replica goes on untouched.
* HTTP requests with one ``X-Session-Id`` stay on one replica.
"""

from __future__ import annotations

import os
import queue
import signal
from collections import defaultdict
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
import numpy as np
import pytest

from anyserve import rpc
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from anyserve.cluster import Cluster, start_cluster
from tests.api_calls import registry_ids
from tests.support import eventually
from tests.test_e2e_processes import anyserve_command, kill_group, spawn

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.anyio

APP = "tests.apps.triton_models:sequences_app"
SEQUENCES, REQUESTS = 8, 100


def value_input(value: int) -> list[Any]:
    tensor = grpcclient.InferInput("INPUT", [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return [tensor]


def answer(result: Any) -> tuple[int, int, int, str]:
    """(sum, count, worker pid, replica) of one accumulator answer."""
    served = result.get_response().parameters[rpc.SERVED_BY].string_param
    return (
        int(result.as_numpy("SUM")[0]),
        int(result.as_numpy("COUNT")[0]),
        int(result.as_numpy("PID")[0]),
        served,
    )


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.5)
    async with start_cluster([APP] * 3, api=config) as running:
        yield running


async def test_eight_pipelined_sequences_on_three_replicas_stay_in_order(cluster: Cluster) -> None:
    def run() -> dict[int, list[tuple[int, int, int, str]]]:
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        with grpcclient.InferenceServerClient(url=cluster.api.grpc_endpoint) as client:
            client.start_stream(
                callback=partial(lambda q, result, error: q.put((result, error)), results)
            )
            # Interleaved: request i of every sequence, then request i + 1.
            for i in range(1, REQUESTS + 1):
                for seq in range(1, SEQUENCES + 1):
                    client.async_stream_infer(
                        "accumulator",
                        value_input(i),
                        request_id=f"{seq}_{i}",
                        sequence_id=seq * 1000,
                        sequence_start=i == 1,
                        sequence_end=i == REQUESTS,
                    )
            got: dict[int, list[tuple[int, int, int, str]]] = defaultdict(list)
            for _ in range(SEQUENCES * REQUESTS):
                result, error = results.get(timeout=60)
                assert error is None, error
                seq, i = map(int, result.get_response().id.split("_"))
                assert len(got[seq]) == i - 1, f"sequence {seq}: answer {i} out of order"
                got[seq].append(answer(result))
            client.stop_stream()
        return got

    got = await anyio.to_thread.run_sync(run)
    replicas = set()
    for seq, answers in got.items():
        # Request i added i: the running sum after it is i(i+1)/2, had every
        # earlier request run once, before it, on the same state.
        assert [(s, c) for s, c, _, _ in answers] == [
            (i * (i + 1) // 2, i) for i in range(1, REQUESTS + 1)
        ], seq
        workers = {(pid, served) for _, _, pid, served in answers}
        assert len(workers) == 1, f"sequence {seq} ran on several workers: {workers}"
        replicas |= {served for _, _, _, served in answers}
    assert len(replicas) >= 2, replicas  # the sequences spread over the replicas


async def test_an_http_session_stays_on_one_replica(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:

        async def where(session: str) -> str:
            answer = await http.post(
                "/v2/models/where/infer", json={"inputs": []}, headers={"X-Session-Id": session}
            )
            assert answer.status_code == 200, answer.text
            return str(answer.json()["outputs"][0]["data"][0])

        homes = {}
        for session in (f"conversation-{n}" for n in range(8)):
            homes[session] = await where(session)
            for _ in range(5):
                assert await where(session) == homes[session]
        assert len(set(homes.values())) >= 2, homes  # sessions still spread
        answer = await http.post(
            "/v2/models/where/infer", json={"inputs": []}, headers={"X-Session-Id": "x" * 300}
        )
        assert answer.status_code == 400


async def test_a_killed_replica_fails_its_sequence_and_nothing_else(tmp_path: Path) -> None:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.3)
    procs: list[anyio.abc.Process] = []
    names = ("seq-a", "seq-b")
    async with ApiServer(config) as api, httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        try:
            for name in names:
                argv = [
                    *anyserve_command(),
                    "start",
                    "--app",
                    APP,
                    "--port",
                    "0",
                    "--api-server",
                    api.url,
                    "--replica-id",
                    name,
                    "--log-level",
                    "warning",
                ]
                procs.append(await spawn(argv, tmp_path / f"{name}.log"))

            async def both_registered() -> bool:
                for name, proc in zip(names, procs, strict=True):
                    assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
                return await registry_ids(http) == set(names)

            await eventually(both_registered, timeout=30)
            client = grpcclient.InferenceServerClient(url=api.grpc_endpoint)

            def send(seq: int, value: int, start: bool = False) -> tuple[int, int, int, str]:
                return answer(
                    client.infer(
                        "accumulator", value_input(value), sequence_id=seq, sequence_start=start
                    )
                )

            async def call(seq: int, value: int, start: bool = False) -> tuple[int, int, int, str]:
                return await anyio.to_thread.run_sync(send, seq, value, start)

            try:
                # Start sequences until each replica holds one.
                holder: dict[str, int] = {}
                seq = 0
                while len(holder) < 2:
                    seq += 1
                    assert seq < 50, holder
                    holder.setdefault((await call(seq, 1, start=True))[3], seq)
                doomed, survivor = holder["seq-a"], holder["seq-b"]
                assert (await call(doomed, 2))[:2] == (3, 2)
                assert (await call(survivor, 2))[:2] == (3, 2)

                os.killpg(procs[0].pid, signal.SIGKILL)
                with anyio.fail_after(10):
                    await procs[0].wait()

                # The doomed sequence fails, now and on every later request
                # (its state is gone), saying so.
                messages = []
                for _ in range(3):
                    with pytest.raises(InferenceServerException) as caught:
                        await call(doomed, 3)
                    messages.append(caught.value.message())
                assert "seq-a, which is gone" in messages[-1], messages
                assert "Start it again (sequence_start)" in messages[-1]
                # The other sequence goes on with its state.
                for value in range(3, 8):
                    total, count, _, served = await call(survivor, value)
                    assert (total, count, served) == (value * (value + 1) // 2, value, "seq-b")
                # Started again, the doomed sequence lives on the survivor.
                restarted = await call(doomed, 5, start=True)
                assert (restarted[0], restarted[1], restarted[3]) == (5, 1, "seq-b")
            finally:
                client.close()
        finally:
            for proc in procs:
                await kill_group(proc)
