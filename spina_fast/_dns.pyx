# cython: language_level=3
"""DNS for the registry: strict query parsing, response encoding, and the answer cache (RFC 1035, 2782, 6891).

``DNSEngine.answer(query, tcp)`` turns one query message into one response message (or ``None``: drop it).
Names (``spina`` stands for the configured domain; matching is ASCII case-insensitive):

- ``<name>.service.spina`` A / AAAA / ANY / SRV / TXT of the instances that are passing or warning;
- ``<tag>.<name>.service.spina`` the same, filtered by tag; ``_<name>._<tag>.service.spina`` (RFC 2782 style,
  ``_tcp`` meaning no tag filter);
- ``<hex address>.addr.spina`` A / AAAA: the SRV targets, so every target of an answer resolves;
- ``spina`` itself answers its SOA; everything else in the zone is NXDOMAIN with the SOA in the authority
  section, and names outside the zone are REFUSED (this server does not recurse).

A service with no healthy instance is NXDOMAIN, as in Consul. Answers are cached as whole messages keyed by
the lowercased question (name, type, class) and the query's EDNS form, and each cached answer remembers the
registry indexes it was built from: a service whose ``service_index`` moved is rebuilt before it is served,
so an answer is never older than the registry. Per request only the id, the RD / CD bits and the question's
letter case (RFC 4343 §4.1: the question is echoed as asked) are patched into a copy of the cached bytes.

``UDPThread`` serves those cached answers over UDP from a native thread without the GIL (see "the serving
thread" below); its copy of the cache is invalidated by push (``DNSEngine.registry_changed``).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror
from posix.signal cimport sigfillset, sigset_t
from posix.unistd cimport close, getpid, read, write

import re

TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16
RCODE_NAMES = {0: "noerror", 1: "formerr", 2: "servfail", 3: "nxdomain", 4: "notimp", 5: "refused", 16: "badvers"}

# Without EDNS0 a UDP answer is at most 512 bytes (RFC 1035 §4.2.1); with it, the smaller of the client's
# buffer and ours (RFC 6891 §6.2.5). 1232 is the DNS Flag Day 2020 size that avoids IP fragmentation.
UDP_PLAIN_LIMIT = 512
DEFAULT_MAX_UDP_PAYLOAD = 1232
DEFAULT_CACHE_ENTRIES = 65536
SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400
MAX_TTL = 0x7FFFFFFF  # RFC 2181 §8

cdef enum:
    T_A = 1
    T_SOA = 6
    T_TXT = 16
    T_AAAA = 28
    T_SRV = 33
    T_OPT = 41
    T_IXFR = 251
    T_AXFR = 252
    T_ANY = 255
    R_NOERROR = 0
    R_FORMERR = 1
    R_SERVFAIL = 2
    R_NXDOMAIN = 3
    R_NOTIMP = 4
    R_REFUSED = 5
    R_BADVERS = 16
    FLAG_QR = 0x8000
    FLAG_AA = 0x0400
    FLAG_TC = 0x0200
    FLAG_RD = 0x0100
    POINTER_LIMIT = 0x4000         # a compression pointer has 14 bits of offset

cdef unsigned char _LOWER[256]
for _c in range(256):
    _LOWER[_c] = _c + 32 if 65 <= _c <= 90 else _c

cdef bytes _ASCII_LOWER = bytes(_LOWER[_c] for _c in range(256))
_DOMAIN_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class MalformedQuery(ValueError):
    """A message that is not a query this server can answer. ``rcode`` is what the server answers
    (FORMERR 1, NOTIMP 4, BADVERS 16), or ``None`` when the message is dropped unanswered."""

    def __init__(self, message, rcode):
        super().__init__(message)
        self.rcode = rcode


cdef class Query:
    """The parts of a query message that decide its answer; ``name`` is lowercased, dotted, without the root."""

    def __repr__(self) -> str:
        return (f"Query(id={self.id}, name={self.name!r}, qtype={self.qtype}, qclass={self.qclass}, "
                f"edns={self.edns}, udp_payload={self.udp_payload})")


# --- parsing ---------------------------------------------------------------------------------------------------

cdef inline uint16_t _u16(const unsigned char* p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef inline uint32_t _u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put16(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = (value >> 8) & 0xFF
    p[1] = value & 0xFF


cdef inline void _put32(unsigned char* p, uint32_t value) noexcept nogil:
    p[0] = value >> 24
    p[1] = (value >> 16) & 0xFF
    p[2] = (value >> 8) & 0xFF
    p[3] = value & 0xFF


cdef Py_ssize_t _read_name(const unsigned char* data, Py_ssize_t size, Py_ssize_t offset, unsigned char* out,
                           Py_ssize_t* out_length, Py_ssize_t* labels) noexcept nogil:
    """Read the (possibly compressed) name at ``offset``: the offset just past it in the message, or -1 when
    it is malformed. With ``out`` set, the name is written there uncompressed and ASCII-lowercased."""
    cdef Py_ssize_t position = offset, run_start = offset, end = -1, written = 0, target, i
    cdef unsigned char length
    labels[0] = 0
    while True:
        if position >= size:
            return -1
        length = data[position]
        if length == 0:
            if out != NULL:
                out[written] = 0
            written += 1
            if end < 0:
                end = position + 1
            break
        if (length & 0xC0) == 0xC0:
            if position + 1 >= size:
                return -1
            target = ((length & 0x3F) << 8) | data[position + 1]
            # RFC 1035 §4.1.4: a pointer names a prior occurrence. Requiring every jump to land before the start
            # of the run of labels it was met in makes the targets strictly decrease: no chain can loop.
            if target < HEADER_BYTES or target >= run_start:
                return -1
            if end < 0:
                end = position + 2
            position = target
            run_start = target
            continue
        if length & 0xC0:
            return -1  # 0x40 / 0x80 label types: extended labels, never standardised (RFC 6891 §5)
        if position + 1 + length > size or written + length + 2 > MAX_NAME_WIRE:
            return -1
        if out != NULL:
            out[written] = length
            for i in range(length):
                out[written + 1 + i] = _LOWER[data[position + 1 + i]]
        written += length + 1
        labels[0] += 1
        position += length + 1
    out_length[0] = written
    return end


cdef ParseStatus _parse(const unsigned char* data, Py_ssize_t size, ParsedQuery* parsed) noexcept nogil:
    cdef Py_ssize_t position, owner_length, owner_labels, rdata_end, record
    cdef uint16_t questions, answers, authorities, additionals, rtype, rdlength, option_length
    cdef uint32_t ttl
    parsed.error = NULL
    parsed.edns = False
    parsed.dnssec_ok = False
    parsed.edns_version = 0
    parsed.udp_payload = 0
    parsed.qname_length = 0
    if size < HEADER_BYTES:
        parsed.error = "shorter than a DNS header"
        return PARSE_DROP
    parsed.id = _u16(data)
    parsed.flags = _u16(data + 2)
    if parsed.flags & FLAG_QR:
        # Answering a response could start a loop between two servers (RFC 1035 §7.3 discards them too).
        parsed.error = "a response, not a query"
        return PARSE_DROP
    if (parsed.flags >> 11) & 0xF:
        parsed.error = "opcode is not QUERY"
        return PARSE_NOTIMP
    questions, answers = _u16(data + 4), _u16(data + 6)
    authorities, additionals = _u16(data + 8), _u16(data + 10)
    if questions != 1:
        parsed.error = "a query must carry exactly one question"
        return PARSE_FORMERR
    if answers or authorities:
        parsed.error = "a query carries no answer or authority records"
        return PARSE_FORMERR
    position = _read_name(data, size, HEADER_BYTES, parsed.qname, &parsed.qname_length, &parsed.labels)
    if position < 0:
        parsed.error = "malformed question name"
        return PARSE_FORMERR
    if position + 4 > size:
        parsed.error = "question cut short"
        return PARSE_FORMERR
    parsed.qtype = _u16(data + position)
    parsed.qclass = _u16(data + position + 2)
    position += 4
    for record in range(additionals):
        position = _read_name(data, size, position, NULL, &owner_length, &owner_labels)
        if position < 0:
            parsed.error = "malformed name in the additional section"
            return PARSE_FORMERR
        if position + 10 > size:
            parsed.error = "additional record cut short"
            return PARSE_FORMERR
        rtype = _u16(data + position)
        ttl = _u32(data + position + 4)
        rdlength = _u16(data + position + 8)
        if position + 10 + rdlength > size:
            parsed.error = "additional record data cut short"
            return PARSE_FORMERR
        if rtype == T_OPT:
            if parsed.edns:
                parsed.error = "more than one OPT record"  # RFC 6891 §6.1.1
                return PARSE_FORMERR
            if owner_labels != 0:
                parsed.error = "OPT record owner is not the root"
                return PARSE_FORMERR
            parsed.edns = True
            parsed.udp_payload = _u16(data + position + 2)
            parsed.edns_version = (ttl >> 16) & 0xFF
            parsed.dnssec_ok = (ttl >> 15) & 1
            # Options are skipped (RFC 6891 §6.1.2: unknown ones are ignored), but must tile the RDATA exactly.
            rdata_end = position + 10 + rdlength
            position += 10
            while position < rdata_end:
                if position + 4 > rdata_end:
                    parsed.error = "EDNS option header cut short"
                    return PARSE_FORMERR
                option_length = _u16(data + position + 2)
                position += 4 + option_length
                if position > rdata_end:
                    parsed.error = "EDNS option runs past its record"
                    return PARSE_FORMERR
        else:
            position += 10 + rdlength
    if position != size:
        parsed.error = "bytes after the last record"
        return PARSE_FORMERR
    if parsed.edns and parsed.edns_version != 0:
        parsed.error = "EDNS version is not 0"
        return PARSE_BADVERS
    return PARSE_OK


cdef str _dotted(const unsigned char* wire, Py_ssize_t length):
    cdef list parts = []
    cdef Py_ssize_t position = 0
    while position < length and wire[position]:
        parts.append(wire[position + 1:position + 1 + wire[position]].decode("utf-8", "backslashreplace"))
        position += wire[position] + 1
    return ".".join(parts)


def parse_query(data) -> Query:
    """Parse one query message strictly; raises ``MalformedQuery`` naming the problem and the answer's rcode."""
    cdef bytes raw = bytes(data)
    cdef ParsedQuery parsed
    cdef ParseStatus status = _parse(<const unsigned char*>PyBytes_AS_STRING(raw), len(raw), &parsed)
    if status != PARSE_OK:
        rcode = {PARSE_DROP: None, PARSE_FORMERR: R_FORMERR, PARSE_NOTIMP: R_NOTIMP, PARSE_BADVERS: R_BADVERS}[status]
        raise MalformedQuery(f"DNS query: {parsed.error.decode('ascii')}", rcode)
    cdef Query query = Query.__new__(Query)
    query.id = parsed.id
    query.opcode = (parsed.flags >> 11) & 0xF
    query.recursion_desired = bool(parsed.flags & FLAG_RD)
    query.name = _dotted(parsed.qname, parsed.qname_length)
    query.qtype = parsed.qtype
    query.qclass = parsed.qclass
    query.edns = parsed.edns
    query.udp_payload = parsed.udp_payload
    query.edns_version = parsed.edns_version
    query.dnssec_ok = parsed.dnssec_ok
    return query


