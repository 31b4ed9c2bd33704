# Declarations of the Raft log, the peer frame codec and the consensus core (definitions in _raft.pyx).
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
    cdef inline uint64_t _last_index(self) noexcept
    cdef inline uint64_t _last_term(self) noexcept
    cdef inline uint64_t _term_or_zero(self, uint64_t index) noexcept
    cdef inline bint _holds(self, uint64_t index, uint64_t term) noexcept
    cdef uint64_t _find_conflict_by_term(self, uint64_t index, uint64_t term) noexcept
    cdef int _check_term(self, uint64_t term) except -1
    cdef uint64_t _append_with_kind(self, uint64_t term, uint8_t kind, list payloads) except? 0
    cdef list _collect(self, uint64_t start_index, uint64_t end_index, Py_ssize_t max_bytes, bint with_index)


cdef class FrameDecoder:
    cdef bytearray _buffer
    cdef Py_ssize_t _max_frame


# Peer message types. Each is also the frame kind (encode_frame's ``kind``) the message travels under.
cpdef enum:
    MSG_APPEND = 1
    MSG_APPEND_RESPONSE = 2
    MSG_VOTE = 3
    MSG_VOTE_RESPONSE = 4
    MSG_PRE_VOTE = 5
    MSG_PRE_VOTE_RESPONSE = 6
    MSG_HEARTBEAT = 7
    MSG_HEARTBEAT_RESPONSE = 8
    MSG_TIMEOUT_NOW = 9
    MSG_READ_INDEX = 10
    MSG_READ_INDEX_RESPONSE = 11
    MSG_SNAPSHOT = 12
    MSG_SNAPSHOT_RESPONSE = 13

# The first byte of every log entry payload says what the rest is.
cpdef enum:
    ENTRY_NORMAL = 0
    ENTRY_NOOP = 1
    ENTRY_CONFIG = 2

cdef enum Role:
    ROLE_FOLLOWER = 0
    ROLE_PRE_CANDIDATE = 1
    ROLE_CANDIDATE = 2
    ROLE_LEADER = 3

cdef enum ProgressState:
    PROGRESS_PROBE = 0         # one append at a time until the follower's match is found
    PROGRESS_REPLICATE = 1     # optimistic pipelining, bounded by max_inflight
    PROGRESS_SNAPSHOT = 2      # waiting for the follower to install a snapshot


cdef class Message:
    cdef readonly int type
    cdef readonly str src
    cdef readonly str dst
    cdef readonly uint64_t term
    cdef readonly uint64_t log_term
    cdef readonly uint64_t index
    cdef readonly uint64_t commit
    cdef readonly list entries         # [(term, payload)] of an append
    cdef readonly bint reject
    cdef readonly uint64_t reject_hint
    cdef readonly uint64_t conflict_term
    cdef readonly bytes context
    cdef readonly uint64_t snapshot_index
    cdef readonly uint64_t snapshot_term
    cdef readonly uint64_t offset
    cdef readonly bytes data
    cdef readonly bint done


cdef class Progress:
    # What a leader knows of one follower's log (etcd's tracker.Progress).
    cdef readonly uint64_t match_index
    cdef readonly uint64_t next_index
    cdef ProgressState _state
    cdef readonly bint probe_sent
    cdef readonly bint recent_active
    cdef readonly uint64_t pending_snapshot
    cdef int _snapshot_ticks
    cdef uint64_t _commit_sent         # the commit index the last append to it carried
    cdef uint64_t* _inflight           # ring of the last index of each append in flight
    cdef Py_ssize_t _inflight_start
    cdef Py_ssize_t _inflight_count
    cdef Py_ssize_t _inflight_capacity

    cdef void _reset(self, uint64_t next_index) noexcept
    cdef void _become_probe(self) noexcept
    cdef void _become_replicate(self) noexcept
    cdef void _become_snapshot(self, uint64_t snapshot_index) noexcept
    cdef bint _maybe_update(self, uint64_t index) noexcept
    cdef bint _maybe_decrease_to(self, uint64_t rejected, uint64_t match_hint) noexcept
    cdef bint _is_paused(self) noexcept
    cdef void _add_inflight(self, uint64_t last_index) noexcept
    cdef void _free_inflight_to(self, uint64_t index) noexcept
    cdef void _free_first_inflight(self) noexcept


cdef class Ready:
    cdef readonly object hard_state
    cdef readonly list entries
    cdef readonly list messages
    cdef readonly list committed
    cdef readonly list read_states
    cdef readonly object soft_state
    cdef readonly object snapshot
    cdef uint64_t _last_entry_index
    cdef uint64_t _last_entry_term
    cdef uint64_t _last_committed_index


