# Declarations of the Raft log and the peer frame codec (definitions in _raft.pyx).
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef uint32_t crc32c_update(uint32_t crc, const unsigned char* data, Py_ssize_t length) noexcept nogil


cdef class RaftLog:
    # Entries [first_index, last_index] are held; everything up to snapshot_index is compacted away.
    cdef uint64_t* _terms          # _terms[i] is the term of entry first_index + i
    cdef uint64_t* _offsets        # entry i occupies _data[_offsets[i]:_offsets[i + 1]]
    cdef unsigned char* _data      # all entry payloads back to back
    cdef Py_ssize_t _count
    cdef Py_ssize_t _capacity      # entries the two arrays have room for
    cdef Py_ssize_t _data_capacity
    cdef readonly uint64_t snapshot_index
    cdef readonly uint64_t snapshot_term

    cdef int _reserve(self, Py_ssize_t entries, Py_ssize_t data_bytes) except -1
    cdef inline Py_ssize_t _slot(self, uint64_t index) except -2


cdef class FrameDecoder:
    cdef bytearray _buffer
    cdef Py_ssize_t _max_frame
