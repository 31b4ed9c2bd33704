# Declarations of the compact registry structures (definitions in _registry.pyx).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef class Interner:
    # One shared str object per distinct string: tags, meta keys, zones and versions repeat across
    # thousands of instances, and sharing them is most of the memory a registry saves.
    cdef dict _strings
    cdef readonly Py_ssize_t hits


cdef extern from *:
    """
    #define SPINA_NO_STRING 0xFFFFFFFFu
    """
    # A string the table does not hold (a query for it matches nothing).
    const uint32_t NO_STRING "SPINA_NO_STRING"


# Registration limits (the issue's "1,000 tags" and "1 MB meta value" must be refused).
cdef enum:
    LIMIT_NAME_BYTES = 255         # service, instance id, version, zone, region, API version
    LIMIT_TAGS = 64
    LIMIT_TAG_BYTES = 255
    LIMIT_META_PAIRS = 64
    LIMIT_META_KEY_BYTES = 128
    LIMIT_META_VALUE_BYTES = 4096
    LIMIT_API_VERSIONS = 16
    LIMIT_RANGE_COMPARATORS = 8
    # The longest variable part of one instance, in 32-bit words: instance id, IPv6 address, tags,
    # meta pairs, API versions.
    MAX_VARIABLE_WORDS = 64 + 4 + LIMIT_TAGS + 2 * LIMIT_META_PAIRS + LIMIT_API_VERSIONS


cdef enum Status:
    STATUS_PASSING = 0
    STATUS_WARNING = 1
    STATUS_CRITICAL = 2


cdef enum VersionKind:
    VERSION_NONE = 0           # the string was never parsed as a version
    VERSION_RELEASE = 1
    VERSION_PRERELEASE = 2     # ordered before the release of the same MAJOR.MINOR.PATCH


cdef enum Comparison:
    COMPARE_EQ = 0
    COMPARE_NE = 1
    COMPARE_LT = 2
    COMPARE_LE = 3
    COMPARE_GT = 4
    COMPARE_GE = 5


ctypedef struct Instance:
    # One registration in 72 bytes. Strings are ids in the store's string table (0 = the empty string).
    # The variable part lives in the service's word arena at var_offset: the instance id (UTF-8, padded
    # to whole words), the IPv6 address if family is 6, then tag ids, meta (key, value) id pairs and
    # API-version ids.
    uint64_t create_index      # Raft index of the registration that created the instance
    uint64_t modify_index      # Raft index of its last change
    # Leader-local (not replicated, not hashed), in the leader's monotonic milliseconds: until when a
    # passing/warning instance stays healthy without a heartbeat, or since when a critical one has been
    # critical. 0 = not yet started (the lease starts at the next sweep).
    uint64_t lease_deadline
    uint32_t check_ttl_ms      # 0: no TTL check, the instance never expires by itself
    uint32_t deregister_after_ms   # 0: a critical instance stays registered
    uint32_t var_offset
    uint8_t ipv4[4]
    uint32_t version
    uint32_t zone
    uint32_t region
    uint32_t max_load
    uint32_t load              # reported with heartbeats on the leader; not replicated, not hashed
    uint16_t port
    uint16_t weight
    uint8_t id_length
    uint8_t family             # 4 or 6
    uint8_t status
    uint8_t tag_count
    uint8_t meta_count
    uint8_t api_count


ctypedef struct OwnerSlot:
    # Instance ids are unique across services (Consul's agent APIs name an instance by its id alone):
    # an open-addressing table from a 32-bit hash of the id to the owning service's name. A hit is
    # confirmed by looking the id up in that service, so hash collisions cost a probe, never a wrong answer.
    uint32_t hash
    uint32_t service           # string id of the service name; 0 = empty slot


ctypedef struct TagCount:
    uint32_t tag
    uint32_t count             # instances of the service carrying the tag


ctypedef struct SemVer:
    uint32_t major
    uint32_t minor
    uint32_t patch
    uint32_t kind              # a VersionKind


ctypedef struct Bound:
    SemVer version
    uint32_t comparison        # a Comparison


ctypedef struct Match:
    uint64_t order             # (proximity tier << 48) | (most free weighted capacity first)
    uint32_t slot              # position in the service's array: ties keep instance-id order


ctypedef struct Draft:
    # An instance about to be stored: the fixed part and its variable words, strings already acquired.
    Instance instance
    uint32_t word_count
    uint32_t words[MAX_VARIABLE_WORDS]


cdef class _StringTable:
    # The store's own intern table: one id per distinct string, shared by every service, counted so
    # a string no instance uses any more is dropped (meta values like build ids churn).
    cdef dict _ids             # str -> id
    cdef list _strings         # id -> str (None for a free id)
    cdef list _free_ids
    cdef uint32_t* _refcounts
    cdef SemVer* _versions     # the parsed form of strings used as instance versions
    cdef dict _prereleases     # id -> prerelease identifiers, for the rare tie on MAJOR.MINOR.PATCH
    cdef Py_ssize_t _capacity

    cdef int _grow(self, Py_ssize_t need) except -1
    cdef uint32_t find(self, str text)
    cdef uint32_t acquire(self, str text) except? NO_STRING
    cdef int release(self, uint32_t string_id) except -1
    cdef void set_version(self, uint32_t string_id, tuple key) noexcept
    cdef inline str text(self, uint32_t string_id)
    cdef Py_ssize_t memory_bytes(self) noexcept


