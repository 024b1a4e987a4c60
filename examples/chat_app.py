"""Scenario 1 and 4: a chat replica in the classic style (sync handlers, native KServe messages)."""

from anyserve import AnyServe
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

app = AnyServe("chat")


@app.capability(type="chat", model="llama-70b")
def chat_handler(request: ModelInferRequest, context) -> ModelInferResponse:  # type: ignore[no-untyped-def]
    return ModelInferResponse(
        model_name="llama-70b",
        id=request.id,
        outputs=[
            ModelInferResponse.InferOutputTensor(
                name="output",
                datatype="BYTES",
                shape=[1],
                contents=ModelInferResponse.InferTensorContents(bytes_contents=[b"Hello, world!"]),
            )
        ],
    )


@app.capability(type="chat", stream=True)
def chat_stream_handler(request: ModelInferRequest, context, stream) -> None:  # type: ignore[no-untyped-def]
    tokens = ["Hello", " ", "world", "!"]
    for i, token in enumerate(tokens):
        is_last = i == len(tokens) - 1
        stream.send(
            ModelStreamInferResponse(
                error_message="",
                infer_response=ModelInferResponse(
                    model_name="llama-70b",
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
        )
