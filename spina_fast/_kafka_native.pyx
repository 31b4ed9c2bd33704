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

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport int32_t, int64_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, strcmp
from posix.dlfcn cimport RTLD_LOCAL, RTLD_NOW, dlerror, dlopen, dlsym

from spina_fast._events cimport ConsumedMessage, EncodedBatch, Event, _HeadReader, read_envelope

import glob
import logging
import os
import time
import types

import confluent_kafka

from spina_fast._events import NO_VALUE

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

    typedef struct spina_rkqu_s spina_rkqu_t;        /* rd_kafka_queue_t */
    typedef struct spina_hdrs_s spina_hdrs_t;        /* rd_kafka_headers_t */
    typedef struct spina_error_s spina_error_t;      /* rd_kafka_error_t */

    typedef struct {                                 /* rd_kafka_topic_partition_t, public layout */
        char *topic;
        int32_t partition;
        int64_t offset;
        void *metadata;
        size_t metadata_size;
        void *opaque;
        int err;
        void *_private;
    } spina_tp_t;

    typedef struct {                                 /* rd_kafka_topic_partition_list_t */
        int cnt;
        int size;
        spina_tp_t *elems;
    } spina_tplist_t;

    typedef void (*spina_dr_cb_t)(spina_rk_t *, const spina_rk_message_t *, void *);
    typedef void (*spina_rebalance_cb_t)(spina_rk_t *, int, spina_tplist_t *, void *);
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
        /* the consumer's (bound by spina_bind_consumer) */
        int (*poll_set_consumer)(spina_rk_t *);
        spina_rkqu_t *(*queue_get_consumer)(spina_rk_t *);
        void (*queue_destroy)(spina_rkqu_t *);
        ssize_t (*consume_batch_queue)(spina_rkqu_t *, int, spina_rk_message_t **, size_t);
        void (*message_destroy)(spina_rk_message_t *);
        const char *(*topic_name)(const spina_rkt_t *);
        int (*message_headers)(const spina_rk_message_t *, spina_hdrs_t **);
        int (*header_get_all)(const spina_hdrs_t *, size_t, const char **, const void **, size_t *);
        int (*subscribe)(spina_rk_t *, const spina_tplist_t *);
        spina_tplist_t *(*tplist_new)(int);
        spina_tp_t *(*tplist_add)(spina_tplist_t *, const char *, int32_t);
        void (*tplist_destroy)(spina_tplist_t *);
        void (*conf_set_rebalance_cb)(spina_rk_conf_t *, spina_rebalance_cb_t);
        int (*assign)(spina_rk_t *, const spina_tplist_t *);
        spina_error_t *(*incremental_assign)(spina_rk_t *, const spina_tplist_t *);
        spina_error_t *(*incremental_unassign)(spina_rk_t *, const spina_tplist_t *);
        const char *(*error_string)(const spina_error_t *);
        void (*error_destroy)(spina_error_t *);
        const char *(*rebalance_protocol)(spina_rk_t *);
        int (*assignment_lost)(spina_rk_t *);
        int (*offsets_store)(spina_rk_t *, spina_tplist_t *);
        int (*commit)(spina_rk_t *, const spina_tplist_t *, int);
        int (*get_watermark_offsets)(spina_rk_t *, const char *, int32_t, int64_t *, int64_t *);
        int (*consumer_close)(spina_rk_t *);
        int (*fatal_error)(spina_rk_t *, char *, size_t);
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
    #define SPINA_RK_CONSUMER 1
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
        void *logger;               /* borrowed PyObject*, kept alive by the NativeProducer/NativeConsumer */
        void *owner;                /* the NativeConsumer (borrowed), for its rebalance callback */
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
    ctypedef struct spina_rkqu_t
    ctypedef struct spina_hdrs_t
    ctypedef struct spina_error_t
    ctypedef struct spina_rk_message_t:
        int err
        spina_rkt_t* rkt
        int32_t partition
        void* payload
        size_t len
        void* key
        size_t key_len
        int64_t offset
    ctypedef struct spina_tp_t:
        char* topic
        int32_t partition
        int64_t offset
        int err
    ctypedef struct spina_tplist_t:
        int cnt
        spina_tp_t* elems
    ctypedef void (*spina_rebalance_cb_t)(spina_rk_t*, int, spina_tplist_t*, void*) noexcept
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
        int (*poll_set_consumer)(spina_rk_t*) noexcept nogil
        spina_rkqu_t* (*queue_get_consumer)(spina_rk_t*) noexcept nogil
        void (*queue_destroy)(spina_rkqu_t*) noexcept nogil
        ssize_t (*consume_batch_queue)(spina_rkqu_t*, int, spina_rk_message_t**, size_t) noexcept nogil
        void (*message_destroy)(spina_rk_message_t*) noexcept nogil
        const char* (*topic_name)(const spina_rkt_t*) noexcept nogil
        int (*message_headers)(const spina_rk_message_t*, spina_hdrs_t**) noexcept nogil
        int (*header_get_all)(const spina_hdrs_t*, size_t, const char**, const void**, size_t*) noexcept nogil
        int (*subscribe)(spina_rk_t*, const spina_tplist_t*) noexcept nogil
        spina_tplist_t* (*tplist_new)(int) noexcept nogil
        spina_tp_t* (*tplist_add)(spina_tplist_t*, const char*, int32_t) noexcept nogil
        void (*tplist_destroy)(spina_tplist_t*) noexcept nogil
        void (*conf_set_rebalance_cb)(spina_rk_conf_t*, spina_rebalance_cb_t) noexcept nogil
        int (*assign)(spina_rk_t*, const spina_tplist_t*) noexcept nogil
        spina_error_t* (*incremental_assign)(spina_rk_t*, const spina_tplist_t*) noexcept nogil
        spina_error_t* (*incremental_unassign)(spina_rk_t*, const spina_tplist_t*) noexcept nogil
        const char* (*error_string)(const spina_error_t*) noexcept nogil
        void (*error_destroy)(spina_error_t*) noexcept nogil
        const char* (*rebalance_protocol)(spina_rk_t*) noexcept nogil
        int (*assignment_lost)(spina_rk_t*) noexcept nogil
        int (*offsets_store)(spina_rk_t*, spina_tplist_t*) noexcept nogil
        int (*commit)(spina_rk_t*, const spina_tplist_t*, int) noexcept nogil
        int (*get_watermark_offsets)(spina_rk_t*, const char*, int32_t, int64_t*, int64_t*) noexcept nogil
        int (*consumer_close)(spina_rk_t*) noexcept nogil
        int (*fatal_error)(spina_rk_t*, char*, size_t) noexcept nogil
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
        void* owner

    int SPINA_RK_PRODUCER
    int SPINA_RK_CONSUMER
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
    cdef const char* missing = NULL
    if _bind_consumer(handle, &missing) != 0:
        raise NativeUnavailable(f"{path} has no symbol {missing.decode()}: not a usable librdkafka")
    _library_path = path
    _bound = True


