"""The exceptions Spina raises: one base, split by whose fault it is."""

from __future__ import annotations


class SpinaError(Exception):
    """Base of every error Spina raises on purpose. ``code`` is stable and machine-readable."""

    code = "spina_error"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SpinaError):
    """The caller used the API wrong (maps to HTTP 400)."""

    code = "invalid_request"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# The ``code`` of an error answered with an HTTP status and no Spina exception behind it.
HTTP_ERROR_CODES = {
    400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
    414: "uri_too_long", 415: "unsupported_media_type", 431: "headers_too_large",
}


class MalformedRequest(InvalidRequest):
    """The bytes on the wire are not an HTTP/1.x request (400), or exceed a size limit (414, 431)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = HTTP_ERROR_CODES.get(status, "invalid_request")


class NotFound(SpinaError):
    code = "not_found"
    http_status = 404


class NotLeader(SpinaError):
    """This node cannot take the write; ``leader`` is the leader's address if one is known."""

    code = "not_leader"
    http_status = 503

    def __init__(self, message: str, *, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class Unavailable(SpinaError):
    """The cluster could not do it now (no quorum, shutting down); retrying later may work."""

    code = "unavailable"
    http_status = 503


class Timeout(SpinaError):
    code = "timeout"
    http_status = 504
