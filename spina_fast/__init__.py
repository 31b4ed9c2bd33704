"""spina_fast: Keiko Spina's registry, discovery, configuration and eventing core."""

from __future__ import annotations

__version__ = "0.1.0"

from spina_fast.config import AgentConfig, HostPort
from spina_fast.errors import InvalidRequest, NotFound, NotLeader, SpinaError, Timeout, Unavailable

__all__ = [
    # configuration
    "AgentConfig",
    "HostPort",
    # errors
    "InvalidRequest",
    "NotFound",
    "NotLeader",
    "SpinaError",
    "Timeout",
    "Unavailable",
    "__version__",
]
