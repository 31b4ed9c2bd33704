"""The Raft message codec: exact round trips, and malformed input never crashes - only FrameError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast._raft import (
    MSG_APPEND,
    MSG_HEARTBEAT,
    MSG_SNAPSHOT,
    MSG_SNAPSHOT_RESPONSE,
    FrameDecoder,
    FrameError,
    Message,
    decode_message,
    encode_frame,
    encode_message,
    entry_kind,
)

MESSAGE_TYPES = list(range(MSG_APPEND, MSG_SNAPSHOT_RESPONSE + 1))
U64 = st.integers(min_value=0, max_value=2**64 - 1)
NODE_IDS = st.text(max_size=40)

messages = st.builds(
    Message,
    type=st.sampled_from(MESSAGE_TYPES),
    src=NODE_IDS,
    dst=NODE_IDS,
    term=U64,
    log_term=U64,
    index=U64,
    commit=U64,
    entries=st.lists(st.tuples(U64, st.binary(max_size=64)), max_size=8),
    reject=st.booleans(),
    reject_hint=U64,
    conflict_term=U64,
    context=st.binary(max_size=32),
    snapshot_index=U64,
    snapshot_term=U64,
    offset=U64,
    data=st.binary(max_size=128),
    done=st.booleans(),
)


def payload_of(frame: bytes) -> tuple[int, bytes]:
    [(kind, payload)] = FrameDecoder().feed(frame)
    return kind, payload


@given(messages)
def test_every_message_round_trips_through_one_frame(msg: Message) -> None:
    frame = encode_message(msg)
    kind, payload = payload_of(frame)
    assert kind == msg.type
    assert decode_message(kind, payload) == msg
    assert encode_frame(kind, payload) == frame


@settings(max_examples=300)
@given(st.sampled_from(MESSAGE_TYPES), st.binary(max_size=400))
def test_random_payloads_raise_only_frame_error(kind: int, payload: bytes) -> None:
    try:
        decoded = decode_message(kind, payload)
    except FrameError:
        return
    # Whatever decodes must be canonical: it encodes back to the very same bytes.
    assert payload_of(encode_message(decoded))[1] == payload


@settings(max_examples=100)
@given(messages, st.data())
def test_every_truncation_and_extension_is_refused(msg: Message, data: st.DataObject) -> None:
    kind, payload = payload_of(encode_message(msg))
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    with pytest.raises(FrameError):
        decode_message(kind, payload[:cut])
    with pytest.raises(FrameError, match="trailing"):
        decode_message(kind, payload + data.draw(st.binary(min_size=1, max_size=8)))


@settings(max_examples=100)
@given(messages, st.data())
def test_corrupted_bytes_raise_frame_error_or_decode_canonically(msg: Message, data: st.DataObject) -> None:
    kind, payload = payload_of(encode_message(msg))
    position = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    corrupted = bytearray(payload)
    corrupted[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        decoded = decode_message(kind, bytes(corrupted))
    except FrameError:
        return
    assert payload_of(encode_message(decoded))[1] == bytes(corrupted)


def test_a_stream_of_messages_decodes_in_order_across_chunk_boundaries() -> None:
    sent = [Message(type=MSG_APPEND, src="a", dst="b", term=t, index=t, entries=[(t, b"\x00" + bytes(t))])
            for t in range(1, 30)]
    stream = b"".join(encode_message(m) for m in sent)
    decoder = FrameDecoder()
    received: list[Message] = []
    for start in range(0, len(stream), 7):
        received.extend(decode_message(kind, payload) for kind, payload in decoder.feed(stream[start:start + 7]))
    assert received == sent and decoder.buffered == 0


def minimal_payload(**overrides: bytes) -> bytes:
    parts = {
        "ids": struct.pack(">H", 1) + b"a" + struct.pack(">H", 1) + b"b",
        "numbers": bytes(6 * 8),
        "flags": b"\x00",
        "context": struct.pack(">I", 0),
        "snapshot": bytes(3 * 8),
        "data": struct.pack(">I", 0),
        "entries": struct.pack(">I", 0),
    }
    parts.update(overrides)
    return b"".join(parts.values())


def test_minimal_payload_decodes() -> None:
    assert decode_message(MSG_HEARTBEAT, minimal_payload()) == Message(type=MSG_HEARTBEAT, src="a", dst="b")


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        (0, minimal_payload(), "unknown message type 0"),
        (200, minimal_payload(), "unknown message type 200"),
        (MSG_APPEND, b"", "shorter than the minimum"),
        (MSG_APPEND, minimal_payload(flags=b"\x04"), "unknown bits"),
        (MSG_APPEND, minimal_payload(ids=struct.pack(">H", 1) + b"\xff" + struct.pack(">H", 1) + b"b"), "UTF-8"),
        (MSG_APPEND, minimal_payload(ids=struct.pack(">H", 999) + b"a" + struct.pack(">H", 1) + b"b"), "truncated"),
        (MSG_APPEND, minimal_payload(context=struct.pack(">I", 2**32 - 1)), "truncated in context"),
        (MSG_APPEND, minimal_payload(data=struct.pack(">I", 50)), "truncated in data"),
        (MSG_APPEND, minimal_payload(entries=struct.pack(">I", 2**32 - 1)), "claims 4294967295 entries"),
        (MSG_APPEND, minimal_payload(entries=struct.pack(">I", 1) + bytes(8) + struct.pack(">I", 9)),
         "truncated in entry payload"),
    ],
)
def test_malformed_payloads_say_what_is_wrong(kind: int, payload: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_message(kind, payload)


def test_snapshot_fields_survive_the_codec() -> None:
    msg = Message(type=MSG_SNAPSHOT, src="leader", dst="f", term=3, snapshot_index=1000, snapshot_term=2,
                  offset=65536, data=b"chunk" * 100, done=True)
    decoded = decode_message(*payload_of(encode_message(msg)))
    assert (decoded.snapshot_index, decoded.snapshot_term, decoded.offset, decoded.done) == (1000, 2, 65536, True)
    assert decoded.data == b"chunk" * 100


def test_message_constructor_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="unknown message type"):
        Message(type=99)
    with pytest.raises(ValueError, match="pairs"):
        Message(type=MSG_APPEND, entries=[(1, b"x", 3)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Message(type=MSG_APPEND, entries=[(1, "text")])  # type: ignore[list-item]
    with pytest.raises(OverflowError):
        Message(type=MSG_APPEND, term=-1)
    with pytest.raises(TypeError):
        Message(type=MSG_APPEND, src=None)  # type: ignore[arg-type]


def test_message_equality_and_repr() -> None:
    first = Message(type=MSG_APPEND, src="a", dst="b", term=2, index=4, entries=[(2, b"\x00x")], commit=3)
    assert first == Message(type=MSG_APPEND, src="a", dst="b", term=2, index=4, entries=[(2, b"\x00x")], commit=3)
    assert first != Message(type=MSG_APPEND, src="a", dst="b", term=2, index=4)
    assert first != "not a message"
    assert repr(first) == "Message(MSG_APPEND a->b term=2 log_term=0 index=4 commit=3 entries=5..5(terms 2..2))"


def test_node_ids_longer_than_the_length_prefix_are_refused() -> None:
    with pytest.raises(ValueError, match="65535"):
        encode_message(Message(type=MSG_HEARTBEAT, src="x" * 70000))


def test_entry_kind_reads_the_first_byte() -> None:
    assert entry_kind(b"\x00cmd") == 0 and entry_kind(b"\x01") == 1
    with pytest.raises(ValueError, match="empty"):
        entry_kind(b"")
