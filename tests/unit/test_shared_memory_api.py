"""The API server's shared-memory decisions (api_server/shared_memory.py) and
the codec's binary inputs kept aside, with real segments in /dev/shm."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from anyserve import codec, shm
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry
from anyserve.api_server.shared_memory import SharedMemory
from anyserve.capability import Capability
from anyserve.errors import AnyServeError, InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

THRESHOLD = 1024


def binary(blobs: list[bytes]) -> tuple[bytes, int]:
    doc = {
        "inputs": [
            {
                "name": f"in{i}",
                "datatype": "UINT8",
                "shape": [len(b)],
                "parameters": {"binary_data_size": len(b)},
            }
            for i, b in enumerate(blobs)
        ]
    }
    header = json.dumps(doc).encode()
    return header + b"".join(blobs), len(header)


def meta() -> RequestMeta:
    return RequestMeta(query={"type": "t"}, model_name="", request_id="r1", timeout=10.0)


def registry_with(host: str) -> Registry:
    registry = Registry(ttl=60.0)
    registry.upsert("r", "127.0.0.1:1", [Capability({"type": "t"})], host=host)
    return registry


@pytest.fixture
def ours() -> Iterator[list[str]]:
    """Fails the test if it leaves a segment of this process behind."""
    yield []
    owner = f"anyserve-{shm.owner_tag()}-"
    assert [n for n in os.listdir(shm.SHM_DIR) if n.startswith(owner)] == []


def test_aside_leaves_big_inputs_out_of_the_message() -> None:
    body, length = binary([b"a" * 10, b"b" * 2000])
    request, aside = codec.request_from_binary_aside(body, length, "", THRESHOLD)
    assert list(request.raw_input_contents) == [b"a" * 10, b""]
    assert list(aside) == [1] and bytes(aside[1]) == b"b" * 2000
    request, aside = codec.request_from_binary_aside(body, length, "", 0)
    assert aside == {} and request.raw_input_contents[1] == b"b" * 2000


def test_big_inputs_go_into_segments_for_a_replica_on_this_host(ours: list[str]) -> None:
    memory = SharedMemory(registry_with(shm.host_id()), THRESHOLD, None)
    body, length = binary([b"a" * 10, b"b" * 2000])
    request, aside = codec.request_from_binary_aside(body, length, "", THRESHOLD)
    routing = meta()
    call = memory.prepare(request, routing, aside)
    assert call is not None and routing.host == shm.host_id()
    ref = shm.Ref.of(request.inputs[1].parameters)
    assert ref is not None and ref.size == 2000
    assert bytes(ref.map("in1")) == b"b" * 2000
    assert request.parameters[shm.OUTPUTS].string_param == call.outputs
    memory.release(call)
    assert not os.path.exists(ref.path)


def test_without_a_replica_on_this_host_big_inputs_stay_in_the_message(ours: list[str]) -> None:
    memory = SharedMemory(registry_with("another-host"), THRESHOLD, None)
    body, length = binary([b"b" * 2000])
    request, aside = codec.request_from_binary_aside(body, length, "", THRESHOLD)
    routing = meta()
    assert memory.prepare(request, routing, aside) is None
    assert request.raw_input_contents[0] == b"b" * 2000 and routing.host == ""
    assert shm.PATH not in request.inputs[0].parameters


def test_reserved_parameters_are_refused_unless_they_name_this_servers_segment(
    ours: list[str],
) -> None:
    memory = SharedMemory(registry_with(shm.host_id()), THRESHOLD, None)
    body, length = binary([b"b" * 2000])
    request, aside = codec.request_from_binary_aside(body, length, "", THRESHOLD)
    call = memory.prepare(request, meta(), aside)
    assert call is not None
    try:
        forwarded = ModelInferRequest.FromString(request.SerializeToString())
        with pytest.raises(InvalidArgument, match="is reserved for anyserve"):
            memory.prepare(forwarded, meta())  # straight from a client
        delegated = meta()
        delegated.delegated_from = "replica-a"
        memory.prepare(forwarded, delegated)  # back from a replica: its own segment
        assert delegated.host == shm.host_id()
        forged = ModelInferRequest.FromString(request.SerializeToString())
        shm.Ref("/dev/shm/somebody-else", 0, 4).stamp(forged.inputs[0].parameters)
        with pytest.raises(InvalidArgument, match="is reserved for anyserve"):
            memory.prepare(forged, delegated)
    finally:
        memory.release(call)


def test_outputs_are_taken_only_from_the_calls_own_segments(ours: list[str]) -> None:
    memory = SharedMemory(registry_with(shm.host_id()), THRESHOLD, None)
    body, length = binary([b"b" * 2000])
    request, aside = codec.request_from_binary_aside(body, length, "", THRESHOLD)
    call = memory.prepare(request, meta(), aside)
    assert call is not None
    try:
        path = os.path.join(shm.SHM_DIR, f"{call.outputs}-0")
        shm.create(path, [b"z" * 3000])
        response = ModelInferResponse()
        response.outputs.add(name="out", datatype="UINT8", shape=[3000])
        response.raw_output_contents.append(b"")
        shm.Ref(path, 0, 3000).stamp(response.outputs[0].parameters)
        taken = memory.take_outputs(response, call)
        assert bytes(taken[0]) == b"z" * 3000 and not os.path.exists(path)
        assert shm.PATH not in response.outputs[0].parameters
        rendered, header_length = codec.response_to_http(response, request, taken)
        assert header_length is None  # JSON: the bytes went into the message
        assert json.loads(rendered)["outputs"][0]["data"] == [ord("z")] * 3000
        shm.Ref("/dev/shm/not-this-call-0", 0, 1).stamp(response.outputs[0].parameters)
        with pytest.raises(AnyServeError, match="names a segment of another call"):
            memory.take_outputs(response, call)
    finally:
        memory.release(call)


class _Regions:
    """One region, as api_server/shm_regions.RegionTable resolves it."""

    def __init__(self, path: str, byte_size: int) -> None:
        self.region = type("R", (), {"path": path, "offset": 0, "byte_size": byte_size})()

    def resolve(self, name: str) -> object:
        return self.region


def region_request(size: int, offset: int = 0) -> ModelInferRequest:
    request = ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype="UINT8", shape=[size])
    tensor.parameters[shm.REGION].string_param = "r"
    tensor.parameters[shm.REGION_SIZE].int64_param = size
    tensor.parameters[shm.REGION_OFFSET].int64_param = offset
    return request


def test_a_region_is_served_only_by_a_replica_on_this_host() -> None:
    regions = _Regions("/dev/shm/client-segment", 64)
    here = SharedMemory(registry_with(shm.host_id()), THRESHOLD, regions)  # type: ignore[arg-type]
    request, routing = region_request(32, offset=16), meta()
    assert here.prepare(request, routing) is None  # nothing of ours to delete
    assert routing.host == shm.host_id()
    assert shm.Ref.of(request.inputs[0].parameters) == shm.Ref("/dev/shm/client-segment", 16, 32)
    elsewhere = SharedMemory(registry_with("another-host"), THRESHOLD, regions)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no replica on this host serves"):
        elsewhere.prepare(region_request(32), meta())
    with pytest.raises(InvalidArgument, match="is beyond shared memory region 'r' of 64 bytes"):
        here.prepare(region_request(32, offset=40), meta())


def test_a_tensor_naming_a_region_is_stamped_again_whatever_it_carried() -> None:
    """A request with a region comes back delegated with the references this
    server stamped, or from a client with forged ones: both are replaced."""
    regions = _Regions("/dev/shm/client-segment", 64)
    here = SharedMemory(registry_with(shm.host_id()), THRESHOLD, regions)  # type: ignore[arg-type]
    request = region_request(32)
    shm.Ref("/dev/shm/somebody-else", 0, 64).stamp(request.inputs[0].parameters)
    delegated = meta()
    delegated.delegated_from = "replica-a"
    for routing in (meta(), delegated):
        here.prepare(request, routing)
        assert shm.Ref.of(request.inputs[0].parameters) == shm.Ref("/dev/shm/client-segment", 0, 32)