cdef extern from *:
    """
    #include <dlfcn.h>

    /* The consumer's functions, bound from C: one line each instead of a cast per signature. */
    #define SPINA_BIND(field, name) do { \
        void *f_ = dlsym(handle, name); \
        if (!f_) { *missing = name; return -1; } \
        *(void **)(&spina_rk.field) = f_; \
    } while (0)

    static int spina_bind_consumer(void *handle, const char **missing) {
        SPINA_BIND(poll_set_consumer, "rd_kafka_poll_set_consumer");
        SPINA_BIND(queue_get_consumer, "rd_kafka_queue_get_consumer");
        SPINA_BIND(queue_destroy, "rd_kafka_queue_destroy");
        SPINA_BIND(consume_batch_queue, "rd_kafka_consume_batch_queue");
        SPINA_BIND(message_destroy, "rd_kafka_message_destroy");
        SPINA_BIND(topic_name, "rd_kafka_topic_name");
        SPINA_BIND(message_headers, "rd_kafka_message_headers");
        SPINA_BIND(header_get_all, "rd_kafka_header_get_all");
        SPINA_BIND(subscribe, "rd_kafka_subscribe");
        SPINA_BIND(tplist_new, "rd_kafka_topic_partition_list_new");
        SPINA_BIND(tplist_add, "rd_kafka_topic_partition_list_add");
        SPINA_BIND(tplist_destroy, "rd_kafka_topic_partition_list_destroy");
        SPINA_BIND(conf_set_rebalance_cb, "rd_kafka_conf_set_rebalance_cb");
        SPINA_BIND(assign, "rd_kafka_assign");
        SPINA_BIND(incremental_assign, "rd_kafka_incremental_assign");
        SPINA_BIND(incremental_unassign, "rd_kafka_incremental_unassign");
        SPINA_BIND(error_string, "rd_kafka_error_string");
        SPINA_BIND(error_destroy, "rd_kafka_error_destroy");
        SPINA_BIND(rebalance_protocol, "rd_kafka_rebalance_protocol");
        SPINA_BIND(assignment_lost, "rd_kafka_assignment_lost");
        SPINA_BIND(offsets_store, "rd_kafka_offsets_store");
        SPINA_BIND(commit, "rd_kafka_commit");
        SPINA_BIND(get_watermark_offsets, "rd_kafka_get_watermark_offsets");
        SPINA_BIND(consumer_close, "rd_kafka_consumer_close");
        SPINA_BIND(fatal_error, "rd_kafka_fatal_error");
        return 0;
    }
    """
    int _bind_consumer "spina_bind_consumer"(void* handle, const char** missing)


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


