"""DNS front end of the registry (UDP and TCP on one port; names in ``shared/DESIGN.md`` §3).

``DNSServer(registry, domain=..., ttl=..., answer_limit=..., udp=...)`` serves a ``RegistryStore``; ``start(host,
port)`` binds both transports and returns the address, ``close()`` stops it, ``stats`` counts answers by rcode.
With ``udp="thread"`` cache hits are answered by a native thread off the event loop, and the owner calls
``registry_changed(services)`` after every registry change.
The bytes are handled by the Cython ``spina_fast._dns`` module (``DNSEngine``, ``parse_query``).
"""

from __future__ import annotations

from spina_fast._dns import (
    DEFAULT_MAX_UDP_PAYLOAD,
    DNSEngine,
    MalformedQuery,
    Query,
    UDPResponder,
    UDPThread,
    parse_query,
)
from spina_fast.dns.server import DNSServer, DNSStats

__all__ = ["DEFAULT_MAX_UDP_PAYLOAD", "DNSEngine", "DNSServer", "DNSStats", "MalformedQuery", "Query", "UDPResponder",
           "UDPThread", "parse_query"]
