# cython: language_level=3
"""Raft hot paths: the in-memory log, the framing and encoding of peer messages, and the consensus
core (RaftCore) as a deterministic state machine.

Python owns sockets, timers and fsync; this module owns the bytes and the bookkeeping.
"""

import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove


cdef extern from *:
    """
    /* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum iSCSI, ext4 and etcd's WAL use.
       It is on every peer frame and every WAL record, so it gets the CPU's instruction where there is one
       (SSE4.2 crc32, 8 bytes per instruction, chosen at import by a CPUID check) and slicing-by-8 elsewhere
       (8 table lookups per 8 bytes instead of one per byte: Intel's "slicing-by-8", Kounavis & Berry 2005). */
    #include <stdint.h>
    #include <string.h>

    static uint32_t spina_crc32c_tables[8][256];

    static void spina_crc32c_build_tables(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t crc = i;
            for (int bit = 0; bit < 8; bit++) {
                crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
            }
            spina_crc32c_tables[0][i] = crc;
        }
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t crc = spina_crc32c_tables[0][i];
            for (int table = 1; table < 8; table++) {
                crc = spina_crc32c_tables[0][crc & 0xFF] ^ (crc >> 8);
                spina_crc32c_tables[table][i] = crc;
            }
        }
    }

    static uint32_t spina_crc32c_portable(uint32_t crc, const unsigned char *data, size_t length) {
        uint32_t (*t)[256] = spina_crc32c_tables;
        crc = ~crc;
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        while (length >= 8) {
            uint32_t low, high;
            memcpy(&low, data, 4);
            memcpy(&high, data + 4, 4);
            low ^= crc;
            crc = t[7][low & 0xFF] ^ t[6][(low >> 8) & 0xFF] ^ t[5][(low >> 16) & 0xFF] ^ t[4][low >> 24]
                ^ t[3][high & 0xFF] ^ t[2][(high >> 8) & 0xFF] ^ t[1][(high >> 16) & 0xFF] ^ t[0][high >> 24];
            data += 8;
            length -= 8;
        }
    #endif
        while (length--) {
            crc = t[0][(crc ^ *data++) & 0xFF] ^ (crc >> 8);
        }
        return ~crc;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <nmmintrin.h>
    #define SPINA_CRC32C_HARDWARE 1
    __attribute__((target("sse4.2")))
    static uint32_t spina_crc32c_sse42(uint32_t crc, const unsigned char *data, size_t length) {
        uint64_t crc64 = (uint32_t)~crc;
        while (length >= 8) {
            uint64_t word;
            memcpy(&word, data, 8);
            crc64 = _mm_crc32_u64(crc64, word);
            data += 8;
            length -= 8;
        }
        uint32_t crc32 = (uint32_t)crc64;
        while (length--) {
            crc32 = _mm_crc32_u8(crc32, *data++);
        }
        return ~crc32;
    }
    #else
    #define SPINA_CRC32C_HARDWARE 0
    #endif

    static uint32_t (*spina_crc32c)(uint32_t, const unsigned char *, size_t) = spina_crc32c_portable;
    static const char *spina_crc32c_name = "slicing-by-8";

    static void spina_crc32c_init(int allow_hardware) {
        spina_crc32c_build_tables();
        spina_crc32c = spina_crc32c_portable;
        spina_crc32c_name = "slicing-by-8";
    #if SPINA_CRC32C_HARDWARE
        __builtin_cpu_init();
        if (allow_hardware && __builtin_cpu_supports("sse4.2")) {
            spina_crc32c = spina_crc32c_sse42;
            spina_crc32c_name = "sse4.2";
        }
    #endif
    }
    """
    void spina_crc32c_init(int allow_hardware) noexcept nogil
    uint32_t spina_crc32c(uint32_t crc, const unsigned char* data, size_t length) noexcept nogil
    uint32_t spina_crc32c_portable(uint32_t crc, const unsigned char* data, size_t length) noexcept nogil
    const char* spina_crc32c_name


# SPINA_CRC32C=portable forces the table-driven code (to compare, or on a CPU that misreports SSE4.2).
spina_crc32c_init(os.environ.get("SPINA_CRC32C", "") != "portable")

CRC32C_IMPLEMENTATION: str = spina_crc32c_name.decode()


cdef uint32_t crc32c_update(uint32_t crc, const unsigned char* data, Py_ssize_t length) noexcept nogil:
    return spina_crc32c(crc, data, <size_t>length)


# Above this many bytes crc32c releases the GIL: a snapshot file's checksum, computed in a worker thread,
# then no longer stops the event loop (tens of MB take tens of ms even at SSE4.2 speed).
cdef enum:
    _CRC_NOGIL_BYTES = 1 << 16


cdef inline uint32_t _crc32c_buffer(uint32_t crc, const unsigned char* data, size_t length) noexcept:
    if length < _CRC_NOGIL_BYTES:
        return spina_crc32c(crc, data, length)
    with nogil:
        crc = spina_crc32c(crc, data, length)
    return crc


