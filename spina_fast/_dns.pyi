from collections.abc import Callable, Iterable
from typing import Any

TYPE_A: int
TYPE_NS: int
TYPE_SOA: int
TYPE_TXT: int
TYPE_AAAA: int
TYPE_SRV: int
TYPE_OPT: int
TYPE_IXFR: int
TYPE_AXFR: int
TYPE_ANY: int
CLASS_IN: int
CLASS_ANY: int
RCODE_NOERROR: int
RCODE_FORMERR: int
RCODE_SERVFAIL: int
RCODE_NXDOMAIN: int
RCODE_NOTIMP: int
RCODE_REFUSED: int
RCODE_BADVERS: int
RCODE_NAMES: dict[int, str]
UDP_PLAIN_LIMIT: int
DEFAULT_MAX_UDP_PAYLOAD: int
DEFAULT_CACHE_ENTRIES: int
SOA_REFRESH: int
SOA_RETRY: int
SOA_EXPIRE: int
MAX_TTL: int

class MalformedQuery(ValueError):
    rcode: int | None
    def __init__(self, message: str, rcode: int | None) -> None: ...

class Query:
    id: int
    opcode: int
    recursion_desired: bool
    name: str
    qtype: int
    qclass: int
    edns: bool
    udp_payload: int
    edns_version: int
    dnssec_ok: bool

def parse_query(data: bytes | bytearray | memoryview) -> Query: ...

class DNSEngine:
    domain: str
    ttl: int
    answer_limit: int
    max_udp_payload: int
    max_cache_entries: int
    def __init__(self, registry: Any, *, domain: str = "spina", ttl: int = 0, answer_limit: int = 0,
                 max_udp_payload: int = 1232, max_cache_entries: int = 65536) -> None: ...
    def answer(self, query: bytes | bytearray | memoryview, tcp: bool) -> bytes | None: ...
    def servfail(self, query: bytes | bytearray | memoryview) -> bytes | None: ...
    def stats(self) -> dict[str, int]: ...
    def registry_changed(self, services: Iterable[str]) -> None: ...
    @property
    def cached_answers(self) -> int: ...
    def clear_cache(self) -> None: ...

UDP_QUERY_SLOT: int
MAX_DRAIN: int

class UDPResponder:
    send_failures: int
    errors: int
    def __init__(self, engine: DNSEngine, fd: int, batch: int = 64,
                 on_error: Callable[[BaseException], object] | None = None) -> None: ...
    def drain(self) -> int: ...

class UDPThread:
    errors: int
    def __init__(self, engine: DNSEngine, fd: int, batch: int = 64,
                 on_error: Callable[[BaseException], object] | None = None) -> None: ...
    @property
    def pending_fd(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    @property
    def send_failures(self) -> int: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def answer_pending(self) -> int: ...