cdef class _Service:
    # A service's instances, contiguous and sorted by instance id, with their variable parts in one
    # word arena and a tag -> instance count index sorted by tag id. No Python fields: not GC tracked.
    cdef uint64_t modify_index
    cdef Instance* instances
    cdef uint32_t* words
    cdef TagCount* tags
    cdef uint32_t name
    cdef uint32_t count
    cdef uint32_t capacity
    cdef uint32_t words_used
    cdef uint32_t words_capacity
    cdef uint32_t words_dead   # words of the arena no instance points at any more
    cdef uint32_t tag_kinds
    cdef uint32_t tag_capacity

    cdef Py_ssize_t find(self, const unsigned char* instance_id, Py_ssize_t length, bint* found) noexcept
    cdef uint32_t tag_instances(self, uint32_t tag) noexcept
    cdef bint count_tags(self, const uint32_t* tags, uint32_t tag_count, int delta) except -1
    cdef int _reserve_instances(self, uint32_t extra) except -1
    cdef uint32_t _append_words(self, const uint32_t* words, uint32_t count) except? 0xFFFFFFFF
    cdef int insert_at(self, Py_ssize_t position, Draft* draft) except -1
    cdef int replace_at(self, Py_ssize_t position, Draft* draft) except -1
    cdef int remove_at(self, Py_ssize_t position) except -1
    cdef int _compact_words(self) except -1
    cdef int shrink_to_fit(self) except -1
    cdef Py_ssize_t memory_bytes(self) noexcept


cdef class _Registration:
    # A register command decoded and validated, strings not yet interned.
    cdef str service
    cdef bytes instance_id
    cdef bytes address
    cdef str version
    cdef tuple version_key
    cdef str zone
    cdef str region
    cdef list api_versions     # sorted, no duplicates
    cdef list tags             # first occurrence order, no duplicates
    cdef list meta             # [(key, value)] sorted by key
    cdef uint32_t max_load
    cdef uint16_t port
    cdef uint16_t weight
    cdef uint8_t status
    cdef uint8_t family
    cdef uint32_t check_ttl_ms
    cdef uint32_t deregister_after_ms
    cdef uint64_t create_index      # set only when restored from a snapshot (0: the applying index)
    cdef uint64_t modify_index


cdef class VersionRange:
    cdef readonly str text
    cdef Bound _bounds[LIMIT_RANGE_COMPARATORS]
    cdef tuple _prereleases    # one entry per bound: its prerelease identifiers, or None
    cdef tuple _keys           # ((comparison, version key), ...) for __contains__
    cdef int _count

    cdef bint _admits(self, _StringTable table, uint32_t version) except -1


cdef class InstanceView:
    # A copy built per answer, with as few allocations as possible: the strings in one tuple (tags, meta
    # keys and values interleaved, API versions), the address as bytes; containers built on access.
    cdef readonly str service
    cdef readonly str instance_id
    cdef readonly str version
    cdef readonly str zone
    cdef readonly str region
    cdef readonly str status
    cdef tuple _texts
    cdef readonly long long max_load
    cdef readonly long long load
    cdef readonly int port
    cdef readonly int weight
    cdef readonly unsigned long long create_index
    cdef readonly unsigned long long modify_index
    cdef readonly unsigned long check_ttl_ms
    cdef readonly unsigned long deregister_after_ms
    cdef uint8_t _address[16]
    cdef uint8_t _address_size
    cdef uint8_t _tag_count
    cdef uint8_t _meta_count


cdef class RegistryStore:
    cdef _StringTable _table
    cdef dict _services                # name -> _Service
    cdef tuple _sorted_names           # cache for services(); None once a service came or went
    cdef dict _catalog_tags            # name -> sorted tag tuple, cache dropped when the tag set changes
    cdef Match* _matches               # query scratch
    cdef Py_ssize_t _matches_capacity
    cdef Py_ssize_t _instance_count
    cdef readonly uint64_t index       # Raft index of the last change to any service
    cdef readonly uint64_t removed_index  # Raft index of the last change that removed a whole service
    cdef set _changed                  # names of the services changed since take_changed()
    cdef OwnerSlot* _owners
    cdef Py_ssize_t _owner_capacity    # a power of two (or 0)
    cdef Py_ssize_t _owner_count

    cdef int _check_index(self, uint64_t index) except -1
    cdef uint32_t _owner_of(self, const unsigned char* instance_id, Py_ssize_t length) except? NO_STRING
    cdef int _owner_add(self, const unsigned char* instance_id, Py_ssize_t length, uint32_t service) except -1
    cdef int _owner_remove(self, const unsigned char* instance_id, Py_ssize_t length, uint32_t service) except -1
    cdef int _owner_grow(self) except -1
    cdef Instance* _find(self, str service, str instance_id)
    cdef int _fill_draft(self, Draft* draft, _Registration registration) except -1
    cdef int _release_words(self, const Instance* instance, const uint32_t* words) except -1
    cdef bint _put(self, uint64_t index, _Registration registration) except -1
    cdef bint _remove(self, uint64_t index, str service, const unsigned char* instance_id,
                      Py_ssize_t length) except -1
    cdef bint _set_status(self, uint64_t index, str service, const unsigned char* instance_id,
                          Py_ssize_t length, uint8_t status) except -1
    cdef InstanceView _view(self, _Service service, str name, const Instance* instance)
    cdef int _reserve_matches(self, Py_ssize_t count) except -1
    cdef int _load(self, const unsigned char* data, Py_ssize_t size) except -1
