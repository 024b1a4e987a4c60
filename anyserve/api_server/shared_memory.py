"""The API server's side of tensors in shared memory (see :mod:`anyserve.shm`).

For each inference request :meth:`SharedMemory.prepare`:

* refuses anyserve's internal shared-memory parameters from outside (a
  delegated request may keep references to segments this server placed);
* resolves Triton's ``shared_memory_region`` on inputs and requested outputs
  against the regions clients registered here, checks the bounds, and writes
  where the bytes are; such a request may only go to a replica on this host;
* with ``place`` (an HTTP request whose answer this server renders), moves
  raw inputs of at least ``threshold`` bytes into new segments when a replica
  on this host can take the request, and asks for big outputs to come back
  in segments too.

The returned :class:`CallSegments` is finished with :meth:`SharedMemory.take_outputs`
(big outputs read back into the response) and always :meth:`SharedMemory.release`
(every segment of the call deleted, also when the call failed).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from anyserve import shm
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry
from anyserve.errors import AnyServeError, InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = ["CallSegments", "Regions", "SharedMemory"]

log = logging.getLogger("anyserve.shm")

_MARK_RESERVED = shm.RESERVED.encode()
_MARK_REGION = shm.REGION.encode()
#: Default --shm-threshold: raw inputs this big go through shared memory.
DEFAULT_THRESHOLD = 1024 * 1024


class Region(Protocol):
    """A registered region: ``byte_size`` bytes at ``offset`` of file ``path``."""

    @property
    def path(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def byte_size(self) -> int: ...


class Regions(Protocol):
    """The regions clients registered (Triton's system shared memory)."""

    def resolve(self, name: str) -> Region:
        """The region ``name``; raises NotFound naming it when unknown."""
        ...


@dataclass
class CallSegments:
    """The segments of one call: those holding its inputs, and the name
    prefix of those the worker creates for its outputs."""

    number: int
    inputs: list[str] = field(default_factory=list)
    outputs: str = ""


def _int_param(params: Any, key: str) -> int:
    if key not in params:  # membership first: indexing inserts the key
        return 0
    value = params[key]
    which = value.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {key!r} must be an integer")
    number: int = getattr(value, which)
    return number


class SharedMemory:
    """Shared-memory decisions and bookkeeping of one API server."""

    def __init__(self, registry: Registry, threshold: int, regions: Regions | None) -> None:
        self.registry = registry
        self.threshold = threshold
        self.regions = regions
        self.host = shm.host_id()
        self._owner = f"anyserve-{shm.owner_tag()}"
        self._numbers = itertools.count(1)
        self._calls: dict[int, CallSegments] = {}  # in flight, by number

    # ------------------------------------------------------------- requests

    def prepare(
        self,
        request: ModelInferRequest,
        meta: RequestMeta,
        aside: Mapping[int, memoryview] | None = None,
    ) -> CallSegments | None:
        """Check and rewrite ``request``'s shared-memory use in place (see the
        module docstring); the call's segments, or None when it placed none.

        ``aside``: raw inputs of at least :attr:`threshold` bytes left out of
        the request by index (``codec.request_from_binary_aside``; their
        entries are empty). They go into segments when a replica on this host
        can take the request, else back into the request.

        Raises InvalidArgument for a reserved parameter, a region used out of
        its bounds or where no replica on this host serves the request, and
        NotFound for an unknown region.
        """
        self._refuse_reserved(request, meta)
        regions = self._resolve_regions(request)
        if regions:
            self._require_local(meta, regions)
        if not aside:
            return None
        if self.host and self._local_candidates(meta):
            placed = self._place(request, meta, aside)
            if placed is not None:
                return placed
        raw = request.raw_input_contents
        for index, view in aside.items():  # the usual way: in the message
            raw[index] = bytes(view)
        return None

    def rewrite(self, payload: bytes, meta: RequestMeta) -> bytes:
        """:meth:`prepare` (placing nothing) for a serialized request that is
        otherwise forwarded untouched (protobuf bodies, the gRPC entry); parsed
        only when its bytes mention shared memory at all."""
        if _MARK_RESERVED not in payload and _MARK_REGION not in payload:
            return payload
        try:
            request = ModelInferRequest.FromString(payload)
        except Exception:  # protobuf's DecodeError; the replica names the problem
            return payload
        if not any(
            key.startswith(shm.RESERVED) or key == shm.REGION
            for _, message in _tensors(request)
            for key in message.parameters
        ):
            return payload  # the words were in tensor data
        self.prepare(request, meta)
        return request.SerializeToString()

    def check(self, request: ModelInferRequest, meta: RequestMeta) -> None:
        """For a request already serialized without this module (a big JSON
        body): InvalidArgument if it uses shared memory at all."""
        self._refuse_reserved(request, meta)
        for kind, message in _tensors(request):
            if shm.REGION in message.parameters:
                raise InvalidArgument(
                    f"{_what(kind, message)}: shared memory regions cannot be used in a JSON"
                    " body over 1 MiB"
                )

    def _refuse_reserved(self, request: ModelInferRequest, meta: RequestMeta) -> None:
        for kind, message in _tensors(request):
            params = message.parameters
            if shm.REGION in params:
                continue  # where its bytes are is stamped again from the region
            for key in params:
                if key.startswith(shm.RESERVED) and not self._ours(key, params, meta):
                    what = _what(kind, message)
                    raise InvalidArgument(f"{what}: parameter {key!r} is reserved for anyserve")

    def _ours(self, key: str, params: Any, meta: RequestMeta) -> bool:
        """Whether a delegated request's internal parameter names what this
        server placed (its reference stays valid: the request stays here)."""
        if not meta.delegated_from:
            return False
        if key == shm.PATH:
            own = {path for call in self._calls.values() for path in call.inputs}
            if params[key].string_param not in own:
                return False
            meta.host = self.host
            return True
        if key == shm.OUTPUTS:
            return self._owns(params[key])
        return key in (shm.OFFSET, shm.SIZE, shm.OUTPUTS_MIN)

    def _owns(self, value: Any) -> bool:
        prefix: str = value.string_param
        return any(call.outputs == prefix for call in self._calls.values())

    def _resolve_regions(self, request: ModelInferRequest) -> list[str]:
        """Stamp every tensor naming a region with where its bytes are; return
        the region names used."""
        used: list[str] = []
        region_inputs: list[int] = []
        for index, (kind, tensor) in enumerate(_tensors(request, with_request=False)):
            params = tensor.parameters
            if shm.REGION not in params:
                continue
            what = _what(kind, tensor)
            name = params[shm.REGION].string_param
            if self.regions is None:
                raise InvalidArgument(f"{what}: this server has no shared memory regions")
            region = self.regions.resolve(name)
            size = _int_param(params, shm.REGION_SIZE)
            offset = _int_param(params, shm.REGION_OFFSET)
            if offset < 0 or size < 0 or offset + size > region.byte_size:
                raise InvalidArgument(
                    f"{what}: offset {offset} + byte size {size} is beyond shared memory"
                    f" region {name!r} of {region.byte_size} bytes"
                )
            shm.Ref(region.path, region.offset + offset, size).stamp(params)
            used.append(name)
            if index < len(request.inputs):
                region_inputs.append(index)
        if region_inputs:
            _raw_for_every_input(request, set(region_inputs))
        return used

    def _local_candidates(self, meta: RequestMeta) -> bool:
        return bool(self.registry.candidates(meta.query, meta.model_name, meta.visited, self.host))

    def _require_local(self, meta: RequestMeta, regions: list[str]) -> None:
        meta.host = self.host
        if self._local_candidates(meta) or not self.registry.candidates(
            meta.query, meta.model_name, meta.visited
        ):
            return  # a local replica, or none at all (the router says so)
        raise InvalidArgument(
            f"shared memory region {regions[0]!r} is on the API server's host, but no"
            f" replica on this host serves {meta.describe()}"
        )

    def _place(
        self, request: ModelInferRequest, meta: RequestMeta, aside: Mapping[int, memoryview]
    ) -> CallSegments | None:
        number = next(self._numbers)
        call = CallSegments(number, outputs=f"{self._owner}-{next(self._numbers)}")
        self._calls[number] = call
        try:
            for index, view in aside.items():
                path = os.path.join(shm.SHM_DIR, f"{self._owner}-{number}-{index}")
                size = shm.create(path, [view])
                call.inputs.append(path)
                shm.Ref(path, 0, size).stamp(request.inputs[index].parameters)
        except OSError as exc:  # /dev/shm full: undo, the bytes go the usual way
            log.warning("request %s: inputs stay in the request: %s", meta.request_id, exc)
            self.release(call)
            for index in aside:
                for key in (shm.PATH, shm.OFFSET, shm.SIZE):
                    request.inputs[index].parameters.pop(key, None)
            return None
        request.parameters[shm.OUTPUTS].string_param = call.outputs
        request.parameters[shm.OUTPUTS_MIN].int64_param = self.threshold
        meta.host = self.host
        return call

    # ------------------------------------------------------------- responses

    def take_outputs(self, response: ModelInferResponse, call: CallSegments) -> dict[int, Any]:
        """The outputs the worker put in this call's segments, by index, as
        read-only mappings (their ``raw_output_contents`` entries stay empty;
        see ``codec.response_to_http``); the files are deleted at once.
        Raises AnyServeError (internal: the replica broke the protocol) for a
        reference outside the call's segments."""
        taken: dict[int, Any] = {}
        for index, out in enumerate(response.outputs):
            ref = shm.Ref.of(out.parameters)
            if ref is None:
                continue
            name = os.path.basename(ref.path)
            if os.path.dirname(ref.path) != shm.SHM_DIR or name != f"{call.outputs}-{index}":
                raise AnyServeError(f"output {out.name!r} names a segment of another call")
            try:
                taken[index] = ref.map(f"output {out.name!r}")
            finally:
                shm.unlink_quietly(ref.path)  # the mapping outlives the name
            for key in (shm.PATH, shm.OFFSET, shm.SIZE):
                del out.parameters[key]
        return taken

    def release(self, call: CallSegments) -> None:
        """Delete every segment of ``call``; never raises."""
        self._calls.pop(call.number, None)
        paths = [*call.inputs, *shm.own_segments(call.outputs + "-")]
        for path in paths:
            try:
                shm.unlink_quietly(path)
            except OSError as exc:
                log.warning("cannot delete shared memory segment %s: %s", path, exc)

    def sweep(self) -> int:
        """Delete segments of owners that are gone, and this server's own that
        belong to no call in flight (an output a worker wrote after its call
        was abandoned). Returns how many."""
        removed = len(shm.sweep())
        live = {f"{self._owner}-{n}" for n in self._calls}
        live |= {call.outputs for call in self._calls.values()}
        for path in shm.own_segments(self._owner + "-"):
            name = os.path.basename(path)
            if name.rsplit("-", 1)[0] not in live:
                try:
                    shm.unlink_quietly(path)
                    removed += 1
                except OSError:
                    continue
        return removed


def _tensors(request: ModelInferRequest, with_request: bool = True) -> Iterator[tuple[str, Any]]:
    """``(kind, message)`` of the request (unless not ``with_request``), then
    each input and requested output: every message with ``parameters``."""
    if with_request:
        yield "request", request
    for tensor in request.inputs:
        yield "input", tensor
    for output in request.outputs:
        yield "output", output


def _what(kind: str, message: Any) -> str:
    """How an error names a message of :func:`_tensors` (formatted only then)."""
    return kind if kind == "request" else f"{kind} {message.name!r}"


def _raw_for_every_input(request: ModelInferRequest, in_regions: set[int]) -> None:
    """Triton's clients send no raw entry for an input in a region; anyserve
    keeps one entry per input when any is raw (an empty one for those)."""
    raw = request.raw_input_contents
    if not raw or len(raw) == len(request.inputs):
        return
    if len(raw) != len(request.inputs) - len(in_regions):
        raise InvalidArgument(
            f"request has {len(raw)} raw_input_contents entries for"
            f" {len(request.inputs) - len(in_regions)} inputs outside shared memory"
        )
    pending = iter(list(raw))
    entries = [b"" if i in in_regions else next(pending) for i in range(len(request.inputs))]
    del raw[:]
    raw.extend(entries)