def crc32c(data, uint32_t crc=0) -> int:
    """CRC-32C of ``data`` (bytes or any contiguous buffer), continuing from ``crc`` (0 to start)."""
    cdef Py_buffer view
    if type(data) is bytes:
        return _crc32c_buffer(crc, <const unsigned char*>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _crc32c_buffer(crc, <const unsigned char*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


def crc32c_portable(data, uint32_t crc=0) -> int:
    """``crc32c`` by the table-driven code whatever the CPU offers (tests compare the two)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return spina_crc32c_portable(crc, <const unsigned char*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


cdef inline void _put_le32(unsigned char* out, uint32_t value) noexcept nogil:
    out[0] = value & 0xFF
    out[1] = (value >> 8) & 0xFF
    out[2] = (value >> 16) & 0xFF
    out[3] = (value >> 24) & 0xFF


cdef inline void _put_le64(unsigned char* out, uint64_t value) noexcept nogil:
    _put_le32(out, <uint32_t>(value & 0xFFFFFFFFU))
    _put_le32(out + 4, <uint32_t>(value >> 32))


def encode_wal_entries(list entries not None, uint64_t first_index, uint8_t record_type) -> bytes:
    """The write-ahead log records of ``entries`` ((index, term, payload) tuples, indexes consecutive from
    ``first_index``), back to back, in ``raft/storage.py``'s format (little-endian): u32 length (1 + 16 +
    payload), u8 ``record_type``, u64 index, u64 term, payload, u32 CRC-32C of everything before it."""
    cdef Py_ssize_t count = len(entries), total = 0, i, size, pos = 0
    cdef object entry
    cdef bytes payload, out
    cdef unsigned char* buf
    cdef uint64_t index
    for i in range(count):
        entry = entries[i]
        if type(entry) is not tuple or len(<tuple>entry) != 3 or type((<tuple>entry)[2]) is not bytes:
            raise TypeError(f"entry {i} is not an (index, term, payload bytes) tuple: {entry!r:.80}")
        index = (<tuple>entry)[0]
        if index != first_index + <uint64_t>i:
            raise ValueError(f"entries are not consecutive: {index} follows {first_index + <uint64_t>i - 1}")
        total += 4 + 1 + 16 + PyBytes_GET_SIZE((<tuple>entry)[2]) + 4
    out = PyBytes_FromStringAndSize(NULL, total)
    buf = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(count):
        entry = entries[i]
        payload = (<tuple>entry)[2]
        size = PyBytes_GET_SIZE(payload)
        _put_le32(buf + pos, <uint32_t>(1 + 16 + size))
        buf[pos + 4] = record_type
        _put_le64(buf + pos + 5, first_index + <uint64_t>i)
        _put_le64(buf + pos + 13, <uint64_t>(<tuple>entry)[1])
        if size:
            memcpy(buf + pos + 21, PyBytes_AS_STRING(payload), size)
        _put_le32(buf + pos + 21 + size, spina_crc32c(0, buf + pos, <size_t>(21 + size)))
        pos += 4 + 1 + 16 + size + 4
    return out


cdef class RaftLog:
    """Raft log entries held compactly: one C array of terms, one of offsets, one byte buffer.

    Indexes are Raft indexes (the first entry ever appended is 1). Term lookup is O(1). The prefix
    up to ``snapshot_index`` can be compacted away once a snapshot covers it.
    """

    def __cinit__(self, uint64_t snapshot_index=0, uint64_t snapshot_term=0):
        self._capacity = 64
        self._data_capacity = 4096
        self._terms = <uint64_t*>malloc(self._capacity * sizeof(uint64_t))
        self._offsets = <uint64_t*>malloc((self._capacity + 1) * sizeof(uint64_t))
        self._data = <unsigned char*>malloc(self._data_capacity)
        if self._terms is NULL or self._offsets is NULL or self._data is NULL:
            raise MemoryError()
        self._offsets[0] = 0
        self._count = 0
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term

    def __dealloc__(self):
        free(self._terms)
        free(self._offsets)
        free(self._data)

    cdef int _reserve(self, Py_ssize_t entries, Py_ssize_t data_bytes) except -1:
        cdef Py_ssize_t need = self._count + entries
        cdef Py_ssize_t need_data = <Py_ssize_t>self._offsets[self._count] + data_bytes
        cdef Py_ssize_t capacity = self._capacity
        cdef void* grown
        if need > capacity:
            while capacity < need:
                capacity *= 2
            grown = realloc(self._terms, capacity * sizeof(uint64_t))
            if grown is NULL:
                raise MemoryError()
            self._terms = <uint64_t*>grown
            grown = realloc(self._offsets, (capacity + 1) * sizeof(uint64_t))
            if grown is NULL:
                raise MemoryError()
            self._offsets = <uint64_t*>grown
            self._capacity = capacity
        capacity = self._data_capacity
        if need_data > capacity:
            while capacity < need_data:
                capacity *= 2
            grown = realloc(self._data, capacity)
            if grown is NULL:
                raise MemoryError()
            self._data = <unsigned char*>grown
            self._data_capacity = capacity
        return 0

    cdef inline Py_ssize_t _slot(self, uint64_t index) except -2:
        if index <= self.snapshot_index or index > self.snapshot_index + <uint64_t>self._count:
            raise IndexError(
                f"log index {index} is not held (held: {self.snapshot_index + 1}..{self.last_index})"
            )
        return <Py_ssize_t>(index - self.snapshot_index - 1)

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot_index + <uint64_t>self._count

    @property
    def last_term(self) -> int:
        if self._count == 0:
            return self.snapshot_term
        return self._terms[self._count - 1]

    @property
    def payload_bytes(self) -> int:
        return self._offsets[self._count]

    def __len__(self) -> int:
        return self._count

    def append(self, uint64_t term, const unsigned char[:] payload not None) -> int:
        """Append one entry; returns its index. Terms never decrease along the log."""
        cdef Py_ssize_t size = payload.shape[0]
        cdef uint64_t start
        if self._count and term < self._terms[self._count - 1]:
            raise ValueError(f"term {term} is older than the last entry's term {self._terms[self._count - 1]}")
        if not self._count and term < self.snapshot_term:
            raise ValueError(f"term {term} is older than the snapshot term {self.snapshot_term}")
        self._reserve(1, size)
        start = self._offsets[self._count]
        if size:
            memcpy(self._data + start, &payload[0], size)
        self._terms[self._count] = term
        self._offsets[self._count + 1] = start + <uint64_t>size
        self._count += 1
        return self.snapshot_index + <uint64_t>self._count

    def append_batch(self, uint64_t term, list payloads not None) -> int:
        """Append many entries of one term with one reservation; returns the last index."""
        cdef Py_ssize_t total = 0
        cdef object item
        for item in payloads:
            total += len(<bytes?>item)
        if self._count and term < self._terms[self._count - 1]:
            raise ValueError(f"term {term} is older than the last entry's term {self._terms[self._count - 1]}")
        if not self._count and term < self.snapshot_term:
            raise ValueError(f"term {term} is older than the snapshot term {self.snapshot_term}")
        self._reserve(len(payloads), total)
        cdef uint64_t offset = self._offsets[self._count]
        cdef Py_ssize_t size
        for item in payloads:
            size = len(<bytes>item)
            memcpy(self._data + offset, PyBytes_AS_STRING(<bytes>item), size)
            self._terms[self._count] = term
            offset += <uint64_t>size
            self._offsets[self._count + 1] = offset
            self._count += 1
        return self.snapshot_index + <uint64_t>self._count

    def term_at(self, uint64_t index) -> int:
        """Term of the entry at ``index``; index 0 and the snapshot index answer from the snapshot."""
        if index == self.snapshot_index:
            return self.snapshot_term
        return self._terms[self._slot(index)]

    def entry(self, uint64_t index) -> bytes:
        cdef Py_ssize_t slot = self._slot(index)
        cdef uint64_t start = self._offsets[slot]
        return PyBytes_FromStringAndSize(<char*>self._data + start, <Py_ssize_t>(self._offsets[slot + 1] - start))

    def entries(self, uint64_t start_index, uint64_t end_index, Py_ssize_t max_bytes=-1) -> list:
        """Entries [start_index, end_index] as (term, payload) pairs, stopping before ``max_bytes``
        would be exceeded (always at least one entry, so a large entry still replicates)."""
        return self._collect(start_index, end_index, max_bytes, False)

    def extend(self, list entries not None) -> int:
        """Append (term, payload) pairs (terms never decreasing) with one reservation; returns the
        last index. Checked before anything is written, so a bad batch leaves the log unchanged."""
        cdef Py_ssize_t total = 0, size
        cdef uint64_t term, previous_term = self._last_term()
        cdef object item
        cdef bytes payload
        for item in entries:
            term = (<tuple?>item)[0]
            total += len(<bytes?>(<tuple>item)[1])
            if term < previous_term:
                raise ValueError(f"term {term} is older than the previous entry's term {previous_term}")
            previous_term = term
        self._reserve(len(entries), total)
        cdef uint64_t offset = self._offsets[self._count]
        for item in entries:
            payload = <bytes>(<tuple>item)[1]
            size = len(payload)
            memcpy(self._data + offset, PyBytes_AS_STRING(payload), size)
            self._terms[self._count] = <uint64_t>(<tuple>item)[0]
            offset += <uint64_t>size
            self._offsets[self._count + 1] = offset
            self._count += 1
        return self.snapshot_index + <uint64_t>self._count

    cdef list _collect(self, uint64_t start_index, uint64_t end_index, Py_ssize_t max_bytes, bint with_index):
        cdef list out = []
        cdef Py_ssize_t used = 0
        cdef Py_ssize_t slot, size
        cdef uint64_t index
        cdef bytes payload
        if end_index > self.snapshot_index + <uint64_t>self._count:
            end_index = self.snapshot_index + <uint64_t>self._count
        if start_index > end_index:
            return out
        self._slot(start_index)
        for index in range(start_index, end_index + 1):
            slot = <Py_ssize_t>(index - self.snapshot_index - 1)
            size = <Py_ssize_t>(self._offsets[slot + 1] - self._offsets[slot])
            if out and max_bytes >= 0 and used + size > max_bytes:
                break
            used += size
            payload = PyBytes_FromStringAndSize(<char*>self._data + self._offsets[slot], size)
            if with_index:
                out.append((index, self._terms[slot], payload))
            else:
                out.append((self._terms[slot], payload))
        return out

    cdef inline uint64_t _last_index(self) noexcept:
        return self.snapshot_index + <uint64_t>self._count

    cdef inline uint64_t _last_term(self) noexcept:
        if self._count == 0:
            return self.snapshot_term
        return self._terms[self._count - 1]

    cdef inline uint64_t _term_or_zero(self, uint64_t index) noexcept:
        # 0 for an index that is compacted away or beyond the log; no real entry has term 0.
        if index == self.snapshot_index:
            return self.snapshot_term
        if index < self.snapshot_index or index > self.snapshot_index + <uint64_t>self._count:
            return 0
        return self._terms[index - self.snapshot_index - 1]

    cdef inline bint _holds(self, uint64_t index, uint64_t term) noexcept:
        if index < self.snapshot_index or index > self.snapshot_index + <uint64_t>self._count:
            return False
        return self._term_or_zero(index) == term

    cdef uint64_t _find_conflict_by_term(self, uint64_t index, uint64_t term) noexcept:
        # The largest held index <= ``index`` whose term is <= ``term`` (the snapshot index if none is).
        # Terms never decrease along the log, so this is a binary search rather than etcd's linear walk.
        cdef uint64_t low, high, middle
        if index > self.snapshot_index + <uint64_t>self._count:
            index = self.snapshot_index + <uint64_t>self._count
        if index <= self.snapshot_index or self._terms[0] > term:
            return self.snapshot_index
        low = self.snapshot_index + 1
        high = index
        while low < high:
            middle = low + (high - low + 1) // 2
            if self._terms[middle - self.snapshot_index - 1] <= term:
                low = middle
            else:
                high = middle - 1
        return low

    cdef int _check_term(self, uint64_t term) except -1:
        if self._count and term < self._terms[self._count - 1]:
            raise ValueError(f"term {term} is older than the last entry's term {self._terms[self._count - 1]}")
        if not self._count and term < self.snapshot_term:
            raise ValueError(f"term {term} is older than the snapshot term {self.snapshot_term}")
        return 0

    cdef uint64_t _append_with_kind(self, uint64_t term, uint8_t kind, list payloads) except? 0:
        # The leader's proposal path: writes the kind byte and the command straight into the log
        # buffer, so no intermediate kind+payload bytes object is built per entry.
        cdef Py_ssize_t total = 0, size
        cdef object item
        for item in payloads:
            total += 1 + len(<bytes?>item)
        self._check_term(term)
        self._reserve(len(payloads), total)
        cdef uint64_t offset = self._offsets[self._count]
        for item in payloads:
            size = len(<bytes>item)
            self._data[offset] = kind
            memcpy(self._data + offset + 1, PyBytes_AS_STRING(<bytes>item), size)
            self._terms[self._count] = term
            offset += <uint64_t>(size + 1)
            self._offsets[self._count + 1] = offset
            self._count += 1
        return self.snapshot_index + <uint64_t>self._count

    def truncate_from(self, uint64_t index) -> None:
        """Drop the entry at ``index`` and everything after it (a follower's conflicting suffix)."""
        if index <= self.snapshot_index:
            raise IndexError(f"cannot truncate at {index}: entries up to {self.snapshot_index} are compacted")
        if index > self.snapshot_index + <uint64_t>self._count:
            return
        self._count = <Py_ssize_t>(index - self.snapshot_index - 1)

    def compact_to(self, uint64_t index, uint64_t term) -> None:
        """Forget entries up to and including ``index`` (covered by a snapshot whose last term is ``term``).

        If ``index`` is beyond the log (a snapshot installed from the leader), the whole log goes.
        """
        cdef Py_ssize_t drop, keep, i
        cdef uint64_t shift
        if index <= self.snapshot_index:
            return
        if index >= self.snapshot_index + <uint64_t>self._count:
            self._count = 0
            self._offsets[0] = 0
        else:
            drop = <Py_ssize_t>(index - self.snapshot_index)
            keep = self._count - drop
            shift = self._offsets[drop]
            memmove(self._terms, self._terms + drop, keep * sizeof(uint64_t))
            memmove(self._data, self._data + shift, <size_t>(self._offsets[self._count] - shift))
            for i in range(keep + 1):
                self._offsets[i] = self._offsets[i + drop] - shift
            self._count = keep
        self.snapshot_index = index
        self.snapshot_term = term


# Frame: u32 big-endian length of (kind + payload), u8 kind, payload, u32 big-endian CRC-32C of kind + payload.
cdef enum:
    _HEADER = 4
    _TRAILER = 4


class FrameError(ValueError):
    """A peer sent bytes that are not a valid frame (bad length or checksum); drop the connection."""


cdef inline void _put_u32(unsigned char* out, uint32_t value) noexcept nogil:
    out[0] = (value >> 24) & 0xFF
    out[1] = (value >> 16) & 0xFF
    out[2] = (value >> 8) & 0xFF
    out[3] = value & 0xFF


cdef inline uint32_t _get_u32(const unsigned char* data) noexcept nogil:
    return (<uint32_t>data[0] << 24) | (<uint32_t>data[1] << 16) | (<uint32_t>data[2] << 8) | data[3]


def encode_frame(uint8_t kind, const unsigned char[:] payload not None) -> bytes:
    """One framed message: length, kind, payload, CRC-32C."""
    cdef Py_ssize_t size = payload.shape[0]
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, _HEADER + 1 + size + _TRAILER)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    _put_u32(out, <uint32_t>(size + 1))
    out[_HEADER] = kind
    if size:
        memcpy(out + _HEADER + 1, &payload[0], size)
    _put_u32(out + _HEADER + 1 + size, crc32c_update(0, out + _HEADER, size + 1))
    return frame


cdef class FrameDecoder:
    """Reassembles frames from a byte stream; ``feed`` returns the complete (kind, payload) pairs."""

    def __cinit__(self, Py_ssize_t max_frame=64 * 1024 * 1024):
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self._buffer = bytearray()
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, const unsigned char[:] data not None) -> list:
        cdef list frames = []
        cdef Py_ssize_t pos = 0, available, body
        cdef const unsigned char* buf
        cdef uint32_t expected
        if data.shape[0]:
            self._buffer += data
        available = len(self._buffer)
        buf = <const unsigned char*>(<char*>self._buffer)
        while available - pos >= _HEADER:
            body = _get_u32(buf + pos)
            if body < 1 or body > self._max_frame:
                raise FrameError(f"frame length {body} is outside 1..{self._max_frame}")
            if available - pos < _HEADER + body + _TRAILER:
                break
            expected = _get_u32(buf + pos + _HEADER + body)
            if crc32c_update(0, buf + pos + _HEADER, body) != expected:
                raise FrameError("frame checksum mismatch")
            frames.append((buf[pos + _HEADER],
                           PyBytes_FromStringAndSize(<char*>buf + pos + _HEADER + 1, body - 1)))
            pos += _HEADER + body + _TRAILER
        if pos:
            del self._buffer[:pos]
        return frames



