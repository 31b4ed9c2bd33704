"""Configuration management end to end: real agents, py-consul, the watcher helper and the command line."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import consul
import pytest

from spina_fast.client.config import ConfigWatcher
from tests.agents import AgentProcess, Cluster, make_cluster
from tests.test_cluster import leader_of, wait_until

CONFIG = "/v1/spina/config"


def http(agent: AgentProcess, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(agent.base_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def ok_json(agent: AgentProcess, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Any:
    status, _, payload = http(agent, method, path, body, headers)
    assert status == 200, (method, path, status, payload)
    return json.loads(payload)


def put(agent: AgentProcess, key: str, value: str, author: str = "", description: str = "") -> dict[str, Any]:
    """A native write, which records the author and description headers."""
    return ok_json(agent, "PUT", f"{CONFIG}/key/{key}", value.encode(),
                   {"X-Spina-Author": author, "X-Spina-Description": description})


def history(agent: AgentProcess, key: str, query: str = "") -> list[dict[str, Any]]:
    result = ok_json(agent, "GET", f"{CONFIG}/history/{key}{query}")
    assert isinstance(result, list)
    return result


def resolve(agent: AgentProcess, service: str | None = None, env: str | None = None,
            extra: str = "") -> dict[str, dict[str, Any]]:
    query = urllib.parse.urlencode({k: v for k, v in (("service", service), ("env", env)) if v is not None})
    result = ok_json(agent, "GET", f"{CONFIG}/resolve?{query}{extra}")
    assert isinstance(result, dict)
    return result


def error_of(agent: AgentProcess, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    status, _, payload = http(agent, method, path, body, headers)
    document = json.loads(payload)
    return status, document["code"], document["error"]


@pytest.fixture
def consul_client(agent: AgentProcess) -> consul.Consul:
    host, port = agent.http.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


# --- one agent -------------------------------------------------------------------------------------------------

def test_resolve_merges_the_four_layers_and_a_delete_uncovers_the_layer_below(
        agent: AgentProcess, consul_client: consul.Consul) -> None:
    for key, value in [("config/global/timeout", "1"), ("config/env/prod/timeout", "2"),
                       ("config/service/checkout/timeout", "3"), ("config/service/checkout/env/prod/timeout", "4"),
                       ("config/global/region", "eu"), ("config/service/checkout/env/staging/timeout", "9")]:
        assert consul_client.kv.put(key, value) is True
    view = resolve(agent, "checkout", "prod")
    assert {name: (item["value"], item["layer"]) for name, item in view.items()} == {
        "region": ("eu", "global"), "timeout": ("4", "service+env")}
    assert view["timeout"]["version"] == 1 and view["timeout"]["key"] == "config/service/checkout/env/prod/timeout"
    for key, (value, layer) in [("config/service/checkout/env/prod/timeout", ("3", "service")),
                                ("config/service/checkout/timeout", ("2", "env")),
                                ("config/env/prod/timeout", ("1", "global"))]:
        assert consul_client.kv.delete(key) is True
        timeout = resolve(agent, "checkout", "prod")["timeout"]
        assert (timeout["value"], timeout["layer"]) == (value, layer)


def test_history_records_kv_and_native_writes_newest_first_with_deletions(
        agent: AgentProcess, consul_client: consul.Consul) -> None:
    key = "config/service/history/db"
    put(agent, key, '{"pool": 5, "host": "a"}', "alice", "initial pool")
    consul_client.kv.put(key, '{"pool": 8, "host": "a"}')
    consul_client.kv.delete(key)
    put(agent, key, '{"pool": 8, "host": "b"}', "bob", "move to b")
    versions = history(agent, key)
    assert [(v["version"], v["author"], v["description"], v["deleted"]) for v in versions] == [
        (4, "bob", "move to b", False), (3, "", "", True), (2, "", "", False), (1, "alice", "initial pool", False)]
    assert versions[1]["value"] is None and versions[3]["value"] == '{"pool": 5, "host": "a"}'
    assert versions[0]["time"] >= versions[3]["time"] and versions[0]["time"].endswith("Z")
    assert [v["version"] for v in history(agent, key, "?limit=2")] == [4, 3]


def test_consul_kv_writes_record_author_and_description_headers(agent: AgentProcess) -> None:
    key = "config/global/kv-authored"
    headers = {"X-Spina-Author": "alice", "X-Spina-Description": "raise the limit"}
    assert ok_json(agent, "PUT", f"/v1/kv/{key}", b"30", headers) is True
    assert ok_json(agent, "DELETE", f"/v1/kv/{key}", None, {"X-Spina-Author": "bob"}) is True
    deleted, written = history(agent, key)
    assert (written["author"], written["description"], written["value"]) == ("alice", "raise the limit", "30")
    assert deleted["deleted"] is True and deleted["author"] == "bob"


def test_diff_is_unified_text_or_json_with_structural_changes(agent: AgentProcess) -> None:
    key = "config/service/diff/limits"
    put(agent, key, '{"cpu": 1, "mem": 512, "zones": ["a"]}')
    put(agent, key, '{"cpu": 2, "mem": 512, "zones": ["a", "b"]}')
    status, headers, text = http(agent, "GET", f"{CONFIG}/diff/{key}?from=1&to=2")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert '-  "cpu": 1,\n+  "cpu": 2,' in text.decode() and text.decode().startswith(f"--- {key}@1")
    document = ok_json(agent, "GET", f"{CONFIG}/diff/{key}?from=1&format=json")
    assert document["structured"] is True and document["to"]["version"] == 2
    assert document["changes"] == [{"op": "replace", "path": "/cpu", "value": 2, "old": 1},
                                   {"op": "add", "path": "/zones/1", "value": "b"}]
    assert http(agent, "GET", f"{CONFIG}/diff/{key}")[2] == text  # default: the latest against the one before


def test_rollback_writes_a_new_version_and_never_rewrites_history(agent: AgentProcess) -> None:
    key = "config/global/rollback/feature"
    for value in ("off", "on", "broken"):
        put(agent, key, value)
    before = history(agent, key)
    result = ok_json(agent, "POST", f"{CONFIG}/rollback/{key}?to=2", headers={"X-Spina-Author": "oncall"})
    assert result["version"] == 4 and result["restored"] == 2
    after = history(agent, key)
    assert after[1:] == before
    assert (after[0]["value"], after[0]["author"], after[0]["description"]) == ("on", "oncall",
                                                                               "rollback to version 2")
    assert ok_json(agent, "GET", f"/v1/kv/{key}")[0]["Value"] is not None


def test_subtree_rollback_by_time_restores_every_key_atomically(agent: AgentProcess) -> None:
    prefix = "config/service/tree/"
    put(agent, prefix + "a", "a1")
    put(agent, prefix + "b", "b1")
    checkpoint = history(agent, prefix + "b")[0]
    # The next writes must carry a later clock reading than the checkpoint (millisecond resolution).
    wait_until(lambda: time.time() * 1000 > checkpoint_ms(checkpoint) + 5, 5, "the clock to move on")
    put(agent, prefix + "a", "a2")
    assert http(agent, "DELETE", f"{CONFIG}/key/{prefix}b")[0] == 200
    put(agent, prefix + "c", "c1")
    dry = ok_json(agent, "POST", f"{CONFIG}/rollback-tree/{prefix}?time={checkpoint['time']}&dry-run")
    assert {c["key"]: c["action"] for c in dry["changes"]} == {prefix + "a": "put", prefix + "b": "put",
                                                               prefix + "c": "delete"}
    assert resolve(agent, "tree")["a"]["value"] == "a2"  # a dry run writes nothing
    result = ok_json(agent, "POST", f"{CONFIG}/rollback-tree/{prefix}?time={checkpoint['time']}",
                     headers={"X-Spina-Description": "undo the tree change"})
    assert len({history(agent, change["key"])[0]["index"] for change in result["changes"]}) == 1  # one commit
    assert {name: item["value"] for name, item in resolve(agent, "tree").items() if item["layer"] == "service"} == {
        "a": "a1", "b": "b1"}
    assert history(agent, prefix + "c")[0]["deleted"] is True
    assert history(agent, prefix + "a")[0]["description"] == "undo the tree change"
    by_index = ok_json(agent, "POST", f"{CONFIG}/rollback-tree/{prefix}?index={checkpoint['index']}&dry-run")
    assert by_index["changes"] == []


def checkpoint_ms(entry: dict[str, Any]) -> float:
    from spina_fast.api.config import parse_time

    return parse_time(entry["time"])


def test_consul_cas_on_config_keys_versions_only_successful_writes(consul_client: consul.Consul,
                                                                   agent: AgentProcess) -> None:
    key = "config/service/cas/leader"
    assert consul_client.kv.put(key, "n1", cas=0) is True
    assert consul_client.kv.put(key, "n2", cas=0) is False
    _, entry = consul_client.kv.get(key)
    assert consul_client.kv.put(key, "n2", cas=entry["ModifyIndex"]) is True
    assert consul_client.kv.put(key, "n3", cas=entry["ModifyIndex"]) is False
    assert consul_client.kv.delete(key, cas=entry["ModifyIndex"]) is False
    assert [(v["version"], v["value"]) for v in history(agent, key)] == [(2, "n2"), (1, "n1")]
    status, code, message = error_of(agent, "PUT", f"{CONFIG}/key/{key}?cas={entry['ModifyIndex']}", b"n4")
    assert (status, code) == (409, "cas_failed") and key in message


def test_blocking_recurse_query_on_config_wakes_quickly(consul_client: consul.Consul) -> None:
    prefix = "config/service/watched/"
    consul_client.kv.put(prefix + "flag", "0")
    latencies = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for round_number in range(1, 6):
            index, _ = consul_client.kv.get(prefix, recurse=True)
            waiting = pool.submit(consul_client.kv.get, prefix, recurse=True, index=index, wait="30s")
            with pytest.raises(concurrent.futures.TimeoutError):
                waiting.result(timeout=0.2)  # blocked while nothing changes
            started = time.monotonic()
            consul_client.kv.put(prefix + "flag", str(round_number))
            new_index, entries = waiting.result(timeout=5)
            latencies.append(time.monotonic() - started)
            assert int(new_index) > int(index) and entries[0]["Value"] == str(round_number).encode()
    print(f"\nblocking query wake-up (write sent -> watcher answered): median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < 5


async def test_watcher_sees_the_final_value_of_1000_rapid_writes_and_history_keeps_each(
        agent: AgentProcess) -> None:
    assert ok_json(agent, "GET", f"{CONFIG}/retention")["max_versions"] >= 1000
    key = "config/service/burst/counter"
    seen: list[tuple[str | None, str | None]] = []
    called = asyncio.Event()

    def reload(old: dict[str, str], new: dict[str, str]) -> None:
        seen.append((old.get("counter"), new.get("counter")))
        called.set()

    async with aiohttp.ClientSession(agent.base_url) as session, \
            ConfigWatcher(agent.http, service="burst", on_change=reload, wait_seconds=30) as watcher:
        assert "counter" not in watcher.values
        started = time.monotonic()
        async with session.put(f"/v1/kv/{key}", data=b"start") as response:
            assert response.status == 200
        await asyncio.wait_for(called.wait(), 5)
        print(f"\nwatcher callback after a write: {(time.monotonic() - started) * 1000:.1f} ms")
        started = time.monotonic()
        for number in range(1000):
            async with session.put(f"/v1/kv/{key}", data=str(number).encode()) as response:
                assert response.status == 200 and await response.read() == b"true"
        writes_done = time.monotonic()
        await watcher.wait_for(lambda values: values.get("counter") == "999", 10)
        print(f"1000 writes in {writes_done - started:.2f} s; the watcher had the final value "
              f"{(time.monotonic() - writes_done) * 1000:.1f} ms later, after {len(seen)} callbacks")
    numbers = [int(new) for _, new in seen[1:] if new is not None]
    assert numbers == sorted(numbers) and numbers[-1] == 999  # never an older view after a newer one
    assert all(old != new for old, new in seen)
    versions = history(agent, key, "?limit=1000")
    assert versions[0]["version"] == 1001
    assert [v["value"] for v in versions] == [str(n) for n in reversed(range(1000))]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "needle"), [
    ("PUT", "/v1/kv/config/bogus/x", b"1", None, 400, "fits no layer"),
    ("PUT", "/v1/kv/config/service/api/env", b"1", None, 400, "reserved"),
    ("PUT", f"{CONFIG}/key/config/global/", b"1", None, 400, "no name"),
    ("PUT", f"{CONFIG}/key/app/x", b"1", None, 400, "not under 'config/'"),
    ("PUT", "/v1/kv/config/global/guarded", b"x" * (512 * 1024 + 1), None, 413, "limit is 524288"),
    ("PUT", f"{CONFIG}/key/config/global/guarded", b"x" * (512 * 1024 + 1), None, 413, "limit is 524288"),
    ("PUT", "/v1/kv/config/global/guarded", b'{"level": "loud"}', None, 400,
     "config/global/guarded: value at /level violates schema 'config/global/guarded' at /properties/level/enum"),
    ("PUT", f"{CONFIG}/key/config/global/guarded", b"not json", None, 400, "not JSON"),
    ("PUT", f"{CONFIG}/key/config/global/guarded", b'{"level": "info"}', {"X-Spina-Author": "a" * 300}, 400,
     "author is 300 bytes"),
    ("GET", f"{CONFIG}/history/config/global/never-written", None, None, 404, "has no history"),
    ("GET", f"{CONFIG}/history/app/x", None, None, 400, "not under 'config/'"),
    ("GET", f"{CONFIG}/diff/config/global/guarded?from=99", None, None, 404, "no version 99"),
    ("GET", f"{CONFIG}/diff/config/global/guarded?from=0", None, None, 400, "versions count from 1"),
    ("GET", f"{CONFIG}/diff/config/global/guarded?from=1&format=xml", None, None, 400, "format 'xml'"),
    ("POST", f"{CONFIG}/rollback/config/global/guarded?to=99", None, None, 404, "no version 99"),
    ("POST", f"{CONFIG}/rollback/config/global/guarded", None, None, 400, "?to="),
    ("POST", f"{CONFIG}/rollback/config/global/guarded?to=abc", None, None, 400, "to 'abc'"),
    ("POST", f"{CONFIG}/rollback-tree/config/?time=yesterday", None, None, 400, "neither RFC 3339"),
    ("POST", f"{CONFIG}/rollback-tree/config/?time=1&index=1", None, None, 400, "exactly one"),
    ("POST", f"{CONFIG}/rollback-tree/app/?index=1", None, None, 400, "not under 'config/'"),
    ("GET", f"{CONFIG}/resolve?service=a/b", None, None, 400, "service 'a/b'"),
    ("GET", f"{CONFIG}/resolve?env=", None, None, 400, "env ''"),
    ("PUT", f"{CONFIG}/schema/config/global/x", b'{"type": 5}', None, 400, "invalid JSON Schema at /type"),
    ("PUT", f"{CONFIG}/schema/config/global/guarded", b'{"type": "integer"}', None, 400, "existing values"),
    ("GET", f"{CONFIG}/schema/config/none/", None, None, 404, "no schema"),
    ("PUT", f"{CONFIG}/retention", b'{"max_versions": 0}', None, 400, "max_versions 0"),
    ("PUT", f"{CONFIG}/retention", b'{"max_versions": true}', None, 400, "max_versions"),
    ("PUT", f"{CONFIG}/retention", b'{"keep": 1}', None, 400, "unknown retention setting 'keep'"),
    ("PUT", f"{CONFIG}/retention", b"[", None, 400, "not JSON"),
])
def test_bad_input_gets_a_clear_error_and_nothing_is_written(
        agent: AgentProcess, method: str, path: str, body: bytes | None, headers: dict[str, str] | None,
        status: int, needle: str) -> None:
    key = "config/global/guarded"
    if http(agent, "GET", f"{CONFIG}/schema/{key}")[0] == 404:
        put(agent, key, '{"level": "info"}')
        ok_json(agent, "PUT", f"{CONFIG}/schema/{key}",
                b'{"type": "object", "properties": {"level": {"enum": ["debug", "info"]}}}')
    before = stored_state(agent, key)
    got_status, code, message = error_of(agent, method, path, body, headers)
    assert got_status == status and needle in message, message
    assert code == {400: "invalid_request", 404: "not_found", 413: "too_large"}[status]
    assert stored_state(agent, key) == before


def stored_state(agent: AgentProcess, key: str) -> tuple[object, ...]:
    return (history(agent, key), ok_json(agent, "GET", f"/v1/kv/{key}"), ok_json(agent, "GET", f"{CONFIG}/retention"),
            ok_json(agent, "GET", f"{CONFIG}/schemas"))


def test_schema_endpoints_register_list_and_remove(agent: AgentProcess) -> None:
    prefix = "config/service/schema-demo/"
    schema = {"type": "object", "properties": {"port": {"type": "integer"}}}
    created = ok_json(agent, "PUT", f"{CONFIG}/schema/{prefix}", json.dumps(schema).encode(),
                      {"X-Spina-Author": "platform"})
    assert created["ok"] is True
    stored = ok_json(agent, "GET", f"{CONFIG}/schema/{prefix}")
    assert stored["schema"] == schema and stored["author"] == "platform"
    assert prefix in [entry["prefix"] for entry in ok_json(agent, "GET", f"{CONFIG}/schemas")]
    status, _, message = error_of(agent, "PUT", f"{CONFIG}/key/{prefix}env/prod/http", b'{"port": "x"}')
    assert status == 400 and "/properties/port/type" in message and f"{prefix}env/prod/http" in message
    assert ok_json(agent, "DELETE", f"{CONFIG}/schema/{prefix}")["ok"] is True
    assert http(agent, "DELETE", f"{CONFIG}/schema/{prefix}")[0] == 404
    assert put(agent, f"{prefix}env/prod/http", '{"port": "x"}')["version"] == 1


def test_retention_prunes_history_and_old_versions_become_not_found(agent: AgentProcess) -> None:
    key = "config/service/retention/value"
    default = ok_json(agent, "GET", f"{CONFIG}/retention")
    try:
        assert ok_json(agent, "PUT", f"{CONFIG}/retention", b'{"max_versions": 3}')["retention"] == {
            "max_versions": 3, "max_age_seconds": default["max_age_seconds"]}
        for number in range(5):
            put(agent, key, str(number))
        assert [v["version"] for v in history(agent, key)] == [5, 4, 3]
        status, code, message = error_of(agent, "GET", f"{CONFIG}/diff/{key}?from=1&to=5")
        assert (status, code) == (404, "not_found") and "dropped by the retention policy" in message
    finally:
        ok_json(agent, "PUT", f"{CONFIG}/retention", json.dumps(default).encode())


def test_config_command_line(agent: AgentProcess) -> None:
    def spina(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spina_fast", "config", "--http-addr", agent.http, *args],
                              capture_output=True, text=True, timeout=30)

    key = "config/service/cli/env/dev/greeting"
    put(agent, "config/global/greeting", "hello")
    put(agent, key, "hi")
    put(agent, key, "hey")
    resolved = spina("resolve", "--service", "cli", "--env", "dev")
    assert resolved.returncode == 0 and "greeting = hey  (service+env, v2)" in resolved.stdout
    assert json.loads(spina("resolve", "--service", "cli", "--env", "dev", "--json").stdout) == \
        resolve(agent, "cli", "dev")
    assert spina("history", key).stdout.splitlines()[0].startswith("v2  ")
    diff = spina("diff", key, "--from", "1").stdout
    assert "\n-hi\n\\ No newline at end of value\n+hey\n" in diff
    rolled = spina("rollback", key, "--to", "1", "--author", "cli-user", "--description", "back to hi")
    assert rolled.returncode == 0 and "restored as version 3" in rolled.stdout
    newest = history(agent, key)[0]
    assert (newest["value"], newest["author"], newest["description"]) == ("hi", "cli-user", "back to hi")
    dry = spina("rollback-tree", "config/service/cli/", "--index", "1", "--dry-run")
    assert dry.returncode == 0 and "delete  " + key in dry.stdout and "would change" in dry.stdout
    missing = spina("rollback", key, "--to", "42")
    assert missing.returncode == 1 and "no version 42" in missing.stderr


# --- a real three-node cluster -------------------------------------------------------------------------------

class WatcherThread:
    """A ConfigWatcher on its own event loop, for a test that otherwise blocks on urllib."""

    def __init__(self, addresses: list[str], service: str, env: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.watcher = ConfigWatcher(addresses, service=service, env=env, wait_seconds=30, max_backoff=0.5)
        asyncio.run_coroutine_threadsafe(self.watcher.start(), self.loop).result(30)

    def value(self, name: str) -> str | None:
        return self.watcher.values.get(name)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.watcher.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_for_writes_through_every_node(cluster: Cluster) -> None:
    """Right after an election a follower may not yet have its connection to the new leader, and answers
    a forwarded write 503 ("not reachable"): wait until every running node takes one."""
    def every_node_takes_a_write() -> bool:
        return all(http(agent, "PUT", "/v1/kv/probe/writable", b"1")[0] == 200
                   for agent in cluster.running().values())

    wait_until(lambda: leader_of(cluster) and every_node_takes_a_write(), 20, "every node to take writes")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = make_cluster(3, tmp_path)
    cluster.start_all()
    try:
        wait_for_writes_through_every_node(cluster)
        yield cluster
    finally:
        cluster.stop_all()


def test_history_diff_and_rollbacks_survive_a_leader_failover(cluster: Cluster) -> None:
    first_leader = leader_of(cluster)
    assert isinstance(first_leader, str)
    agents = cluster.agents
    followers = [node_id for node_id in cluster.ids if node_id != first_leader]
    db = "config/service/api/db"
    prod_db = "config/service/api/env/prod/db"
    # Before the failover: writes through followers (forwarded) and the leader, a schema, a checkpoint.
    put(agents[followers[0]], "config/global/db", '{"pool": 5, "tls": true}', "alice", "defaults")
    put(agents[first_leader], db, '{"pool": 10}', "bob", "api needs more")
    put(agents[followers[1]], prod_db, '{"pool": 50}', "carol", "prod peak")
    ok_json(agents[followers[0]], "PUT", f"{CONFIG}/schema/config/service/",
            b'{"type": "object", "properties": {"pool": {"type": "integer", "minimum": 1}}}')
    checkpoint = history(agents[followers[1]], prod_db)[0]
    wait_until(lambda: time.time() * 1000 > checkpoint_ms(checkpoint) + 5, 5, "the clock to move on")
    watcher = WatcherThread([agents[first_leader].http] + [agents[n].http for n in followers], "api", "prod")
    try:
        put(agents[followers[0]], db, '{"pool": 20}', "bob", "still more")
        wait_until(lambda: watcher.value("db") == '{"pool": 50}', 5, "the watcher's first view")

        agents[first_leader].process.send_signal(signal.SIGKILL)
        agents[first_leader].process.wait(10)
        wait_for_writes_through_every_node(cluster)
        survivor, other = (agents[node_id] for node_id in followers)

        # After the failover: a Consul-style write, a delete, a new key, and a write the schema refuses.
        assert http(survivor, "PUT", f"/v1/kv/{db}", b'{"pool": 30}')[0] == 200
        assert http(other, "DELETE", f"{CONFIG}/key/{prod_db}", headers={"X-Spina-Author": "dave"})[0] == 200
        put(survivor, "config/service/api/new", '{"pool": 1}')
        status, _, message = error_of(other, "PUT", f"/v1/kv/{db}", b'{"pool": 0}')
        assert status == 400 and db in message and "/properties/pool/minimum" in message
        wait_until(lambda: watcher.value("db") == '{"pool": 30}', 10, "the watcher to follow the new leader")

        expected = [(3, '{"pool": 30}', ""), (2, '{"pool": 20}', "bob"), (1, '{"pool": 10}', "bob")]
        for node in (survivor, other):
            versions = history(node, db, "?consistent")
            assert [(v["version"], v["value"], v["author"]) for v in versions] == expected
        assert history(survivor, db) == history(other, db, "?consistent")
        diff = ok_json(other, "GET", f"{CONFIG}/diff/{db}?from=1&to=3&format=json")
        assert diff["changes"] == [{"op": "replace", "path": "/pool", "value": 30, "old": 10}]

        # One key back to version 1, then the whole service subtree back to the checkpoint, in one step.
        assert ok_json(other, "POST", f"{CONFIG}/rollback/{db}?to=1")["version"] == 4
        tree = ok_json(survivor, "POST", f"{CONFIG}/rollback-tree/config/service/api/?time={checkpoint['time']}",
                       headers={"X-Spina-Author": "oncall"})
        assert {c["key"]: c["action"] for c in tree["changes"]} == {prod_db: "put", "config/service/api/new": "delete"}
        for node in (survivor, other):
            view = resolve(node, "api", "prod", "&consistent")
            assert {name: (item["value"], item["layer"]) for name, item in view.items()} == {
                "db": ('{"pool": 50}', "service+env")}
        assert history(other, prod_db, "?consistent")[0]["author"] == "oncall"
        wait_until(lambda: watcher.value("db") == '{"pool": 50}', 10, "the watcher to see the rollback")

        # The killed leader comes back, replays its log and catches up: the same history everywhere.
        restarted = cluster.start(first_leader)
        reference = history(survivor, db, "?consistent")

        def restarted_history() -> object:
            status, _, body = http(restarted, "GET", f"{CONFIG}/history/{db}?stale")
            return json.loads(body) if status == 200 else None

        wait_until(lambda: restarted_history() == reference, 20, "the restarted node's history to match")
        assert history(restarted, prod_db, "?consistent") == history(other, prod_db, "?consistent")
    finally:
        watcher.stop()
