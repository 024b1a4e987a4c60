"""Names and byte-level helpers shared by every gRPC hop.

anyserve forwards serialized KServe messages between hops without parsing them
(only the worker parses a request). The method paths, metadata keys and the few helpers that
build or inspect serialized messages directly live here, so the API server, the
replica and the client agree on them.
"""

from __future__ import annotations

import socket
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import grpc

# Triton's service name: tritonclient dials these paths.
SERVICE = "inference.GRPCInferenceService"
SERVER_LIVE = f"/{SERVICE}/ServerLive"
SERVER_READY = f"/{SERVICE}/ServerReady"
MODEL_READY = f"/{SERVICE}/ModelReady"
SERVER_METADATA = f"/{SERVICE}/ServerMetadata"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
MODEL_CONFIG = f"/{SERVICE}/ModelConfig"

# Request metadata (gRPC keys are lower-case; HTTP headers use the same names).
REQUEST_ID = "x-request-id"
# Set by a replica that sends a request back through the API server.
DELEGATED_FROM = "x-delegated-from"
# Comma-separated replica ids a delegated request has already visited.
VISITED = "x-anyserve-visited"
# Capabilities on the current context.call chain ("type=chat>type=embed").
CALL_CHAIN = "x-anyserve-call-chain"
AUTHORIZATION = "authorization"
# Set by the API server on its own ModelStreamInfer calls to a replica: each
# message then carries every response ready at that moment (see pack_batch), so
# a fast token stream costs one gRPC message per batch instead of per token.
# Negotiated per hop; never forwarded.
BATCH = "x-anyserve-batch"
# Set ("1") by the API server when the replica it sends a request to is the only
# one that could take it: the replica then answers "overloaded" itself rather
# than delegating the call back. Per hop; never forwarded.
SOLE_CANDIDATE = "x-anyserve-sole-candidate"
# The API server's name for one call to a replica (its random per-process
# prefix and a counter), which CANCEL takes to end the call without a gRPC
# cancellation (anyserve/replica/in_flight.py). Per hop; never forwarded.
CALL_ID = "x-anyserve-call"
# The per-hop keys a replica reads from a call's metadata (read_hop) and
# leaves out of what it forwards.
_PER_HOP = frozenset((BATCH, CALL_ID))
CALLS_SERVICE = "anyserve.calls.Calls"
CANCEL = f"/{CALLS_SERVICE}/Cancel"

# Response parameter naming the replica that served a request.
SERVED_BY = "anyserve_served_by"