# ---------------------------------------------------------------------------------------------------
# Peer messages and their binary encoding
# ---------------------------------------------------------------------------------------------------

_MESSAGE_TYPE_NAMES = {
    MSG_APPEND: "MSG_APPEND",
    MSG_APPEND_RESPONSE: "MSG_APPEND_RESPONSE",
    MSG_VOTE: "MSG_VOTE",
    MSG_VOTE_RESPONSE: "MSG_VOTE_RESPONSE",
    MSG_PRE_VOTE: "MSG_PRE_VOTE",
    MSG_PRE_VOTE_RESPONSE: "MSG_PRE_VOTE_RESPONSE",
    MSG_HEARTBEAT: "MSG_HEARTBEAT",
    MSG_HEARTBEAT_RESPONSE: "MSG_HEARTBEAT_RESPONSE",
    MSG_TIMEOUT_NOW: "MSG_TIMEOUT_NOW",
    MSG_READ_INDEX: "MSG_READ_INDEX",
    MSG_READ_INDEX_RESPONSE: "MSG_READ_INDEX_RESPONSE",
    MSG_SNAPSHOT: "MSG_SNAPSHOT",
    MSG_SNAPSHOT_RESPONSE: "MSG_SNAPSHOT_RESPONSE",
}


def entry_kind(bytes payload not None) -> int:
    """The kind (ENTRY_NORMAL, ENTRY_NOOP, ENTRY_CONFIG) of a log entry payload; its data is payload[1:]."""
    if not payload:
        raise ValueError("an entry payload starts with its kind byte; this one is empty")
    return <unsigned char>PyBytes_AS_STRING(payload)[0]


cdef class Message:
    """One Raft peer message. Immutable once built; ``encode_message`` turns it into one frame.

    ``entries`` holds (term, payload) pairs of an append, payloads including their kind byte.
    """

    def __cinit__(self):
        self.src = ""
        self.dst = ""
        self.entries = []
        self.context = b""
        self.data = b""

    def __init__(self, *, int type, str src not None = "", str dst not None = "", uint64_t term=0,
                 uint64_t log_term=0, uint64_t index=0, uint64_t commit=0, entries=None, bint reject=False,
                 uint64_t reject_hint=0, uint64_t conflict_term=0, bytes context not None = b"",
                 uint64_t snapshot_index=0, uint64_t snapshot_term=0, uint64_t offset=0,
                 bytes data not None = b"", bint done=False):
        cdef object item
        if type not in _MESSAGE_TYPE_NAMES:
            raise ValueError(f"unknown message type {type}")
        self.type = type
        self.src = src
        self.dst = dst
        self.term = term
        self.log_term = log_term
        self.index = index
        self.commit = commit
        if entries is not None:
            for item in entries:
                if len(item) != 2:
                    raise ValueError("entries are (term, payload) pairs")
                self.entries.append((<uint64_t>item[0], <bytes?>item[1]))
        self.reject = reject
        self.reject_hint = reject_hint
        self.conflict_term = conflict_term
        self.context = context
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self.offset = offset
        self.data = data
        self.done = done

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        cdef Message that = <Message>other
        return (self.type == that.type and self.src == that.src and self.dst == that.dst
                and self.term == that.term and self.log_term == that.log_term and self.index == that.index
                and self.commit == that.commit and self.entries == that.entries
                and self.reject == that.reject and self.reject_hint == that.reject_hint
                and self.conflict_term == that.conflict_term and self.context == that.context
                and self.snapshot_index == that.snapshot_index and self.snapshot_term == that.snapshot_term
                and self.offset == that.offset and self.data == that.data and self.done == that.done)

    def __repr__(self):
        # Only the fields that differ from their defaults: traces of thousands of messages stay readable.
        cdef list parts = [_MESSAGE_TYPE_NAMES.get(self.type, str(self.type)),
                           f"{self.src}->{self.dst}", f"term={self.term}"]
        if self.log_term or self.index:
            parts.append(f"log_term={self.log_term} index={self.index}")
        if self.commit:
            parts.append(f"commit={self.commit}")
        if self.entries:
            parts.append(f"entries={self.index + 1}..{self.index + <uint64_t>len(self.entries)}"
                         f"(terms {self.entries[0][0]}..{self.entries[-1][0]})")
        if self.reject:
            parts.append(f"reject hint={self.reject_hint} conflict_term={self.conflict_term}")
        if self.context:
            parts.append(f"context={self.context!r}")
        if self.snapshot_index or self.snapshot_term or self.offset or self.data or self.done:
            parts.append(f"snapshot={self.snapshot_index}@{self.snapshot_term} offset={self.offset} "
                         f"data={len(self.data)}B done={self.done}")
        return f"Message({' '.join(parts)})"


# Message payload (the frame's kind byte is the message type), all integers big-endian:
#   u16 len + src UTF-8 | u16 len + dst UTF-8
#   u64 term | u64 log_term | u64 index | u64 commit | u64 reject_hint | u64 conflict_term
#   u8 flags (bit 0 reject, bit 1 done; other bits must be 0)
#   u32 len + context
#   u64 snapshot_index | u64 snapshot_term | u64 offset
#   u32 len + data
#   u32 entry count, then per entry: u64 term | u32 len + payload
cdef enum:
    _MESSAGE_MINIMUM = 2 + 2 + 6 * 8 + 1 + 4 + 3 * 8 + 4 + 4
    _ENTRY_HEADER = 8 + 4
    _FLAG_REJECT = 1
    _FLAG_DONE = 2


ctypedef struct _Cursor:
    const unsigned char* data
    Py_ssize_t size
    Py_ssize_t pos


cdef inline void _put_u16(unsigned char* out, uint32_t value) noexcept nogil:
    out[0] = (value >> 8) & 0xFF
    out[1] = value & 0xFF


cdef inline void _put_u64(unsigned char* out, uint64_t value) noexcept nogil:
    _put_u32(out, <uint32_t>(value >> 32))
    _put_u32(out + 4, <uint32_t>(value & 0xFFFFFFFFU))


cdef inline uint64_t _get_u64(const unsigned char* data) noexcept nogil:
    return (<uint64_t>_get_u32(data) << 32) | _get_u32(data + 4)


cdef inline Py_ssize_t _put_bytes(unsigned char* out, Py_ssize_t pos, bytes value, int width) noexcept:
    cdef Py_ssize_t size = len(value)
    if width == 2:
        _put_u16(out + pos, <uint32_t>size)
    else:
        _put_u32(out + pos, <uint32_t>size)
    pos += width
    memcpy(out + pos, PyBytes_AS_STRING(value), size)
    return pos + size


def encode_message(Message msg not None) -> bytes:
    """``msg`` as one complete frame (what encode_frame(msg.type, payload) would return), built in a
    single allocation."""
    cdef bytes src = msg.src.encode("utf-8")
    cdef bytes dst = msg.dst.encode("utf-8")
    cdef Py_ssize_t size, pos, count = len(msg.entries)
    cdef object item
    cdef bytes payload
    cdef uint64_t term
    if len(src) > 0xFFFF or len(dst) > 0xFFFF:
        raise ValueError("node ids are limited to 65535 UTF-8 bytes")
    if len(msg.context) > 0xFFFFFFFF or len(msg.data) > 0xFFFFFFFF or count > 0xFFFFFFFF:
        raise ValueError("message field too large for its length prefix")
    size = _MESSAGE_MINIMUM + len(src) + len(dst) + len(msg.context) + len(msg.data)
    for item in msg.entries:
        payload = <bytes?>(<tuple?>item)[1]
        term = (<tuple>item)[0]  # an out-of-range term raises OverflowError before anything is written
        size += _ENTRY_HEADER + len(payload)
    if size + 1 > 0xFFFFFFFF:
        raise ValueError(f"message of {size} bytes does not fit one frame")
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, _HEADER + 1 + size + _TRAILER)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
    _put_u32(out, <uint32_t>(size + 1))
    out[_HEADER] = <unsigned char>msg.type
    pos = _HEADER + 1
    pos = _put_bytes(out, pos, src, 2)
    pos = _put_bytes(out, pos, dst, 2)
    _put_u64(out + pos, msg.term)
    _put_u64(out + pos + 8, msg.log_term)
    _put_u64(out + pos + 16, msg.index)
    _put_u64(out + pos + 24, msg.commit)
    _put_u64(out + pos + 32, msg.reject_hint)
    _put_u64(out + pos + 40, msg.conflict_term)
    out[pos + 48] = (_FLAG_REJECT if msg.reject else 0) | (_FLAG_DONE if msg.done else 0)
    pos = _put_bytes(out, pos + 49, msg.context, 4)
    _put_u64(out + pos, msg.snapshot_index)
    _put_u64(out + pos + 8, msg.snapshot_term)
    _put_u64(out + pos + 16, msg.offset)
    pos = _put_bytes(out, pos + 24, msg.data, 4)
    _put_u32(out + pos, <uint32_t>count)
    pos += 4
    for item in msg.entries:
        _put_u64(out + pos, <uint64_t>(<tuple>item)[0])
        pos = _put_bytes(out, pos + 8, <bytes>(<tuple>item)[1], 4)
    _put_u32(out + pos, crc32c_update(0, out + _HEADER, size + 1))
    return frame