cdef list _labels(bytes wire):
    cdef list labels = []
    cdef Py_ssize_t position = 0, length
    while wire[position]:
        length = wire[position]
        labels.append(wire[position + 1:position + 1 + length])
        position += length + 1
    return labels


# --- encoding --------------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _rr_head(unsigned char* out, Py_ssize_t position, Py_ssize_t owner, uint16_t rtype,
                                uint32_t ttl) noexcept:
    """Owner as a compression pointer, type, class IN, TTL and an RDLENGTH filled in later; returns the RDATA offset."""
    _put16(out + position, 0xC000 | owner)
    _put16(out + position + 2, rtype)
    _put16(out + position + 4, 1)
    _put32(out + position + 6, ttl)
    return position + 12


cdef inline void _rr_close(unsigned char* out, Py_ssize_t rdata, Py_ssize_t end) noexcept:
    _put16(out + rdata - 2, end - rdata)


cdef Py_ssize_t _write_soa(unsigned char* out, Py_ssize_t position, Py_ssize_t cap, Py_ssize_t domain,
                           uint32_t ttl, uint32_t serial) noexcept:
    # owner 2 + fixed 10 + "ns" 3 + pointer 2 + "hostmaster" 11 + pointer 2 + five counters 20
    if position + 50 > cap:
        return -1
    cdef Py_ssize_t rdata = _rr_head(out, position, domain, T_SOA, ttl)
    position = rdata
    memcpy(out + position, b"\x02ns", 3)
    _put16(out + position + 3, 0xC000 | domain)
    memcpy(out + position + 5, b"\x0ahostmaster", 11)
    _put16(out + position + 16, 0xC000 | domain)
    position += 18
    _put32(out + position, serial)
    _put32(out + position + 4, SOA_REFRESH)
    _put32(out + position + 8, SOA_RETRY)
    _put32(out + position + 12, SOA_EXPIRE)
    # RFC 2308 §5: the negative-caching TTL is the smaller of the SOA's TTL and its MINIMUM.
    _put32(out + position + 16, ttl)
    position += 20
    _rr_close(out, rdata, position)
    return position


cdef class _Plan:
    """What one answer is encoded from (fields in _dns.pxd)."""


cdef class _Entry:
    """One cached answer and the registry indexes it was built from (fields in _dns.pxd)."""


cdef class _Names:
    """Where SRV target names were written, so that later names point to them (RFC 1035 §4.1.4)."""
    cdef dict targets
    cdef Py_ssize_t addr_label
    cdef Py_ssize_t domain

    def __cinit__(self, Py_ssize_t domain):
        self.targets = {}
        self.addr_label = -1
        self.domain = domain

    cdef Py_ssize_t write(self, unsigned char* out, Py_ssize_t position, Py_ssize_t cap, bytes address,
                          Py_ssize_t* new_target, Py_ssize_t* new_addr_label) except -2:
        """Write ``<hex address>.addr.<domain>`` as compressed as the message allows; -1 when it does not fit.
        Offsets that later names may point to are returned, to be remembered only once the record fits."""
        cdef object known = self.targets.get(address)
        cdef bytes label
        new_target[0] = -1
        new_addr_label[0] = -1
        if known is not None:
            if position + 2 > cap:
                return -1
            _put16(out + position, 0xC000 | <Py_ssize_t>known)
            return position + 2
        label = address.hex().encode("ascii")
        if position + 1 + len(label) + 7 > cap:
            return -1
        if position < POINTER_LIMIT:
            new_target[0] = position
        out[position] = len(label)
        memcpy(out + position + 1, PyBytes_AS_STRING(label), len(label))
        position += 1 + len(label)
        if self.addr_label >= 0:
            _put16(out + position, 0xC000 | self.addr_label)
            return position + 2
        if position < POINTER_LIMIT:
            new_addr_label[0] = position
        memcpy(out + position, b"\x04addr", 5)
        _put16(out + position + 5, 0xC000 | self.domain)
        return position + 7

    cdef void remember(self, bytes address, Py_ssize_t new_target, Py_ssize_t new_addr_label):
        if new_target >= 0:
            self.targets[address] = new_target
        if new_addr_label >= 0:
            self.addr_label = new_addr_label


cdef Py_ssize_t _write_address(unsigned char* out, Py_ssize_t position, Py_ssize_t cap, Py_ssize_t owner,
                               bytes address, uint32_t ttl) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(address)
    if position + 12 + size > cap:
        return -1
    cdef Py_ssize_t rdata = _rr_head(out, position, owner, T_A if size == 4 else T_AAAA, ttl)
    _put16(out + rdata - 2, size)
    memcpy(out + rdata, PyBytes_AS_STRING(address), size)
    return rdata + size


cdef Py_ssize_t _write_txt(unsigned char* out, Py_ssize_t position, Py_ssize_t cap, tuple strings,
                           uint32_t ttl) except -2:
    if position + 12 > cap:
        return -1
    cdef Py_ssize_t rdata = _rr_head(out, position, HEADER_BYTES, T_TXT, ttl), chunk, start, length
    cdef bytes text
    position = rdata
    for text in strings:
        length = len(text)
        start = 0
        # A character-string holds 255 bytes (RFC 1035 §3.3); longer text continues in the next one.
        while True:
            chunk = min(255, length - start)
            if position + 1 + chunk > cap:
                return -1
            out[position] = chunk
            memcpy(out + position + 1, PyBytes_AS_STRING(text) + start, chunk)
            position += 1 + chunk
            start += chunk
            if start >= length:
                break
    _rr_close(out, rdata, position)
    return position


