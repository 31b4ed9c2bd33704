"""Service registry: the compact instance store (Cython), its commands and queries, and the data model.

``RegistryStore`` is a deterministic Raft state machine (``apply(index, command)``, ``snapshot``,
``restore``, ``state_hash``) holding every instance in per-service C arrays; ``encode_register`` /
``encode_deregister`` / ``encode_set_status`` build its commands.
"""

from __future__ import annotations

from spina_fast._registry import (
    MAX_API_VERSIONS,
    MAX_META_KEY_BYTES,
    MAX_META_PAIRS,
    MAX_META_VALUE_BYTES,
    MAX_NAME_BYTES,
    MAX_TAG_BYTES,
    MAX_TAGS,
    STATUSES,
    InstanceView,
    InvalidRegistration,
    RegistryStore,
    VersionRange,
    encode_deregister,
    encode_register,
    encode_set_status,
    parse_version,
)
from spina_fast.registry.model import Registration, describe

__all__ = [
    "MAX_API_VERSIONS",
    "MAX_META_KEY_BYTES",
    "MAX_META_PAIRS",
    "MAX_META_VALUE_BYTES",
    "MAX_NAME_BYTES",
    "MAX_TAGS",
    "MAX_TAG_BYTES",
    "STATUSES",
    "InstanceView",
    "InvalidRegistration",
    "Registration",
    "RegistryStore",
    "VersionRange",
    "describe",
    "encode_deregister",
    "encode_register",
    "encode_set_status",
    "parse_version",
]