cdef int _need(_Cursor* cursor, Py_ssize_t count, str field) except -1:
    if count > cursor.size - cursor.pos:
        raise FrameError(f"message truncated in {field}: needs {count} bytes, {cursor.size - cursor.pos} left")
    return 0


cdef inline uint64_t _take_u64(_Cursor* cursor) noexcept:
    cdef uint64_t value = _get_u64(cursor.data + cursor.pos)
    cursor.pos += 8
    return value


cdef bytes _take_bytes(_Cursor* cursor, int width, str field):
    cdef Py_ssize_t size
    _need(cursor, width, field)
    if width == 2:
        size = (<Py_ssize_t>cursor.data[cursor.pos] << 8) | cursor.data[cursor.pos + 1]
    else:
        size = <Py_ssize_t>_get_u32(cursor.data + cursor.pos)
    cursor.pos += width
    _need(cursor, size, field)
    cdef bytes value = PyBytes_FromStringAndSize(<const char*>cursor.data + cursor.pos, size)
    cursor.pos += size
    return value


cdef str _take_node_id(_Cursor* cursor, str field):
    cdef bytes raw = _take_bytes(cursor, 2, field)
    try:
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), len(raw), NULL)
    except UnicodeDecodeError:
        raise FrameError(f"message {field} is not valid UTF-8") from None