# --- the engine ------------------------------------------------------------------------------------------------

cdef class DNSEngine:
    """Answers DNS queries from a ``RegistryStore`` (any object with its ``instances``, ``service_index``,
    ``services`` and ``index``). Not thread-safe: call it from the thread that applies registry changes."""

    def __cinit__(self):
        self._buffer = <unsigned char*>PyMem_Malloc(MAX_MESSAGE + 1)
        if self._buffer is NULL:
            raise MemoryError()
        memset(self._rcodes, 0, sizeof(self._rcodes))

    def __dealloc__(self):
        PyMem_Free(self._buffer)

    def __init__(self, registry, *, str domain="spina", ttl=0, answer_limit=0,
                 max_udp_payload=DEFAULT_MAX_UDP_PAYLOAD, max_cache_entries=DEFAULT_CACHE_ENTRIES):
        labels = domain.strip(".").lower().split(".")
        if not all(_DOMAIN_LABEL.match(label) for label in labels):
            raise ValueError(f"DNS domain {domain!r} must be dot-separated labels of 1-63 letters, digits or '-'")
        wire = b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\x00"
        # The longest name served is <tag>.<name>.service.<domain>: leave it room below 255 bytes.
        if len(wire) > 128:
            raise ValueError(f"DNS domain {domain!r} is {len(wire)} bytes on the wire; at most 128 are allowed")
        if not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"DNS ttl {ttl} is outside 0..{MAX_TTL}")
        if answer_limit < 0:
            raise ValueError(f"DNS answer limit {answer_limit} is negative (0 means no limit)")
        if not UDP_PLAIN_LIMIT <= max_udp_payload <= MAX_MESSAGE:
            raise ValueError(f"DNS max UDP payload {max_udp_payload} is outside {UDP_PLAIN_LIMIT}..{MAX_MESSAGE}")
        if max_cache_entries < 1:
            raise ValueError(f"DNS cache size {max_cache_entries} must be at least 1")
        self._registry = registry
        self._service_index = registry.service_index
        self._instances = registry.instances
        self.domain = ".".join(labels)
        self._domain_wire = wire
        self.ttl = ttl
        self.answer_limit = answer_limit
        self.max_udp_payload = max_udp_payload
        self.max_cache_entries = max_cache_entries
        self._cache = {}
        self._folded = {}
        self._folded_valid = False

    # --- the hot path ------------------------------------------------------------------------------------------

    cpdef object answer(self, object query, bint tcp):
        """The response to one query message (without the TCP length prefix), or None to drop it."""
        if not PyBytes_CheckExact(query):
            query = bytes(query)
        cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(query)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(query)
        cdef ParsedQuery parsed
        cdef ParseStatus status = _parse(data, size, &parsed)
        if tcp:
            self._tcp_queries += 1
        else:
            self._udp_queries += 1
        if status != PARSE_OK:
            if status == PARSE_DROP:
                self._dropped += 1
                return None
            return self._error(data, size, &parsed, status)
        cdef int edns = (2 if parsed.dnssec_ok else 1) if parsed.edns else 0
        cdef Py_ssize_t name_length = parsed.qname_length
        cdef bytes key = PyBytes_FromStringAndSize(NULL, name_length + 5)
        cdef unsigned char* raw_key = <unsigned char*>PyBytes_AS_STRING(key)
        memcpy(raw_key, parsed.qname, name_length)
        _put16(raw_key + name_length, parsed.qtype)
        _put16(raw_key + name_length + 2, parsed.qclass)
        raw_key[name_length + 4] = edns
        cdef PyObject* found = PyDict_GetItem(self._cache, key)
        cdef _Entry entry
        if found is not NULL and self._is_valid(<_Entry>found):
            entry = <_Entry>found
            self._cache_hits += 1
        else:
            self._cache_misses += 1
            entry = self._resolve(key[:name_length], parsed.qtype, parsed.qclass, edns)
            if found is NULL and len(self._cache) >= self.max_cache_entries:
                # Names are chosen by clients: bound the cache. Dropping it whole costs one rebuild per hot name.
                self._cache.clear()
            self._cache[key] = entry
        cdef Py_ssize_t limit = MAX_MESSAGE if tcp else _udp_limit(&parsed, self.max_udp_payload)
        cdef bytes cached = self._select(entry, limit)
        if self._native is not NULL and not tcp:
            # Asked by the serving thread (a miss there): from now on it answers this question itself.
            self._fill_native(&parsed, entry, limit)
        cdef Py_ssize_t length = PyBytes_GET_SIZE(cached)
        cdef bytes response = PyBytes_FromStringAndSize(PyBytes_AS_STRING(cached), length)
        cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(response)
        out[0] = data[0]
        out[1] = data[1]
        out[2] = (out[2] & 0xFE) | (data[2] & 0x01)  # RD is copied (RFC 1035 §4.1.1)
        out[3] = (out[3] & 0xEF) | (data[3] & 0x10)  # CD is copied (RFC 4035 §3.1.6)
        memcpy(out + HEADER_BYTES, data + HEADER_BYTES, name_length)
        self._rcodes[entry.rcode] += 1
        if out[2] & 0x02:
            self._truncated += 1
        return response

    cdef bint _is_valid(self, _Entry entry) except -1:
        if entry.validation == VALID_SERVICE:
            return <uint64_t>self._service_index(entry.service) == entry.index
        if entry.validation == VALID_ALWAYS:
            return True
        if entry.validation == VALID_REGISTRY:
            return <uint64_t>self._registry.index == entry.index
        return (<uint64_t>self._service_index(entry.service) == entry.index
                and <uint64_t>self._service_index(entry.lower) == entry.lower_index)

    cdef bytes _select(self, _Entry entry, Py_ssize_t limit):
        cdef Py_ssize_t offset = 0
        if entry.variants is not None:
            offset = entry.next_offset
            entry.next_offset = (offset + 1) % len(entry.variants)
        return self._variant(entry, offset, limit)

    cdef bytes _variant(self, _Entry entry, Py_ssize_t offset, Py_ssize_t limit):
        """The answer of ``entry`` rotated by ``offset`` and cut to ``limit`` bytes, encoded on first use."""
        cdef bytes chosen
        if entry.variants is None:
            chosen = entry.full
        else:
            chosen = entry.variants[offset]
            if chosen is None:
                chosen = self._encode(entry.plan, offset, MAX_MESSAGE)
                entry.variants[offset] = chosen
        if PyBytes_GET_SIZE(chosen) <= limit:
            return chosen
        if entry.limited is None:
            entry.limited = {}
        cdef Py_ssize_t size_key = (offset << 17) | limit
        cut = entry.limited.get(size_key)
        if cut is None:
            cut = self._encode(entry.plan, offset, limit)
            entry.limited[size_key] = cut
        return cut

    # --- errors --------------------------------------------------------------------------------------------------

    cdef bytes _error(self, const unsigned char* data, Py_ssize_t size, ParsedQuery* parsed, int status):
        cdef unsigned char* out = self._buffer
        cdef Py_ssize_t position = HEADER_BYTES, question
        cdef uint16_t flags = FLAG_QR | (parsed.flags & (0x7800 | FLAG_RD))
        memset(out, 0, HEADER_BYTES)
        _put16(out, parsed.id)
        if status == PARSE_BADVERS:
            # RFC 6891 §6.1.3: BADVERS is 16, its upper 8 bits in the OPT TTL; the OPT names our version, 0.
            question = parsed.qname_length + 4
            memcpy(out + position, data + HEADER_BYTES, question)
            position += question
            memcpy(out + position, b"\x00\x00\x29", 3)
            _put16(out + position + 3, self.max_udp_payload)
            _put32(out + position + 5, <uint32_t>1 << 24)
            _put16(out + position + 9, 0)
            position += OPT_BYTES
            _put16(out + 4, 1)
            _put16(out + 10, 1)
            self._rcodes[R_BADVERS] += 1
        else:
            # The question is not echoed: it may be what was malformed (RFC 1035 leaves it to the server).
            flags |= R_NOTIMP if status == PARSE_NOTIMP else R_FORMERR
            self._rcodes[R_NOTIMP if status == PARSE_NOTIMP else R_FORMERR] += 1
        _put16(out + 2, flags)
        return PyBytes_FromStringAndSize(<char*>out, position)

    def servfail(self, query) -> bytes | None:
        """A SERVFAIL for a query whose answer could not be built (the caller logs why); None if undecodable."""
        cdef bytes raw = bytes(query)
        if len(raw) < HEADER_BYTES or raw[2] & 0x80:
            self._dropped += 1
            return None
        self._rcodes[R_SERVFAIL] += 1
        return raw[:2] + bytes([0x80 | (raw[2] & 0x79), R_SERVFAIL]) + bytes(8)

    # --- resolution (cache misses) ---------------------------------------------------------------------------

    cdef _Entry _resolve(self, bytes qname, uint16_t qtype, uint16_t qclass, int edns):
        cdef _Plan plan = _Plan.__new__(_Plan)
        cdef _Entry entry = _Entry.__new__(_Entry)
        plan.qname = qname
        plan.qtype = qtype
        plan.qclass = qclass
        plan.edns = edns
        plan.records = []
        plan.domain_offset = -1
        entry.plan = plan
        entry.validation = VALID_ALWAYS
        cdef list labels = _labels(qname)
        cdef list zone = _labels(self._domain_wire)
        cdef Py_ssize_t inner_count = len(labels) - len(zone)
        if qclass not in (CLASS_IN, CLASS_ANY) or inner_count < 0 or labels[inner_count:] != zone \
                or qtype in (T_AXFR, T_IXFR):
            # Not our zone or class, or a zone transfer: refused, and no authority data is given away.
            self._finish(entry, R_REFUSED)
            return entry
        plan.domain_offset = HEADER_BYTES + len(qname) - len(self._domain_wire)
        cdef list inner = labels[:inner_count]
        if inner_count == 0:
            self._depend_on_registry(entry)
            if qtype in (T_SOA, T_ANY):
                plan.soa_answer = True
            else:
                plan.soa_authority = True
            self._finish(entry, R_NOERROR)
        elif inner_count in (2, 3) and inner[-1] == b"service":
            self._resolve_service(entry, inner)
        elif inner_count == 2 and inner[1] == b"addr":
            self._resolve_address(entry, inner[0])
        elif inner_count == 1 and inner[0] in (b"service", b"addr"):
            # Empty non-terminals: names exist below them, so NODATA rather than NXDOMAIN (RFC 8020).
            self._depend_on_registry(entry)
            plan.soa_authority = True
            self._finish(entry, R_NOERROR)
        else:
            self._depend_on_registry(entry)
            plan.soa_authority = True
            self._finish(entry, R_NXDOMAIN)
        return entry

    cdef int _depend_on_registry(self, _Entry entry) except -1:
        entry.validation = VALID_REGISTRY
        entry.index = self._registry.index
        entry.plan.serial = entry.index & 0xFFFFFFFF
        return 0

    cdef int _finish(self, _Entry entry, int rcode) except -1:
        cdef _Plan plan = entry.plan
        cdef Py_ssize_t count = len(plan.records)
        plan.rcode = rcode
        entry.rcode = rcode
        plan.select = min(count, self.answer_limit) if self.answer_limit else count
        if plan.select < count:
            entry.variants = [None] * count
            entry.next_offset = 0
        else:
            entry.full = self._encode(plan, 0, MAX_MESSAGE)
        return 0

    cdef int _resolve_service(self, _Entry entry, list inner) except -1:
        cdef _Plan plan = entry.plan
        cdef bytes service_label, tag_label = None
        if len(inner) == 2:
            service_label = inner[0]
        elif inner[0][:1] == b"_" and inner[1][:1] == b"_":
            service_label = inner[0][1:]
            tag_label = None if inner[1] == b"_tcp" else inner[1][1:]
        else:
            tag_label, service_label = inner[0], inner[1]
        try:
            lower = service_label.decode("utf-8")
        except UnicodeDecodeError:
            lower = None  # no registered name encodes to these bytes
        service = None
        if lower:
            if self._instances(lower, limit=1):
                service = lower
                entry.validation = VALID_SERVICE
            else:
                service = self._fold(lower)
                entry.validation = VALID_FOLDED
                entry.lower = lower
                entry.lower_index = self._service_index(lower)
        if service is None:
            # No such service: any registration may create it, under any letter case.
            self._depend_on_registry(entry)
            plan.soa_authority = True
            self._finish(entry, R_NXDOMAIN)
            return 0
        entry.service = service
        entry.index = self._service_index(service)
        plan.serial = entry.index & 0xFFFFFFFF
        views = self._instances(service, health="healthy")
        if tag_label is not None:
            views = [view for view in views
                     if any(text.encode("utf-8").translate(_ASCII_LOWER) == tag_label for text in view.tags)]
        if not views:
            plan.soa_authority = True
            self._finish(entry, R_NXDOMAIN)
            return 0
        cdef list records = plan.records
        seen = set()
        cdef uint16_t qtype = plan.qtype
        for view in views:
            address = view.packed_address[:-2]
            if qtype == T_SRV:
                record = (T_SRV, view.weight, view.port, address)
            elif qtype == T_TXT:
                record = (T_TXT, (b"version=" + view.version.encode("utf-8"),
                                  b"instance=" + view.instance_id.encode("utf-8")))
            elif (qtype == T_A and len(address) == 4) or (qtype == T_AAAA and len(address) == 16) \
                    or qtype == T_ANY:
                record = (T_A if len(address) == 4 else T_AAAA, address)
            else:
                continue
            # An RRset holds no duplicates (RFC 2181 §5): instances sharing an address give one A record.
            if record not in seen:
                seen.add(record)
                records.append(record)
        if not records:
            plan.soa_authority = True
        self._finish(entry, R_NOERROR)
        return 0

    cdef int _resolve_address(self, _Entry entry, bytes label) except -1:
        cdef _Plan plan = entry.plan
        cdef bytes address = None
        if len(label) in (8, 32) and all(character in b"0123456789abcdef" for character in label):
            address = bytes.fromhex(label.decode("ascii"))
        if address is None:
            self._depend_on_registry(entry)
            plan.soa_authority = True
            self._finish(entry, R_NXDOMAIN)
            return 0
        if plan.qtype == T_ANY or plan.qtype == (T_A if len(address) == 4 else T_AAAA):
            plan.records.append((T_A if len(address) == 4 else T_AAAA, address))
        else:
            self._depend_on_registry(entry)
            plan.soa_authority = True
        self._finish(entry, R_NOERROR)
        return 0

    cdef object _fold(self, str lower):
        """The registered service whose name lowercases (ASCII only, like DNS) to ``lower``, or None."""
        current = self._registry.index
        if not self._folded_valid or <uint64_t>current != self._folded_index:
            folded = {}
            for name in self._registry.services():
                folded.setdefault(name.encode("utf-8").translate(_ASCII_LOWER).decode("utf-8"), name)
            self._folded = folded
            self._folded_index = current
            self._folded_valid = True
        return self._folded.get(lower)

    # --- encoding --------------------------------------------------------------------------------------------

    cdef bytes _encode(self, _Plan plan, Py_ssize_t offset, Py_ssize_t limit):
        """The whole answer of ``plan`` rotated by ``offset``, cut to ``limit`` bytes: answer records that do not
        fit set TC (RFC 2181 §9); additional records that do not fit are left out without it."""
        cdef unsigned char* out = self._buffer
        cdef Py_ssize_t reserve = OPT_BYTES if plan.edns else 0
        cdef Py_ssize_t cap = limit - reserve
        cdef Py_ssize_t qname_length = len(plan.qname), position, written, rdata, index
        cdef Py_ssize_t count = len(plan.records), new_target, new_addr_label
        cdef uint32_t ttl = self.ttl
        cdef uint16_t flags = FLAG_QR | plan.rcode
        cdef int answers = 0, authorities = 0, additionals = 0
        cdef bint truncated = False
        cdef tuple record
        cdef bytes address
        cdef list included = []
        cdef _Names names = _Names(plan.domain_offset)
        if plan.domain_offset >= 0:
            flags |= FLAG_AA
        memset(out, 0, HEADER_BYTES)
        memcpy(out + HEADER_BYTES, PyBytes_AS_STRING(plan.qname), qname_length)
        position = HEADER_BYTES + qname_length
        _put16(out + position, plan.qtype)
        _put16(out + position + 2, plan.qclass)
        position += 4
        if plan.soa_answer:
            position = _write_soa(out, position, cap, plan.domain_offset, ttl, plan.serial)
            answers = 1
        for index in range(plan.select):
            record = plan.records[(offset + index) % count]
            if record[0] == T_SRV:
                address = record[3]
                written = -1
                if position + 18 <= cap:
                    rdata = _rr_head(out, position, HEADER_BYTES, T_SRV, ttl)
                    _put16(out + rdata, 1)  # priority: all instances are equal
                    _put16(out + rdata + 2, record[1])
                    _put16(out + rdata + 4, record[2])
                    written = names.write(out, rdata + 6, cap, address, &new_target, &new_addr_label)
                    if written >= 0:
                        _rr_close(out, rdata, written)
                        names.remember(address, new_target, new_addr_label)
                        if address not in included:
                            included.append(address)
            elif record[0] == T_TXT:
                written = _write_txt(out, position, cap, record[1], ttl)
            else:
                written = _write_address(out, position, cap, HEADER_BYTES, record[1], ttl)
            if written < 0:
                truncated = True
                break
            position = written
            answers += 1
        if not truncated and plan.soa_authority:
            written = _write_soa(out, position, cap, plan.domain_offset, ttl, plan.serial)
            if written < 0:
                truncated = True
            else:
                position = written
                authorities = 1
        if not truncated:
            # RFC 2782: the targets' addresses go in the additional section, as far as they fit.
            for address in included:
                target = names.targets.get(address)
                if target is not None:
                    written = _write_address(out, position, cap, <Py_ssize_t>target, address, ttl)
                else:
                    written = -1
                if written < 0:
                    break
                position = written
                additionals += 1
        if plan.edns:
            out[position] = 0
            _put16(out + position + 1, T_OPT)
            _put16(out + position + 3, self.max_udp_payload)
            _put32(out + position + 5, 0x8000 if plan.edns == 2 else 0)
            _put16(out + position + 9, 0)
            position += OPT_BYTES
            additionals += 1
        if truncated:
            flags |= FLAG_TC
        _put16(out + 2, flags)
        _put16(out + 4, 1)
        _put16(out + 6, answers)
        _put16(out + 8, authorities)
        _put16(out + 10, additionals)
        return PyBytes_FromStringAndSize(<char*>out, position)

    # --- introspection -------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Answers by rcode name, plus dropped messages, truncated answers, cache hits / misses and the
        messages received over each transport (the serving thread's answers included)."""
        cdef uint64_t rcodes[RCODE_SLOTS]
        cdef uint64_t hits = 0, truncated = 0, dropped = 0, overflow = 0
        memset(rcodes, 0, sizeof(rcodes))
        cdef NativeUDP* native = self._native
        if native is not NULL:
            pthread_mutex_lock(&native.lock)
            memcpy(rcodes, native.rcodes, sizeof(rcodes))
            hits, truncated, dropped, overflow = native.hits, native.truncated, native.dropped, native.overflow
            pthread_mutex_unlock(&native.lock)
        counts = {name: self._rcodes[code] + rcodes[code] for code, name in RCODE_NAMES.items()}
        counts.update(dropped=self._dropped + dropped + overflow, truncated=self._truncated + truncated,
                      cache_hits=self._cache_hits + hits, cache_misses=self._cache_misses,
                      udp_queries=self._udp_queries + hits + dropped + overflow, tcp_queries=self._tcp_queries,
                      udp_overflow=self._overflow + overflow)
        return counts

    def registry_changed(self, services) -> None:
        """Told synchronously after every applied registry change, with the names of the services it touched:
        the serving thread's answers that depend on them (and every answer that depends on the registry as a
        whole: unknown names, names matched by letter case) stop being served before this returns. Answers on
        the event loop need no telling: they are checked against the registry's indexes on each use."""
        cdef NativeUDP* native = self._native
        if native is NULL:
            return
        cdef list slots = [_service_slot(service) for service in services]
        cdef Py_ssize_t slot
        pthread_mutex_lock(&native.lock)
        for slot in slots:
            native.service_generations[slot] += 1
        native.registry_generation += 1
        pthread_mutex_unlock(&native.lock)

    cdef int _fill_native(self, ParsedQuery* parsed, _Entry entry, Py_ssize_t limit) except -1:
        """Give the serving thread this answer (every rotation of it) for the question and size class of
        ``parsed``. Answers too large for its reply slots or with too many rotations stay on the loop."""
        cdef NativeUDP* native = self._native
        cdef Py_ssize_t count = 1 if entry.variants is None else len(entry.variants), offset
        if count > NATIVE_MAX_VARIANTS:
            return 0
        cdef list messages = []
        cdef bytes message
        for offset in range(count):
            message = self._variant(entry, offset, limit)
            if PyBytes_GET_SIZE(message) > native.reply_size:
                return 0
            messages.append(message)
        cdef unsigned char key[NATIVE_KEY_MAX]
        cdef Py_ssize_t key_length = _native_key(parsed, limit, key)
        cdef CachedAnswer* answer = _new_answer(key, key_length, messages)
        if answer is NULL:
            raise MemoryError()
        answer.rcode = entry.rcode
        answer.next_variant = entry.next_offset if entry.variants is not None else 0
        if entry.validation == VALID_ALWAYS:
            answer.depends = DEPENDS_NOTHING
        elif entry.validation == VALID_SERVICE:
            answer.depends = DEPENDS_SERVICE
            answer.slot = _service_slot(entry.service)
        else:
            answer.depends = DEPENDS_REGISTRY
        pthread_mutex_lock(&native.lock)
        # The entry was checked against the registry just now, on the thread that applies changes: it is as
        # current as the generations read here.
        if answer.depends == DEPENDS_SERVICE:
            answer.generation = native.service_generations[answer.slot]
        else:
            answer.generation = native.registry_generation
        _table_store(native, answer)
        pthread_mutex_unlock(&native.lock)
        return 0

    @property
    def cached_answers(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._folded_valid = False
        cdef NativeUDP* native = self._native
        if native is not NULL:
            pthread_mutex_lock(&native.lock)
            _table_clear(native)
            pthread_mutex_unlock(&native.lock)


# --- batched UDP I/O -------------------------------------------------------------------------------------------

cdef enum:
    # A query larger than this is not one a resolver sends: it arrives cut (MSG_TRUNC) and is dropped.
    QUERY_SLOT = 4096
    # Datagrams handled per reader callback at most, so that one busy socket cannot starve the loop.
    DRAIN_LIMIT = 1024

UDP_QUERY_SLOT = QUERY_SLOT
MAX_DRAIN = DRAIN_LIMIT


cdef void _link_batch(mmsghdr* received, mmsghdr* replies, iovec* received_iov, iovec* reply_iov,
                      sockaddr_storage* peers, unsigned char* buffers, unsigned int batch) noexcept nogil:
    """Point each of ``batch`` receive headers at its query buffer and peer address, each reply at its iovec."""
    cdef unsigned int slot
    memset(received, 0, batch * sizeof(mmsghdr))
    memset(replies, 0, batch * sizeof(mmsghdr))
    for slot in range(batch):
        received_iov[slot].iov_base = buffers + slot * QUERY_SLOT
        received_iov[slot].iov_len = QUERY_SLOT
        received[slot].msg_hdr.msg_iov = &received_iov[slot]
        received[slot].msg_hdr.msg_iovlen = 1
        received[slot].msg_hdr.msg_name = &peers[slot]
        replies[slot].msg_hdr.msg_iov = &reply_iov[slot]
        replies[slot].msg_hdr.msg_iovlen = 1


cdef object _answer_udp(DNSEngine engine, bytes query, object on_error, uint64_t* errors):
    """The engine's answer to a UDP query, or (counted in ``errors``, ``on_error`` told) a SERVFAIL: a registry
    error costs one answer, not the endpoint."""
    try:
        return engine.answer(query, False)
    except Exception as error:
        errors[0] += 1
        response = engine.servfail(query)
        if on_error is not None:
            on_error(error)
        return response


cdef int _send_batch(int fd, mmsghdr* replies, int pending) noexcept nogil:
    """Send ``pending`` prepared answers with sendmmsg; the number that could not be sent."""
    cdef int offset = 0, sent, failures = 0
    while offset < pending:
        sent = sendmmsg(fd, replies + offset, pending - offset, MSG_DONTWAIT)
        if sent > 0:
            offset += sent
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:  # EWOULDBLOCK on Linux too
            # The send buffer is full: UDP may lose answers, the client asks again.
            return failures + pending - offset
        else:
            failures += 1  # this peer's address was refused; the rest still go out
            offset += 1
    return failures


cdef class UDPResponder:
    """Drains a non-blocking UDP socket with ``recvmmsg`` and answers a whole batch with one ``sendmmsg``: one
    pair of system calls and no Python frame per datagram. ``drain`` is the event loop's reader callback for
    the socket's descriptor; the caller keeps the socket open while the responder is registered.
    ``on_error(exc)`` is told about queries whose answer raised (they are answered SERVFAIL)."""

    def __cinit__(self, DNSEngine engine not None, int fd, unsigned int batch=64, on_error=None):
        if not 1 <= batch <= 1024:
            raise ValueError(f"UDP batch {batch} is outside 1..1024")
        self._engine = engine
        self._fd = fd
        self._batch = batch
        self._on_error = on_error
        self._received = <mmsghdr*>PyMem_Malloc(batch * sizeof(mmsghdr))
        self._replies = <mmsghdr*>PyMem_Malloc(batch * sizeof(mmsghdr))
        self._received_iov = <iovec*>PyMem_Malloc(batch * sizeof(iovec))
        self._reply_iov = <iovec*>PyMem_Malloc(batch * sizeof(iovec))
        self._peers = <sockaddr_storage*>PyMem_Malloc(batch * sizeof(sockaddr_storage))
        self._buffers = <unsigned char*>PyMem_Malloc(batch * QUERY_SLOT)
        if (self._received is NULL or self._replies is NULL or self._received_iov is NULL
                or self._reply_iov is NULL or self._peers is NULL or self._buffers is NULL):
            raise MemoryError()
        _link_batch(self._received, self._replies, self._received_iov, self._reply_iov, self._peers, self._buffers,
                    batch)

    def __dealloc__(self):
        PyMem_Free(self._received)
        PyMem_Free(self._replies)
        PyMem_Free(self._received_iov)
        PyMem_Free(self._reply_iov)
        PyMem_Free(self._peers)
        PyMem_Free(self._buffers)

    def drain(self) -> int:
        """Answer what the socket holds (up to MAX_DRAIN datagrams); returns how many were read."""
        cdef int received, slot, pending
        cdef Py_ssize_t total = 0
        cdef unsigned int batch = self._batch
        cdef list keep
        cdef bytes query
        while total < DRAIN_LIMIT:
            for slot in range(<int>batch):
                self._received[slot].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                self._received[slot].msg_hdr.msg_flags = 0
            received = recvmmsg(self._fd, self._received, batch, MSG_DONTWAIT, NULL)
            if received <= 0:
                # EAGAIN: drained. Anything else (an ICMP error queued on the socket) is for no one to handle.
                break
            total += received
            keep = []
            pending = 0
            for slot in range(received):
                if self._received[slot].msg_hdr.msg_flags & MSG_TRUNC:
                    self._engine._dropped += 1
                    continue
                query = PyBytes_FromStringAndSize(<char*>self._buffers + slot * QUERY_SLOT,
                                                  self._received[slot].msg_len)
                response = _answer_udp(self._engine, query, self._on_error, &self.errors)
                if response is None:
                    continue
                keep.append(response)
                self._reply_iov[pending].iov_base = PyBytes_AS_STRING(<bytes>response)
                self._reply_iov[pending].iov_len = PyBytes_GET_SIZE(response)
                self._replies[pending].msg_hdr.msg_name = &self._peers[slot]
                self._replies[pending].msg_hdr.msg_namelen = self._received[slot].msg_hdr.msg_namelen
                pending += 1
            self.send_failures += _send_batch(self._fd, self._replies, pending)
            if <unsigned int>received < batch:
                break
        return total


# --- the serving thread ----------------------------------------------------------------------------------------
#
# Cache hits are answered by a thread that never holds the GIL, the way a C DNS server would, so that a busy
# event loop (Raft ticks, HTTP, lease sweeps, a collection) cannot delay them. It waits in poll() on the socket
# and on a stop eventfd, reads a batch with recvmmsg, parses each query in C, looks its question up in a C table
# of whole answers (under a mutex held for the lookup and one memcpy) and answers the batch with one sendmmsg.
# Anything else (a question not in the table, a malformed message) goes to the event loop through a ring and an
# eventfd, where DNSEngine.answer answers it as before and puts its answer in the table. Misses stay on the loop
# rather than taking the GIL in the thread: the engine and the registry are then only ever used from the thread
# that applies registry changes, so no answer can be built from a registry half-way through an apply, and a
# miss costs the loop no more than it did before. The table is invalidated by push: the state machine calls
# DNSEngine.registry_changed after every apply, which bumps the generations the table's answers were stored under.

cdef extern from "<pthread.h>" nogil:
    int pthread_create(pthread_t* thread, const void* attributes, void* (*start)(void*) noexcept nogil,
                       void* argument)
    int pthread_join(pthread_t thread, void** result)
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attributes)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)


