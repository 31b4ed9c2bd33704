"""The KV state machine on its own: Consul semantics, determinism, snapshots."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast.errors import InvalidRequest
from spina_fast.kv.store import MAX_VALUE_BYTES, KVStore, encode_delete, encode_put


def apply_all(store: KVStore, commands: list[bytes], start: int = 1) -> list[bool]:
    return [store.apply(index, command) for index, command in enumerate(commands, start)]


def test_put_sets_create_and_modify_index() -> None:
    store = KVStore()
    apply_all(store, [encode_put("a", b"1", flags=7), encode_put("a", b"2")])
    entry = store.get("a")
    assert entry is not None
    assert (entry.value, entry.flags, entry.create_index, entry.modify_index) == (b"2", 0, 1, 2)
    assert entry.to_consul()["Value"] == "Mg==" and store.index == 2


def test_cas_with_a_stale_index_changes_nothing() -> None:
    store = KVStore()
    assert apply_all(store, [encode_put("a", b"1"), encode_put("a", b"2", cas=1), encode_put("a", b"3", cas=1)]) == [
        True, True, False]
    entry = store.get("a")
    assert entry is not None and entry.value == b"2" and entry.modify_index == 2 and store.index == 2


def test_cas_zero_only_creates() -> None:
    store = KVStore()
    assert apply_all(store, [encode_put("a", b"1", cas=0), encode_put("a", b"2", cas=0)]) == [True, False]


def test_delete_with_cas_needs_the_current_index() -> None:
    store = KVStore()
    results = apply_all(store, [encode_put("a", b"1"), encode_delete("a", cas=5), encode_delete("a", cas=1)])
    assert results == [True, False, True] and store.get("a") is None


def test_recurse_keys_and_separator() -> None:
    store = KVStore()
    apply_all(store, [encode_put(k, b"v") for k in ("app/a", "app/b/c", "app/b/d", "apple", "b")])
    assert [e.key for e in store.scan("app/")] == ["app/a", "app/b/c", "app/b/d"]
    assert store.keys("app") == ["app/a", "app/b/c", "app/b/d", "apple"]
    assert store.keys("app/", "/") == ["app/a", "app/b/"]
    store.apply(10, encode_delete("app/", recurse=True))
    assert store.keys("") == ["apple", "b"] and store.index == 10


@pytest.mark.parametrize(("key", "message"), [
    ("", "missing key"), ("/a", "must not start"), ("a\x01", "control characters"), ("k" * 600, "limit is 512"),
])
def test_bad_keys_are_refused_before_they_reach_the_log(key: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        encode_put(key, b"v")


def test_value_over_the_limit_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="limit is 524288"):
        encode_put("a", b"x" * (MAX_VALUE_BYTES + 1))


commands = st.lists(st.one_of(
    st.builds(lambda k, v, c: encode_put(k, v, cas=c), st.sampled_from(["a", "a/b", "b", "c/d/e"]),
              st.binary(max_size=8), st.none() | st.integers(0, 6)),
    st.builds(lambda k, r: encode_delete(k, recurse=r), st.sampled_from(["a", "a/", "c", "b"]), st.booleans()),
), max_size=30)


@settings(deadline=None)  # a loaded CI machine may take longer than the default 200 ms per example
@given(commands)
def test_same_commands_give_same_hash_and_snapshots_restore_exactly(log: list[bytes]) -> None:
    first, second = KVStore(), KVStore()
    assert apply_all(first, log) == apply_all(second, log)
    assert first.state_hash() == second.state_hash()
    restored = KVStore()
    restored.restore(first.snapshot())
    assert restored.state_hash() == first.state_hash() and restored.index == first.index
    assert restored.keys("") == first.keys("")


parity_commands = st.lists(st.one_of(
    st.builds(lambda k, v, f, c: encode_put(k, v, flags=f, cas=c),
              st.sampled_from(["a", "a/b", "b", "é/ü", "config/x"]), st.binary(max_size=8),
              st.integers(0, (1 << 64) - 1), st.none() | st.integers(0, 8)),
    st.builds(lambda k, c: encode_delete(k, cas=c), st.sampled_from(["a", "a/b", "zz", "é/ü"]),
              st.none() | st.integers(0, 8)),
    st.builds(lambda k: encode_delete(k, recurse=True), st.sampled_from(["a", ""])),
), max_size=40)


@settings(deadline=None)
@given(parity_commands)
def test_the_cython_apply_path_matches_the_general_one(log: list[bytes]) -> None:
    """``apply`` takes plain puts and deletes in Cython (``_kv.apply_plain``); the general Python path must
    give the same results, entries, indexes and key order for any mix of commands."""
    fast, general = KVStore(), KVStore()
    results = apply_all(fast, log)
    assert results == [general._apply_general(index, command) for index, command in enumerate(log, 1)]
    assert fast.state_hash() == general.state_hash() and fast.index == general.index
    assert fast.keys("") == general.keys("")
    assert fast.snapshot_binary() == general.snapshot_binary()


def test_the_cython_apply_path_leaves_commands_it_does_not_know_to_the_general_one() -> None:
    store = KVStore()
    with_meta = encode_put("config/a", b"1", author="me")  # a change record: general path only
    assert store.apply(1, with_meta) is True and store.get("config/a") is not None
    plain = encode_put("b", b"2")
    with pytest.raises(ValueError, match="unknown KV op 9"):
        store.apply(2, bytes([9]) + plain[1:])
    with pytest.raises(UnicodeDecodeError):
        store.apply(3, plain[:20] + b"\xff" + plain[21:])  # the key (byte 20 on) is not UTF-8
    assert store.index == 1 and store.keys("") == ["config/a"]


async def test_watchers_wake_only_for_their_prefix() -> None:
    store = KVStore()
    config_watch = asyncio.ensure_future(store.wait_for_change("config/", 30))
    other_watch = asyncio.ensure_future(store.wait_for_change("other/", 30))
    await asyncio.sleep(0)
    store.apply(1, encode_put("config/x", b"1"))
    await asyncio.wait_for(config_watch, 5)
    assert not other_watch.done()
    other_watch.cancel()
