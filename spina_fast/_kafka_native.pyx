# cython: language_level=3, boundscheck=False, wraparound=False
"""librdkafka's producer C API called directly: one call per batch instead of one Python call per event.

confluent-kafka's ``Producer.produce`` is one Python call per event, converts the headers per event and calls a
Python callback per delivery report; on the bulk lane that was most of the producer process's CPU
(benchmarks/README.md, events). Here a batch is handed to librdkafka in a C loop with the GIL released
(``rd_kafka_producev`` per event: key, value, ``traceparent`` header, and as opaque a pointer into the batch),
delivery reports are counted per batch by a C callback on the poll thread, and completed batches reach Python
once per ``rd_kafka_poll`` call, not once per event.

No build-time dependency on librdkafka: at import this binds (``dlopen`` + ``dlsym``) to the librdkafka that
confluent-kafka already loaded (its wheel bundles one in ``confluent_kafka.libs``), or to the system's
``librdkafka.so.1`` for a confluent-kafka built against that. The declarations below are our own and minimal:
opaque handles, the function signatures we call, the public layout of ``rd_kafka_message_t`` and of the
metadata structs, and the few enum values we use; they are part of librdkafka's stable ABI (unchanged since
1.0). ``MIN_VERSION`` is checked at bind time.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport int32_t, int64_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

from spina_fast._events cimport EncodedBatch

import glob
import logging
import os
import time
import types

import confluent_kafka

from spina_fast.errors import InvalidRequest

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <sys/types.h>

    /* Our own declarations of the part of librdkafka's C ABI we use (see the module docstring). */
    typedef struct spina_rk_s spina_rk_t;            /* rd_kafka_t */
    typedef struct spina_rk_conf_s spina_rk_conf_t;  /* rd_kafka_conf_t */
    typedef struct spina_rkt_s spina_rkt_t;          /* rd_kafka_topic_t */

    typedef struct {                                 /* rd_kafka_message_t, public layout */
        int err;
        spina_rkt_t *rkt;
        int32_t partition;
        void *payload;
        size_t len;
        void *key;
        size_t key_len;
        int64_t offset;
        void *_private;
    } spina_rk_message_t;

    typedef struct {                                 /* struct rd_kafka_metadata_topic */
        char *topic;
        int partition_cnt;
        void *partitions;
        int err;
    } spina_rk_md_topic_t;

    typedef struct {                                 /* struct rd_kafka_metadata */
        int broker_cnt;
        void *brokers;
        int topic_cnt;
        spina_rk_md_topic_t *topics;
        int32_t orig_broker_id;
        char *orig_broker_name;
    } spina_rk_metadata_t;

    typedef void (*spina_dr_cb_t)(spina_rk_t *, const spina_rk_message_t *, void *);
    typedef void (*spina_log_cb_t)(const spina_rk_t *, int, const char *, const char *);

    typedef struct {
        int (*version)(void);
        const char *(*version_str)(void);
        spina_rk_conf_t *(*conf_new)(void);
        void (*conf_destroy)(spina_rk_conf_t *);
        int (*conf_set)(spina_rk_conf_t *, const char *, const char *, char *, size_t);
        void (*conf_set_dr_msg_cb)(spina_rk_conf_t *, spina_dr_cb_t);
        void (*conf_set_log_cb)(spina_rk_conf_t *, spina_log_cb_t);
        void (*conf_set_opaque)(spina_rk_conf_t *, void *);
        spina_rk_t *(*new_)(int, spina_rk_conf_t *, char *, size_t);
        void (*destroy)(spina_rk_t *);
        int (*poll)(spina_rk_t *, int);
        int (*flush)(spina_rk_t *, int);
        int (*purge)(spina_rk_t *, int);
        int (*outq_len)(spina_rk_t *);
        spina_rkt_t *(*topic_new)(spina_rk_t *, const char *, void *);
        void (*topic_destroy)(spina_rkt_t *);
        int (*producev)(spina_rk_t *, ...);
        int (*metadata)(spina_rk_t *, int, spina_rkt_t *, const spina_rk_metadata_t **, int);
        void (*metadata_destroy)(const spina_rk_metadata_t *);
        const char *(*err2str)(int);
        const char *(*err2name)(int);
        int (*message_status)(const spina_rk_message_t *);
        int (*set_log_queue)(spina_rk_t *, void *);
        void *(*opaque)(const spina_rk_t *);
    } spina_rk_api_t;

    static spina_rk_api_t spina_rk;

    /* enum values (rd_kafka_vtype_t, rd_kafka_type_t, rd_kafka_msg_status_t, rd_kafka_conf_res_t, flags) */
    #define SPINA_VTYPE_END 0
    #define SPINA_VTYPE_RKT 2
    #define SPINA_VTYPE_PARTITION 3
    #define SPINA_VTYPE_VALUE 4
    #define SPINA_VTYPE_KEY 5
    #define SPINA_VTYPE_OPAQUE 6
    #define SPINA_VTYPE_MSGFLAGS 7
    #define SPINA_VTYPE_HEADER 9
    #define SPINA_RK_PRODUCER 0
    #define SPINA_MSG_F_COPY 2
    #define SPINA_PARTITION_UA (-1)
    #define SPINA_PURGE_QUEUE 1
    #define SPINA_PURGE_INFLIGHT 2
    #define SPINA_ERR_QUEUE_FULL (-184)

    /* One failed delivery: the event's index in its batch, the error and rd_kafka_message_status(). */
    typedef struct { uint32_t index; int32_t err; int32_t status; } spina_failure_t;

    /* A batch in flight. Each event's opaque is &slots[i] (slots[i] == i), which leads back to the batch and
       to the event's index. `remaining` starts at count + 1: the extra one is held by the submitting (event
       loop) thread until every event is queued or given up, so a batch never completes half-submitted.
       Everything else is written by the poll thread only, and read by Python after completion. */
    typedef struct spina_batch_s {
        long remaining;
        uint32_t count;
        int32_t partition;
        int64_t offset;
        uint32_t failed_count;      /* every failed delivery */
        uint32_t failed_cap;
        spina_failure_t *failed;    /* their details, as far as memory allowed */
        struct spina_batch_s *next_done;
        uint32_t slots[];
    } spina_batch_t;

    /* What the callbacks reach through the conf opaque. `done` is touched by the poll thread only (delivery
       reports are served by rd_kafka_poll/flush, which only the poll thread calls). */
    typedef struct {
        spina_batch_t *done;
        void *logger;               /* borrowed PyObject*, kept alive by the NativeProducer */
    } spina_state_t;

    static inline long spina_release(spina_batch_t *b, long n) {
        return __atomic_sub_fetch(&b->remaining, n, __ATOMIC_ACQ_REL);
    }

    static spina_batch_t *spina_batch_new(uint32_t count) {
        spina_batch_t *b = malloc(sizeof(spina_batch_t) + sizeof(uint32_t) * (size_t)(count ? count : 1));
        uint32_t i;
        if (!b) return NULL;
        b->remaining = (long)count + 1;
        b->count = count;
        b->partition = -1;
        b->offset = -1;
        b->failed_count = 0;
        b->failed_cap = 0;
        b->failed = NULL;
        b->next_done = NULL;
        for (i = 0; i < count; i++) b->slots[i] = i;
        return b;
    }

    static void spina_batch_free(spina_batch_t *b) {
        if (b) { free(b->failed); free(b); }
    }

    static void spina_dr_cb(spina_rk_t *rk, const spina_rk_message_t *m, void *opaque) {
        spina_state_t *state = (spina_state_t *)opaque;
        uint32_t *slot = (uint32_t *)m->_private;
        uint32_t i;
        spina_batch_t *b;
        if (!slot) return;  /* fire-and-forget: nobody waits for this report */
        i = *slot;
        b = (spina_batch_t *)((char *)(slot - i) - offsetof(spina_batch_t, slots));
        if (i == 0) { b->partition = m->partition; b->offset = m->offset; }
        if (m->err) {
            if (b->failed_count == b->failed_cap) {
                uint32_t cap = b->failed_cap ? b->failed_cap * 2 : 16;
                spina_failure_t *grown = realloc(b->failed, sizeof(spina_failure_t) * cap);
                if (grown) { b->failed = grown; b->failed_cap = cap; }
            }
            if (b->failed_count < b->failed_cap) {
                spina_failure_t *f = &b->failed[b->failed_count];
                f->index = i;
                f->err = m->err;
                f->status = spina_rk.message_status(m);
            }
            b->failed_count++;
        }
        if (spina_release(b, 1) == 0) { b->next_done = state->done; state->done = b; }
    }

    /* Queues events [start, end) of a batch; returns the index reached. *err is 0 when all were queued, else
       the error producev gave for the event at the returned index (SPINA_ERR_QUEUE_FULL: wait and resume). */
    static Py_ssize_t spina_produce(spina_rk_t *rk, spina_rkt_t *rkt, const char **keys, const size_t *key_sizes,
                                    const char **values, const size_t *value_sizes, const char **headers,
                                    Py_ssize_t start, Py_ssize_t end, spina_batch_t *b, int *err) {
        Py_ssize_t i;
        int e;
        for (i = start; i < end; i++) {
            void *opaque = b ? (void *)&b->slots[i] : NULL;
            if (headers[i])
                e = spina_rk.producev(rk, SPINA_VTYPE_RKT, rkt, SPINA_VTYPE_PARTITION, (int32_t)SPINA_PARTITION_UA,
                                      SPINA_VTYPE_MSGFLAGS, SPINA_MSG_F_COPY,
                                      SPINA_VTYPE_KEY, (void *)keys[i], key_sizes[i],
                                      SPINA_VTYPE_VALUE, (void *)values[i], value_sizes[i],
                                      SPINA_VTYPE_HEADER, "traceparent", (const void *)headers[i], (ssize_t)55,
                                      SPINA_VTYPE_OPAQUE, opaque, SPINA_VTYPE_END);
            else
                e = spina_rk.producev(rk, SPINA_VTYPE_RKT, rkt, SPINA_VTYPE_PARTITION, (int32_t)SPINA_PARTITION_UA,
                                      SPINA_VTYPE_MSGFLAGS, SPINA_MSG_F_COPY,
                                      SPINA_VTYPE_KEY, (void *)keys[i], key_sizes[i],
                                      SPINA_VTYPE_VALUE, (void *)values[i], value_sizes[i],
                                      SPINA_VTYPE_OPAQUE, opaque, SPINA_VTYPE_END);
            if (e) { *err = e; return i; }
        }
        *err = 0;
        return end;
    }
    """
    ctypedef struct spina_rk_t
    ctypedef struct spina_rk_conf_t
    ctypedef struct spina_rkt_t
    ctypedef struct spina_rk_message_t:
        int err
    ctypedef struct spina_rk_md_topic_t:
        char* topic
        int err
    ctypedef struct spina_rk_metadata_t:
        int topic_cnt
        spina_rk_md_topic_t* topics
    ctypedef void (*spina_dr_cb_t)(spina_rk_t*, const spina_rk_message_t*, void*) noexcept nogil
    ctypedef void (*spina_log_cb_t)(const spina_rk_t*, int, const char*, const char*) noexcept
    ctypedef struct spina_rk_api_t:
        int (*version)() noexcept nogil
        const char* (*version_str)() noexcept nogil
        spina_rk_conf_t* (*conf_new)() noexcept nogil
        void (*conf_destroy)(spina_rk_conf_t*) noexcept nogil
        int (*conf_set)(spina_rk_conf_t*, const char*, const char*, char*, size_t) noexcept nogil
        void (*conf_set_dr_msg_cb)(spina_rk_conf_t*, spina_dr_cb_t) noexcept nogil
        void (*conf_set_log_cb)(spina_rk_conf_t*, spina_log_cb_t) noexcept nogil
        void (*conf_set_opaque)(spina_rk_conf_t*, void*) noexcept nogil
        spina_rk_t* (*new_)(int, spina_rk_conf_t*, char*, size_t) noexcept nogil
        void (*destroy)(spina_rk_t*) noexcept nogil
        int (*poll)(spina_rk_t*, int) noexcept nogil
        int (*flush)(spina_rk_t*, int) noexcept nogil
        int (*purge)(spina_rk_t*, int) noexcept nogil
        int (*outq_len)(spina_rk_t*) noexcept nogil
        spina_rkt_t* (*topic_new)(spina_rk_t*, const char*, void*) noexcept nogil
        void (*topic_destroy)(spina_rkt_t*) noexcept nogil
        int (*metadata)(spina_rk_t*, int, spina_rkt_t*, const spina_rk_metadata_t**, int) noexcept nogil
        void (*metadata_destroy)(const spina_rk_metadata_t*) noexcept nogil
        const char* (*err2str)(int) noexcept nogil
        const char* (*err2name)(int) noexcept nogil
        int (*set_log_queue)(spina_rk_t*, void*) noexcept nogil
        void* (*opaque)(const spina_rk_t*) noexcept nogil
    spina_rk_api_t spina_rk

    ctypedef struct spina_failure_t:
        uint32_t index
        int32_t err
        int32_t status
    ctypedef struct spina_batch_t:
        uint32_t count
        int32_t partition
        int64_t offset
        uint32_t failed_count
        uint32_t failed_cap
        spina_failure_t* failed
        spina_batch_t* next_done
    ctypedef struct spina_state_t:
        spina_batch_t* done
        void* logger

    int SPINA_RK_PRODUCER
    int SPINA_PURGE_QUEUE
    int SPINA_PURGE_INFLIGHT
    int SPINA_ERR_QUEUE_FULL
    long spina_release(spina_batch_t* b, long n) noexcept nogil
    spina_batch_t* spina_batch_new(uint32_t count) noexcept nogil
    void spina_batch_free(spina_batch_t* b) noexcept nogil
    void spina_dr_cb(spina_rk_t* rk, const spina_rk_message_t* m, void* opaque) noexcept nogil
    Py_ssize_t spina_produce(spina_rk_t* rk, spina_rkt_t* rkt, const char** keys, const size_t* key_sizes,
                             const char** values, const size_t* value_sizes, const char** headers,
                             Py_ssize_t start, Py_ssize_t end, spina_batch_t* b, int* err) noexcept nogil