cdef object _list_topics(spina_rk_t* rk, double timeout):
    cdef const spina_rk_metadata_t* metadata = NULL
    cdef int timeout_ms = max(1, int(timeout * 1000))
    cdef int err
    cdef int i
    with nogil:
        err = spina_rk.metadata(rk, 1, NULL, &metadata, timeout_ms)
    if err:
        raise _kafka_exception(err)
    try:
        topics = {metadata.topics[i].topic.decode(): metadata.topics[i].err for i in range(metadata.topic_cnt)}
    finally:
        spina_rk.metadata_destroy(metadata)
    return types.SimpleNamespace(topics=topics)


cdef object _kafka_exception(int err, str text=None):
    return confluent_kafka.KafkaException(confluent_kafka.KafkaError(err, text or error_text(err)))


cdef int _configure(spina_rk_conf_t* conf, dict settings, str role) except -1:
    """Applies ``settings`` to ``conf`` with rd_kafka_conf_set; on a refusal destroys ``conf`` and raises
    InvalidRequest naming the setting."""
    cdef char errstr[512]
    cdef bytes name_bytes, value_bytes
    try:
        for name, value in settings.items():
            if callable(value):
                raise InvalidRequest(f"librdkafka setting {name!r}: callbacks are not supported by Spina's "
                                     f"{role} (it sets its own)", field=str(name))
            name_bytes = str(name).encode()
            value_bytes = _conf_text(value).encode()
            if spina_rk.conf_set(conf, name_bytes, value_bytes, errstr, sizeof(errstr)) != 0:
                raise InvalidRequest(f"librdkafka setting {name!r} = {value!r}: "
                                     f"{errstr.decode(errors='replace')}", field=str(name))
    except BaseException:
        spina_rk.conf_destroy(conf)
        raise
    return 0


