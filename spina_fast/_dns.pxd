# Declarations of the DNS query parser, response encoder and answer cache (definitions in _dns.pyx).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    MAX_NAME_WIRE = 255            # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
    MAX_LABEL = 63
    MAX_MESSAGE = 65535            # the largest message a TCP length prefix can frame
    HEADER_BYTES = 12
    OPT_BYTES = 11                 # an OPT RR with an empty RDATA and the root owner
    RCODE_SLOTS = 32


cdef enum ParseStatus:
    PARSE_OK = 0
    PARSE_DROP = 1                 # not a query we may answer at all (too short for a header, or a response)
    PARSE_FORMERR = 2
    PARSE_NOTIMP = 3
    PARSE_BADVERS = 4


cdef enum Validation:
    # How a cached answer is checked against the registry before it is served again.
    VALID_ALWAYS = 0               # depends on no registry data (addr names, REFUSED)
    VALID_SERVICE = 1              # service_index(service) unchanged
    VALID_FOLDED = 2               # ... and service_index(the lowercased name) unchanged too
    VALID_REGISTRY = 3             # registry.index unchanged (no service of that name: any write may add one)


cdef struct ParsedQuery:
    uint16_t id
    uint16_t flags
    uint16_t qtype
    uint16_t qclass
    Py_ssize_t qname_length        # wire length of the question name, root label included
    Py_ssize_t labels
    bint edns
    bint dnssec_ok
    uint8_t edns_version
    uint16_t udp_payload
    const char* error              # why the query was refused (FORMERR / NOTIMP / BADVERS)
    unsigned char qname[MAX_NAME_WIRE + 1]   # the question name, ASCII-lowercased, wire form


cdef class Query:
    cdef readonly int id
    cdef readonly int opcode
    cdef readonly bint recursion_desired
    cdef readonly str name
    cdef readonly int qtype
    cdef readonly int qclass
    cdef readonly bint edns
    cdef readonly int udp_payload
    cdef readonly int edns_version
    cdef readonly bint dnssec_ok


cdef class _Plan:
    # Everything an answer is encoded from; kept so that rotated and size-limited variants can be encoded
    # later without asking the registry again.
    cdef bytes qname
    cdef uint16_t qtype
    cdef uint16_t qclass
    cdef int rcode
    cdef int edns                  # 0: no OPT; 1: OPT; 2: OPT with the DO bit echoed
    cdef Py_ssize_t domain_offset  # where the zone's labels start inside qname (-1: outside the zone)
    cdef list records              # (type, ...) tuples in answer order, before rotation
    cdef Py_ssize_t select         # records per answer (the answer limit, or all)
    cdef bint soa_answer
    cdef bint soa_authority
    cdef uint32_t serial


cdef class _Entry:
    cdef int validation
    cdef object service
    cdef object lower
    cdef uint64_t index
    cdef uint64_t lower_index
    cdef int rcode
    cdef _Plan plan
    cdef bytes full                # the answer when it does not rotate
    cdef list variants             # one answer per rotation offset, encoded on first use
    cdef Py_ssize_t next_offset
    cdef dict limited              # (offset << 17 | size limit) -> answer cut to that size


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr_storage:
        unsigned short ss_family
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* vector, unsigned int length, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vector, unsigned int length, int flags)
    int MSG_DONTWAIT
    int MSG_TRUNC


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass


cdef struct CachedAnswer:
    # One answer the serving thread may give without the GIL: the response messages (one per rotation offset)
    # for one native key, and what it depends on (checked against NativeUDP's generations on every hit).
    unsigned char* key
    Py_ssize_t key_length
    uint64_t hash
    int depends                    # DEPENDS_NOTHING / DEPENDS_SERVICE / DEPENDS_REGISTRY
    Py_ssize_t slot                # the service's generation slot (DEPENDS_SERVICE)
    uint64_t generation
    int rcode
    bint truncated
    Py_ssize_t size                # key and answer bytes
    Py_ssize_t variant_count
    Py_ssize_t next_variant
    unsigned char** variants
    Py_ssize_t* variant_lengths


