"""Generated code is current, and the seed's imports and spellings work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "anyserve" / "_proto"
    committed = ROOT / "anyserve" / "_proto"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix != ".pyc"
    )
    stale = [n for n in names if (fresh / n).read_bytes() != (committed / n).read_bytes()]
    assert not stale, f"anyserve/_proto is stale ({stale}); run `make proto`"


def test_seed_imports_and_nested_names() -> None:
    from anyserve import AnyServe
    from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

    response = ModelStreamInferResponse(
        error_message="",
        infer_response=ModelInferResponse(
            model_name="llama-70b",
            outputs=[
                ModelInferResponse.InferOutputTensor(
                    name="text_output",
                    datatype="BYTES",
                    shape=[1],
                    contents=ModelInferResponse.InferTensorContents(  # type: ignore[attr-defined]
                        bytes_contents=[b"Hello"]
                    ),
                )
            ],
        ),
    )
    parsed = ModelStreamInferResponse.FromString(response.SerializeToString())
    assert parsed.infer_response.outputs[0].contents.bytes_contents == [b"Hello"]
    assert ModelInferRequest().DESCRIPTOR.name == "ModelInferRequest"
    assert AnyServe().handlers == []


def test_wire_compatible_with_tritonclient_messages() -> None:
    """Our messages and Triton's (tritonclient's generated code) share field numbers."""
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from anyserve.proto import ModelInferRequest

    ours = ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x01\x00\x00\x00"])
    tensor = ours.inputs.add(name="x", datatype="INT32", shape=[1])
    tensor.parameters["p"].string_param = "v"
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.id) == ("m", "7")
    assert theirs.inputs[0].parameters["p"].string_param == "v"
    assert list(theirs.raw_input_contents) == [b"\x01\x00\x00\x00"]
