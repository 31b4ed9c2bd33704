"""The registry store's semantics: indexes for blocking queries, orderings, snapshots, memory."""

from __future__ import annotations

import gc
import random
import tracemalloc
from typing import Any

import pytest

from spina_fast import _registry
from spina_fast._registry import RegistryStore, encode_register
from spina_fast.registry.model import describe, sample_registrations
from spina_fast.registry.reference import ReferenceRegistry


def test_registry_module_is_compiled() -> None:
    assert _registry.__file__ is not None and _registry.__file__.endswith(".so")
    assert type(RegistryStore.register).__name__ == "cython_function_or_method"   # not a pure-Python twin


def test_service_index_moves_only_on_real_changes() -> None:
    store = RegistryStore()
    assert store.service_index("web") == 0
    assert store.register(3, "web", "w1", "10.0.0.1", 80, tags=["a"], meta={"k": "v"})
    assert store.service_index("web") == 3
    assert not store.register(4, "web", "w1", "10.0.0.1", 80, tags=["a", "a"], meta={"k": "v"})  # same content
    assert not store.set_status(5, "web", "w1", "passing")
    assert store.report_load("web", "w1", 7)
    assert store.service_index("web") == 3 and store.index == 3
    assert store.set_status(6, "web", "w1", "critical")
    assert store.register(7, "web", "w2", "10.0.0.2", 80)
    assert not store.deregister(8, "web", "nobody")
    assert (store.service_index("web"), store.index) == (7, 7)


def test_a_removed_service_answers_the_index_that_removed_it() -> None:
    store = RegistryStore()
    store.register(1, "web", "w1", "10.0.0.1", 80)
    store.register(2, "db", "d1", "10.0.0.2", 5432)
    assert store.deregister(5, "web", "w1")
    assert store.services() == {"db": ()}
    # A watcher blocked on web at index 1 must wake: the index it sees moves past 1, never back to 0.
    assert (store.service_index("web"), store.removed_index, store.service_index("db")) == (5, 5, 2)
    store.register(9, "web", "w1", "10.0.0.1", 80)
    assert store.service_index("web") == 9


def test_reregistration_keeps_the_reported_load() -> None:
    store = RegistryStore()
    store.register(1, "web", "w1", "10.0.0.1", 80, max_load=100)
    store.report_load("web", "w1", 40)
    hash_with_load = store.state_hash()
    store.report_load("web", "w1", 90)
    assert store.state_hash() == hash_with_load            # load is leader-local, not replicated
    store.register(2, "web", "w1", "10.0.0.1", 81, max_load=100)
    view = store.get("web", "w1")
    assert view is not None and (view.port, view.load, view.free_capacity) == (81, 90, 10)


def test_views_are_copies_unaffected_by_later_changes() -> None:
    store = RegistryStore()
    store.register(1, "web", "w1", "2001:db8::1", 443, tags=["a"], meta={"k": "v"}, version="1.0.0")
    (view,) = store.instances("web")
    store.register(2, "web", "w1", "10.0.0.1", 80, tags=["b"], meta={"k": "w"}, version="2.0.0")
    store.deregister(3, "web", "w1")
    assert (view.address, view.port, view.tags, view.meta, view.version) == ("2001:db8::1", 443, ("a",),
                                                                             {"k": "v"}, "1.0.0")
    assert view.packed_address == _registry.pack_address("2001:db8::1", 443)


def test_orderings_follow_the_documented_keys() -> None:
    store = RegistryStore()
    # (id, zone, region, max_load, load, weight): weighted free capacity = max(max_load - load, 0) * weight
    for number, (instance_id, zone, region, max_load, load, weight) in enumerate([
        ("a", "eu-1a", "eu", 100, 90, 1),    # free 10
        ("b", "eu-1b", "eu", 100, 20, 1),    # free 80
        ("c", "us-1a", "us", 100, 0, 2),     # free 200
        ("d", "eu-1a", "eu", 50, 80, 5),     # overloaded: free 0
        ("e", "eu-1a", "eu", 100, 50, 1),    # free 50
    ], start=1):
        store.register(number, "web", instance_id, f"10.0.0.{number}", 80, zone=zone, region=region,
                       max_load=max_load, weight=weight)
        store.report_load("web", instance_id, load)

    def order(**query: Any) -> list[str]:
        return [view.instance_id for view in store.instances("web", **query)]

    assert order() == ["a", "b", "c", "d", "e"]
    assert order(near_zone="eu-1a", near_region="eu") == ["a", "d", "e", "b", "c"]
    assert order(near_region="us") == ["c", "a", "b", "d", "e"]
    assert order(by_load=True) == ["c", "b", "e", "a", "d"]
    assert order(near_zone="eu-1a", near_region="eu", by_load=True, limit=4) == ["e", "a", "d", "b"]
    assert order(near_zone="nowhere", near_region="eu", by_load=True) == ["b", "e", "a", "d", "c"]