cdef class _ReadRequest:
    cdef bytes context
    cdef uint64_t index
    cdef str requester                 # None for a read asked on this node
    cdef set acks


cdef class RaftCore:
    cdef readonly str node_id
    cdef tuple _voters
    cdef tuple _learners
    cdef tuple _peers                  # everyone this node replicates to as leader: voters and learners
    cdef tuple _voter_peers            # the other voters: whom it asks for votes
    cdef frozenset _voter_set
    cdef uint64_t _pending_config_index
    cdef Py_ssize_t _quorum
    cdef uint64_t* _match_scratch      # one slot per voter, for the commit median
    cdef RaftLog _log
    cdef uint64_t _term
    cdef str _voted_for
    cdef str _leader_id
    cdef Role _role
    cdef uint64_t _commit_index
    cdef uint64_t _applied_index
    cdef uint64_t _stable_index        # entries up to here are durable: handed out in a Ready that was advanced
    cdef uint64_t _handed_out_index    # entries up to here were handed out in a Ready
    cdef uint64_t _committed_handed_out
    cdef int _election_ticks
    cdef int _heartbeat_ticks
    cdef int _randomized_election_timeout
    cdef int _election_elapsed
    cdef int _heartbeat_elapsed
    cdef int _transfer_elapsed
    cdef bint _pre_vote
    cdef bint _check_quorum
    cdef uint64_t _random_state
    cdef Py_ssize_t _max_append_bytes
    cdef Py_ssize_t _max_inflight
    cdef dict _progress
    cdef dict _votes
    cdef list _messages
    cdef list _read_states
    cdef str _transfer_target
    cdef list _read_queue
    cdef dict _read_requests
    cdef list _reads_awaiting_commit
    cdef uint64_t _reported_term
    cdef str _reported_vote
    cdef uint64_t _reported_commit
    cdef Role _reported_role
    cdef str _reported_leader
    cdef object _pending_snapshot
    cdef Ready _outstanding
    cdef bint _started
    cdef bint _commit_news_pending     # the commit index moved; followers not told yet (see ready())

    cdef int _set_config(self, list voters, list learners) except -1
    cdef int _next_random(self) noexcept
    cdef void _reset_timers(self) noexcept
    cdef inline bint _in_leader_lease(self) noexcept
    cdef inline Message _new_message(self, int kind, str to)
    cdef int _become_follower(self, uint64_t term, str leader) except -1
    cdef int _become_pre_candidate(self) except -1
    cdef int _become_candidate(self) except -1
    cdef int _become_leader(self) except -1
    cdef int _campaign(self, bint pre_vote, bint transfer) except -1
    cdef int _tally_vote(self, Message msg) except -1
    cdef int _tick_election(self) except -1
    cdef int _tick_leader(self) except -1
    cdef bint _quorum_active(self) noexcept
    cdef int _step_leader(self, Message msg) except -1
    cdef int _step_candidate(self, Message msg) except -1
    cdef int _step_follower(self, Message msg) except -1
    cdef int _process_vote(self, Message msg) except -1
    cdef int _process_append(self, Message msg) except -1
    cdef int _process_heartbeat(self, Message msg) except -1
    cdef int _process_snapshot(self, Message msg) except -1
    cdef int _append_after(self, uint64_t previous_index, list entries) except -1
    cdef int _truncate_from(self, uint64_t index) except -1
    cdef int _commit_to(self, uint64_t index) except -1
    cdef bint _maybe_commit(self) except -1
    cdef int _handle_append_response(self, Progress progress, Message msg) except -1
    cdef int _handle_heartbeat_response(self, Progress progress, Message msg) except -1
    cdef int _handle_snapshot_response(self, Progress progress, Message msg) except -1
    cdef bint _send_append(self, str to, bint send_if_empty) except -1
    cdef int _send_appends(self, str to) except -1
    cdef int _broadcast_append(self) except -1
    cdef int _send_commit_news(self) except -1
    cdef Message _build_heartbeat(self, str to, bytes context)
    cdef int _broadcast_heartbeat(self, bytes context) except -1
    cdef int _send_timeout_now(self, str to) except -1
    cdef int _abort_transfer(self) except -1
    cdef int _handle_read_request(self, bytes context, str requester) except -1
    cdef int _release_reads_awaiting_commit(self) except -1
    cdef int _ack_read(self, bytes context, str voter) except -1
    cdef int _deliver_read(self, _ReadRequest request) except -1
    cdef int _drop_reads(self) except -1
