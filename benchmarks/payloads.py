"""The messages both servers see, built once (serialized) so the client costs
the same whichever server it talks to."""

from __future__ import annotations

from anyserve.proto import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
    ModelStreamInferResponse,
)

ECHO_TEXT = b"hello"
TOKEN_TEXT = b"tok"
STREAM_CHUNKS = 1000

# Capability metadata sent with every call (the bare server ignores it).
ECHO_METADATA = (("x-capability-type", "echo"),)
TOKENS_METADATA = (("x-capability-type", "tokens"),)


def _text_tensor(name: str, text: bytes) -> ModelInferRequest.InferInputTensor:
    return ModelInferRequest.InferInputTensor(
        name=name,
        datatype="BYTES",
        shape=[1],
        contents=InferTensorContents(bytes_contents=[text]),
    )


def echo_request() -> bytes:
    """A one-input ModelInferRequest, as a client would send it."""
    request = ModelInferRequest(model_name="echo", id="bench")
    request.inputs.append(_text_tensor("text_input", ECHO_TEXT))
    return request.SerializeToString()


def tokens_request(n: int = STREAM_CHUNKS) -> bytes:
    """A ModelInferRequest asking the ``tokens`` handler for ``n`` chunks."""
    request = ModelInferRequest(
        model_name="tokens", id="bench-stream", parameters={"n": InferParameter(int64_param=n)}
    )
    return request.SerializeToString()


def echo_response() -> bytes:
    """What the bare server answers every ModelInfer with: about what the
    replica's echo handler returns for :func:`echo_request`."""
    response = ModelInferResponse(model_name="echo", id="bench")
    tensor = response.outputs.add()
    tensor.name = "text_input"
    tensor.datatype = "BYTES"
    tensor.shape.append(1)
    tensor.contents.bytes_contents.append(ECHO_TEXT)
    return response.SerializeToString()


def token_chunk() -> bytes:
    """One stream chunk as the bare server sends it: a ``text_output`` of one
    word, as anyserve encodes a handler's ``yield "tok"``."""
    chunk = ModelStreamInferResponse()
    response = chunk.infer_response
    response.model_name = "tokens"
    response.id = "bench-stream"
    tensor = response.outputs.add()
    tensor.name = "text_output"
    tensor.datatype = "BYTES"
    tensor.shape.append(1)
    tensor.contents.bytes_contents.append(TOKEN_TEXT)
    return chunk.SerializeToString()
