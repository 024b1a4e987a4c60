"""The OpenAI-compatible API end to end: the real ``openai`` package (sync and
async clients) and curl against an API server and a replica of
``examples.openai_app`` with real worker processes.

The sync client runs in a worker thread (``anyio.to_thread.run_sync``) so the
event loop, which also runs the API server and the replica, keeps serving.
Clients are made with ``max_retries=0``: an error must be seen, not retried.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from examples.openai_app import DIMS, embed_text
from tests.support import parse_sse

pytestmark = pytest.mark.anyio

T = TypeVar("T")

HELLO: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]
HELLO_REPLY = "You said: hello there"
HELLO_TOKENS = ["You", " said:", " hello", " there"]


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    config = ApiServerConfig(port=0, grpc_port=0, token=None)
    async with start_cluster(["examples.openai_app:app"], api=config) as running:
        yield running


@pytest.fixture(scope="module")
def sync_client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
    yield client
    client.close()


@pytest.fixture
async def async_client(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{cluster.url}/v1", api_key="x", max_retries=0
    ) as client:
        yield client


async def in_thread(call: Callable[[], T]) -> T:
    """Run a blocking client call off the event loop."""
    return await anyio.to_thread.run_sync(call)


def delta_text(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


# --------------------------------------------------------------------------- chat


async def test_chat_completion(sync_client: openai.OpenAI) -> None:
    completion = await in_thread(
        lambda: sync_client.chat.completions.create(model="echo-chat", messages=HELLO)
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "echo-chat"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == HELLO_REPLY
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    # The handler counts words: 2 + 2 in the prompt, 4 in the answer.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 4)
    assert completion.usage.total_tokens == 8


async def test_streamed_chat_deltas_arrive_one_by_one(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="echo-chat", messages=HELLO, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # One chunk per token the handler yielded, in order, the first naming the role.
    assert delta_text(chunks) == HELLO_TOKENS
    assert "".join(delta_text(chunks)) == HELLO_REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    assert all(c.usage is None for c in chunks)


async def test_stream_include_usage_ends_with_a_usage_chunk(sync_client: openai.OpenAI) -> None:
    def run() -> list[ChatCompletionChunk]:
        stream = sync_client.chat.completions.create(
            model="echo-chat",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(stream)

    chunks = await in_thread(run)
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 4)
    assert last.usage.total_tokens == 8
    assert all(c.usage is None for c in body)
    assert "".join(delta_text(body)) == HELLO_REPLY


async def test_max_tokens_reaches_the_handler(async_client: openai.AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model="echo-chat", messages=HELLO, stream=True, max_tokens=2
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(delta_text(chunks)) == "You said:"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_capability_headers_win_over_the_model(async_client: openai.AsyncOpenAI) -> None:
    completion = await async_client.chat.completions.create(
        model="not-a-model",
        messages=HELLO,
        extra_headers={"X-Capability-Model": "echo-chat"},
    )
    assert completion.choices[0].message.content == HELLO_REPLY


# --------------------------------------------------------------------------- completions


async def test_completion(sync_client: openai.OpenAI) -> None:
    completion = await in_thread(
        lambda: sync_client.completions.create(model="echo-complete", prompt="one two three")
    )
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.text == " three two one"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)


async def test_completion_of_several_prompts(async_client: openai.AsyncOpenAI) -> None:
    completion = await async_client.completions.create(
        model="echo-complete", prompt=["a b c", "d e"], max_tokens=2
    )
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, " c b", "length"),
        (1, " e d", "stop"),
    ]


async def test_streamed_completion(async_client: openai.AsyncOpenAI) -> None:
    # A unary handler streams as one chunk; the stream still ends properly.
    stream = await async_client.completions.create(
        model="echo-complete",
        prompt="one two three",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == " three two one"
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_the_same_handler_answers_generate(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        response = await http.post(
            "/v2/models/echo-complete/generate",
            json={"text_input": "one two three", "parameters": {"max_tokens": 2}},
        )
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] == " three two"
    assert response.json()["finish_reason"] == "length"


# --------------------------------------------------------------------------- embeddings


async def test_embeddings_as_floats(sync_client: openai.OpenAI) -> None:
    texts = ["hello", "a longer text"]
    result = await in_thread(
        lambda: sync_client.embeddings.create(
            model="toy-embed", input=texts, encoding_format="float"
        )
    )
    assert result.model == "toy-embed"
    assert [e.index for e in result.data] == [0, 1]
    for item, text in zip(result.data, texts, strict=True):
        assert len(item.embedding) == DIMS
        assert item.embedding == pytest.approx(embed_text(text), rel=1e-6)
    assert result.usage.prompt_tokens == 4


async def test_embeddings_as_base64(async_client: openai.AsyncOpenAI) -> None:
    raw = await async_client.embeddings.with_raw_response.create(
        model="toy-embed", input="hello", encoding_format="base64"
    )
    [item] = json.loads(raw.content)["data"]
    vector = struct.unpack(f"<{DIMS}f", base64.b64decode(item["embedding"]))
    assert list(vector) == pytest.approx(embed_text("hello"), rel=1e-6)
    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded = await async_client.embeddings.create(model="toy-embed", input="hello")
    assert decoded.data[0].embedding == pytest.approx(embed_text("hello"), rel=1e-6)


# --------------------------------------------------------------------------- models


async def test_models_are_listed(sync_client: openai.OpenAI) -> None:
    listed = await in_thread(lambda: list(sync_client.models.list()))
    by_id = {m.id: m for m in listed}
    assert set(by_id) == {"echo-chat", "echo-complete", "toy-embed"}
    assert all(m.object == "model" and m.owned_by == "anyserve" for m in listed)
    extra = {m.id: (m.model_extra or {}).get("endpoints") for m in listed}
    assert extra == {
        "echo-chat": ["chat.completions"],
        "echo-complete": ["completions"],
        "toy-embed": ["embeddings"],
    }
    one = await in_thread(lambda: sync_client.models.retrieve("toy-embed"))
    assert one.id == "toy-embed"


# --------------------------------------------------------------------------- errors


async def test_unknown_model_is_not_found(
    sync_client: openai.OpenAI, async_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await async_client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.status_code == 404
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert "no-such-model" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await in_thread(
            lambda: sync_client.chat.completions.create(
                model="no-such-model", messages=HELLO, stream=True
            )
        )
    with pytest.raises(openai.NotFoundError):
        await async_client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.NotFoundError):
        await async_client.models.retrieve("no-such-model")


async def test_malformed_body_is_a_400_naming_the_field(
    cluster: Cluster, async_client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client.chat.completions.create(
            model="echo-chat", messages=[], extra_body={"messages": "hi"}
        )
    assert caught.value.param == "messages"
    async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
        bad = {"model": "echo-chat", "messages": HELLO, "temperature": 7}
        response = await http.post("/v1/chat/completions", json=bad)
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": "'temperature' must be between 0 and 2, got 7",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_argument",
            }
        }
        response = await http.post("/v1/completions", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_a_handler_refusal_before_the_stream_is_an_http_error(
    async_client: openai.AsyncOpenAI,
) -> None:
    # echo-chat raises InvalidArgument without a user message: the first thing
    # the replica says is an error, so the answer is a 400, not a stream.
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client.chat.completions.create(
            model="echo-chat", messages=[{"role": "system", "content": "x"}], stream=True
        )
    assert "user message" in caught.value.message


# --------------------------------------------------------------------------- curl


async def test_curl_shows_openai_sse(cluster: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"model": "echo-chat", "messages": HELLO, "stream": True}
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [
                curl,
                "-N",
                "-sS",
                "--max-time",
                "30",
                "-X",
                "POST",
                f"{cluster.url}/v1/chat/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(body),
            ]
        )
    text = result.stdout.decode()
    lines = [line for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines), text
    assert lines[-1] == "data: [DONE]"
    events = parse_sse(text)
    assert all(name == "message" for name, _ in events)  # no named events
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == HELLO_REPLY
