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
