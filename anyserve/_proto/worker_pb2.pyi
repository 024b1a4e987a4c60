from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("call_id", "hello", "call", "cancel", "chunk", "end", "error", "credit", "stats")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    hello: Hello
    call: Call
    cancel: Cancel
    chunk: Chunk
    end: End
    error: Error
    credit: Credit
    stats: CallStats
    def __init__(self, call_id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., call: _Optional[_Union[Call, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ..., stats: _Optional[_Union[CallStats, _Mapping]] = ...) -> None: ...

class CallStats(_message.Message):
    __slots__ = ("handler_seconds", "credit_stalls", "metrics")
    HANDLER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_STALLS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    handler_seconds: float
    credit_stalls: int
    metrics: _containers.RepeatedCompositeFieldContainer[MetricUpdate]
    def __init__(self, handler_seconds: _Optional[float] = ..., credit_stalls: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[MetricUpdate, _Mapping]]] = ...) -> None: ...

class MetricUpdate(_message.Message):
    __slots__ = ("kind", "name", "documentation", "label_names", "label_values", "value", "observations", "buckets")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COUNTER: _ClassVar[MetricUpdate.Kind]
        GAUGE: _ClassVar[MetricUpdate.Kind]
        HISTOGRAM: _ClassVar[MetricUpdate.Kind]
    COUNTER: MetricUpdate.Kind
    GAUGE: MetricUpdate.Kind
    HISTOGRAM: MetricUpdate.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTATION_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    LABEL_VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    kind: MetricUpdate.Kind
    name: str
    documentation: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    label_values: _containers.RepeatedScalarFieldContainer[str]
    value: float
    observations: _containers.RepeatedScalarFieldContainer[float]
    buckets: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, kind: _Optional[_Union[MetricUpdate.Kind, str]] = ..., name: _Optional[str] = ..., documentation: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., label_values: _Optional[_Iterable[str]] = ..., value: _Optional[float] = ..., observations: _Optional[_Iterable[float]] = ..., buckets: _Optional[_Iterable[float]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("worker_id", "pid", "handler")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pid: int
    handler: str
    def __init__(self, worker_id: _Optional[str] = ..., pid: _Optional[int] = ..., handler: _Optional[str] = ...) -> None: ...

class Call(_message.Message):
    __slots__ = ("stream", "timeout", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    stream: bool
    timeout: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, stream: _Optional[bool] = ..., timeout: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Credit(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    def __init__(self, chunks: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class End(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retry_after: float
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retry_after: _Optional[float] = ...) -> None: ...
