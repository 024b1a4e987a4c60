"""A worker's big outputs into shared memory: the codec's ``divert`` hook and
:func:`anyserve.shm_tensors.output_diverter`, against real ``/dev/shm`` files."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from anyserve import codec, shm, shm_tensors
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest

_calls = itertools.count(1)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A call's output prefix as the API server names it; its segments are
    deleted afterwards."""
    name = f"anyserve-{os.getpid()}-1-{next(_calls)}"
    yield name
    for path in shm.own_segments(name + "-"):
        shm.unlink_quietly(path)


def asking(prefix: str, minimum: int) -> ModelInferRequest:
    request = ModelInferRequest(model_name="m", id="r1")
    request.parameters[shm.OUTPUTS].string_param = prefix
    request.parameters[shm.OUTPUTS_MIN].int64_param = minimum
    return request


def segment(prefix: str, index: int) -> bytes:
    with open(os.path.join(shm.SHM_DIR, f"{prefix}-{index}"), "rb") as file:
        return file.read()


def test_a_big_array_goes_to_its_segment_and_its_raw_entry_stays_empty(prefix: str) -> None:
    request = asking(prefix, 1024)
    big = np.arange(1024, dtype=np.float32)
    result = {"small": np.array([1, 2], dtype=np.int64), "big": big, "text": "hi"}
    response = codec.to_infer_response(result, request, divert=shm_tensors.output_diverter(request))
    assert [t.name for t in response.outputs] == ["small", "big", "text"]
    raw = list(response.raw_output_contents)
    assert raw[0] == np.array([1, 2], dtype="<i8").tobytes()
    assert raw[1] == b""
    assert raw[2] == b"\x02\x00\x00\x00hi"  # BYTES, packed as Triton does
    ref = shm.Ref.of(response.outputs[1].parameters)
    assert ref == shm.Ref(os.path.join(shm.SHM_DIR, f"{prefix}-1"), 0, big.nbytes)
    assert segment(prefix, 1) == big.tobytes()
    assert list(response.outputs[1].shape) == [1024]
    assert response.outputs[1].datatype == "FP32"
    # place_outputs, run after it by the worker, leaves it as it is.
    shm_tensors.place_outputs(request, response)
    assert list(response.raw_output_contents) == raw
    assert sorted(shm.own_segments(prefix + "-")) == [os.path.join(shm.SHM_DIR, f"{prefix}-1")]


def test_what_is_written_is_little_endian_and_a_view_is_read_not_copied_first(
    prefix: str,
) -> None:
    request = asking(prefix, 16)
    backing = np.arange(64, dtype=">i4")  # big-endian: converted once
    read_only = np.frombuffer(memoryview(np.arange(32, dtype=np.float64).tobytes()))
    response = codec.to_infer_response(
        {"be": backing, "view": read_only},
        request,
        divert=shm_tensors.output_diverter(request),
    )
    assert list(response.raw_output_contents) == [b"", b""]
    assert segment(prefix, 0) == backing.astype("<i4").tobytes()
    assert segment(prefix, 1) == read_only.tobytes()
    decoded = codec.decode_outputs(_read_back(response))
    assert decoded["be"].tolist() == list(range(64))


def _read_back(response: Any) -> Any:
    """The response as the API server turns it back: segments into raw entries."""
    copy = type(response)()
    copy.CopyFrom(response)
    raw = list(copy.raw_output_contents)
    for index, out in enumerate(copy.outputs):
        ref = shm.Ref.of(out.parameters)
        if ref is not None:
            raw[index] = bytes(ref.map("test"))
            for key in (shm.PATH, shm.OFFSET, shm.SIZE):
                del out.parameters[key]
    del copy.raw_output_contents[:]
    copy.raw_output_contents.extend(raw)
    return copy


def test_small_and_strided_arrays_stay_in_the_answer(prefix: str) -> None:
    request = asking(prefix, 64)
    strided = np.arange(100, dtype=np.float64)[::2]  # 400 bytes, not contiguous
    small = np.arange(4, dtype=np.float64)  # 32 bytes, under the minimum
    response = codec.to_infer_response(
        {"strided": strided, "small": small},
        request,
        divert=shm_tensors.output_diverter(request),
    )
    assert not any(shm.PATH in out.parameters for out in response.outputs)
    assert list(response.raw_output_contents) == [strided.tobytes(), small.tobytes()]
    # The strided one is big: place_outputs still moves it, from its bytes.
    shm_tensors.place_outputs(request, response)
    assert list(response.raw_output_contents) == [b"", small.tobytes()]
    assert segment(prefix, 0) == strided.tobytes()


def test_nothing_is_diverted_unless_the_request_asks_without_naming_outputs(
    prefix: str,
) -> None:
    assert shm_tensors.output_diverter(ModelInferRequest(model_name="m")) is None
    named = asking(prefix, 1)
    named.outputs.add().name = "y"  # outputs may be dropped and renumbered
    assert shm_tensors.output_diverter(named) is None
    malformed = asking("/etc/passwd", 1)
    with pytest.raises(InvalidArgument, match="malformed"):
        shm_tensors.output_diverter(malformed)


def test_a_segment_that_cannot_be_made_leaves_the_bytes_in_the_answer(prefix: str) -> None:
    request = asking(prefix, 1)
    taken = os.path.join(shm.SHM_DIR, f"{prefix}-0")
    with open(taken, "wb"):  # the name is taken: the exclusive create fails
        pass
    big = np.arange(256, dtype=np.int32)
    response = codec.to_infer_response(
        {"y": big}, request, divert=shm_tensors.output_diverter(request)
    )
    assert list(response.raw_output_contents) == [big.tobytes()]
    assert shm.PATH not in response.outputs[0].parameters
    assert segment(prefix, 0) == b""  # the file that was there, untouched
