"""Scenario 4: streaming chat in the classic sync style (stream.send, native KServe messages)."""

from anyserve import AnyServe
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

app = AnyServe("stream")


@app.capability(type="chat", stream=True)
def chat_stream(request: ModelInferRequest, context, stream):  # type: ignore[no-untyped-def]
    """Stream chat handler: one token per response."""
    tokens = ["Hello", " ", "world", "!"]

    for i, token in enumerate(tokens):
        is_last = i == len(tokens) - 1

        response = ModelStreamInferResponse(
            error_message="",
            infer_response=ModelInferResponse(
                model_name="demo",
                id=request.id,
                outputs=[
                    ModelInferResponse.InferOutputTensor(
                        name="text_output",
                        datatype="BYTES",
                        shape=[1],
                        contents=ModelInferResponse.InferTensorContents(
                            bytes_contents=[token.encode()]
                        ),
                    ),
                    ModelInferResponse.InferOutputTensor(
                        name="finish_reason",
                        datatype="BYTES",
                        shape=[1],
                        contents=ModelInferResponse.InferTensorContents(
                            bytes_contents=[b"stop" if is_last else b""]
                        ),
                    ),
                ],
            ),
        )
        stream.send(response)


@app.capability(type="chat", model="tiny", stream=True)
async def chat_tokens(request: ModelInferRequest, context):  # type: ignore[no-untyped-def]
    """The async-generator form: echo the prompt back word by word."""
    from anyserve import codec

    words = codec.input_text(request, "text_input").split()
    for i, word in enumerate(words):
        yield {"text_output": word + " ", "finish_reason": "stop" if i == len(words) - 1 else ""}