cdef spina_rk_t* _new_handle(int kind, dict settings, spina_state_t* state, object logger) except NULL:
    """A producer or consumer handle with ``settings`` (InvalidRequest naming a refused one), Spina's delivery
    report or rebalance callback, ``state`` as opaque, and logs (to ``logger``) queued for the caller's
    poll/fetch thread to serve instead of librdkafka's own threads."""
    cdef char errstr[512]
    cdef spina_rk_t* rk
    cdef spina_rk_conf_t* conf = spina_rk.conf_new()
    cdef str role = "producer" if kind == SPINA_RK_PRODUCER else "consumer"
    state.logger = <void*>logger if logger is not None else NULL
    settings.setdefault("log.queue", True)
    _configure(conf, settings, role)
    if kind == SPINA_RK_PRODUCER:
        spina_rk.conf_set_dr_msg_cb(conf, spina_dr_cb)
    else:
        spina_rk.conf_set_rebalance_cb(conf, _rebalance_cb)
    if logger is not None:
        spina_rk.conf_set_log_cb(conf, _log_cb)
    spina_rk.conf_set_opaque(conf, state)
    with nogil:
        rk = spina_rk.new_(kind, conf, errstr, sizeof(errstr))  # takes conf on success
    if rk == NULL:
        spina_rk.conf_destroy(conf)
        raise InvalidRequest(f"librdkafka refused the {role} settings: {errstr.decode(errors='replace')}")
    spina_rk.set_log_queue(rk, NULL)
    return rk


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
        self._topics = {}
        self._state.done = NULL
        self._state.owner = NULL
        settings = dict(settings)
        self._logger = settings.pop("logger", None)
        # Logs are served by rd_kafka_poll on the poll thread, not from librdkafka's own threads.
        self._rk = _new_handle(SPINA_RK_PRODUCER, settings, &self._state, self._logger)
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
        if self._rk == NULL:
            raise RuntimeError("the producer is closed")
        return _list_topics(self._rk, timeout)

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


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

# rd_kafka_resp_err_t values the consumer reads
cdef enum:
    _ERR_UNKNOWN = -1
    _ERR_ASSIGN_PARTITIONS = -175
    _ERR_REVOKE_PARTITIONS = -174
    _ERR_FATAL = -150
ERR_ASSIGN_PARTITIONS = _ERR_ASSIGN_PARTITIONS
ERR_REVOKE_PARTITIONS = _ERR_REVOKE_PARTITIONS
ERR_PARTITION_EOF = -191
ERR_NO_OFFSET = -168
ERR_FATAL = _ERR_FATAL
cdef int _MAX_BATCH = 1_000_000


cdef inline bint _is_derived_traceparent(str event_id, const char* value, size_t size) noexcept:
    """True if ``value`` is 00-<id>-<id[16:]>-01, the traceparent Event.traceparent derives from the id."""
    cdef Py_ssize_t id_size
    cdef const char* id_text
    if size != <size_t>_TRACEPARENT_SIZE or event_id is None:
        return False
    id_text = PyUnicode_AsUTF8AndSize(event_id, &id_size)
    return (id_text != NULL and id_size == 32 and memcmp(value, b"00-", 3) == 0 and memcmp(value + 3, id_text, 32) == 0
            and value[35] == 45 and memcmp(value + 36, id_text + 16, 16) == 0 and memcmp(value + 52, b"-01", 3) == 0)


cdef list _headers(const spina_rk_message_t* m):
    """The message's headers as confluent-kafka's Message.headers() gives them, None without any."""
    cdef spina_hdrs_t* hdrs = NULL
    cdef const char* name
    cdef const void* value
    cdef size_t size
    cdef size_t index = 0
    cdef list out
    if spina_rk.message_headers(m, &hdrs) != 0:
        return None
    out = []
    while spina_rk.header_get_all(hdrs, index, &name, &value, &size) == 0:
        out.append((name.decode(errors="replace"),
                    PyBytes_FromStringAndSize(<const char*>value, size) if value != NULL else None))
        index += 1
    return out or None


cdef object _bytes_or_none(const void* data, size_t size):
    return PyBytes_FromStringAndSize(<const char*>data, size) if data != NULL else None