# rd_kafka_msg_status_t
MSG_STATUS_NOT_PERSISTED = 0
MSG_STATUS_POSSIBLY_PERSISTED = 1
MSG_STATUS_PERSISTED = 2
ERR_QUEUE_FULL = -184
# Every function and layout declared above exists unchanged since librdkafka 1.0; 2.0 is required because
# confluent-kafka 2.x (what Spina installs) ships nothing older, and this module was tested with its 2.16.
MIN_VERSION = 0x020000ff
MIN_VERSION_TEXT = "2.0.0"

cdef bint _bound = False
cdef str _library_path = ""
cdef int _POLL_MS = 50
cdef Py_ssize_t _TRACEPARENT_SIZE = 55  # "00-" 32 "-" 16 "-01": the only header size spina_produce sends


class NativeUnavailable(ImportError):
    """No usable librdkafka could be bound (none found, a symbol missing, or older than MIN_VERSION)."""


def _candidates():
    """Where librdkafka is: confluent-kafka's bundled copy first (already loaded by its import, so dlopen
    returns that very library), then the system's."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(confluent_kafka.__file__)))
    found = sorted(glob.glob(os.path.join(package, "confluent_kafka.libs", "librdkafka*.so*")))
    return found + ["librdkafka.so.1"]


cdef void* _symbol(void* handle, str name, str path) except NULL:
    cdef void* address = dlsym(handle, name.encode())
    if address == NULL:
        raise NativeUnavailable(f"{path} has no symbol {name}: not a usable librdkafka")
    return address


cdef _bind():
    global _bound, _library_path
    if _bound:
        return
    cdef void* handle = NULL
    errors = []
    for path in _candidates():
        handle = dlopen(path.encode(), RTLD_NOW | RTLD_LOCAL)
        if handle != NULL:
            break
        errors.append((<bytes>dlerror()).decode(errors="replace"))
    if handle == NULL:
        raise NativeUnavailable("could not load librdkafka (install confluent-kafka): " + "; ".join(errors))
    spina_rk.version = <int (*)() noexcept nogil>_symbol(handle, "rd_kafka_version", path)
    spina_rk.version_str = <const char* (*)() noexcept nogil>_symbol(handle, "rd_kafka_version_str", path)
    cdef int version = spina_rk.version()
    if version < MIN_VERSION:
        raise NativeUnavailable(f"{path} is librdkafka {spina_rk.version_str().decode()}; Spina's producer needs "
                                f">= {MIN_VERSION_TEXT} (pip install -U confluent-kafka)")
    spina_rk.conf_new = <spina_rk_conf_t* (*)() noexcept nogil>_symbol(handle, "rd_kafka_conf_new", path)
    spina_rk.conf_destroy = <void (*)(spina_rk_conf_t*) noexcept nogil>_symbol(handle, "rd_kafka_conf_destroy", path)
    spina_rk.conf_set = <int (*)(spina_rk_conf_t*, const char*, const char*, char*, size_t) noexcept nogil>_symbol(
        handle, "rd_kafka_conf_set", path)
    spina_rk.conf_set_dr_msg_cb = <void (*)(spina_rk_conf_t*, spina_dr_cb_t) noexcept nogil>_symbol(
        handle, "rd_kafka_conf_set_dr_msg_cb", path)
    spina_rk.conf_set_log_cb = <void (*)(spina_rk_conf_t*, spina_log_cb_t) noexcept nogil>_symbol(
        handle, "rd_kafka_conf_set_log_cb", path)
    spina_rk.conf_set_opaque = <void (*)(spina_rk_conf_t*, void*) noexcept nogil>_symbol(
        handle, "rd_kafka_conf_set_opaque", path)
    spina_rk.new_ = <spina_rk_t* (*)(int, spina_rk_conf_t*, char*, size_t) noexcept nogil>_symbol(
        handle, "rd_kafka_new", path)
    spina_rk.destroy = <void (*)(spina_rk_t*) noexcept nogil>_symbol(handle, "rd_kafka_destroy", path)
    spina_rk.poll = <int (*)(spina_rk_t*, int) noexcept nogil>_symbol(handle, "rd_kafka_poll", path)
    spina_rk.flush = <int (*)(spina_rk_t*, int) noexcept nogil>_symbol(handle, "rd_kafka_flush", path)
    spina_rk.purge = <int (*)(spina_rk_t*, int) noexcept nogil>_symbol(handle, "rd_kafka_purge", path)
    spina_rk.outq_len = <int (*)(spina_rk_t*) noexcept nogil>_symbol(handle, "rd_kafka_outq_len", path)
    spina_rk.topic_new = <spina_rkt_t* (*)(spina_rk_t*, const char*, void*) noexcept nogil>_symbol(
        handle, "rd_kafka_topic_new", path)
    spina_rk.topic_destroy = <void (*)(spina_rkt_t*) noexcept nogil>_symbol(handle, "rd_kafka_topic_destroy", path)
    _set_producev(_symbol(handle, "rd_kafka_producev", path))
    spina_rk.metadata = <int (*)(spina_rk_t*, int, spina_rkt_t*, const spina_rk_metadata_t**, int) noexcept nogil>(
        _symbol(handle, "rd_kafka_metadata", path))
    spina_rk.metadata_destroy = <void (*)(const spina_rk_metadata_t*) noexcept nogil>_symbol(
        handle, "rd_kafka_metadata_destroy", path)
    spina_rk.err2str = <const char* (*)(int) noexcept nogil>_symbol(handle, "rd_kafka_err2str", path)
    spina_rk.err2name = <const char* (*)(int) noexcept nogil>_symbol(handle, "rd_kafka_err2name", path)
    _set_message_status(_symbol(handle, "rd_kafka_message_status", path))
    spina_rk.set_log_queue = <int (*)(spina_rk_t*, void*) noexcept nogil>_symbol(handle, "rd_kafka_set_log_queue",
                                                                                 path)
    spina_rk.opaque = <void* (*)(const spina_rk_t*) noexcept nogil>_symbol(handle, "rd_kafka_opaque", path)
    _library_path = path
    _bound = True


cdef extern from *:
    """
    /* The variadic producev and message_status are only called from C above; assigned here untyped. */
    static void spina_set_producev(void *f) { spina_rk.producev = (int (*)(spina_rk_t *, ...))f; }
    static void spina_set_message_status(void *f) {
        spina_rk.message_status = (int (*)(const spina_rk_message_t *))f;
    }
    """
    void _set_producev "spina_set_producev"(void* f)
    void _set_message_status "spina_set_message_status"(void* f)


def library():
    """(path, version string) of the librdkafka this module is bound to."""
    _bind()
    return _library_path, spina_rk.version_str().decode()


def error_name(int code):
    _bind()
    return spina_rk.err2name(code).decode()


def error_text(int code):
    _bind()
    return spina_rk.err2str(code).decode()


# syslog levels (librdkafka's) -> logging levels
cdef tuple _LEVELS = (logging.CRITICAL, logging.CRITICAL, logging.CRITICAL, logging.ERROR, logging.WARNING,
                      logging.INFO, logging.INFO, logging.DEBUG)


cdef void _log_cb(const spina_rk_t* rk, int level, const char* facility, const char* text) noexcept with gil:
    cdef spina_state_t* state = <spina_state_t*>spina_rk.opaque(rk)
    if state == NULL or state.logger == NULL:
        return
    try:
        (<object>state.logger).log(_LEVELS[min(max(level, 0), 7)], "%s: %s", facility.decode(errors="replace"),
                                   text.decode(errors="replace"))
    except BaseException:  # a logging failure must not unwind into librdkafka's C frames
        return


cdef str _conf_text(object value):
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


cdef class DeliveryBatch:
    """One submitted batch: its delivery reports are counted in C; read ``failures`` after completion."""

    cdef spina_batch_t* _batch

    def __cinit__(self, Py_ssize_t count):
        if count < 0 or count > 0xFFFFFFF:
            raise ValueError(f"batch of {count} events: expected 0 to {0xFFFFFFF:,}")
        self._batch = spina_batch_new(<uint32_t>count)
        if self._batch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        spina_batch_free(self._batch)

    @property
    def address(self):
        return <uintptr_t>self._batch

    @property
    def count(self):
        return self._batch.count

    @property
    def partition(self):
        """The first event's partition and offset (what publish() of one event reports)."""
        return self._batch.partition

    @property
    def offset(self):
        return self._batch.offset

    def failures(self):
        """[(index, error code, message status)] of the failed deliveries, in report order; events that failed
        beyond what memory allowed to record are reported with index -1."""
        cdef uint32_t i
        cdef uint32_t recorded = min(self._batch.failed_count, self._batch.failed_cap)
        out = []
        for i in range(recorded):
            failure = self._batch.failed[i]
            out.append((failure.index, failure.err, failure.status))
        for i in range(recorded, self._batch.failed_count):
            out.append((-1, -195, MSG_STATUS_NOT_PERSISTED))  # RD_KAFKA_RESP_ERR__FAIL
        return out

    cdef bint release(self, long count) noexcept:
        """Drops ``count`` from the events still awaited; True if that completed the batch."""
        return spina_release(self._batch, count) == 0