cdef extern from "<signal.h>" nogil:
    int pthread_sigmask(int how, const sigset_t* mask, sigset_t* old)
    int SIG_BLOCK
    int SIG_SETMASK


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long count, int timeout)
    short POLLIN


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initial, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC


cdef extern from "<sys/socket.h>" nogil:
    cdef struct sockaddr:
        unsigned short sa_family
    ssize_t sendto(int fd, const void* data, size_t length, int flags, const sockaddr* address,
                   socklen_t address_length)


cdef enum:
    PLAIN_LIMIT = 512
    NATIVE_KEY_MAX = MAX_NAME_WIRE + 1 + 7   # the question name, type, class, EDNS form and size class
    SERVICE_SLOTS = 16384          # generations per service hash; two services sharing one only cost misses
    PENDING_SLOTS = 1024           # misses waiting for the loop; beyond this a burst of them is dropped
    NATIVE_MAX_VARIANTS = 1024     # rotations kept per answer; an answer with more stays on the loop
    NATIVE_MAX_BYTES = 64 << 20    # answer bytes the table holds at most (names and rotations are clients' choice)
    BATCHES_PER_WAKE = 16          # batches read before poll() looks at the stop eventfd again
    DEPENDS_NOTHING = 0
    DEPENDS_SERVICE = 1
    DEPENDS_REGISTRY = 2
    ANSWERED = 1
    QUEUED = 0
    DROPPED = -1


