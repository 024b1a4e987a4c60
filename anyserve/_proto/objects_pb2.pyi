from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class FetchObjectRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ObjectChunk(_message.Message):
    __slots__ = ("size", "age_seconds", "data", "sha256")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    size: int
    age_seconds: float
    data: bytes
    sha256: bytes
    def __init__(self, size: _Optional[int] = ..., age_seconds: _Optional[float] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...
