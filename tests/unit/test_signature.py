"""Declared tensor signatures without processes: ``anyserve.Tensor``, the
request/response checks, output selection, Triton's model config and
repository index as the replica and the API server build them (wire-checked
against tritonclient's own generated classes), and the CLI's typed inputs."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.api_server import model_meta
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.state import ApiState
from anyserve.app import HandlerInfo
from anyserve.capability import Capability
from anyserve.cli.client import InputSpec, build_request, parse_input, parse_values
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import InferTensorContents, ModelInferRequest, ModelInferResponse
from anyserve.replica import status
from anyserve.replica.manager import Manager
from anyserve.replica.processes import WorkerConfig
from anyserve.signature import (
    TRITON_TYPES,
    Tensor,
    check_request,
    check_response,
    config_dims,
    fit_shape,
    select_outputs,
    tensors,
    triton_type,
)
from tests.unit.replica_fakes import handler, ready_slot

X = Tensor("x", "FP32", [-1, 4])
MASK = Tensor("mask", "BOOL", [4])
PROBS = Tensor("probs", "FP32", [-1, 3])
LABEL = Tensor("label", "BYTES", [-1])


def request_with(*inputs: tuple[str, str, list[int]]) -> ModelInferRequest:
    request = ModelInferRequest()
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def response_with(*outputs: tuple[str, str, list[int]]) -> ModelInferResponse:
    response = ModelInferResponse()
    for name, datatype, shape in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
    return response


# --------------------------------------------------------------------------- Tensor


def test_tensor_holds_a_declaration() -> None:
    assert (X.name, X.datatype, X.shape) == ("x", "FP32", (-1, 4))
    assert Tensor("s", "INT64", []).shape == ()
    assert Tensor("x", "FP32", (-1, 4)) == X and hash(X) == hash(Tensor("x", "FP32", [-1, 4]))


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "says"),
    [
        ("", "FP32", [1], "non-empty"),
        ("x", "FLOAT", [1], "unknown datatype 'FLOAT'"),
        ("x", "FP32", [-2], "sizes >= 0 or -1"),
        ("x", "FP32", [True], "sizes >= 0 or -1"),
        ("x", "FP32", [1.5], "sizes >= 0 or -1"),
    ],
)
def test_tensor_refuses_malformed_declarations(
    name: str, datatype: str, shape: list[Any], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        Tensor(name, datatype, shape)


def test_tensor_accepts_shapes() -> None:
    assert X.accepts_shape([1, 4]) and X.accepts_shape([7, 4])
    assert not X.accepts_shape([1, 5])
    assert not X.accepts_shape([4])
    assert not X.accepts_shape([1, 4, 1])
    assert MASK.accepts_shape([4]) and not MASK.accepts_shape([3])


def test_tensor_json_round_trip() -> None:
    assert X.to_dict() == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    assert Tensor.from_dict(X.to_dict()) == X
    with pytest.raises(ValueError):
        Tensor.from_dict({"name": "x", "datatype": "NOPE", "shape": []})
    with pytest.raises(KeyError):
        Tensor.from_dict({"name": "x"})


def test_decorator_lists_are_validated() -> None:
    assert tensors(None, "inputs") == ()
    assert tensors([X, MASK], "inputs") == (X, MASK)
    with pytest.raises(ValueError, match=r"list of anyserve\.Tensor"):
        tensors(X, "inputs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"hold anyserve\.Tensor"):
        tensors([X, "y"], "inputs")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="repeats a tensor name"):
        tensors([X, X], "outputs")


# --------------------------------------------------------------------------- checks


def test_check_request_passes_what_fits() -> None:
    check_request([], request_with(("anything", "BYTES", [1])))  # nothing declared
    check_request([X, MASK], request_with(("mask", "BOOL", [4]), ("x", "FP32", [2, 4])))


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ([("mask", "BOOL", [4])], r"missing input 'x' \(FP32\[-1, 4\]\)"),
        ([("x", "FP64", [1, 4]), ("mask", "BOOL", [4])], "input 'x' must be FP32, not FP64"),
        (
            [("x", "FP32", [1, 5]), ("mask", "BOOL", [4])],
            r"input 'x' has shape \[1, 5\]; expected \[-1, 4\]",
        ),
        ([("x", "FP32", [4]), ("mask", "BOOL", [4])], r"input 'x' has shape \[4\]"),
        (
            [("x", "FP32", [1, 4]), ("mask", "BOOL", [4]), ("extra", "BYTES", [1])],
            "unknown input 'extra'; this capability takes: x FP32",
        ),
    ],
)
def test_check_request_names_the_input_and_what_was_expected(
    inputs: list[tuple[str, str, list[int]]], says: str
) -> None:
    with pytest.raises(InvalidArgument, match=says):
        check_request([X, MASK], request_with(*inputs))


def test_check_response_holds_the_handler_to_its_declaration() -> None:
    check_response([], response_with(("whatever", "BYTES", [1])))
    check_response(
        [PROBS, LABEL], response_with(("label", "BYTES", [2]), ("probs", "FP32", [2, 3]))
    )
    with pytest.raises(HandlerError, match="did not return declared output 'label'"):
        check_response([PROBS, LABEL], response_with(("probs", "FP32", [1, 3])))
    with pytest.raises(HandlerError, match=r"output 'probs' is FP64\[1, 3\]; declared FP32"):
        check_response([PROBS], response_with(("probs", "FP64", [1, 3])))
    with pytest.raises(HandlerError, match=r"output 'probs' is FP32\[3\]"):
        check_response([PROBS], response_with(("probs", "FP32", [3])))
    with pytest.raises(HandlerError, match="undeclared output 'debug'"):
        check_response([PROBS], response_with(("probs", "FP32", [1, 3]), ("debug", "BYTES", [1])))


def three_outputs(raw: bool) -> ModelInferResponse:
    response = response_with(("a", "INT32", [1]), ("b", "INT32", [1]), ("c", "INT32", [1]))
    for i, tensor in enumerate(response.outputs):
        if raw:
            response.raw_output_contents.append(bytes([i, 0, 0, 0]))
        else:
            tensor.contents.CopyFrom(InferTensorContents(int_contents=[i]))
    return response


def asking_for(*names: str) -> ModelInferRequest:
    request = ModelInferRequest()
    for name in names:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize("raw", [False, True])
def test_select_outputs_keeps_what_was_asked_for(raw: bool) -> None:
    response = three_outputs(raw)
    select_outputs(asking_for(), response)  # none named: every output
    assert [t.name for t in response.outputs] == ["a", "b", "c"]

    select_outputs(asking_for("c", "a"), response)  # kept in the response's order
    assert [t.name for t in response.outputs] == ["a", "c"]
    if raw:
        assert list(response.raw_output_contents) == [b"\x00\0\0\0", b"\x02\0\0\0"]
    else:
        assert [list(t.contents.int_contents) for t in response.outputs] == [[0], [2]]
        assert not response.raw_output_contents

    with pytest.raises(InvalidArgument, match="requested output 'b' does not exist"):
        select_outputs(asking_for("b"), response)


# --------------------------------------------------------------------------- Triton's model config


def test_triton_types_and_dims() -> None:
    assert triton_type("FP32") == "TYPE_FP32" and triton_type("BYTES") == "TYPE_STRING"
    assert triton_type("BOOL") == "TYPE_BOOL" and triton_type("UINT64") == "TYPE_UINT64"
    with pytest.raises(ValueError, match="unknown datatype"):
        triton_type("STRING")
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    for name in TRITON_TYPES.values():  # every name exists in Triton's enum
        assert mc.DataType.Value(name) > 0
    assert config_dims(X, max_batch_size=4) == [4]  # batch dimension left out
    assert config_dims(X, max_batch_size=0) == [-1, 4]
    assert config_dims(Tensor("s", "FP32", []), max_batch_size=2) == []


@pytest.mark.parametrize(
    ("shape", "count", "fitted"),
    [
        ([-1, 4], 4, [1, 4]),
        ([-1, 4], 8, [2, 4]),
        ([-1], 3, [3]),
        ([-1, -1], 6, [1, 6]),
        ([2, 2], 4, [2, 2]),
        ([], 1, []),
        ([0, -1], 0, [0, 0]),
    ],
)
def test_fit_shape(shape: list[int], count: int, fitted: list[int]) -> None:
    assert fit_shape(shape, count) == fitted


@pytest.mark.parametrize(("shape", "count"), [([-1, 4], 3), ([2, 2], 3), ([], 2), ([0, -1], 1)])
def test_fit_shape_refuses_counts_that_do_not_fit(shape: list[int], count: int) -> None:
    with pytest.raises(ValueError, match=r"fit|holds"):
        fit_shape(shape, count)


CLASSIFIER = HandlerInfo(
    name="classify",
    capability=Capability(type="classify", model="classifier"),
    stream=False,
    workers=2,
    max_batch_size=4,
    batch_timeout=0.002,
    inputs=(X, MASK),
    outputs=(PROBS,),
)


def test_model_config_of_a_declared_handler_reads_in_tritonclient() -> None:
    service = pytest.importorskip("tritonclient.grpc.service_pb2")
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    ours = pb.ModelConfigResponse(config=status.model_config(CLASSIFIER, "classifier"))
    config = service.ModelConfigResponse.FromString(ours.SerializeToString()).config
    assert (config.name, config.platform, config.backend) == ("classifier", "anyserve", "anyserve")
    assert config.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("x", mc.TYPE_FP32, [4]),
        ("mask", mc.TYPE_BOOL, []),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("probs", mc.TYPE_FP32, [3])
    ]
    [group] = config.instance_group
    assert (group.name, group.kind, group.count) == ("classify", group.KIND_CPU, 2)
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.parameters["capability"].string_value == "model=classifier,type=classify"
    assert not config.model_transaction_policy.decoupled


def test_model_config_of_an_undeclared_streaming_gpu_handler() -> None:
    info = handler("gen", stream=True, resources={"gpu": 1.0}, workers=3)
    config = status.model_config(info, "gen")
    assert config.max_batch_size == 0 and not config.input and not config.output
    assert config.WhichOneof("scheduling_choice") is None
    assert config.model_transaction_policy.decoupled
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert config.instance_group[0].count == 3


def test_config_json_is_tritons_json_form() -> None:
    doc = model_meta.config_json(status.model_config(CLASSIFIER, "classifier"))
    assert doc["max_batch_size"] == 4 and doc["backend"] == "anyserve"
    assert doc["input"][0] == {
        "name": "x",
        "data_type": "TYPE_FP32",
        "format": "FORMAT_NONE",
        "dims": [4],
    }
    assert doc["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [3]}]
    assert doc["instance_group"] == [{"name": "classify", "kind": "KIND_CPU", "count": 2}]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert doc["model_transaction_policy"] == {"decoupled": False}


def test_tensor_metadata_lists_full_shapes() -> None:
    [x, mask] = status.tensor_metadata(CLASSIFIER.inputs)
    assert (x.name, x.datatype, list(x.shape)) == ("x", "FP32", [-1, 4])
    assert (mask.name, mask.datatype, list(mask.shape)) == ("mask", "BOOL", [4])


# --------------------------------------------------------------------------- repository index


def test_api_server_index_from_the_registry() -> None:
    service = pytest.importorskip("tritonclient.grpc.service_pb2")
    state = ApiState(ApiServerConfig(port=0, grpc_port=0, token=None))
    chat, tiny = Capability(type="chat", model="llama"), Capability(type="chat")
    state.registry.upsert("r1", "h:1", [chat], loadable=[Capability(type="heavy")])
    state.registry.upsert("r2", "h:2", [], loadable=[chat, tiny])
    index = model_meta.repository_index(state)
    theirs = service.RepositoryIndexResponse.FromString(index.SerializeToString())
    assert [(m.name, m.version, m.state, m.reason) for m in theirs.models] == [
        ("chat", "1", "UNAVAILABLE", "loadable"),
        ("heavy", "1", "UNAVAILABLE", "loadable"),
        ("llama", "1", "READY", ""),  # loaded somewhere: READY
    ]
    ready = model_meta.repository_index(state, ready_only=True)
    assert model_meta.index_json(ready) == [{"name": "llama", "version": "1", "state": "READY"}]
    assert model_meta.index_json(index)[0] == {
        "name": "chat",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "loadable",
    }


def test_replica_index_says_why_a_handler_is_unavailable() -> None:
    chat, big = handler("chat", type="chat"), handler("big", type="chat", model="big")
    huge = handler("huge", resources={"gpu": 4.0}, type="huge")
    manager = Manager([chat, big, huge], WorkerConfig(app="unit:app"), resources={"gpu": 1.0})
    manager.slots["big"].append(ready_slot(big)[0])
    index = status.repository_index(manager)
    assert [(m.name, m.state, m.reason) for m in index.models] == [
        ("big", "READY", ""),
        ("chat", "UNAVAILABLE", "loadable"),
        ("huge", "UNAVAILABLE", "unfit"),
    ]
    ready = status.repository_index(manager, ready_only=True)
    assert [m.name for m in ready.models] == ["big"]


# --------------------------------------------------------------------------- the CLI's typed inputs


def test_parse_input_forms() -> None:
    assert parse_input("text=hello=world") == InputSpec("text", "hello=world")
    assert parse_input("x:FP32[1,4]=1,2,3,4") == InputSpec("x", "1,2,3,4", "FP32", (1, 4))
    assert parse_input("x:int64=5") == InputSpec("x", "5", "INT64", None)
    assert parse_input("x:FP32[-1, 2]=1,2") == InputSpec("x", "1,2", "FP32", (-1, 2))
    for bad in ("novalue", "=1", "x:FP32[1,a]=1", "x:[1]=1"):
        with pytest.raises(typer.BadParameter):
            parse_input(bad)


def test_parse_values() -> None:
    assert parse_values("FP32", "[[1, 2], [3.5, 4]]", "x") == [1.0, 2.0, 3.5, 4.0]
    assert parse_values("INT32", "1,-2", "x") == [1, -2]
    assert parse_values("BOOL", "true,0,FALSE,1", "x") == [True, False, False, True]
    assert parse_values("BYTES", "a,b", "x") == [b"a,b"]
    with pytest.raises(typer.BadParameter, match="not a list of INT32"):
        parse_values("INT32", "1.5", "input 'x'")


def test_build_request_types_declared_and_explicit_inputs() -> None:
    declared = {"x": ("FP32", [-1, 4])}
    request = build_request(
        [InputSpec("x", "1,2,3,4"), InputSpec("n", "7", "INT8"), InputSpec("t", "hi")], declared
    )
    x, n, t = request.inputs
    assert (x.datatype, list(x.shape), list(x.contents.fp32_contents)) == (
        "FP32",
        [1, 4],
        [1, 2, 3, 4],
    )
    assert (n.datatype, list(n.shape), list(n.contents.int_contents)) == ("INT8", [1], [7])
    assert (t.datatype, list(t.shape), list(t.contents.bytes_contents)) == ("BYTES", [1], [b"hi"])
    check_request([X], build_request([InputSpec("x", "1,2,3,4,5,6,7,8")], declared))

    with pytest.raises(typer.BadParameter, match=r"input 'x': 3 values do not fit shape \[-1, 4\]"):
        build_request([InputSpec("x", "1,2,3")], declared)
    with pytest.raises(typer.BadParameter, match="does not fit INT8"):
        build_request([InputSpec("n", "300", "INT8")], {})
    with pytest.raises(typer.BadParameter, match="unknown datatype 'FLOAT'"):
        build_request([InputSpec("n", "3", "FLOAT")], {})
