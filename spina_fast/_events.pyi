from collections.abc import Callable
from typing import Any

class EncodeError(ValueError):
    index: int
    reason: str
    cause: BaseException | None
    size: int
    def __init__(self, index: int, reason: str, cause: BaseException | None = ..., size: int = ...) -> None: ...

class Event:
    id: str
    type: str
    source: str
    aggregate_id: str
    time: str
    schema_version: int
    correlation_id: str | None
    topic: str
    partition: int
    offset: int
    def __init__(self, id: str, type: str, source: str, aggregate_id: str, time: str, schema_version: int,
                 correlation_id: str | None, payload: Any, topic: str = ..., partition: int = ..., offset: int = ...,
                 message: Any = ...) -> None: ...
    @property
    def payload(self) -> Any: ...
    @property
    def traceparent(self) -> str | None: ...
    @property
    def message(self) -> Any: ...

class EncodedBatch:
    keys: list[bytes]
    values: list[bytes]
    headers: list[bytes]
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]: ...

class EnvelopeWriter:
    source: str
    trace_headers: bool
    def __init__(self, source: str, trace_headers: bool = ...) -> None: ...
    def next_id(self) -> str: ...
    def encode_batch(self, event_type: str, items: list[Any], schema_version: int, time_text: str, max_bytes: int,
                     traceparent_ok: Callable[[str], object]) -> EncodedBatch: ...

def decode_batch(messages: list[Any]) -> tuple[list[Event], list[tuple[Any, str]], list[Any],
                                                dict[tuple[str, int], int]]: ...
