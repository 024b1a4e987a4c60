"""Two replicas for the three-hosts test (tests/test_three_hosts.py).

``front`` (chat): ``pipeline`` writes a random object of the size asked for, calls
``embed`` with only its reference and answers what came back plus the reference and
the object's SHA-256; ``tokens`` streams three tokens. ``back`` (embed): ``embed``
reads an object by reference (``blob``) and answers its size and SHA-256, or echoes
``text``. Each replica has an object directory of its own, so ``back`` gets the
object by fetching it from ``front``.
"""

from __future__ import annotations

import hashlib
import os

from anyserve import AnyServe, Context, Stream, codec
from anyserve.proto import ModelInferRequest, ModelInferResponse

front = AnyServe("front")
back = AnyServe("back")


@front.capability(type="chat", model="pipeline")
def pipeline(request: ModelInferRequest, context: Context) -> ModelInferResponse:
    data = os.urandom(int(codec.input_text(request, "size")))
    ref = context.objects.create(data)
    result: ModelInferResponse = context.call(capability={"type": "embed"}, inputs={"blob": ref})
    result.outputs.append(codec.encode_output("object_ref", ref))
    result.outputs.append(codec.encode_output("created_sha256", hashlib.sha256(data).hexdigest()))
    return result


@front.capability(type="chat", stream=True)
def tokens(request: ModelInferRequest, context: Context, stream: Stream) -> None:
    for token in ("one", "two", "three"):
        stream.send(token)


@back.capability(type="embed")
def embed(request: ModelInferRequest, context: Context) -> dict[str, object]:
    inputs = codec.decode_inputs(request)
    if "blob" in inputs:
        data = context.objects.get(inputs["blob"])
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"echo": inputs["text"].decode()}