cdef int _follow_rebalance(spina_rk_t* rk, int err, spina_tplist_t* partitions, spina_error_t** error) noexcept nogil:
    """(Un)assigns as the group decided, for its protocol: incremental for COOPERATIVE, the whole assignment
    for EAGER (and on any other error: nothing assigned). Returns assign()'s error code; incremental ones
    leave their error in ``*error``."""
    cdef const char* protocol = spina_rk.rebalance_protocol(rk)
    cdef bint cooperative = protocol != NULL and strcmp(protocol, b"COOPERATIVE") == 0
    error[0] = NULL
    if cooperative and err == _ERR_ASSIGN_PARTITIONS:
        error[0] = spina_rk.incremental_assign(rk, partitions)
    elif cooperative and err == _ERR_REVOKE_PARTITIONS:
        error[0] = spina_rk.incremental_unassign(rk, partitions)
    elif err == _ERR_ASSIGN_PARTITIONS:
        return spina_rk.assign(rk, partitions)
    else:
        return spina_rk.assign(rk, NULL)
    return 0


cdef void _rebalance_cb(spina_rk_t* rk, int err, spina_tplist_t* partitions, void* opaque) noexcept with gil:
    cdef spina_state_t* state = <spina_state_t*>opaque
    cdef spina_error_t* error = NULL
    if state != NULL and state.owner != NULL:
        (<NativeConsumer>state.owner)._rebalance(rk, err, partitions)
        return
    # The NativeConsumer is being freed without close(): rd_kafka_destroy leaves the group, and waits for
    # this callback to give the partitions up.
    with nogil:
        _follow_rebalance(rk, err, partitions, &error)
    if error != NULL:
        spina_rk.error_destroy(error)


