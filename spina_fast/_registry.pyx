# cython: language_level=3
"""Compact registry structures: string interning and packed socket addresses.

An address is packed into 6 bytes (IPv4) or 18 bytes (IPv6): the raw address followed by the port,
big-endian, which is also exactly what a DNS A/AAAA record and an SRV port field carry.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

import ipaddress


cdef class Interner:
    """Maps equal strings to one shared object."""

    def __cinit__(self):
        self._strings = {}
        self.hits = 0

    def intern(self, str value not None) -> str:
        cdef object shared = self._strings.get(value)
        if shared is None:
            self._strings[value] = value
            return value
        self.hits += 1
        return <str>shared

    def __len__(self) -> int:
        return len(self._strings)

    def __contains__(self, value) -> bool:
        return value in self._strings


def pack_address(str host not None, int port) -> bytes:
    """Pack an IP literal and port into 6 (IPv4) or 18 (IPv6) bytes.

    Raises ValueError naming the problem for a host that is not an IP literal or a port outside 0..65535.
    """
    if port < 0 or port > 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    try:
        raw = ipaddress.ip_address(host).packed
    except ValueError:
        raise ValueError(f"address {host!r} is not an IPv4 or IPv6 literal") from None
    cdef Py_ssize_t size = len(raw)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size + 2)
    cdef unsigned char* buf = <unsigned char*>PyBytes_AS_STRING(out)
    memcpy(buf, PyBytes_AS_STRING(raw), size)
    buf[size] = (port >> 8) & 0xFF
    buf[size + 1] = port & 0xFF
    return out


def unpack_address(const unsigned char[:] packed not None) -> tuple:
    """Inverse of pack_address: (host, port)."""
    cdef Py_ssize_t size = packed.shape[0]
    if size != 6 and size != 18:
        raise ValueError(f"a packed address is 6 or 18 bytes, got {size}")
    cdef int port = (packed[size - 2] << 8) | packed[size - 1]
    host = str(ipaddress.ip_address(bytes(packed[:size - 2])))
    return host, port