cdef inline Py_ssize_t _udp_limit(ParsedQuery* parsed, Py_ssize_t max_udp_payload) noexcept nogil:
    # Without EDNS0, 512 bytes (RFC 1035 §4.2.1); with it, the smaller of the client's buffer and ours.
    if parsed.edns and parsed.udp_payload > PLAIN_LIMIT:
        return parsed.udp_payload if parsed.udp_payload < max_udp_payload else max_udp_payload
    return PLAIN_LIMIT


cdef inline Py_ssize_t _native_key(ParsedQuery* parsed, Py_ssize_t limit, unsigned char* out) noexcept nogil:
    """Everything an answer depends on besides the id, RD / CD and the question's letter case."""
    cdef Py_ssize_t length = parsed.qname_length
    memcpy(out, parsed.qname, length)
    _put16(out + length, parsed.qtype)
    _put16(out + length + 2, parsed.qclass)
    out[length + 4] = (2 if parsed.dnssec_ok else 1) if parsed.edns else 0
    _put16(out + length + 5, <uint32_t>limit)
    return length + 7


cdef inline uint64_t _hash_key(const unsigned char* key, Py_ssize_t length) noexcept nogil:
    cdef uint64_t value = 0xcbf29ce484222325ULL  # FNV-1a
    cdef Py_ssize_t index
    for index in range(length):
        value = (value ^ key[index]) * 0x100000001b3ULL
    return value