def test_catalog_lists_each_service_with_the_union_of_its_tags() -> None:
    store = RegistryStore()
    store.register(1, "web", "w1", "10.0.0.1", 80, tags=["tls", "primary"])
    store.register(2, "web", "w2", "10.0.0.2", 80, tags=["canary", "tls"])
    store.register(3, "api", "a1", "10.0.0.3", 80)
    assert store.services() == {"api": (), "web": ("canary", "primary", "tls")}
    store.deregister(4, "web", "w1")
    assert store.services() == {"api": (), "web": ("canary", "tls")}


def test_state_hash_does_not_depend_on_the_path_to_the_state() -> None:
    # Different histories give different internal string ids; the hash and snapshot must not see them.
    first, second = RegistryStore(), RegistryStore()
    first.register(1, "web", "w1", "10.0.0.1", 80, tags=["q", "r", "s"], meta={"m": "n"})
    second.register(1, "web", "w1", "10.0.0.1", 80, tags=["z"])
    for store in (first, second):
        store.register(2, "web", "w1", "10.0.0.1", 80, tags=["a", "b"], meta={"x": "y"}, version="1.2.3")
        store.register(3, "db", "d1", "::1", 5432, tags=["b", "c"], zone="z1")
    assert first.snapshot() == second.snapshot()
    assert first.state_hash() == second.state_hash()
    second.set_status(4, "db", "d1", "warning")
    assert first.state_hash() != second.state_hash()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_heavy_churn_in_one_big_service_matches_the_reference(seed: int) -> None:
    # Hundreds of instances in one service: re-registrations that grow and shrink the variable parts and
    # removals exercise the arena's reuse and compaction and the arrays' shrinking.
    rng = random.Random(seed)
    store, reference = RegistryStore(), ReferenceRegistry()
    empty_bytes = store.memory_bytes()
    ids = [f"i{number:04d}" for number in range(400)]
    for index in range(1, 6000):
        instance_id = rng.choice(ids)
        if rng.random() < 0.3:
            changed = store.deregister(index, "big", instance_id)
            assert changed == reference.deregister(index, "big", instance_id), f"seed {seed}"
            continue
        tags = rng.sample([f"t{number}" for number in range(30)], rng.randrange(0, 12))
        meta = {f"k{number}": rng.choice(["a", "b", "c" * 40]) for number in range(rng.randrange(0, 8))}
        address = rng.choice(["10.0.0.1", "2001:db8::5"])
        arguments = ("big", instance_id, address, 80)
        options: dict[str, Any] = {"tags": tags, "meta": meta, "version": rng.choice(["1.0.0", "2.0.0-rc.1"])}
        changed = store.register(index, *arguments, **options)
        assert changed == reference.register(index, *arguments, **options), f"seed {seed}"
    assert [describe(view) for view in store.instances("big")] == \
        [describe(instance) for instance in reference.instances("big")], f"seed {seed}"
    assert [describe(view) for view in store.instances("big", tags=["t3", "t7"], version="<2")] == \
        [describe(instance) for instance in reference.instances("big", tags=["t3", "t7"], version="<2")]
    for instance_id in ids:
        store.deregister(store.index + 1, "big", instance_id)
    assert len(store) == 0 and store.services() == {}
    assert store.memory_bytes() <= empty_bytes + 16 * 400  # only the query scratch may stay


def test_a_typical_registration_takes_at_most_256_bytes() -> None:
    # 10,000 typical instances (4 tags, 4 meta pairs, version, 2 API versions, zone, region, weight,
    # capacity) over 1,000 services; every byte the store allocates, Python or C, as tracemalloc sees it.
    commands = [registration.encode() for registration in sample_registrations(10_000, skewed=True)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = RegistryStore()
        for index, command in enumerate(commands, 1):
            store.apply(index, command)
        gc.collect()
        per_registration = (tracemalloc.get_traced_memory()[0] - before) / len(store)
    finally:
        tracemalloc.stop()
    assert len(store) == 10_000
    assert per_registration <= 256, per_registration
    assert store.memory_bytes() / len(store) <= 200


def test_encoded_command_and_method_give_the_same_state() -> None:
    registrations = list(sample_registrations(500, seed=7, skewed=True))
    by_command, by_method = RegistryStore(), RegistryStore()
    for index, registration in enumerate(registrations, 1):
        by_command.apply(index, encode_register(**registration.document()))
        registration.register_into(by_method, index)
    assert by_command.state_hash() == by_method.state_hash()
    assert len(by_command) == 500