cdef class NativeProducer:
    """An rd_kafka_t producer with the settings confluent-kafka would take (``{"key": value}``, values as
    librdkafka strings; ``"logger"`` a logging.Logger). Bad settings raise InvalidRequest naming the key.

    Threads: ``produce()`` from one thread (the event loop's); ``serve()`` on a dedicated poll thread, the only
    caller of rd_kafka_poll/flush, so delivery reports and the list of completed batches stay on it."""

    cdef spina_rk_t* _rk
    cdef spina_state_t _state
    cdef object _logger
    cdef dict _topics          # name -> rd_kafka_topic_t* as an int
    cdef int _stop
    cdef int _producing        # produce() is in its GIL-released loop: destroy() must wait for it
    cdef int _flush_ms
    cdef readonly int left_after_close

    def __cinit__(self, dict settings):
        _bind()
        cdef char errstr[512]
        cdef spina_rk_conf_t* conf = spina_rk.conf_new()
        cdef bytes name_bytes, value_bytes
        self._topics = {}
        self._state.done = NULL
        self._state.logger = NULL
        settings = dict(settings)
        self._logger = settings.pop("logger", None)
        if self._logger is not None:
            self._state.logger = <void*>self._logger
        # Logs are served by rd_kafka_poll on the poll thread, not from librdkafka's own threads.
        settings.setdefault("log.queue", True)
        try:
            for name, value in settings.items():
                if callable(value):
                    raise InvalidRequest(f"librdkafka setting {name!r}: callbacks are not supported by Spina's "
                                         "producer (it sets its own)", field=name)
                name_bytes = str(name).encode()
                value_bytes = _conf_text(value).encode()
                if spina_rk.conf_set(conf, name_bytes, value_bytes, errstr, sizeof(errstr)) != 0:
                    raise InvalidRequest(f"librdkafka setting {name!r} = {value!r}: "
                                         f"{errstr.decode(errors='replace')}", field=str(name))
        except BaseException:
            spina_rk.conf_destroy(conf)
            raise
        spina_rk.conf_set_dr_msg_cb(conf, spina_dr_cb)
        if self._logger is not None:
            spina_rk.conf_set_log_cb(conf, _log_cb)
        spina_rk.conf_set_opaque(conf, &self._state)
        with nogil:
            self._rk = spina_rk.new_(SPINA_RK_PRODUCER, conf, errstr, sizeof(errstr))  # takes conf on success
        if self._rk == NULL:
            spina_rk.conf_destroy(conf)
            raise InvalidRequest(f"librdkafka refused the producer settings: {errstr.decode(errors='replace')}")
        spina_rk.set_log_queue(self._rk, NULL)
        self.left_after_close = 0

    def __dealloc__(self):
        self.destroy()

    def destroy(self):
        """Frees the rd_kafka_t (call after serve() returned, or if it never ran); queued events are dropped
        without reports. Idempotent."""
        cdef spina_rk_t* rk = self._rk
        if rk == NULL:
            return
        # Called from any thread: produce() (on the event loop's) may be between releasing and retaking the
        # GIL with this handle. Both check under the GIL, so once _rk is NULL no new produce() can start.
        while self._producing:
            time.sleep(0.001)
        if self._rk == NULL:
            return
        self._rk = NULL
        for address in self._topics.values():
            spina_rk.topic_destroy(<spina_rkt_t*><uintptr_t>address)
        self._topics = {}
        with nogil:
            spina_rk.destroy(rk)

    def __len__(self):
        """Events queued or in flight."""
        return spina_rk.outq_len(self._rk) if self._rk != NULL else 0

    def list_topics(self, timeout=10.0):
        """The cluster's metadata as confluent-kafka's list_topics gives it, as far as Spina reads it: an object
        whose ``topics`` maps names to error codes; KafkaException if no broker answered in ``timeout`` s."""
        cdef const spina_rk_metadata_t* metadata = NULL
        cdef int timeout_ms = max(1, int(timeout * 1000))
        cdef int err
        cdef int i
        with nogil:
            err = spina_rk.metadata(self._rk, 1, NULL, &metadata, timeout_ms)
        if err:
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(err, error_text(err)))
        try:
            topics = {metadata.topics[i].topic.decode(): metadata.topics[i].err for i in range(metadata.topic_cnt)}
        finally:
            spina_rk.metadata_destroy(metadata)
        return types.SimpleNamespace(topics=topics)

    cdef spina_rkt_t* _topic(self, str topic) except NULL:
        address = self._topics.get(topic)
        if address is not None:
            return <spina_rkt_t*><uintptr_t>address
        cdef spina_rkt_t* rkt = spina_rk.topic_new(self._rk, topic.encode(), NULL)
        if rkt == NULL:
            raise InvalidRequest(f"librdkafka refused topic {topic!r}")
        self._topics[topic] = <uintptr_t>rkt
        return rkt

    def produce(self, str topic, EncodedBatch encoded, Py_ssize_t start, DeliveryBatch batch):
        """Queues ``encoded[start:]`` (reports counted in ``batch``; None: fire-and-forget). Returns (index
        reached, error code): (len, 0) when all are queued, (i, ERR_QUEUE_FULL) when the local queue is full
        (resume from i later), (i, code) when librdkafka refused event i."""
        if self._rk == NULL:
            raise RuntimeError("the producer is closed")
        cdef spina_rkt_t* rkt = self._topic(topic)
        cdef list keys = encoded.keys
        cdef list values = encoded.values
        cdef list headers = encoded.headers
        cdef Py_ssize_t count = len(keys)
        cdef Py_ssize_t i
        cdef Py_ssize_t reached = start
        cdef int err = 0
        cdef object item
        cdef spina_batch_t* native = batch._batch if batch is not None else NULL
        if start >= count:
            return count, 0
        if native != NULL and <Py_ssize_t>native.count != count:
            raise ValueError(f"batch counts {native.count} events, the encoded batch has {count}")
        cdef void* block = malloc(count * 5 * sizeof(void*))
        if block == NULL:
            raise MemoryError()
        cdef const char** key_data = <const char**>block
        cdef size_t* key_sizes = <size_t*>(key_data + count)
        cdef const char** value_data = <const char**>(key_sizes + count)
        cdef size_t* value_sizes = <size_t*>(value_data + count)
        cdef const char** header_data = <const char**>(value_sizes + count)
        try:
            # Pointers into the bytes objects, taken with the GIL; the EncodedBatch keeps them alive and
            # librdkafka copies them (RD_KAFKA_MSG_F_COPY) before producev returns.
            for i in range(start, count):
                item = <object>PyList_GET_ITEM(keys, i)
                key_data[i] = PyBytes_AS_STRING(item)
                key_sizes[i] = PyBytes_GET_SIZE(item)
                item = <object>PyList_GET_ITEM(values, i)
                value_data[i] = PyBytes_AS_STRING(item)
                value_sizes[i] = PyBytes_GET_SIZE(item)
                item = <object>PyList_GET_ITEM(headers, i)
                if item is None:
                    header_data[i] = NULL
                elif PyBytes_GET_SIZE(item) == _TRACEPARENT_SIZE:
                    header_data[i] = PyBytes_AS_STRING(item)
                else:
                    raise ValueError(f"event {i}: traceparent header of {PyBytes_GET_SIZE(item)} bytes, "
                                     f"expected {_TRACEPARENT_SIZE}")
            self._producing = 1
            with nogil:
                reached = spina_produce(self._rk, rkt, key_data, key_sizes, value_data, value_sizes, header_data,
                                        start, count, native, &err)
        finally:
            self._producing = 0
            free(block)
        return reached, err

    def submitted(self, DeliveryBatch batch, Py_ssize_t not_queued):
        """The submitting side is done with ``batch``: ``not_queued`` of its events never reached the queue.
        True if that completed it (every report is in): the caller resolves it, the poll thread will not."""
        return batch.release(1 + not_queued)

    def serve(self, on_done):
        """The poll thread's loop until close(): serves delivery reports and logs; after each poll that
        completed batches, calls ``on_done([batch address, ...])`` once. On close it flushes (waits for every
        outcome up to the close timeout), purges what is left (reported failed) and returns."""
        cdef spina_rk_t* rk = self._rk
        cdef int left
        while True:
            with nogil:
                while not self._stop and self._state.done == NULL:
                    spina_rk.poll(rk, _POLL_MS)
            if self._state.done != NULL:
                on_done(self._take_done())
            if self._stop:
                break
        with nogil:
            spina_rk.flush(rk, self._flush_ms)
            left = spina_rk.outq_len(rk)
            if left > 0:
                spina_rk.purge(rk, SPINA_PURGE_QUEUE | SPINA_PURGE_INFLIGHT)
                spina_rk.flush(rk, 1000)
        self.left_after_close = left
        if self._state.done != NULL:
            on_done(self._take_done())

    cdef list _take_done(self):
        cdef list out = []
        cdef spina_batch_t* b = self._state.done
        self._state.done = NULL
        while b != NULL:
            out.append(<uintptr_t>b)
            b = b.next_done
        out.reverse()
        return out

    def stop(self, double flush_timeout_s):
        """Asks serve() to flush for up to ``flush_timeout_s`` and return."""
        self._flush_ms = max(0, int(flush_timeout_s * 1000))
        self._stop = 1


# Bound at import: a missing or too old librdkafka is an ImportError naming the problem when the events
# producer is first imported, not a failure on the first publish.
_bind()
