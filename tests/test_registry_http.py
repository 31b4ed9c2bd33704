"""The service registry over HTTP, driven by py-consul (a client nobody here wrote) and raw requests."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from tests.agents import (
    AgentProcess,
    Cluster,
    call_json,
    consul_client,
    leader_of,
    started_cluster,
    wait_until,
)


@pytest.fixture
def client(agent: AgentProcess) -> consul.Consul:
    return consul_client(agent)


def ids_of(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["Service"]["ID"] for entry in entries]


# --- Consul API through py-consul ----------------------------------------------------------------------------

def test_register_heartbeat_and_discover_with_py_consul(client: consul.Consul) -> None:
    check = consul.Check.ttl("10s")
    assert client.agent.service.register("pay", service_id="pay-1", address="10.1.0.1", port=8080,
                                         tags=["v1", "blue"], meta={"team": "core"}, check=check)
    assert client.agent.service.register("pay", service_id="pay-2", address="10.1.0.2", port=8080,
                                         tags=["v1", "green"], check=check)
    # Consul: a TTL check starts critical, so nothing passes before the first heartbeat.
    _, entries = client.health.service("pay", passing=True)
    assert entries == []
    client.agent.check.ttl_pass("service:pay-1")
    client.agent.check.ttl_warn("service:pay-2", notes="slow disk")
    _, passing = client.health.service("pay", passing=True)
    assert ids_of(passing) == ["pay-1"]
    index, every = client.health.service("pay")
    assert ids_of(every) == ["pay-1", "pay-2"] and int(index) > 0
    first = every[0]
    assert first["Service"] == {**first["Service"], "Service": "pay", "Address": "10.1.0.1", "Port": 8080,
                                "Tags": ["v1", "blue"], "Meta": {"team": "core"}}
    assert first["Checks"][0]["CheckID"] == "service:pay-1" and first["Checks"][0]["Status"] == "passing"
    assert every[1]["Checks"][0]["Status"] == "warning"
    _, green = client.health.service("pay", tag="green")
    assert ids_of(green) == ["pay-2"]
    _, catalog = client.catalog.service("pay")
    assert [(entry["ServiceID"], entry["ServiceAddress"], entry["ServicePort"]) for entry in catalog] == \
        [("pay-1", "10.1.0.1", 8080), ("pay-2", "10.1.0.2", 8080)]
    _, services = client.catalog.services()
    assert sorted(services["pay"]) == ["blue", "green", "v1"]
    assert "pay-1" in client.agent.services()
    client.agent.check.ttl_fail("service:pay-1")
    _, passing = client.health.service("pay", passing=True)
    assert passing == []
    assert client.agent.service.deregister("pay-1")
    assert client.agent.service.deregister("pay-2")
    _, services = client.catalog.services()
    assert "pay" not in services


def test_check_update_sets_the_status(agent: AgentProcess, client: consul.Consul) -> None:
    client.agent.service.register("upd", service_id="upd-1", address="10.2.0.1", port=80,
                                  check=consul.Check.ttl("30s"))
    status, _, _ = call_json(agent, "PUT", "/v1/agent/check/update/service:upd-1",
                             {"Status": "passing", "Output": "ok"})
    assert status == 200
    assert ids_of(client.health.service("upd", passing=True)[1]) == ["upd-1"]
    status, _, body = call_json(agent, "PUT", "/v1/agent/check/update/service:upd-1", {"Status": "sleepy"})
    assert status == 400 and body["code"] == "invalid_request" and "Status" in body["error"]


def test_a_silent_instance_goes_critical_then_is_deregistered(client: consul.Consul) -> None:
    client.agent.service.register("flaky", service_id="flaky-1", address="10.3.0.1", port=80,
                                  check={**consul.Check.ttl("1s"), "DeregisterCriticalServiceAfter": "2s"})
    client.agent.check.ttl_pass("service:flaky-1")
    assert ids_of(client.health.service("flaky", passing=True)[1]) == ["flaky-1"]
    wait_until(lambda: client.health.service("flaky", passing=True)[1] == [], 15, "flaky-1 to go critical")
    assert [entry["Checks"][0]["Status"] for entry in client.health.service("flaky")[1]] in (["critical"], [])
    wait_until(lambda: "flaky" not in client.catalog.services()[1], 20, "flaky-1 to be deregistered")


def test_blocking_query_wakes_only_for_its_own_service(agent: AgentProcess, client: consul.Consul) -> None:
    for name in ("watched", "other"):
        client.agent.service.register(name, service_id=f"{name}-1", address="10.4.0.1", port=80)
    index, _ = client.health.service("watched")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(client.health.service, "watched", index=index, wait="20s")
        # A change to another service must not end the blocking query.
        client.agent.service.register("other", service_id="other-2", address="10.4.0.2", port=80)
        with pytest.raises(concurrent.futures.TimeoutError):
            watcher.result(timeout=1.0)
        client.agent.service.register("watched", service_id="watched-2", address="10.4.0.3", port=80)
        new_index, entries = watcher.result(timeout=15)
    assert int(new_index) > int(index)
    assert ids_of(entries) == ["watched-1", "watched-2"]
    status, headers, _ = call_json(agent, "GET", f"/v1/health/service/watched?index={new_index}&wait=100ms")
    assert status == 200 and headers["X-Consul-Index"] == new_index


def test_unknown_service_has_a_nonzero_index(agent: AgentProcess) -> None:
    status, headers, body = call_json(agent, "GET", "/v1/health/service/never-registered")
    assert status == 200 and body == [] and int(headers["X-Consul-Index"]) > 0


def test_the_agent_lists_itself_under_the_spina_service(client: consul.Consul, agent: AgentProcess) -> None:
    _, servers = client.catalog.service("spina")
    assert [entry["ServicePort"] for entry in servers] == [int(agent.http.rsplit(":", 1)[1])]


# --- native API -------------------------------------------------------------------------------------------------

def test_native_batch_register_query_and_heartbeat_with_load(agent: AgentProcess) -> None:
    registrations = [
        {"service": "search", "instance_id": f"s{number}", "address": f"10.5.0.{number}", "port": 9000,
         "version": f"1.{number}.0", "api_versions": ["v1", "v2"] if number % 2 else ["v1"],
         "zone": "z1" if number < 3 else "z2", "region": "r1", "tags": ["http"], "max_load": 100, "weight": 1}
        for number in range(1, 6)]
    status, _, body = call_json(agent, "PUT", "/v1/spina/services/register", registrations)
    assert status == 200 and body["registered"] == 5 and body["index"] > 0
    status, headers, found = call_json(agent, "GET",
                                       "/v1/spina/services/search?version=%3E%3D1.2,%3C1.5&api_version=v2")
    assert status == 200 and [item["instance_id"] for item in found] == ["s3"]
    assert int(headers["X-Consul-Index"]) > 0
    status, _, near = call_json(agent, "GET", "/v1/spina/services/search?zone=z2&region=r1&limit=3")
    assert [item["instance_id"] for item in near] == ["s3", "s4", "s5"]
    for instance_id, load in (("s1", 90), ("s2", 10), ("s3", 50), ("s4", 95), ("s5", 0)):
        status, _, _ = call_json(agent, "PUT", f"/v1/spina/services/heartbeat/{instance_id}?load={load}")
        assert status == 200
    _, _, by_load = call_json(agent, "GET", "/v1/spina/services/search?by_load")
    assert [item["instance_id"] for item in by_load] == ["s5", "s2", "s3", "s1", "s4"]
    assert by_load[0]["ttl_ms"] == 30_000 and by_load[0]["deregister_after_ms"] == 180_000


def test_a_heartbeat_for_an_unknown_instance_is_404(agent: AgentProcess) -> None:
    status, _, body = call_json(agent, "PUT", "/v1/spina/services/heartbeat/ghost")
    assert status == 404 and "ghost" in body["error"]
    status, _, body = call_json(agent, "PUT", "/v1/agent/check/pass/service:ghost")
    assert status == 404


@pytest.mark.parametrize(("body", "field"), [
    ({"Port": 80}, "Name"),
    ({"Name": "x"}, "Port"),
    ({"Name": "x", "Port": 0}, "Port"),
    ({"Name": "x", "Port": 70000}, "Port"),
    ({"Name": "x", "Port": "80"}, "Port"),
    ({"Name": "x", "Port": 80, "Address": "not-an-ip"}, "Address"),
    ({"Name": "x", "Port": 80, "Version": "1.x"}, "Version"),
    ({"Name": "x", "Port": 80, "Check": {"TTL": "0s"}}, "Check.TTL"),
    ({"Name": "x", "Port": 80, "Check": {"TTL": "-5s"}}, "Check.TTL"),
    ({"Name": "x", "Port": 80, "Check": {"TTL": "soon"}}, "Check.TTL"),
    ({"Name": "x", "Port": 80, "Check": {"HTTP": "http://x/health", "Interval": "10s"}}, "Check"),
    ({"Name": "x", "Port": 80, "Tags": [f"t{number}" for number in range(1000)]}, "Tags"),
    ({"Name": "x", "Port": 80, "Meta": {"big": "x" * 1_000_000}}, "Meta"),
    ({"Name": "x", "Port": 80, "Tags": "one"}, "Tags"),
    ({"Name": "x", "Port": 80, "Weights": {"Passing": -1}}, "Weights.Passing"),
])
def test_bad_consul_registrations_are_400_naming_the_field(agent: AgentProcess, body: dict[str, Any],
                                                           field: str) -> None:
    _, before, _ = call_json(agent, "GET", "/v1/catalog/services")
    status, _, error = call_json(agent, "PUT", "/v1/agent/service/register", body)
    assert status == 400, error
    assert error["code"] == "invalid_request" and field in error["error"], error
    status, after, services = call_json(agent, "GET", "/v1/catalog/services")
    assert "x" not in services and after["X-Consul-Index"] == before["X-Consul-Index"]


def test_a_native_batch_with_one_bad_item_stores_nothing(agent: AgentProcess) -> None:
    batch = [{"service": "atomic", "instance_id": "a1", "address": "10.6.0.1", "port": 80},
             {"service": "atomic", "instance_id": "a2", "address": "10.6.0.2", "port": 80, "ttl": 0}]
    status, _, error = call_json(agent, "PUT", "/v1/spina/services/register", batch)
    assert status == 400 and "[1]" in error["error"] and "ttl" in error["error"]
    _, _, found = call_json(agent, "GET", "/v1/spina/services/atomic")
    assert found == []
    status, _, error = call_json(agent, "PUT", "/v1/spina/services/register", b"{not json")
    assert status == 400 and "JSON" in error["error"]
    status, _, error = call_json(agent, "PUT", "/v1/spina/services/register", {"service": "x", "port": 1, "colour": 1})
    assert status == 400 and "colour" in error["error"]
    status, _, error = call_json(agent, "GET", "/v1/spina/services/atomic?version=%3E%3Dbanana")
    assert status == 400 and "version" in error["error"]


# --- a real 3-node cluster --------------------------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with started_cluster(3, tmp_path) as nodes:
        yield nodes


def test_heartbeats_through_a_follower_and_a_leader_kill_deregister_nothing(cluster: Cluster) -> None:
    leader = wait_until(lambda: leader_of(cluster), 30, "a leader")
    follower = next(node_id for node_id in cluster.ids if node_id != leader)
    client = consul_client(cluster.agents[follower])
    check = {**consul.Check.ttl("4s"), "DeregisterCriticalServiceAfter": "60s"}
    for number in range(10):
        assert client.agent.service.register("orders", service_id=f"o{number}", address=f"10.7.0.{number}",
                                             port=80, check=check)
    # Heartbeats sent to a follower reach the leader's leases.
    wait_until(lambda: all(_beat(client, f"o{number}") for number in range(10)), 30, "heartbeats through a follower")
    assert len(client.health.service("orders", passing=True)[1]) == 10

    cluster.agents[leader].kill()
    survivors = [node_id for node_id in cluster.ids if node_id != leader]
    new_leader = wait_until(lambda: leader_of(cluster), 30, "a new leader")
    survivor = consul_client(cluster.agents[new_leader])
    # Heartbeating through the failover keeps every instance: the new leader starts leases at full TTL.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        for number in range(10):
            _beat(survivor, f"o{number}")
        time.sleep(0.5)
    _, entries = survivor.health.service("orders")
    assert len(entries) == 10
    assert all(entry["Checks"][0]["Status"] == "passing" for entry in entries)
    # Without heartbeats they go critical on the new leader, and stay registered.
    wait_until(lambda: survivor.health.service("orders", passing=True)[1] == [], 30, "leases to expire")
    assert len(survivor.health.service("orders")[1]) == 10
    other = next(node_id for node_id in survivors if node_id != new_leader)
    wait_until(lambda: consul_client(cluster.agents[other]).health.service("orders", passing=True)[1] == [], 30,
               "the follower to see the critical status")


def _beat(client: consul.Consul, instance_id: str) -> bool:
    try:
        return bool(client.agent.check.ttl_pass(f"service:{instance_id}"))
    except (consul.ConsulException, OSError):
        return False