cdef inline Py_ssize_t _service_slot(str service):
    return hash(service) & (SERVICE_SLOTS - 1)


cdef CachedAnswer* _new_answer(const unsigned char* key, Py_ssize_t key_length, list messages):
    cdef Py_ssize_t count = len(messages), index, length
    cdef CachedAnswer* answer = <CachedAnswer*>calloc(1, sizeof(CachedAnswer))
    if answer is NULL:
        return NULL
    answer.key = <unsigned char*>malloc(key_length)
    answer.variants = <unsigned char**>calloc(count, sizeof(unsigned char*))
    answer.variant_lengths = <Py_ssize_t*>calloc(count, sizeof(Py_ssize_t))
    if answer.key is NULL or answer.variants is NULL or answer.variant_lengths is NULL:
        _free_answer(answer)
        return NULL
    memcpy(answer.key, key, key_length)
    answer.key_length = key_length
    answer.hash = _hash_key(key, key_length)
    answer.variant_count = count
    for index in range(count):
        length = PyBytes_GET_SIZE(messages[index])
        answer.variants[index] = <unsigned char*>malloc(length)
        if answer.variants[index] is NULL:
            _free_answer(answer)
            return NULL
        memcpy(answer.variants[index], PyBytes_AS_STRING(messages[index]), length)
        answer.variant_lengths[index] = length
        answer.size += length
    answer.size += key_length
    return answer