# gRPC message size limit on every hop (requests carry tensors).
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class LazyStatusCode:
    """A class attribute that reads as ``grpc.StatusCode[name]``, looked up when read,
    so that declaring one (``errors``' classes) does not load grpc: a worker process
    never does unless it calls out (about 10 MiB less resident)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.name]


def grpc_options(max_message: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    """Channel/server options used on every anyserve hop."""
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.so_reuseport", 0),
    ]


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def wrap_stream_response(infer_response: bytes) -> bytes:
    """Serialized ``ModelStreamInferResponse{infer_response=<bytes>}`` built by
    concatenation, without parsing the response (field 2, length-delimited)."""
    return b"\x12" + encode_varint(len(infer_response)) + infer_response


def pack_batch(messages: list[bytes]) -> bytes:
    """Several serialized messages in one: each prefixed by its varint length."""
    return b"".join(encode_varint(len(m)) + m for m in messages)


def unpack_batch(data: bytes) -> list[bytes]:
    """The inverse of :func:`pack_batch`; raises ValueError on malformed data."""
    messages: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        length, pos = read_varint(data, pos)
        if pos + length > end:
            raise ValueError("truncated batch")
        messages.append(data[pos : pos + length])
        pos += length
    return messages


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """``(value, position after it)`` of the protobuf varint at ``pos``;
    ValueError when it is truncated or longer than 64 bits."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def message_fields(buf: bytes | memoryview) -> list[tuple[int, int, int | bytes]]:
    """``(number, wire type, value)`` of every top-level field; a
    length-delimited value is its bytes except for large ones (tensors),
    whose length stands in (they are never decoded here, so not copied)."""
    out: list[tuple[int, int, int | bytes]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = 0, pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value = bytes(buf[pos : pos + length]) if length <= 4096 else length
            pos += length
        elif wire_type == 5:
            value, pos = 0, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated message")
        out.append((number, wire_type, value))
    return out


def peek_string_field(buf: bytes | memoryview, field: int) -> str:
    """Read a top-level string field of a serialized message without parsing the
    rest (used for ``model_name``, field 1, and ``id``, field 3, of a
    ModelInferRequest). Returns "" when absent; raises ValueError when the bytes
    are not a well-formed message.
    """
    found: bytes | memoryview = b""
    for _, value in peek_fields(buf, (field,)):
        found = value  # the last one, as a parser keeps
    return str(found, "utf-8", "replace")


def peek_fields(
    buf: bytes | memoryview, wanted: Container[int], copy_up_to: int | None = None
) -> list[tuple[int, bytes | memoryview]]:
    """``(number, value)`` of each top-level length-delimited field numbered
    in ``wanted``, in order, in one walk that neither parses nor copies the
    rest. A value is a slice of ``buf`` (a copy from bytes), except that one
    longer than ``copy_up_to`` is a memoryview of it, never copied. Raises
    ValueError when the bytes are not a well-formed message."""
    found: list[tuple[int, bytes | memoryview]] = []
    pos = 0
    end = len(buf)
    while pos < end:
        # Keys and lengths under 128 take one byte: read inline, as a replica
        # walks every request it routes; read_varint takes the rest.
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = read_varint(buf, pos)
        wire_type = key & 7
        if wire_type == 2:
            if pos < end and buf[pos] < 0x80:
                length = buf[pos]
                pos += 1
            else:
                length, pos = read_varint(buf, pos)
            if key >> 3 in wanted:
                if copy_up_to is None or length <= copy_up_to:
                    found.append((key >> 3, buf[pos : pos + length]))
                else:  # a big field the caller may not read: not copied
                    found.append((key >> 3, memoryview(buf)[pos : pos + length]))
            pos += length
        elif wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ValueError("truncated message")
    return found


class Hop(NamedTuple):
    """A replica's reading of the metadata of one call to it (:func:`read_hop`)."""

    forward: dict[str, str]  # what travels on to the next hop
    call_id: str | None  # CALL_ID: the API server's name for the call
    batched: bool  # BATCH "1": stream responses packed (pack_batch)


def forwarded(metadata: Mapping[str, str]) -> dict[str, str]:
    """What of a call's metadata travels with the request to the next hop:
    every ``x-*`` key (capability query, request id, hop list, call chain)
    but binary ``-bin`` ones and the per-hop keys; grpc internals and
    credentials stay behind. Reads each key once, ``metadata[key]`` only for
    the kept ones (a local lane call's protobuf map is read as it is, not
    copied first)."""
    return {
        key: metadata[key]
        for key in metadata
        if key.startswith("x-") and not key.endswith("-bin") and key not in _PER_HOP
    }


def read_hop(metadata: object) -> Hop:
    """One pass over a gRPC call's metadata pairs: what :func:`forwarded`
    keeps of them (a loop of its own, not a dict of the pairs first: a third
    less per call), and the per-hop keys BATCH and CALL_ID."""
    forward: dict[str, str] = {}
    call_id: str | None = None
    batched = False
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if not key.startswith("x-") or key.endswith("-bin") or not isinstance(value, str):
            continue
        if key not in _PER_HOP:
            forward[key] = value
        elif key == CALL_ID:
            call_id = value
        else:
            batched = value == "1"
    return Hop(forward, call_id, batched)


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` (``"Address already in
    use"``...), or None when it can. A probe before gRPC binds, so a taken
    port is one clear line instead of gRPC's own error log; port 0 always can."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc.strerror or exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC binds: a port left in TIME_WAIT by a restart is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None
