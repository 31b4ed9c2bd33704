"""The Cython extensions: really compiled, and correct against plain-Python models."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast import _raft, _registry
from spina_fast._raft import FrameDecoder, FrameError, RaftLog, crc32c, encode_frame
from spina_fast._registry import Interner, pack_address, unpack_address


@pytest.mark.parametrize("module", [_raft, _registry])
def test_extension_is_compiled(module: object) -> None:
    assert module.__file__ is not None and module.__file__.endswith(".so")


def test_crc32c_matches_published_check_values() -> None:
    # RFC 3720 appendix B.4 and the CRC catalogue's check value for "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_continues_across_chunks(first: bytes, second: bytes) -> None:
    assert crc32c(second, crc32c(first)) == crc32c(first + second)
    assert crc32c(first + b"x") != crc32c(first + b"y")


def test_log_starts_empty_and_answers_term_zero_at_index_zero() -> None:
    log = RaftLog()
    assert (len(log), log.first_index, log.last_index, log.last_term) == (0, 1, 0, 0)
    assert log.term_at(0) == 0
    with pytest.raises(IndexError, match="log index 1 is not held"):
        log.entry(1)


def test_log_refuses_a_term_older_than_the_last_entry() -> None:
    log = RaftLog()
    log.append(3, b"a")
    with pytest.raises(ValueError, match="older than the last entry"):
        log.append(2, b"b")
    with pytest.raises(ValueError, match="older than the last entry"):
        log.append_batch(1, [b"c"])
    assert log.last_index == 1


class LogModel:
    """The same log as a plain list: the reference the Cython log must agree with."""

    def __init__(self) -> None:
        self.snapshot_index = 0
        self.snapshot_term = 0
        self.entries: list[tuple[int, bytes]] = []

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 3), st.binary(max_size=40)),
        st.tuples(st.just("batch"), st.integers(0, 3), st.lists(st.binary(max_size=40), max_size=6)),
        st.tuples(st.just("truncate"), st.integers(0, 40)),
        st.tuples(st.just("compact"), st.integers(0, 45)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(operations)
def test_log_agrees_with_a_list_model(ops: list[tuple]) -> None:
    log, model = RaftLog(), LogModel()
    term = 1
    for op in ops:
        if op[0] == "append":
            term += op[1]
            assert log.append(term, op[2]) == model.last_index + 1
            model.entries.append((term, op[2]))
        elif op[0] == "batch":
            term += op[1]
            assert log.append_batch(term, op[2]) == model.last_index + len(op[2])
            model.entries.extend((term, payload) for payload in op[2])
        elif op[0] == "truncate":
            index = model.snapshot_index + 1 + op[1]
            log.truncate_from(index)
            del model.entries[index - model.snapshot_index - 1:]
        else:
            index = model.snapshot_index + op[1]
            if index <= model.snapshot_index:
                continue
            held = index - model.snapshot_index
            new_term = model.entries[held - 1][0] if held <= len(model.entries) else term
            log.compact_to(index, new_term)
            model.entries = model.entries[held:]
            model.snapshot_index, model.snapshot_term = index, new_term
        assert len(log) == len(model.entries)
        assert log.last_index == model.last_index
        assert log.snapshot_index == model.snapshot_index
        assert log.last_term == (model.entries[-1][0] if model.entries else model.snapshot_term)
        assert log.payload_bytes == sum(len(payload) for _, payload in model.entries)
    held = log.entries(log.first_index, log.last_index)
    assert held == model.entries
    for position, (entry_term, payload) in enumerate(model.entries):
        index = model.snapshot_index + 1 + position
        assert log.term_at(index) == entry_term
        assert log.entry(index) == payload


def test_entries_respect_max_bytes_but_always_return_one() -> None:
    log = RaftLog()
    log.append_batch(1, [b"x" * 100, b"y" * 100, b"z" * 100])
    assert [p for _, p in log.entries(1, 3, max_bytes=250)] == [b"x" * 100, b"y" * 100]
    assert [p for _, p in log.entries(1, 3, max_bytes=10)] == [b"x" * 100]
    assert log.entries(4, 9) == []


def test_log_cannot_truncate_into_the_compacted_prefix() -> None:
    log = RaftLog()
    log.append_batch(1, [b"a", b"b", b"c"])
    log.compact_to(2, 1)
    assert log.term_at(2) == 1 and log.entry(3) == b"c"
    with pytest.raises(IndexError, match="compacted"):
        log.truncate_from(2)


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=2000)), max_size=20), st.data())
def test_frames_survive_any_split_of_the_stream(messages: list[tuple[int, bytes]],
                                                data: st.DataObject) -> None:
    stream = b"".join(encode_frame(kind, payload) for kind, payload in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    received: list[tuple[int, bytes]] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        received.extend(decoder.feed(stream[previous:cut]))
        previous = cut
    assert received == messages
    assert decoder.buffered == 0


def test_frame_with_a_flipped_bit_is_rejected() -> None:
    frame = bytearray(encode_frame(7, b"append entries"))
    frame[8] ^= 0x01
    with pytest.raises(FrameError, match="checksum"):
        FrameDecoder().feed(bytes(frame))


def test_frame_length_beyond_the_limit_is_rejected_before_buffering_it() -> None:
    decoder = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameError, match=r"outside 1\.\.1024"):
        decoder.feed((1 << 20).to_bytes(4, "big") + b"\x01")
    with pytest.raises(FrameError, match="outside"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_frame_checksum_is_crc32c_not_zlib_crc32() -> None:
    frame = encode_frame(1, b"abc")
    assert int.from_bytes(frame[-4:], "big") == crc32c(b"\x01abc") != zlib.crc32(b"\x01abc")


def test_interner_returns_one_shared_object_per_string() -> None:
    interner = Interner()
    first = interner.intern("".join(["zone-", "a"]))
    second = interner.intern("".join(["zone", "-a"]))
    assert first is second and len(interner) == 1 and interner.hits == 1 and "zone-a" in interner


@pytest.mark.parametrize(("host", "port", "size"), [
    ("10.1.2.3", 8080, 6), ("0.0.0.0", 0, 6), ("::1", 65535, 18), ("2001:db8::7", 443, 18),
])
def test_address_round_trips_through_its_packed_form(host: str, port: int, size: int) -> None:
    packed = pack_address(host, port)
    assert len(packed) == size
    assert unpack_address(packed) == (host, port)


@pytest.mark.parametrize(("host", "port", "message"), [
    ("10.1.2.3", 70000, "outside 0..65535"), ("10.1.2.3", -1, "outside 0..65535"),
    ("example.com", 80, "not an IPv4 or IPv6 literal"), ("10.1.2", 80, "not an IPv4"),
])
def test_bad_addresses_are_refused_by_name(host: str, port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_address(host, port)


def test_unpack_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="6 or 18 bytes, got 5"):
        unpack_address(b"\x01\x02\x03\x04\x05")