cdef void _free_answer(CachedAnswer* answer) noexcept nogil:
    cdef Py_ssize_t index
    if answer is NULL:
        return
    if answer.variants is not NULL:
        for index in range(answer.variant_count):
            free(answer.variants[index])
    free(answer.variants)
    free(answer.variant_lengths)
    free(answer.key)
    free(answer)


cdef CachedAnswer** _table_slot(NativeUDP* native, const unsigned char* key, Py_ssize_t length,
                                uint64_t hash) noexcept nogil:
    """The slot holding ``key``, or the empty slot where it belongs (linear probing; the table is at least
    twice as large as the entries it may hold, so an empty slot always ends the probe)."""
    cdef Py_ssize_t mask = native.capacity - 1
    cdef Py_ssize_t index = hash & mask
    cdef CachedAnswer* held
    while True:
        held = native.table[index]
        if held is NULL or (held.hash == hash and held.key_length == length
                            and memcmp(held.key, key, length) == 0):
            return &native.table[index]
        index = (index + 1) & mask


cdef void _table_store(NativeUDP* native, CachedAnswer* answer) noexcept nogil:
    cdef CachedAnswer** slot = _table_slot(native, answer.key, answer.key_length, answer.hash)
    if slot[0] is not NULL:
        native.bytes_held -= slot[0].size
        _free_answer(slot[0])
        native.count -= 1
    if native.count >= native.max_entries or native.bytes_held + answer.size > NATIVE_MAX_BYTES:
        # Names are chosen by clients: bound the table. Emptying it costs one loop trip per hot name.
        _table_clear(native)
        slot = _table_slot(native, answer.key, answer.key_length, answer.hash)
    native.count += 1
    native.bytes_held += answer.size
    slot[0] = answer


cdef void _table_clear(NativeUDP* native) noexcept nogil:
    cdef Py_ssize_t index
    for index in range(native.capacity):
        if native.table[index] is not NULL:
            _free_answer(native.table[index])
            native.table[index] = NULL
    native.count = 0
    native.bytes_held = 0


cdef inline bint _is_current(NativeUDP* native, CachedAnswer* answer) noexcept nogil:
    if answer.depends == DEPENDS_SERVICE:
        return native.service_generations[answer.slot] == answer.generation
    if answer.depends == DEPENDS_REGISTRY:
        return native.registry_generation == answer.generation
    return True


cdef int _answer_datagram(NativeUDP* native, unsigned int slot, unsigned char* out,
                          Py_ssize_t* out_length) noexcept nogil:
    """Answer datagram ``slot`` from the table into ``out`` (ANSWERED), queue it for the loop (QUEUED), or
    drop it (DROPPED: cut short by the socket, a response, or no room left in the queue)."""
    cdef const unsigned char* data = native.buffers + slot * QUERY_SLOT
    cdef Py_ssize_t size = native.received[slot].msg_len
    cdef ParsedQuery parsed
    cdef ParseStatus status
    cdef unsigned char key[NATIVE_KEY_MAX]
    cdef Py_ssize_t key_length, variant, length
    cdef uint64_t hash
    cdef CachedAnswer* answer
    cdef PendingQuery* pending
    cdef unsigned char* copy
    if native.received[slot].msg_hdr.msg_flags & MSG_TRUNC:
        status = PARSE_DROP
    else:
        status = _parse(data, size, &parsed)
    if status == PARSE_DROP:
        pthread_mutex_lock(&native.lock)
        native.dropped += 1
        pthread_mutex_unlock(&native.lock)
        return DROPPED
    if status == PARSE_OK:
        key_length = _native_key(&parsed, _udp_limit(&parsed, native.max_udp_payload), key)
        hash = _hash_key(key, key_length)
        pthread_mutex_lock(&native.lock)
        answer = _table_slot(native, key, key_length, hash)[0]
        if answer is not NULL and _is_current(native, answer):
            variant = answer.next_variant
            if answer.variant_count > 1:
                answer.next_variant = (variant + 1) % answer.variant_count
            length = answer.variant_lengths[variant]
            memcpy(out, answer.variants[variant], length)
            native.hits += 1
            native.rcodes[answer.rcode] += 1
            if out[2] & 0x02:
                native.truncated += 1
            pthread_mutex_unlock(&native.lock)
            out[0] = data[0]
            out[1] = data[1]
            out[2] = (out[2] & 0xFE) | (data[2] & 0x01)  # RD is copied (RFC 1035 §4.1.1)
            out[3] = (out[3] & 0xEF) | (data[3] & 0x10)  # CD is copied (RFC 4035 §3.1.6)
            memcpy(out + HEADER_BYTES, data + HEADER_BYTES, parsed.qname_length)  # the question as asked
            out_length[0] = length
            return ANSWERED
        pthread_mutex_unlock(&native.lock)
    copy = <unsigned char*>malloc(size)
    pthread_mutex_lock(&native.lock)
    if copy is NULL or native.pending_count >= PENDING_SLOTS:
        native.overflow += 1
        pthread_mutex_unlock(&native.lock)
        free(copy)
        return DROPPED
    memcpy(copy, data, size)
    pending = &native.pending[(native.pending_head + native.pending_count) % PENDING_SLOTS]
    pending.data = copy
    pending.length = size
    pending.peer_length = native.received[slot].msg_hdr.msg_namelen
    memcpy(&pending.peer, &native.peers[slot], pending.peer_length)
    native.pending_count += 1
    pthread_mutex_unlock(&native.lock)
    return QUEUED


cdef void _serve_batches(NativeUDP* native) noexcept nogil:
    cdef unsigned int batch = native.batch, slot
    cdef int received, outcome, rounds, failures
    cdef unsigned int pending
    cdef Py_ssize_t length
    cdef bint queued
    cdef uint64_t one = 1
    for rounds in range(BATCHES_PER_WAKE):
        for slot in range(batch):
            native.received[slot].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            native.received[slot].msg_hdr.msg_flags = 0
        received = recvmmsg(native.fd, native.received, batch, MSG_DONTWAIT, NULL)
        if received <= 0:
            if received < 0 and errno == EINTR:
                continue
            return  # EAGAIN: drained; anything else (an ICMP error queued on the socket) is no one's to handle
        pending = 0
        queued = False
        for slot in range(<unsigned int>received):
            outcome = _answer_datagram(native, slot, native.reply_buffers + pending * native.reply_size, &length)
            if outcome == ANSWERED:
                native.reply_iov[pending].iov_base = native.reply_buffers + pending * native.reply_size
                native.reply_iov[pending].iov_len = length
                native.replies[pending].msg_hdr.msg_name = &native.peers[slot]
                native.replies[pending].msg_hdr.msg_namelen = native.received[slot].msg_hdr.msg_namelen
                pending += 1
            elif outcome == QUEUED:
                queued = True
        if queued:
            write(native.pending_fd, &one, sizeof(one))
        failures = _send_batch(native.fd, native.replies, pending)
        if failures:
            pthread_mutex_lock(&native.lock)
            native.send_failures += failures
            pthread_mutex_unlock(&native.lock)
        if <unsigned int>received < batch:
            return