cdef class NativeConsumer:
    """An rd_kafka_t consumer with the settings confluent-kafka's Consumer would take (``{"key": value}``,
    ``"logger"`` a logging.Logger); bad settings raise InvalidRequest naming the key.

    ``fetch()`` takes a batch off the consumer queue with the GIL released, decodes the envelopes in C from
    librdkafka's payload buffers into Events and frees the messages: an event's only Python objects are its
    Event, its strings and its value. Messages that are not envelopes come back as ConsumedMessage records.
    The rebalance callback runs inside ``fetch()`` and ``close()`` (the caller's thread), calls
    ``on_rebalance("assign" | "revoke" | "lost", [TopicPartition])`` and then (un)assigns for the group's
    protocol (incremental for COOPERATIVE, whole assignment for EAGER), as confluent-kafka's Consumer does.

    Threads: fetch/subscribe/close from one thread; commit, store_offsets and watermarks from any."""

    cdef spina_rk_t* _rk
    cdef spina_rkqu_t* _queue
    cdef spina_state_t _state
    cdef object _logger
    cdef object _on_rebalance
    cdef object _callback_error
    cdef spina_rk_message_t** _messages
    cdef Py_ssize_t _capacity
    cdef _HeadReader _reader
    cdef bytes _last_topic_name
    cdef str _last_topic
    cdef int _busy             # a call is in its GIL-released part: close() must wait for it

    def __cinit__(self, dict settings):
        _bind()
        self._state.done = NULL
        self._state.owner = <void*>self  # borrowed: the handle never outlives this object (close/__dealloc__)
        self._reader = _HeadReader()
        settings = dict(settings)
        self._logger = settings.pop("logger", None)
        # Logs go to the main queue, which poll_set_consumer forwards to the consumer queue: fetch() serves
        # them on its own thread, not librdkafka's.
        self._rk = _new_handle(SPINA_RK_CONSUMER, settings, &self._state, self._logger)
        spina_rk.poll_set_consumer(self._rk)
        self._queue = spina_rk.queue_get_consumer(self._rk)

    def __dealloc__(self):
        if self._rk != NULL:
            # Not closed: rd_kafka_destroy leaves the group (the rebalance callback assigns on its own then).
            self._state.owner = NULL
            if self._queue != NULL:
                spina_rk.queue_destroy(self._queue)
            spina_rk.destroy(self._rk)
            self._rk = NULL
        free(self._messages)

    cdef spina_rk_t* _handle(self) except NULL:
        if self._rk == NULL:
            raise RuntimeError("the consumer is closed")
        return self._rk

    def list_topics(self, timeout=10.0):
        """Like NativeProducer.list_topics (for wait_for_cluster)."""
        return _list_topics(self._handle(), timeout)

    def subscribe(self, list topics, on_rebalance=None):
        cdef spina_rk_t* rk = self._handle()
        cdef spina_tplist_t* wanted = spina_rk.tplist_new(len(topics))
        cdef int err
        try:
            for topic in topics:
                spina_rk.tplist_add(wanted, (<str>topic).encode(), -1)  # RD_KAFKA_PARTITION_UA
            self._on_rebalance = on_rebalance
            err = spina_rk.subscribe(rk, wanted)
        finally:
            spina_rk.tplist_destroy(wanted)
        if err:
            raise _kafka_exception(err, f"subscribe to {', '.join(topics)}: {error_text(err)}")

    cdef void _rebalance(self, spina_rk_t* rk, int err, spina_tplist_t* partitions) noexcept:
        cdef int i
        cdef spina_error_t* error = NULL
        cdef int code = 0
        try:
            kind = ("assign" if err == _ERR_ASSIGN_PARTITIONS else
                    ("lost" if spina_rk.assignment_lost(rk) else "revoke") if err == _ERR_REVOKE_PARTITIONS else None)
            if kind is not None and self._on_rebalance is not None:
                self._on_rebalance(kind, [confluent_kafka.TopicPartition(partitions.elems[i].topic.decode(),
                                                                         partitions.elems[i].partition,
                                                                         partitions.elems[i].offset)
                                          for i in range(partitions.cnt)])
        except BaseException as exc:  # raised again by the fetch() or close() this callback runs in
            if self._callback_error is None:
                self._callback_error = exc
        # Whatever the callback did, the assignment follows the group: librdkafka waits for this call.
        with nogil:
            code = _follow_rebalance(rk, err, partitions, &error)
        try:
            if error != NULL:
                text = spina_rk.error_string(error).decode(errors="replace")
                spina_rk.error_destroy(error)
                raise _kafka_exception(_ERR_UNKNOWN, f"incremental (un)assign failed: {text}")
            if code:
                raise _kafka_exception(code, f"assign failed: {error_text(code)}")
        except BaseException as exc:
            if self._callback_error is None:
                self._callback_error = exc

    def fetch(self, Py_ssize_t max_batch, double first_timeout_s, double batch_wait_s):
        """Up to ``max_batch`` messages: waits up to ``first_timeout_s`` for the first, then up to
        ``batch_wait_s`` for the rest. Returns (events, undecodable [(ConsumedMessage, reason)], errors
        [(topic, partition, offset, error code, text)], {(topic, partition): next offset}); events keep the
        fetch order. Errors raised by the rebalance callback are raised here."""
        cdef spina_rk_t* rk = self._handle()
        cdef ssize_t count = 0
        cdef ssize_t more = 0
        cdef ssize_t i
        cdef int first_ms = max(0, int(first_timeout_s * 1000))
        cdef int wait_ms = max(0, int(batch_wait_s * 1000))
        if not 0 < max_batch <= _MAX_BATCH:
            raise ValueError(f"max_batch {max_batch}: expected 1 to {_MAX_BATCH:,}")
        if max_batch > self._capacity:
            free(self._messages)
            self._messages = NULL
            self._capacity = 0
            self._messages = <spina_rk_message_t**>malloc(max_batch * sizeof(spina_rk_message_t*))
            if self._messages == NULL:
                raise MemoryError()
            self._capacity = max_batch
        self._busy = 1
        try:
            with nogil:
                count = spina_rk.consume_batch_queue(self._queue, first_ms, self._messages, 1)
                if count == 1 and max_batch > 1:
                    more = spina_rk.consume_batch_queue(self._queue, wait_ms, self._messages + 1,
                                                        <size_t>(max_batch - 1))
                    if more > 0:
                        count += more
        finally:
            self._busy = 0
        if count < 0:
            count = 0
        try:
            result = self._decode(count)
        finally:
            with nogil:
                for i in range(count):
                    spina_rk.message_destroy(self._messages[i])
        self._raise_callback_error()
        return result

    cdef _raise_callback_error(self):
        error = self._callback_error
        if error is not None:
            self._callback_error = None
            raise error

    cdef str _topic_of(self, const spina_rk_message_t* m):
        cdef const char* name
        if m.rkt == NULL:
            return ""
        name = spina_rk.topic_name(m.rkt)
        if self._last_topic_name is None or strcmp(name, PyBytes_AS_STRING(self._last_topic_name)) != 0:
            self._last_topic_name = <bytes>name
            self._last_topic = self._last_topic_name.decode(errors="replace")
        return self._last_topic

    cdef ConsumedMessage _record(self, const spina_rk_message_t* m, str topic, value):
        return ConsumedMessage(topic, m.partition, m.offset, _bytes_or_none(m.key, m.key_len), value, _headers(m))

    cdef tuple _decode(self, ssize_t count):
        cdef list events = []
        cdef list undecodable = []
        cdef list errors = []
        cdef dict offsets = {}
        cdef ssize_t i
        cdef const spina_rk_message_t* m
        cdef Event event
        cdef str topic
        cdef str reason
        cdef object value
        cdef char errstr[512]
        # The offsets of one partition's run of messages are noted once, at its end.
        cdef str run_topic = None
        cdef int32_t run_partition = -1
        cdef int64_t run_next = -1
        for i in range(count):
            m = self._messages[i]
            topic = self._topic_of(m)
            if m.err:
                if m.err == _ERR_FATAL:
                    spina_rk.fatal_error(self._rk, errstr, sizeof(errstr))
                    text = errstr.decode(errors="replace")
                elif m.payload != NULL:
                    text = PyBytes_FromStringAndSize(<const char*>m.payload, m.len).decode(errors="replace")
                else:
                    text = error_text(m.err)
                errors.append((topic, m.partition, m.offset, m.err, text))
                continue
            if run_topic is not topic or run_partition != m.partition:
                if run_topic is not None:
                    offsets[(run_topic, run_partition)] = run_next
                run_topic, run_partition = topic, m.partition
            run_next = m.offset + 1
            if m.payload == NULL:
                undecodable.append((self._record(m, topic, None), NO_VALUE))
                continue
            value = PyBytes_FromStringAndSize(<const char*>m.payload, m.len)
            event = Event.__new__(Event)
            event._payload_end = -1
            event.topic = topic
            event.partition = m.partition
            event.offset = m.offset
            reason = read_envelope(self._reader, event, <bytes>value)
            if reason is not None:
                undecodable.append((self._record(m, topic, value), reason))
                continue
            event._native = True
            event._value = value
            self._note_key_and_headers(event, m)
            events.append(event)
        if run_topic is not None:
            offsets[(run_topic, run_partition)] = run_next
        return events, undecodable, errors, offsets

    cdef int _note_key_and_headers(self, Event event, const spina_rk_message_t* m) except -1:
        """Keeps on the Event what its message had beyond the envelope: nothing in the usual case (key = the
        aggregate id, no header but the traceparent derived from the id), else (key, headers) in _extra."""
        cdef spina_hdrs_t* hdrs = NULL
        cdef const char* name
        cdef const void* value
        cdef size_t size
        cdef Py_ssize_t id_size
        cdef const char* aggregate = PyUnicode_AsUTF8AndSize(event.aggregate_id, &id_size)
        cdef bint same_key = (m.key != NULL and <size_t>id_size == m.key_len
                              and memcmp(m.key, aggregate, id_size) == 0)
        cdef list headers = None
        if spina_rk.message_headers(m, &hdrs) == 0:
            if (spina_rk.header_get_all(hdrs, 0, &name, &value, &size) == 0
                    and spina_rk.header_get_all(hdrs, 1, &name, &value, &size) != 0):
                spina_rk.header_get_all(hdrs, 0, &name, &value, &size)
                if (strcmp(name, b"traceparent") == 0 and value != NULL
                        and _is_derived_traceparent(event.id, <const char*>value, size)):
                    event._tp_header = True
                else:
                    headers = _headers(m)
            else:
                headers = _headers(m)
        if headers is not None:
            for header_name, header_value in headers:
                if header_name == "traceparent" and header_value is not None:
                    event._traceparent = header_value.decode("ascii", "replace")
                    break
        if not same_key or headers is not None:
            event._extra = (_bytes_or_none(m.key, m.key_len), headers)
        return 0

    cdef spina_tplist_t* _tplist(self, offsets) except NULL:
        cdef spina_tplist_t* out = spina_rk.tplist_new(max(1, len(offsets)))
        cdef spina_tp_t* tp
        for item in offsets:
            tp = spina_rk.tplist_add(out, (<str>item.topic).encode(), item.partition)
            tp.offset = item.offset
        return out

    def store_offsets(self, offsets):
        """Stores ``offsets`` ([TopicPartition]: the next offset to consume) for the next commit."""
        cdef spina_rk_t* rk = self._handle()
        cdef spina_tplist_t* wanted = self._tplist(offsets)
        cdef int err
        cdef int i
        try:
            err = spina_rk.offsets_store(rk, wanted)
            if err:
                failed = [f"{wanted.elems[i].topic.decode()}[{wanted.elems[i].partition}]: "
                          f"{error_text(wanted.elems[i].err)}" for i in range(wanted.cnt) if wanted.elems[i].err]
                raise _kafka_exception(err, f"{error_text(err)}: {', '.join(failed)}")
        finally:
            spina_rk.tplist_destroy(wanted)

    def commit(self, offsets=None, bint asynchronous=False):
        """Commits ``offsets`` ([TopicPartition]), or every stored offset of the assignment if None; waits for
        the broker's answer unless ``asynchronous``. KafkaException on failure (ERR_NO_OFFSET: nothing to
        commit)."""
        cdef spina_rk_t* rk = self._handle()
        cdef spina_tplist_t* wanted = self._tplist(offsets) if offsets is not None else NULL
        cdef int err
        try:
            with nogil:
                err = spina_rk.commit(rk, wanted, asynchronous)
        finally:
            if wanted != NULL:
                spina_rk.tplist_destroy(wanted)
        if err:
            raise _kafka_exception(err)

    def get_watermark_offsets(self, str topic, int partition):
        """(low, high) watermarks as last seen in fetch responses (no broker round trip)."""
        cdef int64_t low = -1
        cdef int64_t high = -1
        cdef int err = spina_rk.get_watermark_offsets(self._handle(), topic.encode(), partition, &low, &high)
        if err:
            raise _kafka_exception(err)
        return low, high

    def close(self):
        """Leaves the group (the rebalance callback runs for the revoke; enable.auto.commit commits the stored
        offsets) and frees the handle. Idempotent; callback errors are raised after the handle is freed."""
        cdef spina_rk_t* rk = self._rk
        if rk == NULL:
            return
        while self._busy:
            time.sleep(0.001)
        with nogil:
            spina_rk.consumer_close(rk)
        self._rk = NULL
        self._state.owner = NULL
        with nogil:
            spina_rk.queue_destroy(self._queue)
            spina_rk.destroy(rk)
        self._queue = NULL
        self._raise_callback_error()


# Bound at import: a missing or too old librdkafka is an ImportError naming the problem when the events
# producer is first imported, not a failure on the first publish.
_bind()
