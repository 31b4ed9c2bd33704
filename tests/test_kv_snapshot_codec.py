"""The binary state snapshot: the KV's entries (``_kv.pyx``) beside the configuration and registry parts."""

from __future__ import annotations

import random

import orjson
import pytest

from spina_fast import _kv
from spina_fast.kv.store import KVStore, encode_delete, encode_put
from spina_fast.state import MODULE_KV, ReplicatedState

SEED = 20261127


def filled_state(rng: random.Random, count: int) -> ReplicatedState:
    state = ReplicatedState()
    index = 0
    for number in range(count):
        index += 1
        key = rng.choice(["app/", "config/global/", "ünï/", "ключ/", ""]) + f"k{number}"
        value = rng.randbytes(rng.randrange(0, 600))
        state.apply(index, MODULE_KV + encode_put(key, value, flags=rng.choice([0, 7, 2**64 - 1])))
        if number % 5 == 0:
            index += 1
            state.apply(index, MODULE_KV + encode_delete(key))
    return state


def test_kv_extension_is_compiled() -> None:
    assert _kv.__file__.endswith(".so")


@pytest.mark.parametrize("count", [0, 1, 500])
def test_snapshot_round_trips_to_the_same_state(count: int) -> None:
    rng = random.Random(SEED + count)
    state = filled_state(rng, count)
    restored = ReplicatedState()
    restored.restore(state.snapshot())
    assert restored.state_hash() == state.state_hash()
    assert restored.kv.index == state.kv.index
    assert restored.kv.keys("", "") == state.kv.keys("", "")


def test_snapshots_in_the_json_layout_still_restore() -> None:
    state = filled_state(random.Random(SEED), 200)
    legacy = orjson.dumps({"kv": state.kv.snapshot().decode(), "config": state.config.snapshot().decode()})
    restored = ReplicatedState()
    restored.restore(legacy)
    assert restored.kv.state_hash() == state.kv.state_hash()


def test_the_binary_kv_part_is_smaller_than_the_json_one() -> None:
    store = filled_state(random.Random(SEED), 300).kv
    assert len(store.snapshot_binary()) < len(store.snapshot()) * 0.75


@pytest.mark.parametrize("keep", [4, 10, 20, 21, 60, -1, -5])
def test_a_cut_short_kv_snapshot_is_refused(keep: int) -> None:
    data = filled_state(random.Random(SEED), 10).kv.snapshot_binary()
    with pytest.raises(_kv.KVSnapshotError):
        KVStore().restore(data[:keep])


def test_a_state_snapshot_with_trailing_bytes_is_refused() -> None:
    data = filled_state(random.Random(SEED), 10).snapshot()
    with pytest.raises(ValueError, match="after the state snapshot"):
        ReplicatedState().restore(data + b"x")
    with pytest.raises(ValueError, match="cut short"):
        ReplicatedState().restore(data[:-3])
