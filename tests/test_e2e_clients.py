"""Clients end to end: what users point at the API server works as they use it.

The README's curl commands as pasted, curl on the KServe path, tritonclient
over HTTP and gRPC (unary and streaming), and anyserve's Python client. The
clusters (``seed``, ``bench``, ``randomly``) are the session's, from
tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest

from anyserve import codec, rpc
from anyserve.client import Client
from anyserve.cluster import Cluster
from anyserve.errors import HandlerError, LoopDetected, NotFound
from anyserve.proto import ModelInferRequest, ModelInferResponse
from tests.api_calls import outputs, pb_served_by, served_by, text_body, tokens
from tests.support import parse_sse

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


def readme_run_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## Run it", 1)[1].split("\n## ", 1)[0]


def readme_curls() -> list[str]:
    """The curl commands of the README's "Run it" section, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme_run_section(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.startswith("curl ")]
    return commands


# --------------------------------------------------------------------------- curl


async def test_readme_curl_commands_work_as_pasted(seed: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    section = readme_run_section()
    # The README's scenario is exactly the apps this cluster runs.
    readme_apps = set(re.findall(r"--app (\S+)", section))
    assert readme_apps == {"examples.chat_app:app", "examples.embed_app:app"}
    assert {r.config.app for r in seed.replicas} == readme_apps

    commands = readme_curls()
    assert len(commands) == 4, commands
    hostport = seed.url.removeprefix("http://")
    seen = set()
    for command in commands:
        assert "localhost:8080" in command, command
        argv = shlex.split(command.replace("localhost:8080", hostport))
        assert argv[0] == "curl"
        argv = [curl, *argv[1:], "-sS", "-w", "\n%{http_code}"]
        with anyio.fail_after(20):
            result = await anyio.run_process(argv, check=False)
        out = result.stdout.decode()
        assert result.returncode == 0, (command, result.stderr.decode())
        body, _, status = out.rpartition("\n")
        assert status == "200", (command, out)
        if "/infer/stream" in command:
            assert "event: done\ndata: [DONE]" in body
            events = parse_sse(body)
            assert tokens(events) == ["Hello", " ", "world", "!"]
            assert [e for e, _ in events] == ["message"] * 4 + ["done"]
            seen.add("stream")
        elif "/registry" in command:
            ids = {r["replica_id"] for r in json.loads(body)["replicas"]}
            assert ids == {"chat_app", "embed_app"}
            seen.add("registry")
        elif "X-Capability-Type: chat" in command:
            doc = json.loads(body)
            assert outputs(doc)["output"] == "Hello, world!" and served_by(doc) == "chat_app"
            seen.add("chat")
        elif "X-Capability-Type: embed" in command:
            doc = json.loads(body)
            assert served_by(doc) == "embed_app" and outputs(doc)["dims"] == 8
            assert {"dims", "norm", "source", "replica"} <= set(outputs(doc))
            seen.add("embed")
    assert seen == {"chat", "embed", "stream", "registry"}


async def test_curl_kserve_infer_path(seed: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps(text_body("text_input", "hi"))
    argv = [curl, "-sS", "-w", "\n%{http_code}", "-X", "POST"]
    argv += [
        f"{seed.url}/v2/models/llama-70b/infer",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    with anyio.fail_after(20):
        result = await anyio.run_process(argv, check=False)
    assert result.returncode == 0, result.stderr.decode()
    out, _, status = result.stdout.decode().rpartition("\n")
    assert status == "200", out
    doc = json.loads(out)
    assert outputs(doc)["output"] == "Hello, world!" and served_by(doc) == "chat_app"


# --------------------------------------------------------------------------- tritonclient


async def test_tritonclient_http_and_grpc_through_the_api_server(
    seed: Cluster, bench: Cluster
) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    # By model name on the README's apps, by capability headers on forms_app.
    by_name_at = seed.url.removeprefix("http://")
    by_headers_at = bench.url.removeprefix("http://")
    echo = {"x-capability-type": "echo", "x-capability-form": "async"}

    def texts(array: Any) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.tolist()]

    def text_input(module: Any, name: str, text: str, binary: bool | None = None) -> Any:
        tensor = module.InferInput(name, [1], "BYTES")
        data = np.array([text.encode()], dtype=object)
        if binary is None:
            tensor.set_data_from_numpy(data)  # grpc: always raw
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        return tensor

    def wanted(binary: bool, *names: str) -> list[Any]:
        return [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]

    def run_http(binary: bool) -> list[Any]:
        results = []
        client = httpclient.InferenceServerClient(url=by_name_at)
        try:
            results.append(
                client.infer(
                    "llama-70b",
                    [text_input(httpclient, "text_input", "hi", binary)],
                    outputs=wanted(binary, "output"),
                    request_id=f"h-{binary}",
                )
            )
            results.append(
                client.infer(
                    "embed",
                    [text_input(httpclient, "text", "hello", binary)],
                    outputs=wanted(binary, "dims", "norm"),
                )
            )
        finally:
            client.close()
        client = httpclient.InferenceServerClient(url=by_headers_at)
        try:
            results.append(
                client.infer(
                    "ignored-by-headers",
                    [text_input(httpclient, "text_input", "hey", binary)],
                    outputs=wanted(binary, "text_output", "pid"),
                    headers=dict(echo),  # a copy: tritonclient adds to the dict it is given
                )
            )
        finally:
            client.close()
        return results

    for binary in (True, False):
        by_name, numbers, by_headers = await anyio.to_thread.run_sync(run_http, binary)
        assert texts(by_name.as_numpy("output")) == ["Hello, world!"]
        assert by_name.get_response()["id"] == f"h-{binary}"
        assert by_name.get_response()["parameters"][rpc.SERVED_BY] == "chat_app"
        assert numbers.as_numpy("dims").tolist() == [8]
        assert abs(float(numbers.as_numpy("norm")[0]) - 1.0) < 1e-6
        assert texts(by_headers.as_numpy("text_output")) == ["async:hey"]
        assert int(by_headers.as_numpy("pid")[0]) > 0
        assert by_headers.get_response()["parameters"][rpc.SERVED_BY] == "forms_app"

    def run_grpc() -> list[Any]:
        results = []
        client = grpcclient.InferenceServerClient(seed.api.grpc_endpoint)
        try:
            inputs = [text_input(grpcclient, "text", "hello")]
            results.append(client.infer("embed", inputs, request_id="g-1"))
            inputs = [text_input(grpcclient, "text_input", "yo")]
            results.append(client.infer("llama-70b", inputs))
        finally:
            client.close()
        client = grpcclient.InferenceServerClient(bench.api.grpc_endpoint)
        try:
            inputs = [text_input(grpcclient, "text_input", "yo")]
            results.append(client.infer("ignored", inputs, headers=dict(echo)))
        finally:
            client.close()
        return results

    by_name, chat, by_headers = await anyio.to_thread.run_sync(run_grpc)
    assert by_name.get_response().id == "g-1"
    assert by_name.as_numpy("dims").tolist() == [8]
    assert pb_served_by(by_name.get_response()) == "embed_app"
    assert texts(chat.as_numpy("output")) == ["Hello, world!"]
    assert texts(by_headers.as_numpy("text_output")) == ["async:yo"]
    assert pb_served_by(by_headers.get_response()) == "forms_app"


async def test_grpc_entry_refuses_malformed_bytes_with_or_without_a_query(seed: Cluster) -> None:
    """With capability metadata the API server forwards the bytes unread and
    the replica refuses them; without, the API server's peek for the model
    name does. Both are INVALID_ARGUMENT naming the problem, and the next
    good request on the same channel is served."""
    import grpc.aio

    async with grpc.aio.insecure_channel(seed.api.grpc_endpoint) as channel:
        raw = channel.unary_unary(rpc.MODEL_INFER)
        for metadata in ([("x-capability-type", "chat")], []):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(b"\xff\xff\xff", metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, metadata
            assert "malformed" in (info.value.details() or ""), metadata
        good = ModelInferRequest()
        good.inputs.append(codec.encode_input("text_input", "yo"))
        metadata = [("x-capability-type", "chat")]
        answer = await raw(good.SerializeToString(), metadata=metadata, timeout=10)
        assert pb_served_by(ModelInferResponse.FromString(answer)) == "chat_app"


async def test_tritonclient_grpc_stream_through_the_api_server(bench: Cluster) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")

    def run() -> list[str]:
        import queue

        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(bench.api.grpc_endpoint)
        try:
            client.start_stream(
                callback=lambda result, error: results.put((result, error)),
                headers={"x-capability-type": "gen", "x-capability-form": "async"},
            )
            words = grpcclient.InferInput("text_input", [1], "BYTES")
            words.set_data_from_numpy(np.array([b"a b c"], dtype=object))
            client.async_stream_infer("gen", [words], request_id="s-1")
            got = []
            for _ in range(3):
                result, error = results.get(timeout=10)
                assert error is None, error
                got.append(result.as_numpy("text_output")[0].decode())
            client.stop_stream()
            return got
        finally:
            client.close()

    assert await anyio.to_thread.run_sync(run) == ["a", "b", "c"]


# --------------------------------------------------------------------------- Python client


async def test_python_client_end_to_end(seed: Cluster, bench: Cluster, randomly: Cluster) -> None:
    async with Client(seed.url, timeout=30) as client:
        response = await client.infer({"type": "chat"}, {"text_input": "hi"}, request_id="c-1")
        assert pb_served_by(response) == "chat_app" and response.id == "c-1"
        assert codec.decode_outputs(response)["output"] == b"Hello, world!"
        response = await client.infer(model="embed", inputs={"text": "hello"})
        assert codec.decode_outputs(response)["dims"].tolist() == [8]  # INT64 [1]
        with pytest.raises(NotFound):
            await client.infer({"type": "nope"})
    async with Client(randomly.url, timeout=30) as client:
        chunks = [c async for c in client.stream({"type": "chat"})]
        assert [codec.decode_outputs(c)["text_output"] for c in chunks] == [
            b"Hello",
            b" ",
            b"world",
            b"!",
        ]
        with pytest.raises(LoopDetected, match=r"^loop detected"):
            await client.infer({"type": "nothing"})
    async with Client(bench.url, timeout=30) as client:
        seen = []
        with pytest.raises(HandlerError, match="stream broke after two tokens"):
            async for chunk in client.stream({"type": "fail"}):
                seen.append(codec.decode_outputs(chunk)["text_output"])
        assert seen == [b"one", b"two"]
