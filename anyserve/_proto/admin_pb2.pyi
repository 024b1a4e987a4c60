from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("id", "handler", "capability", "pid", "state", "inflight", "restarts", "error", "recycles", "last_recycle")
    class CapabilityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECYCLES_FIELD_NUMBER: _ClassVar[int]
    LAST_RECYCLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    handler: str
    capability: _containers.ScalarMap[str, str]
    pid: int
    state: str
    inflight: int
    restarts: int
    error: str
    recycles: int
    last_recycle: str
    def __init__(self, id: _Optional[str] = ..., handler: _Optional[str] = ..., capability: _Optional[_Mapping[str, str]] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., inflight: _Optional[int] = ..., restarts: _Optional[int] = ..., error: _Optional[str] = ..., recycles: _Optional[int] = ..., last_recycle: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartWorkerRequest(_message.Message):
    __slots__ = ("capability", "count")
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    capability: str
    count: int
    def __init__(self, capability: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class StopWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "drain")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    drain: bool
    def __init__(self, worker_id: _Optional[str] = ..., drain: _Optional[bool] = ...) -> None: ...

class WorkersReply(_message.Message):
    __slots__ = ("replica_id", "workers")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, replica_id: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...
