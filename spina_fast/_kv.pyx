# cython: language_level=3
"""The KV store's snapshot encoding (every entry as fixed-width fields and raw bytes, in key order) and its
apply hot path (``apply_plain``, at the end).

A snapshot is written by a forked child from the whole state (``raft/node.py``), so its cost grows with the
state, not with the writes since the last one: as JSON with hex values it took ~1 s of CPU at 300k keys, which
on a 2-core machine competes with the nodes' event loops. Here it is two passes of dictionary lookups and
``memcpy`` (tens of ms at 300k keys), and the file is about half the size.

Layout (little-endian): ``b"SKV1"``, index u64, count u64, then per entry key length u32, value length u32,
flags u64, create index u64, modify index u64, the key (UTF-8), the value.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

MAGIC = b"SKV1"
cdef Py_ssize_t _HEADER = 4 + 8 + 8
cdef Py_ssize_t _ENTRY = 4 + 4 + 8 + 8 + 8


class KVSnapshotError(ValueError):
    """The bytes are not a KV snapshot this code wrote, or were cut short."""


cdef inline void _put_u32(char* out, uint32_t value) noexcept:
    cdef int shift
    for shift in range(4):
        out[shift] = <char>((value >> (8 * shift)) & 0xFF)


cdef inline void _put_u64(char* out, uint64_t value) noexcept:
    cdef int shift
    for shift in range(8):
        out[shift] = <char>((value >> (8 * shift)) & 0xFF)


cdef inline uint32_t _get_u32(const unsigned char* data) noexcept:
    return (<uint32_t>data[0] | (<uint32_t>data[1] << 8) | (<uint32_t>data[2] << 16)
            | (<uint32_t>data[3] << 24))


cdef inline uint64_t _get_u64(const unsigned char* data) noexcept:
    cdef uint64_t value = 0
    cdef int shift
    for shift in range(8):
        value |= (<uint64_t>data[shift]) << (8 * shift)
    return value


cdef extern from "Python.h":
    # Borrowed-reference forms (Cython's own declarations return owned objects, so it would incref and decref
    # every key, tuple and value it passes): see encode_entries for why the encoder must not write to them.
    PyObject* _borrow_list_item "PyList_GET_ITEM"(PyObject* items, Py_ssize_t position)
    Py_ssize_t _list_size "PyList_GET_SIZE"(PyObject* items)
    PyObject* _borrow_tuple_item "PyTuple_GET_ITEM"(PyObject* items, Py_ssize_t position)
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject* items)
    PyObject* _borrow_dict_item "PyDict_GetItem"(PyObject* mapping, PyObject* key)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* data)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject* data)
    bint _is_list "PyList_CheckExact"(PyObject* value)
    bint _is_tuple "PyTuple_CheckExact"(PyObject* value)
    bint _is_bytes "PyBytes_CheckExact"(PyObject* value)
    bint _is_str "PyUnicode_CheckExact"(PyObject* value)
    const char* _utf8 "PyUnicode_AsUTF8AndSize"(PyObject* text, Py_ssize_t* size) except NULL
    unsigned long long _as_u64 "PyLong_AsUnsignedLongLong"(PyObject* number) except? <unsigned long long>-1


cdef PyObject* _entry_of(PyObject* entries, PyObject* key) except NULL:
    """The ``(value, flags, create_index, modify_index)`` tuple of ``key``, borrowed and checked."""
    if not _is_str(key):
        raise TypeError(f"KV snapshot: a key is {type(<object>key).__name__}, not str")
    cdef PyObject* entry = _borrow_dict_item(entries, key)
    if entry == NULL:
        raise KeyError(<object>key)
    if not _is_tuple(entry) or _tuple_size(entry) != 4 or not _is_bytes(_borrow_tuple_item(entry, 0)):
        raise TypeError(f"KV snapshot: the entry of {<object>key!r} is not (bytes, flags, create, modify)")
    return entry


def encode_entries(uint64_t index, list key_runs not None, dict entries not None) -> bytes:
    """The keys of ``key_runs`` (lists of keys, written in order: a ``SortedList``'s ``_lists``) with their
    ``(value, flags, create_index, modify_index)`` tuples from ``entries``.

    This runs in a forked snapshot child (``raft/node.py``) whose memory is a copy-on-write image of the
    node's. Taking a reference to an object writes its reference count, and that write copies the object's
    whole 4 KB page: an encoder that increfs every key, tuple and value copies the entire heap (at 400k keys
    90k page faults and ~0.3 s of system time per node, while the node goes on serving beside it). So
    everything here is a borrowed pointer that only reads the state; only the output is written."""
    cdef PyObject* runs = <PyObject*>key_runs
    cdef PyObject* mapping = <PyObject*>entries
    cdef PyObject* run
    cdef PyObject* key
    cdef PyObject* entry
    cdef PyObject* value
    cdef Py_ssize_t run_position, position, key_length
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t total = _HEADER
    for run_position in range(_list_size(runs)):
        run = _borrow_list_item(runs, run_position)
        if not _is_list(run):
            raise TypeError(f"KV snapshot: key_runs holds a {type(<object>run).__name__}, not a list")
        for position in range(_list_size(run)):
            key = _borrow_list_item(run, position)
            entry = _entry_of(mapping, key)
            # The UTF-8 form of a str is cached on it (for an ASCII key it is the str's own buffer): no copy.
            _utf8(key, &key_length)
            total += _ENTRY + key_length + _bytes_size(_borrow_tuple_item(entry, 0))
            count += 1
    if count != len(entries):
        raise ValueError(f"KV snapshot: {count} keys in key_runs but {len(entries)} entries")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* cursor = PyBytes_AS_STRING(out)
    memcpy(cursor, <const char*>MAGIC, 4)
    _put_u64(cursor + 4, index)
    _put_u64(cursor + 12, <uint64_t>count)
    cursor += _HEADER
    cdef const char* key_data
    for run_position in range(_list_size(runs)):
        run = _borrow_list_item(runs, run_position)
        for position in range(_list_size(run)):
            key = _borrow_list_item(run, position)
            entry = _entry_of(mapping, key)
            key_data = _utf8(key, &key_length)
            value = _borrow_tuple_item(entry, 0)
            _put_u32(cursor, <uint32_t>key_length)
            _put_u32(cursor + 4, <uint32_t>_bytes_size(value))
            _put_u64(cursor + 8, _as_u64(_borrow_tuple_item(entry, 1)))
            _put_u64(cursor + 16, _as_u64(_borrow_tuple_item(entry, 2)))
            _put_u64(cursor + 24, _as_u64(_borrow_tuple_item(entry, 3)))
            cursor += _ENTRY
            memcpy(cursor, key_data, key_length)
            cursor += key_length
            memcpy(cursor, _bytes_data(value), _bytes_size(value))
            cursor += _bytes_size(value)
    return out


def is_encoded(bytes data not None) -> bool:
    return PyBytes_GET_SIZE(data) >= 4 and memcmp(PyBytes_AS_STRING(data), <const char*>MAGIC, 4) == 0


def decode_entries(bytes data not None) -> tuple:
    """``(index, {key: (value, flags, create_index, modify_index)})`` with the keys in the order written."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* start = <const unsigned char*>PyBytes_AS_STRING(data)
    if size < _HEADER or not is_encoded(data):
        raise KVSnapshotError("not a KV snapshot (no SKV1 header)")
    cdef uint64_t index = _get_u64(start + 4)
    cdef uint64_t count = _get_u64(start + 12)
    cdef Py_ssize_t position = _HEADER
    cdef uint64_t number
    cdef uint32_t key_length, value_length
    cdef dict entries = {}
    for number in range(count):
        if size - position < _ENTRY:
            raise KVSnapshotError(f"KV snapshot cut short in entry {number} of {count}")
        key_length = _get_u32(start + position)
        value_length = _get_u32(start + position + 4)
        if <Py_ssize_t>key_length + <Py_ssize_t>value_length > size - position - _ENTRY:
            raise KVSnapshotError(f"KV snapshot cut short in entry {number} of {count}")
        key = PyUnicode_DecodeUTF8(<const char*>start + position + _ENTRY, key_length, "strict")
        entries[key] = (
            PyBytes_FromStringAndSize(<const char*>start + position + _ENTRY + key_length, value_length),
            _get_u64(start + position + 8), _get_u64(start + position + 16), _get_u64(start + position + 24))
        position += _ENTRY + key_length + value_length
    if position != size:
        raise KVSnapshotError(f"{size - position} bytes after the last of {count} KV snapshot entries")
    return index, entries


# --- the apply hot path -------------------------------------------------------------------------------------
# A command (kv/store.py): op u8 | flags u64 | cas u64 | has_cas u8 | key length u16 (big-endian) | key | value.
cdef Py_ssize_t _COMMAND_HEADER = 1 + 8 + 8 + 1 + 2
cdef int _OP_PUT = 1
cdef int _OP_DELETE = 2


cdef inline uint64_t _get_be64(const unsigned char* data) noexcept:
    cdef uint64_t value = 0
    cdef int position
    for position in range(8):
        value = (value << 8) | data[position]
    return value


def apply_plain(store, uint64_t index, bytes command not None, Py_ssize_t offset, bytes skip_prefix not None):
    """Apply a plain PUT or DELETE (no change record, no CAS beyond ModifyIndex) found at ``offset`` of
    ``command`` to ``store`` (a ``KVStore``), as ``KVStore.apply`` would; ``None`` when it is not one, or its key
    starts with ``skip_prefix``: the caller then takes the general path. This is most of what every replica
    does per committed write, so it reads the header in place, copies nothing but the key and value, and makes
    one dictionary lookup."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(command) - offset
    if offset < 0 or size < _COMMAND_HEADER:
        return None
    cdef const unsigned char* data = <const unsigned char*>PyBytes_AS_STRING(command) + offset
    cdef int op = data[0]
    if op != _OP_PUT and op != _OP_DELETE:
        return None
    cdef uint64_t flags = _get_be64(data + 1)
    cdef uint64_t cas = _get_be64(data + 9)
    cdef bint has_cas = data[17] != 0
    cdef Py_ssize_t key_length = (<Py_ssize_t>data[18] << 8) | data[19]
    cdef Py_ssize_t prefix_length = PyBytes_GET_SIZE(skip_prefix)
    if _COMMAND_HEADER + key_length > size:
        return None
    if key_length >= prefix_length and memcmp(data + _COMMAND_HEADER, PyBytes_AS_STRING(skip_prefix),
                                              prefix_length) == 0:
        return None
    try:
        key = PyUnicode_DecodeUTF8(<const char*>data + _COMMAND_HEADER, key_length, "strict")
    except UnicodeDecodeError:
        return None  # the general path raises it as it always has
    cdef dict entries = store._entries
    cdef PyObject* existing = _borrow_dict_item(<PyObject*>entries, <PyObject*>key)
    cdef uint64_t modify_index = 0
    if existing != NULL:
        modify_index = _as_u64(_borrow_tuple_item(existing, 3))
    if has_cas and (modify_index != cas or (op == _OP_DELETE and existing == NULL)):
        return False
    if op == _OP_PUT:
        value = PyBytes_FromStringAndSize(<const char*>data + _COMMAND_HEADER + key_length,
                                          size - _COMMAND_HEADER - key_length)
        if existing == NULL:
            entries[key] = (value, flags, index, index)
            store._sorted_keys.add(key)
        else:
            entries[key] = (value, flags, <object>_borrow_tuple_item(existing, 2), index)
    elif existing == NULL:
        return True  # deleting what is not there changes nothing (and wakes no one)
    else:
        del entries[key]
        store._sorted_keys.remove(key)
    store.index = index
    if store._waiters:
        store._touch(index, key)
    return True