cdef void* _serve(void* argument) noexcept nogil:
    cdef NativeUDP* native = <NativeUDP*>argument
    cdef pollfd waits[2]
    waits[0].fd = native.fd
    waits[0].events = POLLIN
    waits[1].fd = native.stop_fd
    waits[1].events = POLLIN
    while True:
        waits[0].revents = 0
        waits[1].revents = 0
        if poll(waits, 2, -1) < 0 and errno != EINTR:
            return NULL  # EFAULT / EINVAL: not recoverable; UDPThread.alive says so
        if waits[1].revents:
            return NULL
        if waits[0].revents:
            _serve_batches(native)


cdef void _free_native(NativeUDP* native) noexcept nogil:
    cdef Py_ssize_t index
    if native is NULL:
        return
    if native.table is not NULL:
        _table_clear(native)
    if native.pending is not NULL:
        for index in range(native.pending_count):
            free(native.pending[(native.pending_head + index) % PENDING_SLOTS].data)
    if native.stop_fd >= 0:
        close(native.stop_fd)
    if native.pending_fd >= 0:
        close(native.pending_fd)
    free(native.table)
    free(native.service_generations)
    free(native.pending)
    free(native.received)
    free(native.replies)
    free(native.received_iov)
    free(native.reply_iov)
    free(native.peers)
    free(native.buffers)
    free(native.reply_buffers)
    pthread_mutex_destroy(&native.lock)
    free(native)


cdef class UDPThread:
    """Serves UDP queries for ``engine`` on the socket ``fd`` from a native thread that never takes the GIL:
    cache hits are answered there; everything else is queued for the event loop, which answers it when its
    reader on ``pending_fd`` calls ``answer_pending`` (and teaches the thread the answer). Whoever applies
    registry changes must call ``engine.registry_changed(services)`` after each one, or the thread serves
    answers older than the registry. ``stop()`` wakes and joins the thread; the caller owns the socket and
    closes it after. ``on_error(exc)`` is told about queries whose answer raised (answered SERVFAIL)."""

    def __cinit__(self, DNSEngine engine not None, int fd, unsigned int batch=64, on_error=None):
        if not 1 <= batch <= 1024:
            raise ValueError(f"UDP batch {batch} is outside 1..1024")
        if engine._native is not NULL:
            raise RuntimeError("this DNS engine is already served by a UDP thread")
        self._engine = engine
        self._on_error = on_error
        self._owner_pid = getpid()
        cdef NativeUDP* native = <NativeUDP*>calloc(1, sizeof(NativeUDP))
        if native is NULL:
            raise MemoryError()
        pthread_mutex_init(&native.lock, NULL)
        native.stop_fd = -1
        native.pending_fd = -1
        self._native = native
        native.fd = fd
        native.batch = batch
        native.max_udp_payload = engine.max_udp_payload
        native.reply_size = engine.max_udp_payload
        native.max_entries = engine.max_cache_entries
        native.capacity = 1
        while native.capacity < 2 * native.max_entries:
            native.capacity <<= 1
        native.table = <CachedAnswer**>calloc(native.capacity, sizeof(CachedAnswer*))
        native.service_generations = <uint64_t*>calloc(SERVICE_SLOTS, sizeof(uint64_t))
        native.pending = <PendingQuery*>calloc(PENDING_SLOTS, sizeof(PendingQuery))
        native.received = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        native.replies = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        native.received_iov = <iovec*>calloc(batch, sizeof(iovec))
        native.reply_iov = <iovec*>calloc(batch, sizeof(iovec))
        native.peers = <sockaddr_storage*>calloc(batch, sizeof(sockaddr_storage))
        native.buffers = <unsigned char*>malloc(batch * QUERY_SLOT)
        native.reply_buffers = <unsigned char*>malloc(batch * native.reply_size)
        if (native.table is NULL or native.service_generations is NULL or native.pending is NULL
                or native.received is NULL or native.replies is NULL or native.received_iov is NULL
                or native.reply_iov is NULL or native.peers is NULL or native.buffers is NULL
                or native.reply_buffers is NULL):
            raise MemoryError()
        native.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        native.pending_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if native.stop_fd < 0 or native.pending_fd < 0:
            raise OSError(errno, f"DNS could not create the UDP thread's eventfds: {strerror(errno).decode()}")
        _link_batch(native.received, native.replies, native.received_iov, native.reply_iov, native.peers,
                    native.buffers, batch)

    def __dealloc__(self):
        if getpid() != self._owner_pid:
            # A forked child (a snapshot writer) has no serving thread, and the mutex may have been held at
            # the fork: it leaves all of this alone.
            return
        self._stop()
        _free_native(self._native)
        self._native = NULL

    @property
    def pending_fd(self) -> int:
        """Readable when misses wait for ``answer_pending`` (register it with the loop's ``add_reader``)."""
        return self._native.pending_fd

    @property
    def alive(self) -> bool:
        return self._running

    def start(self) -> None:
        if self._running:
            raise RuntimeError("the DNS UDP thread is already running")
        cdef sigset_t every, previous
        cdef int status
        # Signals stay with the interpreter's threads: the serving thread blocks them all (it inherits the mask).
        sigfillset(&every)
        pthread_sigmask(SIG_BLOCK, &every, &previous)
        self._engine._native = self._native
        status = pthread_create(&self._thread, NULL, _serve, self._native)
        pthread_sigmask(SIG_SETMASK, &previous, NULL)
        if status != 0:
            self._engine._native = NULL
            raise OSError(status, f"DNS could not start its UDP thread: {strerror(status).decode()}")
        self._running = True

    def stop(self) -> None:
        """Wake the thread (even while it waits for a datagram), join it, and keep its counts in the engine's."""
        if getpid() == self._owner_pid:
            self._stop()

    cdef void _stop(self):
        cdef NativeUDP* native = self._native
        cdef uint64_t one = 1
        cdef int index
        if not self._running or self._engine is None:
            return
        write(native.stop_fd, &one, sizeof(one))
        with nogil:
            pthread_join(self._thread, NULL)
        self._running = False
        engine = self._engine
        engine._native = NULL
        for index in range(RCODE_SLOTS):
            engine._rcodes[index] += native.rcodes[index]
        engine._cache_hits += native.hits
        engine._truncated += native.truncated
        engine._dropped += native.dropped + native.overflow
        engine._overflow += native.overflow
        engine._udp_queries += native.hits + native.dropped + native.overflow
        memset(native.rcodes, 0, sizeof(native.rcodes))
        native.hits = native.truncated = native.dropped = native.overflow = 0

    @property
    def send_failures(self) -> int:
        pthread_mutex_lock(&self._native.lock)
        failures = self._native.send_failures
        pthread_mutex_unlock(&self._native.lock)
        return failures

    def answer_pending(self) -> int:
        """The loop's reader callback for ``pending_fd``: answer the queued misses; returns how many."""
        cdef NativeUDP* native = self._native
        cdef uint64_t value
        cdef Py_ssize_t count, index
        cdef PendingQuery* taken
        cdef ssize_t sent
        # Reset the eventfd before taking the queue: a miss queued after the take makes it readable again.
        read(native.pending_fd, &value, sizeof(value))
        pthread_mutex_lock(&native.lock)
        count = native.pending_count
        taken = <PendingQuery*>malloc(count * sizeof(PendingQuery)) if count else NULL
        if taken is not NULL:
            for index in range(count):
                taken[index] = native.pending[(native.pending_head + index) % PENDING_SLOTS]
            native.pending_head = (native.pending_head + count) % PENDING_SLOTS
            native.pending_count = 0
        pthread_mutex_unlock(&native.lock)
        if taken is NULL:
            return 0
        index = 0
        try:
            while index < count:
                query = PyBytes_FromStringAndSize(<char*>taken[index].data, taken[index].length)
                free(taken[index].data)
                taken[index].data = NULL
                response = _answer_udp(self._engine, query, self._on_error, &self.errors)
                if response is not None:
                    sent = sendto(native.fd, PyBytes_AS_STRING(response), PyBytes_GET_SIZE(response), MSG_DONTWAIT,
                                  <const sockaddr*>&taken[index].peer, taken[index].peer_length)
                    if sent < 0:
                        pthread_mutex_lock(&native.lock)
                        native.send_failures += 1
                        pthread_mutex_unlock(&native.lock)
                index += 1
        finally:
            for index in range(index, count):
                free(taken[index].data)
            free(taken)
        return count