cdef struct PendingQuery:
    # A datagram the serving thread could not answer, waiting for the event loop.
    unsigned char* data
    Py_ssize_t length
    sockaddr_storage peer
    socklen_t peer_length


cdef struct NativeUDP:
    # Everything the serving thread touches: no Python object, so that it never needs the GIL. ``lock`` guards
    # the table, the generations, the pending ring and the counters; the buffers are the thread's own.
    pthread_mutex_t lock
    int fd
    int stop_fd
    int pending_fd
    unsigned int batch
    Py_ssize_t reply_size
    uint16_t max_udp_payload
    CachedAnswer** table
    Py_ssize_t capacity
    Py_ssize_t count
    Py_ssize_t max_entries
    Py_ssize_t bytes_held          # answer and key bytes in the table, bounded by NATIVE_MAX_BYTES
    uint64_t* service_generations
    uint64_t registry_generation
    PendingQuery* pending
    Py_ssize_t pending_head
    Py_ssize_t pending_count
    uint64_t rcodes[RCODE_SLOTS]
    uint64_t hits
    uint64_t truncated
    uint64_t dropped
    uint64_t overflow
    uint64_t send_failures
    mmsghdr* received
    mmsghdr* replies
    iovec* received_iov
    iovec* reply_iov
    sockaddr_storage* peers
    unsigned char* buffers
    unsigned char* reply_buffers


cdef class DNSEngine:
    cdef NativeUDP* _native        # set while a UDPThread serves this engine: its cache is filled and invalidated
    cdef object _registry
    cdef object _service_index
    cdef object _instances
    cdef readonly str domain
    cdef bytes _domain_wire
    cdef readonly uint32_t ttl
    cdef readonly Py_ssize_t answer_limit
    cdef readonly Py_ssize_t max_udp_payload
    cdef readonly Py_ssize_t max_cache_entries
    cdef dict _cache
    cdef dict _folded
    cdef uint64_t _folded_index
    cdef bint _folded_valid
    cdef unsigned char* _buffer
    cdef uint64_t _rcodes[RCODE_SLOTS]
    cdef uint64_t _dropped
    cdef uint64_t _truncated
    cdef uint64_t _cache_hits
    cdef uint64_t _cache_misses
    cdef uint64_t _udp_queries
    cdef uint64_t _tcp_queries
    cdef uint64_t _overflow

    cpdef object answer(self, object query, bint tcp)
    cdef bint _is_valid(self, _Entry entry) except -1
    cdef _Entry _resolve(self, bytes qname, uint16_t qtype, uint16_t qclass, int edns)
    cdef int _depend_on_registry(self, _Entry entry) except -1
    cdef int _finish(self, _Entry entry, int rcode) except -1
    cdef int _resolve_service(self, _Entry entry, list inner) except -1
    cdef int _resolve_address(self, _Entry entry, bytes label) except -1
    cdef object _fold(self, str lower)
    cdef bytes _encode(self, _Plan plan, Py_ssize_t offset, Py_ssize_t limit)
    cdef bytes _select(self, _Entry entry, Py_ssize_t limit)
    cdef bytes _variant(self, _Entry entry, Py_ssize_t offset, Py_ssize_t limit)
    cdef int _fill_native(self, ParsedQuery* parsed, _Entry entry, Py_ssize_t limit) except -1
    cdef bytes _error(self, const unsigned char* data, Py_ssize_t size, ParsedQuery* parsed, int status)


cdef class UDPResponder:
    cdef DNSEngine _engine
    cdef int _fd
    cdef unsigned int _batch
    cdef mmsghdr* _received
    cdef mmsghdr* _replies
    cdef iovec* _received_iov
    cdef iovec* _reply_iov
    cdef sockaddr_storage* _peers
    cdef unsigned char* _buffers
    cdef object _on_error
    cdef readonly uint64_t send_failures
    cdef readonly uint64_t errors


cdef class UDPThread:
    cdef DNSEngine _engine
    cdef NativeUDP* _native
    cdef pthread_t _thread
    cdef bint _running
    cdef long _owner_pid
    cdef object _on_error
    cdef readonly uint64_t errors

    cdef void _stop(self)
