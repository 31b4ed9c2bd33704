"""The Cython registry store agrees with the plain-Python reference on every query, after any history."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast._registry import (
    InvalidRegistration,
    RegistryStore,
    encode_deregister,
    encode_register,
    encode_set_status,
)
from spina_fast.registry.model import describe
from spina_fast.registry.reference import ReferenceRegistry

SERVICES = ("api", "web", "db")
# "é1" sorts after "z" both by code point and by UTF-8 byte: the store orders ids by their bytes.
INSTANCE_IDS = ("a", "b", "c", "d", "é1", "z")
TAGS = ("t1", "t2", "t3", "t4", "t5")
VERSIONS = ("", "1.0.0", "1.2.0", "1.2.3-alpha", "1.2.3-beta.1", "1.2.3-beta.2", "1.2.3-1", "1.2.3", "1.2.3+build.5",
            "2.0.0-rc.1", "2.0.0", "0.9", "v1.5.2", "0.0.3", "0.2.7")
RANGES = (">=1.2,<2.0", "<2", "<=2.0.0", ">1.2.3-beta.1", "^1.2", "^0.9", "^0.0.3", "^0.2", "~1.2", "~1", "=1.2.3",
          "!=1.2.3", ">=1.2.3-alpha, <1.2.3", "1.2.3", ">=0", "<2.0.0-rc.2", ">1.2.3,<=2")
ZONES = ("", "z1", "z2", "z3")
REGIONS = ("", "r1", "r2")

addresses = st.one_of(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "2001:db8::7"]), st.ip_addresses().map(str))
registrations = st.fixed_dictionaries({
    "service": st.sampled_from(SERVICES),
    "instance_id": st.sampled_from(INSTANCE_IDS),
    "address": addresses,
    "port": st.integers(1, 65535),
    "version": st.sampled_from(VERSIONS),
    "api_versions": st.lists(st.sampled_from(["v1", "v2", "v3"]), max_size=3),
    "weight": st.one_of(st.integers(0, 10), st.just(65535)),
    "max_load": st.one_of(st.integers(0, 100), st.just(2**32 - 1)),
    "zone": st.sampled_from(ZONES),
    "region": st.sampled_from(REGIONS),
    "tags": st.lists(st.sampled_from(TAGS), max_size=5),
    "meta": st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(["", "x", "y", "ü"]), max_size=3),
    "status": st.sampled_from(["passing", "warning", "critical"]),
    "check_ttl_ms": st.sampled_from([0, 1000, 30_000]),
    "deregister_after_ms": st.sampled_from([0, 60_000]),
})
# One bad field per refused registration; the store must refuse it and keep its state.
refusals = st.sampled_from([
    {"tags": [f"t{number}" for number in range(65)]}, {"meta": {"k": "x" * 4097}}, {"version": "1.x"},
    {"address": "host.example"}, {"port": 0}, {"api_versions": [f"v{number}" for number in range(17)]},
    {"meta": {f"k{number}": "" for number in range(65)}}, {"tags": ["t1", ""]}, {"weight": 65536},
])
target = st.tuples(st.sampled_from(SERVICES), st.sampled_from(INSTANCE_IDS))
via = st.sampled_from(["method", "command"])
operations = st.lists(st.one_of(
    st.tuples(st.just("register"), registrations, via),
    st.tuples(st.just("register"), registrations, via),
    st.tuples(st.just("deregister"), target, via),
    st.tuples(st.just("status"), target, st.sampled_from(["passing", "warning", "critical"]), via),
    st.tuples(st.just("load"), target, st.integers(0, 120)),
    st.tuples(st.just("refuse"), registrations, refusals),
    st.tuples(st.just("fork")),
), max_size=40)
queries = st.fixed_dictionaries({}, optional={
    "health": st.sampled_from(["any", "healthy", "passing"]),
    "tags": st.lists(st.sampled_from([*TAGS, "missing"]), max_size=3),
    "version": st.sampled_from(RANGES),
    "api_version": st.sampled_from(["v1", "v2", "v3", "v9", ""]),
    "near_zone": st.sampled_from([*ZONES, "elsewhere"]),
    "near_region": st.sampled_from([*REGIONS, "elsewhere"]),
    "by_load": st.booleans(),
    "limit": st.integers(0, 4),
})


def register_kwargs(registration: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in registration.items()
            if key not in ("service", "instance_id", "address", "port")}


def apply_operation(store: RegistryStore, index: int, operation: tuple) -> bool:
    """One operation on the store, through its method or its encoded command."""
    kind = operation[0]
    if kind == "register":
        registration, path = operation[1], operation[2]
        if path == "command":
            return store.apply(index, encode_register(**registration))
        return store.register(index, registration["service"], registration["instance_id"], registration["address"],
                              registration["port"], **register_kwargs(registration))
    (service, instance_id), path = operation[1], operation[-1]
    if kind == "deregister":
        if path == "command":
            return store.apply(index, encode_deregister(service, instance_id))
        return store.deregister(index, service, instance_id)
    if path == "command":
        return store.apply(index, encode_set_status(service, instance_id, operation[2]))
    return store.set_status(index, service, instance_id, operation[2])


def apply_to_reference(reference: ReferenceRegistry, index: int, operation: tuple) -> bool:
    kind = operation[0]
    if kind == "register":
        registration = operation[1]
        return reference.register(index, registration["service"], registration["instance_id"],
                                  registration["address"], registration["port"], **register_kwargs(registration))
    service, instance_id = operation[1]
    if kind == "deregister":
        return reference.deregister(index, service, instance_id)
    return reference.set_status(index, service, instance_id, operation[2])


def assert_same_catalog(store: RegistryStore, reference: ReferenceRegistry) -> None:
    assert len(store) == len(reference)
    assert store.services() == reference.services()
    assert (store.index, store.removed_index) == (reference.index, reference.removed_index)
    for service in (*SERVICES, "unknown"):
        assert store.service_index(service) == reference.service_index(service)
        for instance_id in INSTANCE_IDS:
            held, expected = store.get(service, instance_id), reference.get(service, instance_id)
            assert (describe(held) if held else None) == (describe(expected) if expected else None)
    for instance_id in INSTANCE_IDS:
        # Ids are unique across services: registering one under another service moved it.
        assert store.owner_of(instance_id) == reference.owner_of(instance_id)


def assert_same_answers(store: RegistryStore, reference: ReferenceRegistry, query_list: list[dict[str, Any]]) -> None:
    for service in (*SERVICES, "unknown"):
        fixed: list[dict[str, Any]] = [{}, {"health": "passing"}, {"by_load": True},
                                       {"near_zone": "z1", "near_region": "r2"}]
        for query in [*fixed, *query_list]:
            answer = [describe(view) for view in store.instances(service, **query)]
            expected = [describe(instance) for instance in reference.instances(service, **query)]
            assert answer == expected, (service, query)


def without_loads(reference: ReferenceRegistry) -> ReferenceRegistry:
    for instance in reference.all_instances():
        instance.load = 0
    return reference


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(queries, min_size=3, max_size=12))
def test_store_answers_like_the_reference_after_any_history(ops: list[tuple], query_list: list[dict]) -> None:
    store, reference = RegistryStore(), ReferenceRegistry()
    twin: RegistryStore | None = None       # restored from a snapshot mid-way, then given the same commands
    index = 0
    for operation in ops:
        index += 1
        kind = operation[0]
        if kind == "load":
            (service, instance_id), load = operation[1], operation[2]
            assert store.report_load(service, instance_id, load) == reference.report_load(service, instance_id, load)
        elif kind == "refuse":
            before = (store.snapshot(), store.memory_bytes(), len(store))
            registration = {**operation[1], **operation[2]}
            try:
                store.register(index, registration["service"], registration["instance_id"], registration["address"],
                               registration["port"], **register_kwargs(registration))
            except InvalidRegistration as refused:
                assert refused.field in operation[2]
            else:
                raise AssertionError(f"accepted {operation[2]}")
            assert (store.snapshot(), store.memory_bytes(), len(store)) == before
        elif kind == "fork":
            if twin is None:
                twin = RegistryStore()
                twin.restore(store.snapshot())
        else:
            changed = apply_operation(store, index, operation)
            assert changed == apply_to_reference(reference, index, operation), operation
            if twin is not None:
                assert apply_operation(twin, index, operation) == changed
        assert_same_catalog(store, reference)
    assert_same_answers(store, reference, query_list)

    snapshot = store.snapshot()
    restored = RegistryStore()
    restored.restore(snapshot)
    assert restored.state_hash() == store.state_hash()
    assert restored.snapshot() == snapshot
    if twin is not None:
        assert twin.state_hash() == store.state_hash()
    # Load is leader-local: a restored store has the replicated state and no loads.
    assert_same_catalog(restored, without_loads(reference))
    assert_same_answers(restored, reference, query_list)
