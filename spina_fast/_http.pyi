Buffer = bytes | bytearray

class RequestHead:
    method: str
    path: str
    query: str
    escape_offset: int
    http11: bool
    keep_alive: bool
    expect_continue: bool
    delegate: bool
    content_length: int
    end: int

def parse_head(data: Buffer, start: int = 0, max_line: int = 8190, max_field: int = 8190, max_head: int = 65536,
               max_headers: int = 128) -> RequestHead | None: ...
def parse_query(raw: str) -> dict[str, str]: ...
def encode_response(status: int, body: bytes, content_type: str | None, headers: dict[str, str] | None, date: bytes,
                    http11: bool, keep_alive: bool) -> bytes: ...
