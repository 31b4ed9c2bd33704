# cython: language_level=3
"""Raft hot paths: the in-memory log and the framing of peer messages.

Python owns sockets, timers and fsync; this module owns the bytes and the bookkeeping.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove


cdef uint32_t _CRC32C_TABLE[256]


cdef void _build_crc32c_table() noexcept nogil:
    # CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum iSCSI, ext4 and etcd's WAL use.
    cdef uint32_t crc
    cdef int i, bit
    for i in range(256):
        crc = <uint32_t>i
        for bit in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ <uint32_t>0x82F63B78U
            else:
                crc >>= 1
        _CRC32C_TABLE[i] = crc


_build_crc32c_table()


cdef uint32_t crc32c_update(uint32_t crc, const unsigned char* data, Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t i
    crc = ~crc
    for i in range(length):
        crc = _CRC32C_TABLE[(crc ^ data[i]) & 0xFF] ^ (crc >> 8)
    return ~crc


def crc32c(const unsigned char[:] data not None, uint32_t crc=0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (0 to start)."""
    if data.shape[0] == 0:
        return crc
    return crc32c_update(crc, &data[0], data.shape[0])


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
        cdef list out = []
        cdef Py_ssize_t used = 0
        cdef Py_ssize_t slot, size
        cdef uint64_t index
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
            out.append((self._terms[slot],
                        PyBytes_FromStringAndSize(<char*>self._data + self._offsets[slot], size)))
        return out

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