def decode_message(int kind, const unsigned char[:] payload not None) -> Message:
    """The Message in a frame's (kind, payload), as FrameDecoder.feed returns them. Raises FrameError
    for an unknown kind and for a payload that is truncated, over-long or otherwise malformed."""
    cdef _Cursor cursor
    cdef Message msg
    cdef uint64_t count, index, term
    cdef unsigned char flags
    cdef list entries
    if kind not in _MESSAGE_TYPE_NAMES:
        raise FrameError(f"unknown message type {kind}")
    if payload.shape[0] < _MESSAGE_MINIMUM:
        raise FrameError(f"message of {payload.shape[0]} bytes is shorter than the minimum {_MESSAGE_MINIMUM}")
    cursor.data = &payload[0]
    cursor.size = payload.shape[0]
    cursor.pos = 0
    msg = Message.__new__(Message)
    msg.type = kind
    msg.src = _take_node_id(&cursor, "src")
    msg.dst = _take_node_id(&cursor, "dst")
    _need(&cursor, 6 * 8 + 1, "header")
    msg.term = _take_u64(&cursor)
    msg.log_term = _take_u64(&cursor)
    msg.index = _take_u64(&cursor)
    msg.commit = _take_u64(&cursor)
    msg.reject_hint = _take_u64(&cursor)
    msg.conflict_term = _take_u64(&cursor)
    flags = cursor.data[cursor.pos]
    cursor.pos += 1
    if flags & ~(_FLAG_REJECT | _FLAG_DONE):
        raise FrameError(f"message flags {flags:#04x} has unknown bits set")
    msg.reject = (flags & _FLAG_REJECT) != 0
    msg.done = (flags & _FLAG_DONE) != 0
    msg.context = _take_bytes(&cursor, 4, "context")
    _need(&cursor, 3 * 8, "snapshot header")
    msg.snapshot_index = _take_u64(&cursor)
    msg.snapshot_term = _take_u64(&cursor)
    msg.offset = _take_u64(&cursor)
    msg.data = _take_bytes(&cursor, 4, "data")
    _need(&cursor, 4, "entry count")
    count = _get_u32(cursor.data + cursor.pos)
    cursor.pos += 4
    # Bound the count by what the remaining bytes could hold before building anything.
    if count > <uint64_t>((cursor.size - cursor.pos) // _ENTRY_HEADER):
        raise FrameError(f"message claims {count} entries but only {cursor.size - cursor.pos} bytes follow")
    entries = msg.entries
    for index in range(count):
        _need(&cursor, _ENTRY_HEADER, "entry header")
        term = _take_u64(&cursor)
        entries.append((term, _take_bytes(&cursor, 4, "entry payload")))
    if cursor.pos != cursor.size:
        raise FrameError(f"message has {cursor.size - cursor.pos} trailing bytes")
    return msg


# ---------------------------------------------------------------------------------------------------
# The consensus core
# ---------------------------------------------------------------------------------------------------

class ConfigChangePending(Exception):
    """A configuration change cannot start yet: another one is not applied, or the leader is new."""


class NotLeader(Exception):
    """This node cannot take the request; ``leader`` is the leader's node id if one is known."""

    def __init__(self, message, leader=None):
        super().__init__(message)
        self.leader = leader


_ROLE_NAMES = ("follower", "pre_candidate", "candidate", "leader")
_PROGRESS_STATE_NAMES = ("probe", "replicate", "snapshot")

# A vote campaign started by MSG_TIMEOUT_NOW says so in its context: voters then grant it even
# while they still hear from the current leader (Raft §3.10; etcd's campaignTransfer).
cdef bytes _TRANSFER_CONTEXT = b"transfer"
cdef bytes _EMPTY = b""


cdef inline uint64_t _splitmix64(uint64_t* state) noexcept nogil:
    state[0] += <uint64_t>0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef class Progress:
    """What the leader knows of one follower: ``match_index`` (highest index known replicated there),
    ``next_index`` (next one to send), ``state`` ("probe" | "replicate" | "snapshot"), appends in flight."""

    def __cinit__(self, Py_ssize_t max_inflight):
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._inflight = <uint64_t*>malloc(max_inflight * sizeof(uint64_t))
        if self._inflight is NULL:
            raise MemoryError()
        self._inflight_capacity = max_inflight
        self._reset(1)

    def __dealloc__(self):
        free(self._inflight)

    @property
    def state(self) -> str:
        return _PROGRESS_STATE_NAMES[self._state]

    @property
    def inflight(self) -> int:
        return self._inflight_count

    def __repr__(self):
        return (f"Progress(match_index={self.match_index}, next_index={self.next_index}, state={self.state!r}, "
                f"inflight={self._inflight_count}, recent_active={self.recent_active})")

    cdef void _reset(self, uint64_t next_index) noexcept:
        self.match_index = 0
        self.next_index = next_index
        self._state = PROGRESS_PROBE
        self.probe_sent = False
        self.recent_active = False
        self.pending_snapshot = 0
        self._snapshot_ticks = 0
        self._commit_sent = 0
        self._inflight_start = 0
        self._inflight_count = 0

    cdef void _become_probe(self) noexcept:
        if self._state == PROGRESS_SNAPSHOT:
            self.next_index = max(self.match_index + 1, self.pending_snapshot + 1)
        else:
            self.next_index = self.match_index + 1
        self._state = PROGRESS_PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self._inflight_start = 0
        self._inflight_count = 0

    cdef void _become_replicate(self) noexcept:
        self._state = PROGRESS_REPLICATE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._inflight_start = 0
        self._inflight_count = 0

    cdef void _become_snapshot(self, uint64_t snapshot_index) noexcept:
        self._state = PROGRESS_SNAPSHOT
        self.pending_snapshot = snapshot_index
        self._snapshot_ticks = 0
        self._inflight_start = 0
        self._inflight_count = 0

    cdef bint _maybe_update(self, uint64_t index) noexcept:
        cdef bint updated = False
        if self.match_index < index:
            self.match_index = index
            self.probe_sent = False
            updated = True
        if self.next_index < index + 1:
            self.next_index = index + 1
        return updated

    cdef bint _maybe_decrease_to(self, uint64_t rejected, uint64_t match_hint) noexcept:
        # ``rejected`` is the previous index of the refused append, ``match_hint`` where the follower
        # says its log could match. A rejection that does not fit what we last sent is stale.
        if self._state == PROGRESS_REPLICATE:
            if rejected <= self.match_index:
                return False
            self.next_index = self.match_index + 1
            return True
        if self.next_index - 1 != rejected:
            return False
        self.next_index = max(min(rejected, match_hint + 1), self.match_index + 1)
        self.probe_sent = False
        return True

    cdef bint _is_paused(self) noexcept:
        if self._state == PROGRESS_PROBE:
            return self.probe_sent
        if self._state == PROGRESS_REPLICATE:
            return self._inflight_count >= self._inflight_capacity
        return True

    cdef void _add_inflight(self, uint64_t last_index) noexcept:
        # Callers check _is_paused first, so the ring always has room.
        self._inflight[(self._inflight_start + self._inflight_count) % self._inflight_capacity] = last_index
        self._inflight_count += 1

    cdef void _free_inflight_to(self, uint64_t index) noexcept:
        while self._inflight_count and self._inflight[self._inflight_start] <= index:
            self._inflight_start = (self._inflight_start + 1) % self._inflight_capacity
            self._inflight_count -= 1

    cdef void _free_first_inflight(self) noexcept:
        if self._inflight_count:
            self._inflight_start = (self._inflight_start + 1) % self._inflight_capacity
            self._inflight_count -= 1


cdef class Ready:
    """What the driver must do, in order: persist ``snapshot``/``entries``/``hard_state``, send
    ``messages``, apply ``committed``, serve ``read_states``; then call ``RaftCore.advance(ready)``."""

    def __cinit__(self):
        self.entries = []
        self.messages = []
        self.committed = []
        self.read_states = []

    def __bool__(self):
        return bool(self.hard_state is not None or self.entries or self.messages or self.committed
                    or self.read_states or self.soft_state is not None or self.snapshot is not None)

    def __repr__(self):
        return (f"Ready(hard_state={self.hard_state}, entries={len(self.entries)}, messages={len(self.messages)}, "
                f"committed={len(self.committed)}, read_states={self.read_states}, soft_state={self.soft_state}, "
                f"snapshot={self.snapshot})")


cdef class _ReadRequest:
    pass


cdef class RaftCore:
    """The Raft consensus algorithm as a deterministic state machine (etcd/raft's "Ready" design).

    The driver feeds it time (``tick``), peer messages (``step``) and client requests (``propose``,
    ``read_index``, ``transfer_leadership``); it answers with ``Ready`` batches of things to persist,
    send and apply. It does no I/O and reads no clock; given the same inputs and ``seed`` it makes the
    same decisions. See ``ready`` for the contract.

    Once a snapshot covers them, the driver may compact ``log`` up to ``applied_index``
    (``log.compact_to(index, log.term_at(index))``); a follower that needs compacted entries is then
    sent a MSG_SNAPSHOT request (offset 0, no data, done=False) for the driver to stream.
    """

    def __init__(self, str node_id not None, voters not None, *, learners=(), int election_ticks=10,
                 int heartbeat_ticks=1, bint pre_vote=True, bint check_quorum=True, uint64_t seed=0,
                 Py_ssize_t max_append_bytes=1 << 20, Py_ssize_t max_inflight=256):
        cdef bytes id_bytes
        if not node_id:
            raise ValueError("node_id must not be empty")
        if heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be at least 1")
        if election_ticks <= heartbeat_ticks:
            raise ValueError(f"election_ticks ({election_ticks}) must exceed heartbeat_ticks ({heartbeat_ticks})")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if max_append_bytes < 0:
            raise ValueError("max_append_bytes must not be negative")
        self.node_id = node_id
        self._log = RaftLog()
        self._election_ticks = election_ticks
        self._heartbeat_ticks = heartbeat_ticks
        self._pre_vote = pre_vote
        self._check_quorum = check_quorum
        self._max_append_bytes = max_append_bytes
        self._max_inflight = max_inflight
        # Mix the node id into the seed so nodes configured with the same seed still time out apart.
        id_bytes = node_id.encode("utf-8")
        self._random_state = seed ^ (<uint64_t>crc32c_update(0, <const unsigned char*>PyBytes_AS_STRING(id_bytes),
                                                            len(id_bytes)) << 32)
        self._progress = {}
        self._voters = ()
        self._learners = ()
        self._peers = ()
        self._set_config(list(voters), list(learners))
        self._votes = {}
        self._messages = []
        self._read_states = []
        self._read_queue = []
        self._read_requests = {}
        self._reads_awaiting_commit = []
        self._role = ROLE_FOLLOWER
        self._reported_role = ROLE_FOLLOWER
        self._reset_timers()

    def __dealloc__(self):
        free(self._match_scratch)

    # -- Python-visible state ---------------------------------------------------------------------

    @property
    def role(self) -> str:
        return _ROLE_NAMES[self._role]

    @property
    def term(self) -> int:
        return self._term

    @property
    def voted_for(self):
        return self._voted_for

    @property
    def leader_id(self):
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._commit_index

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def voters(self) -> list:
        return list(self._voters)

    @property
    def learners(self) -> list:
        return list(self._learners)

    @property
    def is_voter(self) -> bool:
        return self.node_id in self._voter_set

    @property
    def pending_config_index(self) -> int:
        return self._pending_config_index

    @property
    def log(self) -> RaftLog:
        return self._log

    @property
    def last_index(self) -> int:
        return self._log._last_index()

    @property
    def transfer_target(self):
        return self._transfer_target

    def progress(self, str peer not None) -> Progress:
        """The leader's view of ``peer``'s replication (meaningful while this node leads)."""
        try:
            return self._progress[peer]
        except KeyError:
            raise ValueError(f"{peer!r} is not a peer of {self.node_id!r}") from None

    # -- Start-up ---------------------------------------------------------------------------------

    def restore(self, uint64_t term, voted_for, uint64_t commit_index, entries not None,
                uint64_t snapshot_index=0, uint64_t snapshot_term=0, applied_index=None) -> None:
        """Load durable state, once, before the first tick/step.

        ``entries`` is either a RaftLog (used as is; its snapshot index/term win) or a list of
        (index, term, payload) continuing from ``snapshot_index`` + 1. ``voted_for`` is a node id, or
        "" / None. ``commit_index`` may be anything from 0 up to the last index (0 is always safe);
        ``applied_index`` is where the state machine already is (default: ``snapshot_index``, so
        entries (snapshot_index, commit_index] come back in the first Ready's ``committed``).
        A log whose last term is newer than ``term`` (crash between the entries and the hard state)
        moves the term up to it, with no vote.
        """
        cdef RaftLog log
        cdef uint64_t expected, applied, commit, durable_term = term
        cdef object item
        cdef str durable_vote = voted_for if voted_for else None
        if self._started:
            raise RuntimeError("restore() must come before the first tick() or step()")
        if isinstance(entries, RaftLog):
            log = <RaftLog>entries
            if (snapshot_index or snapshot_term) and (snapshot_index, snapshot_term) != (log.snapshot_index,
                                                                                        log.snapshot_term):
                raise ValueError("snapshot_index/snapshot_term disagree with the RaftLog passed")
        else:
            log = RaftLog(snapshot_index, snapshot_term)
            expected = snapshot_index + 1
            for item in entries:
                if <uint64_t>item[0] != expected:
                    raise ValueError(f"restored entries must be contiguous from {snapshot_index + 1}: "
                                     f"expected index {expected}, got {item[0]}")
                log.append(item[1], item[2])
                expected += 1
        if log._last_term() > term:
            # A crash between writing entries and the hard state: no message of that term left this
            # node (messages go out only after the whole Ready is durable), so no vote was cast in it.
            term = log._last_term()
            voted_for = None
        if commit_index > log._last_index():
            raise ValueError(f"commit_index {commit_index} is beyond the restored log (last index "
                             f"{log._last_index()}): entries must be persisted before the hard state")
        commit = max(commit_index, log.snapshot_index)
        applied = log.snapshot_index if applied_index is None else <uint64_t>applied_index
        if applied < log.snapshot_index or applied > commit:
            raise ValueError(f"applied_index {applied} is outside {log.snapshot_index}..{commit}")
        # Everything is checked: only now does the core change, so a refused restore leaves it as it was.
        self._log = log
        self._term = term
        self._voted_for = voted_for if voted_for else None
        self._commit_index = commit
        self._applied_index = applied
        self._committed_handed_out = applied
        self._stable_index = log._last_index()
        self._handed_out_index = log._last_index()
        # What storage holds: a Ready reports the hard state whenever ours differs from it.
        self._reported_term = durable_term
        self._reported_vote = durable_vote
        self._reported_commit = commit_index
        for item in self._progress.values():
            (<Progress>item)._reset(log._last_index() + 1)

    # -- Inputs -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """One logical clock tick: elections on followers, heartbeats and check-quorum on the leader."""
        self._started = True
        if self._role == ROLE_LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def step(self, Message msg not None) -> None:
        """Handle one message from a peer."""
        cdef int kind = msg.type
        cdef Message response
        self._started = True
        if msg.dst != self.node_id:
            raise ValueError(f"message for {msg.dst!r} stepped into {self.node_id!r}")
        if msg.src == self.node_id:
            return
        if (kind == MSG_VOTE or kind == MSG_PRE_VOTE) and msg.src not in self._voter_set:
            # A removed node (or one we never had) must not disturb elections. Other messages from outside
            # the configuration are taken: a leader added after this node's last known configuration
            # still needs to reach it, and a leader ignores answers from nodes it does not track.
            return
        if msg.term > self._term:
            if kind == MSG_VOTE or kind == MSG_PRE_VOTE:
                # Leader lease (Raft §4.2.3): while we hear from a leader, a node that lost contact
                # (and rejoins with a higher term) must not depose it. A transfer is exempt.
                if self._in_leader_lease() and not (kind == MSG_VOTE and msg.context == _TRANSFER_CONTEXT):
                    return
            # A pre-vote never changes terms; the pre-candidate bumps its term once it wins.
            if not (kind == MSG_PRE_VOTE or (kind == MSG_PRE_VOTE_RESPONSE and not msg.reject)):
                if kind == MSG_APPEND or kind == MSG_HEARTBEAT or kind == MSG_SNAPSHOT:
                    self._become_follower(msg.term, msg.src)
                else:
                    self._become_follower(msg.term, None)
        elif msg.term < self._term:
            if (self._check_quorum or self._pre_vote) and (kind == MSG_APPEND or kind == MSG_HEARTBEAT):
                # The sender leads an older term. With check-quorum/pre-vote our higher term would
                # otherwise never reach it (we ignore it, it never sees our votes): tell it.
                self._messages.append(self._new_message(MSG_APPEND_RESPONSE, msg.src))
            elif kind == MSG_PRE_VOTE:
                response = self._new_message(MSG_PRE_VOTE_RESPONSE, msg.src)
                response.reject = True
                self._messages.append(response)
            return
        if kind == MSG_VOTE or kind == MSG_PRE_VOTE:
            self._process_vote(msg)
        elif self._role == ROLE_LEADER:
            self._step_leader(msg)
        elif self._role == ROLE_FOLLOWER:
            self._step_follower(msg)
        else:
            self._step_candidate(msg)

    def propose(self, list payloads not None) -> int:
        """Append client commands (one ENTRY_NORMAL entry each, in one batch); returns the last index."""
        if self._role != ROLE_LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", self._leader_id)
        if self._transfer_target is not None:
            raise NotLeader(f"{self.node_id} is transferring leadership to {self._transfer_target}", None)
        if not payloads:
            raise ValueError("propose needs at least one command")
        cdef uint64_t last = self._log._append_with_kind(self._term, ENTRY_NORMAL, payloads)
        self._broadcast_append()
        return last

    def propose_config(self, bytes data not None) -> int:
        """Append one ENTRY_CONFIG entry carrying ``data`` (the driver's encoding of the whole new
        configuration); returns its index. The driver calls ``apply_config`` when it applies it.

        Raft §4.1 single-server changes, applied when committed (as etcd does): safe as long as one change
        is in flight at a time and the leader has committed an entry of its own term first (the fix from
        Ongaro's 2015 raft-dev note). Otherwise raises ConfigChangePending; retry after ``applied_index``
        passes ``pending_config_index``.
        """
        if self._role != ROLE_LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", self._leader_id)
        if self._transfer_target is not None:
            raise NotLeader(f"{self.node_id} is transferring leadership to {self._transfer_target}", None)
        if self._pending_config_index > self._applied_index:
            raise ConfigChangePending(f"configuration change at index {self._pending_config_index} is not "
                                      f"applied yet (applied: {self._applied_index})")
        if self._log._term_or_zero(self._commit_index) != self._term:
            raise ConfigChangePending(f"{self.node_id} has not committed an entry of its term {self._term} yet")
        cdef uint64_t last = self._log._append_with_kind(self._term, ENTRY_CONFIG, [data])
        self._pending_config_index = last
        self._broadcast_append()
        return last

    def apply_config(self, voters not None, learners not None) -> None:
        """Make (voters, learners) the configuration: at start-up, when a committed ENTRY_CONFIG entry
        is applied, or after a snapshot carrying a configuration is installed. A leader that is no
        longer a voter steps down; progress of new peers starts from the end of the log."""
        cdef object item
        cdef str peer
        cdef uint64_t next_index = self._log._last_index() + 1
        self._set_config(list(voters), list(learners))
        if self._transfer_target is not None and self._transfer_target not in self._voter_set:
            self._abort_transfer()
        if self.node_id not in self._voter_set and self._role != ROLE_FOLLOWER:
            self._become_follower(self._term, None)
            return
        if self._role != ROLE_LEADER:
            return
        for peer in self._peers:
            item = self._progress[peer]
            if (<Progress>item).next_index == 0:
                (<Progress>item)._reset(next_index)
                self._send_appends(peer)
        # A smaller quorum may commit what was waiting for the removed voter.
        if self._maybe_commit():
            self._broadcast_append()

    cdef int _set_config(self, list voters, list learners) except -1:
        cdef object member
        cdef dict progress = {}
        cdef Progress tracked
        for member in voters + learners:
            if not isinstance(member, str) or not member:
                raise ValueError(f"voters and learners must be non-empty strings, got {member!r}")
        if len(set(voters)) != len(voters) or len(set(learners)) != len(learners):
            raise ValueError(f"a node is listed twice: voters {voters}, learners {learners}")
        if set(voters) & set(learners):
            raise ValueError(f"{sorted(set(voters) & set(learners))} cannot be voter and learner at once")
        cdef void* scratch = realloc(self._match_scratch, (len(voters) + 1) * sizeof(uint64_t))
        if scratch is NULL:
            raise MemoryError()
        self._match_scratch = <uint64_t*>scratch
        self._voters = tuple(voters)
        self._learners = tuple(learners)
        self._voter_set = frozenset(voters)
        self._voter_peers = tuple([member for member in voters if member != self.node_id])
        self._peers = tuple([member for member in voters + learners if member != self.node_id])
        self._quorum = len(voters) // 2 + 1
        for member in self._peers:
            tracked = self._progress.get(member)
            if tracked is None:
                tracked = Progress(self._max_inflight)
                tracked.next_index = 0  # marks it new: apply_config starts it at the log's end
            progress[member] = tracked
        self._progress = progress
        return 0

    def read_index(self, bytes context not None) -> None:
        """Ask for a linearizable read point (Raft §6.4). It arrives as (context, index) in a later
        Ready's ``read_states``; serve the read once ``applied_index`` >= index. ``context`` must be
        unique per request. A read that cannot complete (leadership lost) is dropped: time it out."""
        cdef Message msg
        if self._role == ROLE_LEADER:
            self._handle_read_request(context, None)
        elif self._leader_id is not None:
            msg = self._new_message(MSG_READ_INDEX, self._leader_id)
            msg.context = context
            self._messages.append(msg)
        else:
            raise NotLeader(f"{self.node_id} knows no leader", None)

    def transfer_leadership(self, str to not None) -> None:
        """Hand leadership to ``to`` (Raft §3.10): stop taking proposals, bring ``to`` up to date, send
        it MSG_TIMEOUT_NOW. Abandoned after an election timeout if ``to`` has not taken over."""
        cdef Progress progress
        if self._role != ROLE_LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", self._leader_id)
        if to == self.node_id:
            return
        if to not in self._voter_set:
            raise ValueError(f"{to!r} is not a voter")
        if self._transfer_target == to:
            return
        self._transfer_target = to
        self._transfer_elapsed = 0
        progress = self._progress[to]
        if progress.match_index == self._log._last_index():
            self._send_timeout_now(to)
        else:
            self._send_appends(to)

    # -- The Ready contract -----------------------------------------------------------------------

    def has_ready(self) -> bool:
        """True when ready() has something; always False between ready() and advance()."""
        if self._outstanding is not None:
            return False
        return bool(self._messages or self._read_states or self._commit_news_pending
                    or self._handed_out_index < self._log._last_index()
                    or self._committed_handed_out < self._commit_index
                    or self._pending_snapshot is not None
                    or self._term != self._reported_term or self._voted_for != self._reported_vote
                    or self._commit_index != self._reported_commit
                    or self._role != self._reported_role or self._leader_id != self._reported_leader)

    def ready(self) -> Ready:
        """Everything that happened since the last Ready. The driver, in this order:

        1. if ``snapshot`` is (index, term): replace the durable log with that snapshot (and restore
           the state machine from the snapshot data the driver received);
        2. write ``entries``; when the first index is <= the last index handed out before, first
           truncate the durable log from that index (a conflicting suffix);
        3. write ``hard_state`` (term, voted_for or "", commit_index) if not None - after the entries,
           or atomically with them; fsync;
        4. send ``messages``;  5. apply ``committed``;  6. serve ``read_states``;  7. ``advance(ready)``.

        step()/tick()/propose() may be called between ready() and advance(); another ready() may not.
        """
        cdef Ready ready
        cdef uint64_t last = self._log._last_index()
        cdef tuple last_entry
        if self._outstanding is not None:
            raise RuntimeError("advance() the previous Ready before taking another")
        ready = Ready()
        if (self._term != self._reported_term or self._voted_for != self._reported_vote
                or self._commit_index != self._reported_commit):
            ready.hard_state = (self._term, self._voted_for or "", self._commit_index)
            self._reported_term = self._term
            self._reported_vote = self._voted_for
            self._reported_commit = self._commit_index
        if self._pending_snapshot is not None:
            ready.snapshot = self._pending_snapshot
            self._pending_snapshot = None
        if self._commit_news_pending:
            self._send_commit_news()
        if self._handed_out_index < last:
            ready.entries = self._log._collect(self._handed_out_index + 1, last, -1, True)
            self._handed_out_index = last
            last_entry = ready.entries[len(ready.entries) - 1]
            ready._last_entry_index = last
            ready._last_entry_term = last_entry[1]
        if self._messages:
            ready.messages = self._messages
            self._messages = []
        if self._committed_handed_out < self._commit_index:
            ready.committed = self._log._collect(self._committed_handed_out + 1, self._commit_index, -1, True)
            self._committed_handed_out = self._commit_index
            ready._last_committed_index = self._commit_index
        if self._read_states:
            ready.read_states = self._read_states
            self._read_states = []
        if self._role != self._reported_role or self._leader_id != self._reported_leader:
            ready.soft_state = (_ROLE_NAMES[self._role], self._leader_id)
            self._reported_role = self._role
            self._reported_leader = self._leader_id
        self._outstanding = ready
        return ready

    def advance(self, Ready ready not None) -> None:
        """The driver persisted, sent and applied ``ready``.

        The leader's own log counts towards commit only from here: its match index becomes the last
        entry of an advanced Ready (if that entry is still in the log), so nothing commits before a
        quorum - the leader included only once its fsync is done - holds it durably.
        """
        if ready is not self._outstanding:
            raise ValueError("advance() takes the Ready returned by the last ready()")
        self._outstanding = None
        if ready._last_committed_index > self._applied_index:
            self._applied_index = ready._last_committed_index
        if (ready._last_entry_index > self._stable_index
                and self._log._holds(ready._last_entry_index, ready._last_entry_term)):
            # Every entry before this Ready's came in an earlier, already advanced Ready.
            self._stable_index = ready._last_entry_index
            if self._role == ROLE_LEADER and self._maybe_commit():
                self._commit_news_pending = True

    # -- Timers and elections ---------------------------------------------------------------------

    cdef int _next_random(self) noexcept:
        return <int>(_splitmix64(&self._random_state) % <uint64_t>self._election_ticks)

    cdef void _reset_timers(self) noexcept:
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        # Raft §5.2: randomized in [election_ticks, 2 * election_ticks) so split votes are rare.
        self._randomized_election_timeout = self._election_ticks + self._next_random()

    cdef inline bint _in_leader_lease(self) noexcept:
        return (self._check_quorum and self._leader_id is not None
                and self._election_elapsed < self._election_ticks)

    cdef inline Message _new_message(self, int kind, str to):
        cdef Message msg = Message.__new__(Message)
        msg.type = kind
        msg.src = self.node_id
        msg.dst = to
        msg.term = self._term
        return msg

    cdef int _tick_election(self) except -1:
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_election_timeout:
            if self.node_id in self._voter_set:
                self._campaign(self._pre_vote, False)
            else:
                # A learner or a node outside the configuration waits to be told; it never campaigns.
                self._reset_timers()
        return 0

    cdef int _tick_leader(self) except -1:
        cdef object item
        cdef Progress progress
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._election_ticks:
            self._election_elapsed = 0
            # Check quorum (Raft §6.2): a leader cut off from a majority steps down rather than
            # keep answering as leader while the others elect someone else.
            if self._check_quorum and not self._quorum_active():
                self._become_follower(self._term, None)
                return 0
        if self._transfer_target is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self._election_ticks:
                self._abort_transfer()
        for item in self._progress.values():
            progress = <Progress>item
            if progress._state == PROGRESS_SNAPSHOT:
                # The snapshot answer may be lost: ask again (the driver ignores a repeat while a stream runs).
                progress._snapshot_ticks += 1
                if progress._snapshot_ticks >= self._election_ticks:
                    progress._become_probe()
        if self._heartbeat_elapsed >= self._heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat(
                (<_ReadRequest>self._read_queue[len(self._read_queue) - 1]).context if self._read_queue else _EMPTY)
        return 0

    cdef bint _quorum_active(self) noexcept:
        cdef Py_ssize_t active = 1
        cdef object item
        cdef str peer
        for peer, item in self._progress.items():
            if (<Progress>item).recent_active and peer in self._voter_set:
                active += 1
            (<Progress>item).recent_active = False
        return active >= self._quorum

    cdef int _become_follower(self, uint64_t term, str leader) except -1:
        if term != self._term:
            self._term = term
            self._voted_for = None
        self._role = ROLE_FOLLOWER
        self._leader_id = leader
        self._votes.clear()
        self._reset_timers()
        self._abort_transfer()
        self._drop_reads()
        return 0

    cdef int _become_pre_candidate(self) except -1:
        # Raft §9.6: ask first whether we could win, without touching the term, so a node that
        # cannot win (stale log, partitioned) does not force everyone into a new term.
        self._role = ROLE_PRE_CANDIDATE
        self._leader_id = None
        self._votes.clear()
        self._reset_timers()
        return 0

    cdef int _become_candidate(self) except -1:
        self._term += 1
        self._voted_for = self.node_id
        self._role = ROLE_CANDIDATE
        self._leader_id = None
        self._votes.clear()
        self._reset_timers()
        return 0

    cdef int _become_leader(self) except -1:
        cdef object item
        cdef uint64_t next_index = self._log._last_index() + 1
        self._role = ROLE_LEADER
        self._leader_id = self.node_id
        self._votes.clear()
        self._reset_timers()
        self._transfer_target = None
        self._drop_reads()
        for item in self._progress.values():
            (<Progress>item)._reset(next_index)
        # Any entry after the commit index may be a configuration change: none more until it is applied.
        self._pending_config_index = self._log._last_index()
        # Raft §5.4.2 / §6.4: a leader commits earlier terms' entries only through one of its own
        # term, and serves reads only after that; the no-op makes that happen without client writes.
        self._log._append_with_kind(self._term, ENTRY_NOOP, [_EMPTY])
        self._broadcast_append()
        return 0

    cdef int _campaign(self, bint pre_vote, bint transfer) except -1:
        cdef int kind
        cdef uint64_t vote_term
        cdef str peer
        cdef Message msg
        if pre_vote:
            self._become_pre_candidate()
            kind = MSG_PRE_VOTE
            vote_term = self._term + 1
        else:
            self._become_candidate()
            kind = MSG_VOTE
            vote_term = self._term
        self._votes[self.node_id] = True
        if self._quorum == 1:
            if pre_vote:
                return self._campaign(False, transfer)
            return self._become_leader()
        for peer in self._voter_peers:
            msg = self._new_message(kind, peer)
            msg.term = vote_term
            msg.index = self._log._last_index()
            msg.log_term = self._log._last_term()
            if transfer:
                msg.context = _TRANSFER_CONTEXT
            self._messages.append(msg)
        return 0

    cdef int _tally_vote(self, Message msg) except -1:
        cdef Py_ssize_t granted = 0, rejected = 0
        cdef object vote
        if msg.src not in self._voter_set:
            return 0
        if msg.src not in self._votes:
            self._votes[msg.src] = not msg.reject
        for vote in self._votes.values():
            if vote:
                granted += 1
            else:
                rejected += 1
        if granted >= self._quorum:
            if self._role == ROLE_PRE_CANDIDATE:
                self._campaign(False, False)
            else:
                self._become_leader()
        elif rejected > len(self._voters) - self._quorum:
            self._become_follower(self._term, None)
        return 0

    # -- Per-role message handling ----------------------------------------------------------------

    cdef int _step_leader(self, Message msg) except -1:
        cdef Progress progress = self._progress.get(msg.src)
        cdef int kind = msg.type
        if progress is None:
            return 0
        if kind == MSG_APPEND_RESPONSE:
            progress.recent_active = True
            self._handle_append_response(progress, msg)
        elif kind == MSG_HEARTBEAT_RESPONSE:
            progress.recent_active = True
            self._handle_heartbeat_response(progress, msg)
        elif kind == MSG_SNAPSHOT_RESPONSE:
            progress.recent_active = True
            self._handle_snapshot_response(progress, msg)
        elif kind == MSG_READ_INDEX:
            self._handle_read_request(msg.context, msg.src)
        return 0

    cdef int _step_candidate(self, Message msg) except -1:
        cdef int kind = msg.type
        if kind == MSG_APPEND or kind == MSG_HEARTBEAT or kind == MSG_SNAPSHOT:
            # A leader exists in our term (or, for a pre-candidate, the term we did not leave).
            self._become_follower(msg.term, msg.src)
            self._step_follower(msg)
        elif ((kind == MSG_PRE_VOTE_RESPONSE and self._role == ROLE_PRE_CANDIDATE)
              or (kind == MSG_VOTE_RESPONSE and self._role == ROLE_CANDIDATE)):
            self._tally_vote(msg)
        return 0

    cdef int _step_follower(self, Message msg) except -1:
        cdef int kind = msg.type
        if kind == MSG_APPEND or kind == MSG_HEARTBEAT or kind == MSG_SNAPSHOT:
            self._election_elapsed = 0
            self._leader_id = msg.src
            if kind == MSG_APPEND:
                self._process_append(msg)
            elif kind == MSG_HEARTBEAT:
                self._process_heartbeat(msg)
            else:
                self._process_snapshot(msg)
        elif kind == MSG_TIMEOUT_NOW:
            if self.node_id in self._voter_set:
                self._campaign(False, True)
        elif kind == MSG_READ_INDEX_RESPONSE:
            self._read_states.append((msg.context, msg.index))
        return 0

    cdef int _process_vote(self, Message msg) except -1:
        cdef bint pre_vote = msg.type == MSG_PRE_VOTE
        cdef Message response = self._new_message(MSG_PRE_VOTE_RESPONSE if pre_vote else MSG_VOTE_RESPONSE,
                                                  msg.src)
        cdef uint64_t last_term = self._log._last_term()
        cdef bint can_vote = (self._voted_for == msg.src
                              or (self._voted_for is None and self._leader_id is None)
                              or (pre_vote and msg.term > self._term))
        # Raft §5.4.1: only a candidate whose log is at least as up to date as ours.
        cdef bint up_to_date = msg.log_term > last_term or (msg.log_term == last_term
                                                            and msg.index >= self._log._last_index())
        if can_vote and up_to_date:
            # A granted pre-vote carries the term it was asked for, so the pre-candidate counts it.
            response.term = msg.term
            if not pre_vote:
                self._election_elapsed = 0
                self._voted_for = msg.src
        else:
            response.reject = True
        self._messages.append(response)
        return 0

    cdef int _process_append(self, Message msg) except -1:
        cdef Message response = self._new_message(MSG_APPEND_RESPONSE, msg.src)
        cdef uint64_t last_new, hint
        if msg.index < self._commit_index:
            # Everything up to our commit index matches the leader already (Raft §5.4 / etcd).
            response.index = self._commit_index
        elif self._log._holds(msg.index, msg.log_term):
            last_new = msg.index + <uint64_t>len(msg.entries)
            self._append_after(msg.index, msg.entries)
            self._commit_to(min(msg.commit, last_new))
            response.index = last_new
        else:
            # Fast backtracking (Raft §5.3 "optimization"; etcd's findConflictByTerm): point the leader
            # at the last index whose term could still match, skipping a whole term per round trip.
            hint = self._log._find_conflict_by_term(min(msg.index, self._log._last_index()), msg.log_term)
            response.index = msg.index
            response.reject = True
            response.reject_hint = hint
            response.conflict_term = self._log._term_or_zero(hint)
        self._messages.append(response)
        return 0

    cdef int _append_after(self, uint64_t previous_index, list entries) except -1:
        cdef Py_ssize_t position = 0, count = len(entries)
        cdef uint64_t index, last = self._log._last_index()
        while position < count:
            index = previous_index + 1 + <uint64_t>position
            if index > last:
                break
            if self._log._term_or_zero(index) != <uint64_t>(<tuple>entries[position])[0]:
                if index <= self._commit_index:
                    raise RuntimeError(f"{self.node_id}: entry {index} conflicts with committed entries "
                                       f"(commit index {self._commit_index})")
                self._truncate_from(index)
                break
            position += 1
        if position < count:
            self._log.extend(entries[position:] if position else entries)
        return 0

    cdef int _truncate_from(self, uint64_t index) except -1:
        self._log.truncate_from(index)
        if self._handed_out_index >= index:
            self._handed_out_index = index - 1
        if self._stable_index >= index:
            self._stable_index = index - 1
        return 0

    cdef int _commit_to(self, uint64_t index) except -1:
        if index > self._commit_index:
            if index > self._log._last_index():
                raise RuntimeError(f"{self.node_id}: commit index {index} is beyond the last index "
                                   f"{self._log._last_index()}")
            self._commit_index = index
        return 0

    cdef int _process_heartbeat(self, Message msg) except -1:
        cdef Message response = self._new_message(MSG_HEARTBEAT_RESPONSE, msg.src)
        # The leader sends min(our match index, its commit), so this never outruns a matching log.
        self._commit_to(msg.commit)
        response.context = msg.context
        self._messages.append(response)
        return 0

    cdef int _process_snapshot(self, Message msg) except -1:
        cdef Message response
        cdef uint64_t index = msg.snapshot_index
        if not msg.done:
            return 0  # earlier chunks are the driver's to assemble; the final one carries the decision
        response = self._new_message(MSG_SNAPSHOT_RESPONSE, msg.src)
        if index <= self._commit_index:
            response.index = self._commit_index
        elif self._log._holds(index, msg.snapshot_term):
            # Our log already has the snapshot's last entry: it is committed, nothing to install.
            self._commit_to(index)
            response.index = index
        else:
            self._log = RaftLog(index, msg.snapshot_term)
            self._commit_index = index
            self._applied_index = index
            self._committed_handed_out = index
            self._stable_index = index
            self._handed_out_index = index
            self._pending_snapshot = (index, msg.snapshot_term)
            response.index = index
        self._messages.append(response)
        return 0

    # -- Leader: replication, commit, heartbeats --------------------------------------------------

    cdef bint _maybe_commit(self) except -1:
        cdef Py_ssize_t count = 1, i, j
        cdef uint64_t value, candidate
        cdef object item
        cdef str peer
        self._match_scratch[0] = self._stable_index
        for peer in self._voter_peers:
            self._match_scratch[count] = (<Progress>self._progress[peer]).match_index
            count += 1
        for i in range(1, count):  # insertion sort, descending: a handful of voters
            value = self._match_scratch[i]
            j = i - 1
            while j >= 0 and self._match_scratch[j] < value:
                self._match_scratch[j + 1] = self._match_scratch[j]
                j -= 1
            self._match_scratch[j + 1] = value
        candidate = self._match_scratch[self._quorum - 1]
        # Raft §5.4.2: count replicas only for an entry of the current term.
        if candidate > self._commit_index and self._log._term_or_zero(candidate) == self._term:
            self._commit_index = candidate
            if self._reads_awaiting_commit:
                self._release_reads_awaiting_commit()
            return True
        return False

    cdef int _handle_append_response(self, Progress progress, Message msg) except -1:
        cdef uint64_t hint
        if msg.reject:
            hint = msg.reject_hint
            if msg.conflict_term > 0:
                # The follower's hint term may not exist on our side; skip to our last entry at or
                # before the hint whose term is no newer, so one round trip passes a whole term.
                hint = self._log._find_conflict_by_term(hint, msg.conflict_term)
            if progress._maybe_decrease_to(msg.index, hint):
                if progress._state == PROGRESS_REPLICATE:
                    progress._become_probe()
                self._send_append(msg.src, True)
            return 0
        if not progress._maybe_update(msg.index):
            return 0
        if progress._state == PROGRESS_PROBE:
            progress._become_replicate()
        elif progress._state == PROGRESS_SNAPSHOT:
            if progress.match_index >= progress.pending_snapshot:
                progress._become_probe()
        else:
            progress._free_inflight_to(msg.index)
        if self._maybe_commit():
            # Told in the next Ready (_send_commit_news), not now: appends of the writes proposed meanwhile
            # carry it, and several commits before that Ready cost one message per follower, not one each.
            self._commit_news_pending = True
        # The ack may have opened the in-flight window: what waited for it goes now. Nothing when nothing
        # waited: an empty append would only draw another ack (one more message each way per round).
        while self._send_append(msg.src, False):
            pass
        if msg.src == self._transfer_target and progress.match_index == self._log._last_index():
            self._send_timeout_now(msg.src)
        return 0

    cdef int _handle_heartbeat_response(self, Progress progress, Message msg) except -1:
        progress.probe_sent = False
        if progress._state == PROGRESS_REPLICATE and progress._inflight_count >= progress._inflight_capacity:
            # Acks may have been lost: let one more append out so the follower can tell us where it is.
            progress._free_first_inflight()
        if progress.match_index < self._log._last_index():
            self._send_append(msg.src, True)
        if msg.context and self._read_queue:
            self._ack_read(msg.context, msg.src)
        return 0

    cdef int _handle_snapshot_response(self, Progress progress, Message msg) except -1:
        cdef bint updated = False
        if progress._state != PROGRESS_SNAPSHOT:
            return 0
        if msg.reject:
            progress.pending_snapshot = 0
        else:
            updated = progress._maybe_update(msg.index)
        progress._become_probe()
        if updated and self._maybe_commit():
            self._broadcast_append()
        else:
            self._send_appends(msg.src)
        return 0

    cdef bint _send_append(self, str to, bint send_if_empty) except -1:
        # One append to ``to`` from its next index; True if it carried entries.
        cdef Progress progress = self._progress[to]
        cdef uint64_t previous_index, last_index
        cdef list entries
        cdef Message msg
        if progress._is_paused():
            return False
        previous_index = progress.next_index - 1
        if previous_index < self._log.snapshot_index:
            # The entries it needs are compacted: ask the driver to stream the snapshot (offset 0,
            # no data, not done); the follower's core acts on the final chunk.
            progress._become_snapshot(self._log.snapshot_index)
            msg = self._new_message(MSG_SNAPSHOT, to)
            msg.snapshot_index = self._log.snapshot_index
            msg.snapshot_term = self._log.snapshot_term
            self._messages.append(msg)
            return False
        last_index = self._log._last_index()
        if progress.next_index <= last_index:
            entries = self._log._collect(progress.next_index, last_index, self._max_append_bytes, False)
        else:
            entries = []
        if not entries and not send_if_empty:
            return False
        msg = self._new_message(MSG_APPEND, to)
        msg.index = previous_index
        msg.log_term = self._log._term_or_zero(previous_index)
        msg.commit = self._commit_index
        msg.entries = entries
        self._messages.append(msg)
        progress._commit_sent = self._commit_index
        if progress._state == PROGRESS_REPLICATE:
            if entries:
                # Pipelining: assume it will be accepted and send the next batch without waiting.
                progress.next_index = previous_index + <uint64_t>len(entries) + 1
                progress._add_inflight(progress.next_index - 1)
        else:
            progress.probe_sent = True
        return len(entries) > 0

    cdef int _send_appends(self, str to) except -1:
        if self._send_append(to, True):
            while self._send_append(to, False):
                pass
        return 0

    cdef int _broadcast_append(self) except -1:
        cdef str peer
        for peer in self._peers:
            self._send_appends(peer)
        return 0

    cdef int _send_commit_news(self) except -1:
        # A new commit index to every follower that no append since has carried (Raft §5.3: followers
        # learn it from the next AppendEntries); an empty append where no entries wait.
        cdef str peer
        self._commit_news_pending = False
        if self._role != ROLE_LEADER:
            return 0
        for peer in self._peers:
            if (<Progress>self._progress[peer])._commit_sent < self._commit_index:
                self._send_appends(peer)
        return 0

    cdef Message _build_heartbeat(self, str to, bytes context):
        cdef Message msg = self._new_message(MSG_HEARTBEAT, to)
        cdef Progress progress = self._progress[to]
        # Never more than the follower is known to match: its log beyond that may still differ.
        msg.commit = min(progress.match_index, self._commit_index)
        msg.context = context
        return msg

    cdef int _broadcast_heartbeat(self, bytes context) except -1:
        cdef str peer
        for peer in self._peers:
            self._messages.append(self._build_heartbeat(peer, context))
        return 0

    cdef int _send_timeout_now(self, str to) except -1:
        self._messages.append(self._new_message(MSG_TIMEOUT_NOW, to))
        return 0

    cdef int _abort_transfer(self) except -1:
        self._transfer_target = None
        self._transfer_elapsed = 0
        return 0

    # -- Leader: linearizable reads (Raft §6.4) ---------------------------------------------------

    cdef int _handle_read_request(self, bytes context, str requester) except -1:
        cdef _ReadRequest request
        if self._log._term_or_zero(self._commit_index) != self._term:
            # Until an entry of this term commits, our commit index may trail the real one.
            self._reads_awaiting_commit.append((context, requester))
            return 0
        if context in self._read_requests:
            return 0
        request = _ReadRequest()
        request.context = context
        request.index = self._commit_index
        request.requester = requester
        if self._quorum == 1:
            return self._deliver_read(request)
        # Confirm we still lead: a heartbeat round acknowledged by a quorum after the request arrived.
        request.acks = {self.node_id}
        self._read_requests[context] = request
        self._read_queue.append(request)
        self._broadcast_heartbeat(context)
        return 0

    cdef int _release_reads_awaiting_commit(self) except -1:
        cdef list waiting = self._reads_awaiting_commit
        cdef tuple item
        self._reads_awaiting_commit = []
        for item in waiting:
            self._handle_read_request(<bytes>item[0], <str>item[1])
        return 0

    cdef int _ack_read(self, bytes context, str voter) except -1:
        cdef _ReadRequest request = self._read_requests.get(context)
        cdef _ReadRequest released
        cdef Py_ssize_t position
        if request is None or voter not in self._voter_set:
            return 0
        request.acks.add(voter)
        if len(request.acks) < self._quorum:
            return 0
        # The quorum answered a heartbeat sent after every earlier queued request too: release them all.
        position = self._read_queue.index(request) + 1
        for released in self._read_queue[:position]:
            del self._read_requests[released.context]
            self._deliver_read(released)
        del self._read_queue[:position]
        return 0

    cdef int _deliver_read(self, _ReadRequest request) except -1:
        cdef Message msg
        if request.requester is None:
            self._read_states.append((request.context, request.index))
        else:
            msg = self._new_message(MSG_READ_INDEX_RESPONSE, request.requester)
            msg.index = request.index
            msg.context = request.context
            self._messages.append(msg)
        return 0

    cdef int _drop_reads(self) except -1:
        self._read_queue.clear()
        self._read_requests.clear()
        self._reads_awaiting_commit.clear()
        return 0
