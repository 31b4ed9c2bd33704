"""Refused registrations name their field and leave nothing behind; malformed bytes never crash the store."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast._registry import (
    MAX_META_VALUE_BYTES,
    MAX_TAGS,
    InvalidRegistration,
    RegistryStore,
    encode_deregister,
    encode_register,
    encode_set_status,
)

VALID: dict[str, Any] = {"service": "web", "instance_id": "web-1", "address": "10.0.0.1", "port": 8080}


def filled_store() -> RegistryStore:
    store = RegistryStore()
    store.register(1, "web", "web-0", "10.0.0.9", 80, version="1.0.0", tags=["a"], meta={"k": "v"}, zone="z")
    store.report_load("web", "web-0", 5)
    return store


def fingerprint(store: RegistryStore) -> tuple[bytes, int, int, int]:
    return store.snapshot(), store.memory_bytes(), len(store), store.index


@pytest.mark.parametrize(("override", "field", "message"), [
    ({"service": ""}, "service", "service name is missing"),
    ({"service": None}, "service", "service name is missing"),
    ({"port": None}, "port", "port is missing"),
    ({"port": 0}, "port", r"port 0 is outside 1\.\.65535"),
    ({"port": 70000}, "port", r"port 70000 is outside 1\.\.65535"),
    ({"port": -1}, "port", "outside"),
    ({"address": ""}, "address", "address is missing"),
    ({"address": "example.com"}, "address", "'example.com' is not an IPv4 or IPv6 literal"),
    ({"address": "10.1.2"}, "address", "not an IPv4 or IPv6 literal"),
    ({"address": "10.0.0.1\x00"}, "address", "not an IPv4 or IPv6 literal"),
    ({"address": "fe80::1%eth0"}, "address", "not an IPv4 or IPv6 literal"),
    ({"version": "abc"}, "version", "version 'abc' is not a semantic version"),
    ({"version": "1.2.3.4"}, "version", "not a semantic version"),
    ({"version": "1.2.3-01"}, "version", "leading zero"),
    ({"tags": ["t"] * 1000}, "tags", "tags: 1000 tags given; the limit is 64"),
    ({"tags": [f"t{n}" for n in range(65)]}, "tags", "tags: 65 tags given; the limit is 64"),
    ({"tags": ["ok", "x" * 256]}, "tags", r"tags\[1\] is 256 bytes; the limit is 255"),
    ({"tags": ["ok", ""]}, "tags", r"tags\[1\] is empty"),
    ({"meta": {"k": "x" * (1 << 20)}}, "meta", r"meta\['k'\] is 1048576 bytes; the limit is 4096"),
    ({"meta": {"k": "x" * 4097}}, "meta", r"meta\['k'\] is 4097 bytes"),
    ({"meta": {f"k{n}": "" for n in range(65)}}, "meta", "meta: 65 pairs given; the limit is 64"),
    ({"meta": {"k" * 129: "v"}}, "meta", r"meta\[0\] is 129 bytes; the limit is 128"),
    ({"meta": {"": "v"}}, "meta", r"meta\[0\] is empty"),
    ({"api_versions": [f"v{n}" for n in range(17)]}, "api_versions", "17 versions given; the limit is 16"),
    ({"instance_id": "i" * 256}, "instance_id", "instance_id is 256 bytes"),
    ({"zone": "z" * 256}, "zone", "zone is 256 bytes; the limit is 255"),
    ({"region": "r" * 256}, "region", "region is 256 bytes"),
    ({"weight": 65536}, "weight", r"weight 65536 is outside 0\.\.65535"),
    ({"max_load": 2**32}, "max_load", "max_load 4294967296 is outside"),
    ({"status": "sick"}, "status", "status 'sick' is not one of passing, warning, critical"),
])
def test_refused_registration_names_its_field_and_stores_nothing(override: dict[str, Any], field: str,
                                                                message: str) -> None:
    registration = {**VALID, **override}
    with pytest.raises(InvalidRegistration, match=message) as refused:
        encode_register(**registration)
    assert refused.value.field == field
    store = filled_store()
    before = fingerprint(store)
    with pytest.raises(InvalidRegistration, match=message):
        store.register(2, **registration)
    assert fingerprint(store) == before


def test_registration_at_every_limit_is_accepted() -> None:
    store = RegistryStore()
    assert store.register(
        1, "s" * 255, "i" * 255, "2001:db8::1", 65535, version="1.2.3-" + "a" * 249, zone="z" * 255,
        region="r" * 255, tags=[f"{n:0>255}" for n in range(MAX_TAGS)],
        meta={f"{n:0>128}": "v" * MAX_META_VALUE_BYTES for n in range(64)},
        api_versions=[f"v{n}" for n in range(16)], weight=65535, max_load=2**32 - 1,
    )
    (view,) = store.instances("s" * 255)
    assert (len(view.tags), len(view.meta), len(view.api_versions), view.port) == (64, 64, 16, 65535)
    restored = RegistryStore()
    restored.restore(store.snapshot())
    assert restored.state_hash() == store.state_hash()


def test_wrong_types_are_type_errors() -> None:
    with pytest.raises(TypeError, match="tags must be a sequence of str, not one str"):
        encode_register(**VALID, tags="primary")
    with pytest.raises(TypeError, match="meta must be a mapping"):
        encode_register(**VALID, meta=[("k", "v")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="port must be an int"):
        encode_register(**{**VALID, "port": "80"})


def test_deregister_and_status_commands_need_both_names() -> None:
    with pytest.raises(InvalidRegistration, match="instance_id is missing"):
        encode_deregister("web", "")
    with pytest.raises(InvalidRegistration, match="service name is missing"):
        encode_set_status("", "web-1", "passing")
    with pytest.raises(InvalidRegistration, match="status 'down'"):
        encode_set_status("web", "web-1", "down")  # type: ignore[arg-type]


def test_indexes_must_not_go_backwards() -> None:
    store = filled_store()
    with pytest.raises(ValueError, match="index 0: Raft indexes start at 1"):
        store.apply(0, encode_deregister("web", "web-0"))
    store.register(5, **VALID)
    with pytest.raises(ValueError, match="index 4 is older than the registry's last change at 5"):
        store.deregister(4, "web", "web-1")
    assert store.deregister(5, "web", "web-1")


def test_load_outside_32_bits_is_refused() -> None:
    store = filled_store()
    with pytest.raises(InvalidRegistration, match="load -1 is outside") as refused:
        store.report_load("web", "web-0", -1)
    assert refused.value.field == "load"
    with pytest.raises(InvalidRegistration, match="load 4294967296 is outside"):
        store.report_load("web", "web-0", 2**32)


@pytest.mark.parametrize(("query", "error", "message"), [
    ({"health": "ok"}, ValueError, "health 'ok' is not one of any, healthy, passing"),
    ({"limit": -1}, ValueError, "limit -1 is negative"),
    ({"version": ">=1.x"}, ValueError, r"version range '>=1\.x'"),
    ({"version": 12}, TypeError, "version must be a range string"),
    ({"tags": "a"}, TypeError, "tags must be a sequence of str"),
])
def test_bad_queries_are_refused_by_name(query: dict[str, Any], error: type[Exception], message: str) -> None:
    store = filled_store()
    with pytest.raises(error, match=message):
        store.instances("web", **query)
    with pytest.raises(error, match=message):
        store.instances("unknown", **query)


def test_every_truncation_of_a_command_is_refused() -> None:
    command = encode_register(**VALID, version="1.0.0", tags=["a", "b"], meta={"k": "v"}, api_versions=["v1"])
    for cut in range(len(command)):
        store = filled_store()
        before = fingerprint(store)
        with pytest.raises(ValueError):
            store.apply(2, command[:cut])
        assert fingerprint(store) == before
    store = filled_store()
    with pytest.raises(ValueError, match="1 trailing bytes"):
        store.apply(2, command + b"\x00")
    with pytest.raises(ValueError, match="unknown registry op 9"):
        store.apply(2, b"\x09")


def test_commands_from_elsewhere_are_validated_like_local_ones() -> None:
    # A register command with 65 tags, as a node with other limits (or a corrupt log) might hold it.
    command = bytearray(encode_register(**VALID, tags=[f"t{n}" for n in range(64)]))
    tag_count_at = command.index(b"\x40\x02t0")        # varint 64, then the first tag ("t0", length 2)
    command[tag_count_at] = 65
    command[-1:-1] = b"\x03t64"                        # a 65th tag, before the last byte (no meta pairs)
    with pytest.raises(InvalidRegistration, match="65 tags given"):
        RegistryStore().apply(1, bytes(command))


@settings(max_examples=300)
@given(st.binary(max_size=120), st.sampled_from([b"\x01", b"\x02", b"\x03", b""]))
def test_arbitrary_bytes_never_crash_the_store(payload: bytes, op: bytes) -> None:
    store = filled_store()
    before = fingerprint(store)
    try:
        store.apply(2, op + payload)
    except ValueError:
        assert fingerprint(store) == before


@settings(max_examples=200)
@given(st.data())
def test_corrupt_snapshots_are_refused_and_change_nothing(data: st.DataObject) -> None:
    source = filled_store()
    source.register(2, "db", "db-1", "::1", 5432, tags=["primary", "a"], api_versions=["v1", "v2"])
    snapshot = bytearray(source.snapshot())
    position = data.draw(st.integers(0, len(snapshot) - 1))
    snapshot[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(snapshot)))
    store = filled_store()
    before = fingerprint(store)
    try:
        store.restore(bytes(snapshot[:cut]))
    except ValueError:
        assert fingerprint(store) == before
