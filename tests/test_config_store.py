"""Configuration management as pure logic: layers, history, retention, schemas, rollback, diff, determinism."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spina_fast.api.config import json_changes, parse_time, unified_diff
from spina_fast.errors import InvalidRequest
from spina_fast.kv.config import (
    LAYER_ENV,
    LAYER_GLOBAL,
    LAYER_SERVICE,
    LAYER_SERVICE_ENV,
    Retention,
    Version,
    encode_retention,
    encode_rollback,
    encode_rollback_tree,
    encode_schema_delete,
    encode_schema_put,
    encode_write,
    format_time,
    parse_config_key,
)
from spina_fast.kv.store import ChangeMeta, decode_command, encode_delete, encode_put
from spina_fast.state import MODULE_CONFIG, MODULE_KV, ReplicatedState

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class Log:
    """Applies commands to a ReplicatedState at consecutive Raft indexes, like the Raft driver does."""

    def __init__(self) -> None:
        self.state = ReplicatedState()
        self.index = 0

    def kv(self, command: bytes) -> object:
        self.index += 1
        return self.state.apply(self.index, MODULE_KV + command)

    def native(self, command: bytes) -> dict[str, object]:
        self.index += 1
        result = self.state.apply(self.index, MODULE_CONFIG + command)
        assert isinstance(result, dict)
        return result

    def put(self, key: str, value: str, at: int, author: str = "", description: str = "") -> object:
        return self.kv(encode_put(key, value.encode(), time_ms=at, author=author, description=description))

    def delete(self, key: str, at: int, recurse: bool = False) -> object:
        return self.kv(encode_delete(key, recurse=recurse, time_ms=at))

    def values(self, service: str | None = None, env: str | None = None) -> dict[str, tuple[str, str]]:
        return {name: (item.value.decode(), item.layer)
                for name, item in self.state.config.resolve(service, env).items()}


def meta(at: int, author: str = "", description: str = "") -> ChangeMeta:
    return ChangeMeta(at, author, description)


# --- layers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "layer", "name", "service", "env"), [
    ("config/global/db/url", LAYER_GLOBAL, "db/url", None, None),
    ("config/env/prod/db/url", LAYER_ENV, "db/url", None, "prod"),
    ("config/service/api/db/url", LAYER_SERVICE, "db/url", "api", None),
    ("config/service/api/env/prod/db/url", LAYER_SERVICE_ENV, "db/url", "api", "prod"),
    ("config/service/api/envoy/port", LAYER_SERVICE, "envoy/port", "api", None),
])
def test_keys_split_into_layer_scope_and_name(key: str, layer: str, name: str, service: str | None,
                                              env: str | None) -> None:
    parsed = parse_config_key(key)
    assert (parsed.layer, parsed.name, parsed.service, parsed.env) == (layer, name, service, env)


@pytest.mark.parametrize(("key", "message"), [
    ("config/other/x", "fits no layer"),
    ("config/global/", "no name"),
    ("config/env/prod", "no name"),
    ("config/env//x", "env ''"),
    ("config/service/api/env/prod/", "no name"),
    ("config/service/api/env", "reserved"),
    ("config/global/dir/", "may not end with '/'"),
    ("config/global/a//b", "'//'"),
    ("config/service/a b/x", "service 'a b'"),
    ("config/global/\x07", "control characters"),
    ("app/x", "not under 'config/'"),
])
def test_keys_that_fit_no_layer_are_refused_with_the_reason(key: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_config_key(key)


def test_later_layers_win_and_a_delete_uncovers_the_layer_below() -> None:
    log = Log()
    log.put("config/global/timeout", "1", T0)
    log.put("config/env/prod/timeout", "2", T0)
    log.put("config/service/api/timeout", "3", T0)
    log.put("config/service/api/env/prod/timeout", "4", T0)
    log.put("config/global/only-global", "g", T0)
    log.put("config/env/staging/timeout", "other env", T0)
    log.put("config/service/web/timeout", "other service", T0)
    assert log.values("api", "prod") == {"only-global": ("g", LAYER_GLOBAL), "timeout": ("4", LAYER_SERVICE_ENV)}
    assert log.values("api", None)["timeout"] == ("3", LAYER_SERVICE)
    assert log.values(None, "prod")["timeout"] == ("2", LAYER_ENV)
    assert log.values(None, None)["timeout"] == ("1", LAYER_GLOBAL)
    expected_after_each_delete = [("config/service/api/env/prod/timeout", ("3", LAYER_SERVICE)),
                                  ("config/service/api/timeout", ("2", LAYER_ENV)),
                                  ("config/env/prod/timeout", ("1", LAYER_GLOBAL))]
    for key, expected in expected_after_each_delete:
        log.delete(key, T0 + 1)
        assert log.values("api", "prod")["timeout"] == expected
    log.delete("config/global/timeout", T0 + 2)
    assert "timeout" not in log.values("api", "prod")


def test_resolved_entries_carry_key_version_and_index() -> None:
    log = Log()
    log.put("config/service/api/port", "80", T0)
    log.put("config/service/api/port", "81", T0)
    item = log.state.config.resolve("api", None)["port"]
    assert (item.key, item.version, item.index, item.value) == ("config/service/api/port", 2, 2, b"81")


def test_view_index_moves_on_deletes_and_ignores_other_services() -> None:
    log = Log()
    log.put("config/service/api/port", "80", T0)
    log.put("config/service/web/port", "80", T0)
    assert log.state.config.view_index("api", "prod") == 1
    log.delete("config/service/api/port", T0)
    assert log.state.config.view_index("api", "prod") == 3


# --- history -------------------------------------------------------------------------------------------------

def test_every_change_is_a_version_with_time_author_and_description() -> None:
    log = Log()
    log.put("config/global/db", "a", T0, author="alice", description="first")
    log.kv(encode_put("config/global/db", b"b", flags=7, time_ms=T0 + 5, author="bob"))
    log.delete("config/global/db", T0 + 9)
    log.put("config/global/db", "c", T0 + 10)
    history = log.state.config.history("config/global/db")
    assert [(v.version, v.modify_index, v.time_ms, v.author, v.value, v.flags) for v in history] == [
        (1, 1, T0, "alice", b"a", 0), (2, 2, T0 + 5, "bob", b"b", 7), (3, 3, T0 + 9, "", None, 0),
        (4, 4, T0 + 10, "", b"c", 0)]
    assert history[0].description == "first" and history[2].deleted


def test_history_time_never_goes_backwards_when_a_proposer_clock_lags() -> None:
    log = Log()
    log.put("config/global/a", "1", T0 + 1000)
    log.put("config/global/a", "2", T0)  # a new leader whose clock is one second behind
    assert [v.time_ms for v in log.state.config.history("config/global/a")] == [T0 + 1000, T0 + 1000]


def test_failed_cas_and_absent_deletes_record_nothing() -> None:
    log = Log()
    assert log.put("config/global/a", "1", T0) is True
    assert log.kv(encode_put("config/global/a", b"2", cas=99, time_ms=T0)) is False
    assert log.kv(encode_delete("config/global/missing", time_ms=T0)) is True
    assert [v.version for v in log.state.config.history("config/global/a")] == [1]
    assert log.state.config.history("config/global/missing") == []


def test_recursive_delete_records_a_tombstone_per_config_key_only() -> None:
    log = Log()
    log.put("config/global/a", "1", T0)
    log.put("config/env/prod/b", "2", T0)
    log.kv(encode_put("app/c", b"3"))
    log.delete("", T0 + 1, recurse=True)
    assert len(log.state.kv) == 0
    for key in ("config/global/a", "config/env/prod/b"):
        assert log.state.config.history(key)[-1].deleted
    assert log.state.config.history("app/c") == []


def test_keys_outside_config_are_not_checked_or_versioned() -> None:
    log = Log()
    assert log.kv(encode_put("app/anything/", b"x")) is True
    assert log.state.config.history("app/anything/") == [] and log.state.config.index == 0


def test_native_write_answers_the_version_it_created() -> None:
    log = Log()
    first = log.native(encode_write(encode_put("config/global/a", b"1", time_ms=T0)))
    second = log.native(encode_write(encode_put("config/global/a", b"2", time_ms=T0)))
    stale = log.native(encode_write(encode_put("config/global/a", b"3", cas=1, time_ms=T0)))
    assert first["versions"] == {"config/global/a": 1} and second["versions"] == {"config/global/a": 2}
    assert stale == {"ok": False, "index": 3, "versions": {}}
    with pytest.raises(InvalidRequest, match="not under"):
        log.native(encode_write(encode_put("app/x", b"1")))


def test_commands_without_a_change_record_still_apply() -> None:
    """Log entries written before configuration history existed carry no meta; they replay unchanged."""
    log = Log()
    legacy = encode_put("config/global/a", b"1", time_ms=T0)
    decoded = decode_command(legacy)
    assert decoded.meta == ChangeMeta(T0) and decoded.value == b"1"
    plain = encode_put("app/a", b"1")
    assert decode_command(plain).meta is None
    log.kv(plain)
    assert log.state.kv.get("app/a") is not None


@pytest.mark.parametrize(("author", "description", "message"), [
    ("a" * 300, "", "author is 300 bytes"), ("bell\x07", "", "control characters"),
    ("", "d" * 5000, "description is 5000 bytes"),
])
def test_bad_change_records_are_refused_before_the_log(author: str, description: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        encode_put("config/global/a", b"1", author=author, description=description)


# --- retention ---------------------------------------------------------------------------------------------

def test_count_retention_keeps_the_newest_versions() -> None:
    log = Log()
    log.native(encode_retention(Retention(max_versions=3), meta(T0)))
    for value in range(6):
        log.put("config/global/a", str(value), T0)
    assert [v.version for v in log.state.config.history("config/global/a")] == [4, 5, 6]
    assert "dropped by the retention policy" in log.state.config.missing_version_message("config/global/a", 2)
    assert "no version 9" in log.state.config.missing_version_message("config/global/a", 9)


def test_age_retention_keeps_a_live_keys_current_version_and_forgets_old_tombstones() -> None:
    day = 86_400_000
    log = Log()
    log.native(encode_retention(Retention(max_versions=100, max_age_ms=7 * day), meta(T0)))
    log.put("config/global/live", "old", T0)
    log.put("config/global/live", "current", T0 + day)
    log.put("config/global/gone", "x", T0)
    log.delete("config/global/gone", T0 + day)
    log.put("config/global/other", "tick", T0 + 10 * day)  # time moves on with any config change
    config = log.state.config
    assert [v.value for v in config.history("config/global/live")] == [b"current"]
    assert config.history("config/global/gone") == []
    assert config.forgotten_index == 5  # the tombstone's index (the retention command was index 1)
    with pytest.raises(InvalidRequest, match="forgotten"):
        config.plan_tree_rollback("config/", target_index=3)
    with pytest.raises(InvalidRequest, match="retention window"):
        config.plan_tree_rollback("config/", time_ms=T0)
    log.put("config/global/gone", "again", T0 + 10 * day)
    assert [v.version for v in config.history("config/global/gone")] == [1]


def test_age_retention_after_a_snapshot_restore_still_expires_keys_nobody_touches() -> None:
    day = 86_400_000
    log = Log()
    log.native(encode_retention(Retention(max_age_ms=day), meta(T0)))
    log.put("config/global/a", "1", T0)
    log.put("config/global/a", "2", T0)
    log.put("config/global/b", "x", T0)
    log.delete("config/global/b", T0)
    restored = ReplicatedState()
    restored.restore(log.state.snapshot())
    log.state = restored
    log.put("config/global/clock", "tick", T0 + 2 * day)
    assert [v.version for v in restored.config.history("config/global/a")] == [2]
    assert restored.config.history("config/global/b") == []


def test_tightening_retention_prunes_at_once() -> None:
    log = Log()
    for value in range(5):
        log.put("config/global/a", str(value), T0)
    result = log.native(encode_retention(Retention(max_versions=2), meta(T0)))
    assert result["retention"] == {"max_versions": 2, "max_age_seconds": 0}
    assert [v.version for v in log.state.config.history("config/global/a")] == [4, 5]


@pytest.mark.parametrize(("max_versions", "max_age_ms"), [(0, 0), (10**7, 0), (5, -1)])
def test_retention_outside_its_range_is_refused(max_versions: int, max_age_ms: int) -> None:
    with pytest.raises(InvalidRequest):
        Retention(max_versions, max_age_ms)


# --- schemas -----------------------------------------------------------------------------------------------

PORT_SCHEMA = b'{"type": "object", "required": ["port"], "properties": {"port": {"type": "integer", "maximum": 65535}}}'


def test_a_value_against_its_schema_is_refused_naming_key_and_schema_path_and_nothing_changes() -> None:
    log = Log()
    log.native(encode_schema_put("config/service/api/", PORT_SCHEMA, meta(T0)))
    assert log.put("config/service/api/http", '{"port": 80}', T0) is True
    before = log.state.state_hash()
    with pytest.raises(InvalidRequest) as refused:
        log.put("config/service/api/http", '{"port": 70000}', T0)
    message = refused.value.message
    assert "config/service/api/http" in message and "/properties/port/maximum" in message and "/port" in message
    with pytest.raises(InvalidRequest, match="not JSON"):
        log.put("config/service/api/env/prod/http", "port=80", T0)
    assert log.state.state_hash() == before
    assert log.put("config/service/web/http", "not json, no schema here", T0) is True


def test_every_matching_schema_applies() -> None:
    log = Log()
    log.native(encode_schema_put("config/", b'{"type": "object"}', meta(T0)))
    log.native(encode_schema_put("config/global/limits/", b'{"required": ["max"]}', meta(T0)))
    assert log.put("config/global/limits/cpu", '{"max": 2}', T0) is True
    with pytest.raises(InvalidRequest, match="'config/global/limits/'"):
        log.put("config/global/limits/mem", '{"min": 2}', T0)
    with pytest.raises(InvalidRequest, match="schema 'config/'"):
        log.put("config/global/name", '"text"', T0)


def test_a_schema_that_existing_values_violate_is_refused() -> None:
    log = Log()
    log.put("config/service/api/http", '{"port": "eighty"}', T0)
    with pytest.raises(InvalidRequest, match="existing values under 'config/service/api/'"):
        log.native(encode_schema_put("config/service/api/", PORT_SCHEMA, meta(T0)))
    assert log.state.config.schemas() == []


def test_deleting_a_schema_lifts_it() -> None:
    log = Log()
    log.native(encode_schema_put("config/global/", b'{"type": "integer"}', meta(T0)))
    assert log.native(encode_schema_delete("config/global/", meta(T0)))["ok"] is True
    assert log.native(encode_schema_delete("config/global/", meta(T0)))["ok"] is False
    assert log.put("config/global/a", "text", T0) is True


@pytest.mark.parametrize(("document", "message"), [
    (b"{not json", "not JSON"), (b"[1]", "is an object"), (b'{"type": "nope"}', "invalid JSON Schema at /type"),
    (b'{"$ref": "https://example.com/s.json"}', "not local"),
    (b'{"$schema": "https://example.com/dialect"}', "dialect"),
    (b'{"properties": {"a": {"$ref": "other.json#/x"}}}', "/properties/a"),
])
def test_bad_schemas_are_refused_before_the_log(document: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        encode_schema_put("config/global/", document, meta(T0))


def test_schemas_only_live_under_config() -> None:
    with pytest.raises(InvalidRequest, match="not under 'config/'"):
        encode_schema_put("app/", b"{}", meta(T0))


# --- rollback ----------------------------------------------------------------------------------------------

def test_rollback_writes_the_old_content_as_a_new_version() -> None:
    log = Log()
    log.kv(encode_put("config/global/a", b"one", flags=3, time_ms=T0))
    log.put("config/global/a", "two", T0 + 1)
    result = log.native(encode_rollback("config/global/a", 1, meta(T0 + 2, "carol")))
    assert result["version"] == 3 and result["changed"] is True
    newest = log.state.config.history("config/global/a")[-1]
    assert (newest.value, newest.flags, newest.author, newest.description) == (
        b"one", 3, "carol", "rollback to version 1")
    entry = log.state.kv.get("config/global/a")
    assert entry is not None and entry.value == b"one" and entry.flags == 3


def test_rollback_to_a_deletion_deletes_and_to_an_unknown_version_is_not_found() -> None:
    log = Log()
    log.put("config/global/a", "one", T0)
    log.delete("config/global/a", T0)
    log.put("config/global/a", "three", T0)
    assert log.native(encode_rollback("config/global/a", 2, meta(T0)))["version"] == 4
    assert log.state.kv.get("config/global/a") is None
    missing = log.native(encode_rollback("config/global/a", 9, meta(T0)))
    assert missing["ok"] is False and missing["code"] == "not_found" and "no version 9" in str(missing["error"])
    assert log.native(encode_rollback("config/global/b", 1, meta(T0)))["code"] == "not_found"


def test_rollback_of_a_value_the_current_schema_refuses_is_refused() -> None:
    log = Log()
    log.put("config/global/a", "text", T0)
    log.put("config/global/a", "1", T0)
    log.native(encode_schema_put("config/global/a", b'{"type": "integer"}', meta(T0)))
    with pytest.raises(InvalidRequest, match="not JSON"):
        log.native(encode_rollback("config/global/a", 1, meta(T0)))
    assert len(log.state.config.history("config/global/a")) == 2


def _tree_fixture() -> Log:
    log = Log()
    log.put("config/service/api/a", "a1", T0)
    log.put("config/service/api/b", "b1", T0)
    log.put("config/service/web/a", "w1", T0)  # outside the rolled-back subtree
    # --- the point in time to return to: T0 (index 3) ---
    log.put("config/service/api/a", "a2", T0 + 100)
    log.delete("config/service/api/b", T0 + 100)
    log.put("config/service/api/c", "c1", T0 + 100)
    log.put("config/service/web/a", "w2", T0 + 100)
    return log


@pytest.mark.parametrize("target", [{"time_ms": T0 + 50}, {"index": 3}])
def test_subtree_rollback_restores_a_point_in_time_in_one_step(target: dict[str, int]) -> None:
    log = _tree_fixture()
    index_before = log.index
    result = log.native(encode_rollback_tree("config/service/api/", meta(T0 + 200, "ops"), **target))
    assert {change["key"]: change["action"] for change in result["changes"]} == {  # type: ignore[union-attr]
        "config/service/api/a": "put", "config/service/api/b": "put", "config/service/api/c": "delete"}
    assert log.values("api") == {"a": ("a1", LAYER_SERVICE), "b": ("b1", LAYER_SERVICE)}
    assert log.values("web") == {"a": ("w2", LAYER_SERVICE)}
    for key in ("config/service/api/a", "config/service/api/b", "config/service/api/c"):
        newest = log.state.config.history(key)[-1]
        assert newest.modify_index == index_before + 1 and newest.author == "ops"
    # Nothing left to do: a second rollback to the same point changes nothing.
    again = log.native(encode_rollback_tree("config/service/api/", meta(T0 + 300), **target))
    assert again["changes"] == []


def test_subtree_rollback_is_all_or_nothing_when_one_value_fails_its_schema() -> None:
    log = _tree_fixture()
    log.native(encode_schema_put("config/service/api/b", b'{"type": "integer"}', meta(T0 + 150)))
    before = log.state.state_hash()
    with pytest.raises(InvalidRequest, match="config/service/api/b"):
        log.native(encode_rollback_tree("config/service/api/", meta(T0 + 200), index=3))
    assert log.state.state_hash() == before


def test_subtree_rollback_past_pruned_versions_is_refused() -> None:
    log = _tree_fixture()
    log.native(encode_retention(Retention(max_versions=1), meta(T0 + 150)))
    with pytest.raises(InvalidRequest, match="dropped by the retention policy"):
        log.state.config.plan_tree_rollback("config/service/api/", target_index=3)


def test_subtree_rollback_needs_exactly_one_target() -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        encode_rollback_tree("config/", meta(T0))
    with pytest.raises(InvalidRequest, match="exactly one"):
        encode_rollback_tree("config/", meta(T0), time_ms=T0, index=3)


# --- diff and time ---------------------------------------------------------------------------------------

def _version(number: int, value: bytes | None) -> Version:
    return Version(number, number, T0, "", "", value, 0)


def test_structural_diff_is_rfc6902_with_old_values() -> None:
    old = {"a": 1, "b": {"c": [1, 2, 3]}, "gone": True, "x/y": 1}
    new = {"a": 1.0, "b": {"c": [1, 5]}, "new": None, "x/y": 2}
    assert json_changes(old, new) == [
        {"op": "replace", "path": "/a", "value": 1.0, "old": 1},
        {"op": "replace", "path": "/b/c/1", "value": 5, "old": 2},
        {"op": "remove", "path": "/b/c/2", "old": 3},
        {"op": "remove", "path": "/gone", "old": True},
        {"op": "add", "path": "/new", "value": None},
        {"op": "replace", "path": "/x~1y", "value": 2, "old": 1},
    ]
    assert json_changes([1], [1, 2, 3]) == [{"op": "add", "path": "/1", "value": 2},
                                           {"op": "add", "path": "/2", "value": 3}]
    assert json_changes({"same": [1]}, {"same": [1]}) == []


def test_unified_diff_of_text_json_binary_and_deletions() -> None:
    text, structured = unified_diff("k", _version(1, b"a\nb\n"), _version(2, b"a\nc\n"))
    assert not structured and "-b\n+c\n" in text and text.startswith("--- k@1")
    text, structured = unified_diff("k", _version(1, b'{"a":1,"b":2}'), _version(2, b'{"b":2,"a":3}'))
    assert structured and '-  "a": 1,\n+  "a": 3,' in text
    text, _ = unified_diff("k", _version(1, b"\xff\x00"), _version(2, b"\xfe"))
    assert text.startswith("Binary values k@1 and k@2 differ")
    text, _ = unified_diff("k", _version(1, b"x\n"), _version(2, None))
    assert "+++ k@2 (deleted)" in text and "-x\n" in text


@pytest.mark.parametrize(("text", "expected"), [
    ("1767225600", T0), ("1767225600.25", T0 + 250), ("2026-01-01T00:00:00Z", T0),
    ("2026-01-01T02:00:00+02:00", T0), ("2026-01-01T00:00:00.123Z", T0 + 123),
])
def test_times_parse_as_rfc3339_or_unix_seconds(text: str, expected: int) -> None:
    assert parse_time(text) == expected
    assert parse_time(format_time(expected)) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("2026-01-01T00:00:00", "no time zone"), ("yesterday", "neither RFC 3339"), ("-5", "out of range"),
])
def test_bad_times_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_time(text)


# --- determinism -----------------------------------------------------------------------------------------

KEYS = ["config/global/a", "config/env/prod/a", "config/service/api/a", "config/service/api/env/prod/b"]

times = st.integers(0, 10_000).map(lambda offset: T0 + offset)
commands = st.lists(st.one_of(
    st.builds(lambda key, value, at: MODULE_KV + encode_put(key, value, time_ms=at),
              st.sampled_from(KEYS), st.sampled_from([b"1", b"2", b'{"n": 1}', b"x"]), times),
    st.builds(lambda key, at: MODULE_KV + encode_delete(key, time_ms=at), st.sampled_from(KEYS), times),
    st.builds(lambda prefix, at: MODULE_KV + encode_delete(prefix, recurse=True, time_ms=at),
              st.sampled_from(["config/service/", "config/", ""]), times),
    st.builds(lambda key, version, at: MODULE_CONFIG + encode_rollback(key, version, meta(at)),
              st.sampled_from(KEYS), st.integers(1, 6), times),
    st.builds(lambda prefix, index, at: MODULE_CONFIG + encode_rollback_tree(prefix, meta(at), index=index),
              st.sampled_from(["config/", "config/service/"]), st.integers(0, 20), times),
    st.builds(lambda versions, age, at: MODULE_CONFIG + encode_retention(Retention(versions, age), meta(at)),
              st.integers(1, 4), st.sampled_from([0, 2_000, 5_000]), times),
    st.builds(lambda prefix, schema, at: MODULE_CONFIG + encode_schema_put(prefix, schema, meta(at)),
              st.sampled_from(["config/global/", "config/service/api/"]),
              st.sampled_from([b'{"type": "integer"}', b"true"]), times),
), max_size=40)


def _apply(state: ReplicatedState, index: int, command: bytes) -> object:
    try:
        return state.apply(index, command)
    except InvalidRequest as exc:
        return ("refused", exc.message)


@settings(max_examples=150, deadline=None)
@given(commands, st.integers(0, 40))
def test_replicas_agree_and_a_snapshot_mid_log_changes_nothing(commands: list[bytes], cut: int) -> None:
    first, second, restored = ReplicatedState(), ReplicatedState(), ReplicatedState()
    results = [_apply(first, index, command) for index, command in enumerate(commands, 1)]
    assert [_apply(second, index, command) for index, command in enumerate(commands, 1)] == results
    assert first.state_hash() == second.state_hash()
    cut = min(cut, len(commands))
    for index, command in enumerate(commands[:cut], 1):
        _apply(restored, index, command)
    snapshot = ReplicatedState()
    snapshot.restore(restored.snapshot())
    tail = [_apply(snapshot, index, command) for index, command in enumerate(commands[cut:], cut + 1)]
    assert tail == results[cut:]
    assert snapshot.state_hash() == first.state_hash()


def test_snapshots_without_a_config_part_restore() -> None:
    log = Log()
    log.kv(encode_put("app/a", b"1"))
    legacy = ReplicatedState()
    legacy.restore(orjson.dumps({"kv": log.state.kv.snapshot().decode()}))
    assert legacy.kv.get("app/a") is not None and list(legacy.config.history_keys("")) == []
