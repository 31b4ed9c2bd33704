"""The Consul KV API of a single agent, driven by py-consul (a client nobody here wrote)."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import consul
import pytest

from tests.agents import AgentProcess


@pytest.fixture
def client(agent: AgentProcess) -> consul.Consul:
    host, port = agent.http.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port))


def raw(agent: AgentProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(agent.base_url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_put_then_get_round_trips_value_flags_and_indexes(client: consul.Consul) -> None:
    assert client.kv.put("app/name", "spina", flags=42) is True
    index, entry = client.kv.get("app/name")
    assert entry["Value"] == b"spina" and entry["Flags"] == 42
    assert entry["CreateIndex"] == entry["ModifyIndex"] and int(index) >= entry["ModifyIndex"] > 0


def test_unknown_key_is_none_with_a_nonzero_index(client: consul.Consul, agent: AgentProcess) -> None:
    index, entry = client.kv.get("no/such/key")
    assert entry is None and int(index) > 0
    status, headers, _ = raw(agent, "GET", "/v1/kv/no/such/key")
    assert status == 404 and int(headers["X-Consul-Index"]) > 0
    assert headers["X-Consul-KnownLeader"] == "true"


def test_cas_with_a_stale_index_returns_false_and_changes_nothing(client: consul.Consul) -> None:
    client.kv.put("cas/key", "v1")
    _, first = client.kv.get("cas/key")
    assert client.kv.put("cas/key", "v2", cas=first["ModifyIndex"]) is True
    assert client.kv.put("cas/key", "v3", cas=first["ModifyIndex"]) is False
    _, current = client.kv.get("cas/key")
    assert current["Value"] == b"v2" and current["ModifyIndex"] > first["ModifyIndex"]
    assert client.kv.put("cas/new", "x", cas=0) is True and client.kv.put("cas/new", "y", cas=0) is False


def test_recurse_keys_separator_and_recursive_delete(client: consul.Consul) -> None:
    for key in ("tree/a", "tree/b/c", "tree/b/d", "treetop"):
        client.kv.put(key, key)
    _, entries = client.kv.get("tree/", recurse=True)
    assert [e["Key"] for e in entries] == ["tree/a", "tree/b/c", "tree/b/d"]
    _, keys = client.kv.get("tree/", keys=True, separator="/")
    assert keys == ["tree/a", "tree/b/"]
    assert client.kv.delete("tree/", recurse=True) is True
    _, gone = client.kv.get("tree/", recurse=True)
    assert gone is None and client.kv.get("treetop")[1]["Value"] == b"treetop"


def test_delete_with_stale_cas_keeps_the_key(client: consul.Consul) -> None:
    client.kv.put("del/key", "v")
    _, entry = client.kv.get("del/key")
    assert client.kv.delete("del/key", cas=entry["ModifyIndex"] + 1000) is False
    assert client.kv.get("del/key")[1] is not None
    assert client.kv.delete("del/key", cas=entry["ModifyIndex"]) is True
    assert client.kv.get("del/key")[1] is None


def test_raw_returns_the_bytes(agent: AgentProcess) -> None:
    payload = bytes(range(256))
    assert raw(agent, "PUT", "/v1/kv/bin/blob", payload)[0] == 200
    status, _, body = raw(agent, "GET", "/v1/kv/bin/blob?raw")
    assert status == 200 and body == payload


def test_consistent_and_stale_reads(client: consul.Consul) -> None:
    client.kv.put("read/mode", "now")
    assert client.kv.get("read/mode", consistency="consistent")[1]["Value"] == b"now"
    assert client.kv.get("read/mode", consistency="stale")[1]["Value"] == b"now"


def test_blocking_query_returns_when_the_key_changes(client: consul.Consul) -> None:
    client.kv.put("watch/key", "before")
    index, _ = client.kv.get("watch/key")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        waiting = pool.submit(client.kv.get, "watch/key", index=index, wait="30s")
        with pytest.raises(concurrent.futures.TimeoutError):
            waiting.result(timeout=0.3)  # still blocked: nothing changed yet
        client.kv.put("watch/key", "after")
        new_index, entry = waiting.result(timeout=20)
    assert entry["Value"] == b"after" and int(new_index) > int(index)
    assert time.monotonic() - started < 20


def test_blocking_query_times_out_with_the_same_index(client: consul.Consul) -> None:
    client.kv.put("idle/key", "x")
    index, _ = client.kv.get("idle/key")
    again, entry = client.kv.get("idle/key", index=index, wait="1s")
    assert again == index and entry["Value"] == b"x"


def test_value_over_512_kib_is_413_and_not_stored(agent: AgentProcess) -> None:
    status, _, body = raw(agent, "PUT", "/v1/kv/big/value", b"x" * (512 * 1024 + 1))
    assert status == 413 and json.loads(body)["code"] == "too_large"
    assert raw(agent, "GET", "/v1/kv/big/value")[0] == 404
    assert raw(agent, "PUT", "/v1/kv/big/value", b"x" * (512 * 1024))[0] == 200


@pytest.mark.parametrize(("method", "path", "field"), [
    ("PUT", "/v1/kv/", "key"),
    ("PUT", "/v1/kv/k?flags=abc", "flags"),
    ("PUT", "/v1/kv/k?cas=-1", "cas"),
    ("GET", "/v1/kv/k?index=1&wait=soon", "wait"),
    ("PUT", "/v1/kv/k?acquire=abc", "acquire"),
    ("GET", "/v1/kv/k?consistent&stale", "consistent"),
])
def test_bad_requests_are_400_naming_the_problem(agent: AgentProcess, method: str, path: str, field: str) -> None:
    status, _, body = raw(agent, method, path, b"v" if method == "PUT" else None)
    document = json.loads(body)
    assert status == 400 and document["code"] == "invalid_request" and field in document["error"]


def test_kv_command_line_round_trip(agent: AgentProcess) -> None:
    import subprocess
    import sys

    def spina(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "spina_fast", "kv", "--http-addr", agent.http, *args],
                              input=stdin, capture_output=True, timeout=30)

    assert spina("put", "cli/a", "hello").returncode == 0
    assert spina("put", "cli/b", "-", stdin=b"from stdin").returncode == 0
    assert spina("get", "cli/a").stdout == b"hello"
    assert spina("get", "cli/b").stdout == b"from stdin"
    assert spina("ls", "cli/").stdout.decode().split() == ["cli/a", "cli/b"]
    stale = spina("put", "cli/a", "again", "--cas", "1")
    assert stale.returncode == 1 and b"check-and-set failed" in stale.stderr
    assert spina("del", "cli/", "--recurse").returncode == 0
    missing = spina("get", "cli/a")
    assert missing.returncode == 1 and b"not found" in missing.stderr
