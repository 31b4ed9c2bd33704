"""The agent's DNS on --dns-addr answers from the replicated registry (dnspython and dig as clients)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.agents import AgentProcess, make_cluster, request_json, start_agent, wait_until
from tests.dns.conftest import StaleAnswerWatch


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    process = start_agent("--dev", "--log-level", "warning")
    yield process
    process.kill()


def register(agent: AgentProcess, items: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(agent.base_url + "/v1/spina/services/register",
                                     data=json.dumps(items).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def ask(agent: AgentProcess, name: str, kind: str = "A") -> dns.message.Message:
    host, port = agent.dns.rsplit(":", 1)
    return dns.query.udp(dns.message.make_query(name, kind), host, port=int(port), timeout=5)


def records(answer: dns.message.Message, kind: str) -> list[str]:
    wanted = dns.rdatatype.from_text(kind)
    return sorted(item.to_text() for rrset in answer.answer if rrset.rdtype == wanted for item in rrset)


def test_registered_instances_resolve_over_udp_and_tcp(agent: AgentProcess) -> None:
    register(agent, [
        {"service": "web", "instance_id": "web-1", "address": "10.20.0.1", "port": 8080, "version": "1.2.3",
         "tags": ["blue"]},
        {"service": "web", "instance_id": "web-2", "address": "10.20.0.2", "port": 8081, "version": "1.3.0"},
        {"service": "web", "instance_id": "web-6", "address": "fd00::6", "port": 8082},
    ])
    assert records(ask(agent, "web.service.spina"), "A") == ["10.20.0.1", "10.20.0.2"]
    assert records(ask(agent, "web.service.spina", "AAAA"), "AAAA") == ["fd00::6"]
    assert records(ask(agent, "blue.web.service.spina"), "A") == ["10.20.0.1"]
    srv = ask(agent, "_web._tcp.service.spina", "SRV")
    assert sorted(int(item.split()[2]) for item in records(srv, "SRV")) == [8080, 8081, 8082]
    assert {item.to_text() for rrset in srv.additional for item in rrset} >= {"10.20.0.1", "10.20.0.2", "fd00::6"}
    assert any("1.2.3" in item for item in records(ask(agent, "web.service.spina", "TXT"), "TXT"))
    host, port = agent.dns.rsplit(":", 1)
    over_tcp = dns.query.tcp(dns.message.make_query("web.service.spina", "A"), host, port=int(port), timeout=5)
    assert records(over_tcp, "A") == ["10.20.0.1", "10.20.0.2"]


def test_unknown_names_are_nxdomain_and_critical_instances_drop_out(agent: AgentProcess) -> None:
    answer = ask(agent, "nothing-here.service.spina")
    assert answer.rcode() == dns.rcode.NXDOMAIN and answer.authority
    register(agent, [{"service": "db", "instance_id": "db-1", "address": "10.21.0.1", "port": 5432},
                     {"service": "db", "instance_id": "db-2", "address": "10.21.0.2", "port": 5432,
                      "status": "critical"}])
    assert records(ask(agent, "db.service.spina"), "A") == ["10.21.0.1"]
    register(agent, [{"service": "db", "instance_id": "db-2", "address": "10.21.0.2", "port": 5432}])
    assert records(ask(agent, "db.service.spina"), "A") == ["10.21.0.1", "10.21.0.2"]


def test_the_agents_themselves_resolve_as_the_spina_service(agent: AgentProcess) -> None:
    own = wait_until(lambda: records(ask(agent, "spina.service.spina"), "A"), 10, "the agent's own record")
    assert own == ["127.0.0.1"]


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is in dnsutils (scripts/install-services.sh)")
def test_dig_resolves_srv_with_additional_records(agent: AgentProcess) -> None:
    register(agent, [{"service": "cache", "instance_id": "c1", "address": "10.22.0.1", "port": 6379}])
    host, port = agent.dns.rsplit(":", 1)
    output = subprocess.run(["dig", f"@{host}", "-p", port, "_cache._tcp.service.spina", "SRV", "+time=5"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert "status: NOERROR" in output and "6379" in output and "10.22.0.1" in output


def test_every_node_of_a_cluster_answers_dns_from_its_replica(tmp_path: Any) -> None:
    cluster = make_cluster(3, tmp_path, "--log-level", "warning")
    cluster.start_all()
    try:
        first = cluster.agents["n1"]
        register_through = wait_until(lambda: _registered(first), 30, "a registration")
        assert register_through
        for node_id, process in cluster.agents.items():
            assert wait_until(lambda process=process: records(ask(process, "api.service.spina"), "A"), 30,
                              f"api on {node_id}") == \
                ["10.23.0.1"], node_id
    finally:
        cluster.stop_all()


def _registered(process: AgentProcess) -> bool:
    try:
        register(process, [{"service": "api", "instance_id": "api-1", "address": "10.23.0.1", "port": 80}])
    except OSError:
        return False
    return True


def consul(agent: AgentProcess, path: str, body: object = None) -> None:
    status, _, payload = request_json("PUT", agent.base_url + path, body)
    assert status == 200, payload


def test_every_change_through_the_http_api_is_seen_by_the_next_query(agent: AgentProcess) -> None:
    consul(agent, "/v1/agent/service/register", {"Name": "flip", "ID": "flip-0", "Address": "10.30.0.1", "Port": 80})
    for number in range(15):
        address = f"10.30.1.{number + 1}"
        instance = f"flip-{number + 1}"
        consul(agent, "/v1/agent/service/register", {"Name": "flip", "ID": instance, "Address": address, "Port": 80,
                                                     "Check": {"TTL": "1h"}})
        # As in Consul, a TTL check starts critical: not in DNS until its first heartbeat.
        assert records(ask(agent, "flip.service.spina"), "A") == ["10.30.0.1"]
        consul(agent, f"/v1/agent/check/pass/service:{instance}")
        for _ in range(3):  # the first is a miss answered by the loop, the rest come from the serving thread
            assert records(ask(agent, "flip.service.spina"), "A") == sorted(["10.30.0.1", address])
        consul(agent, f"/v1/agent/check/fail/service:{instance}")
        assert records(ask(agent, "flip.service.spina"), "A") == ["10.30.0.1"]
        consul(agent, f"/v1/agent/check/pass/service:{instance}")
        assert records(ask(agent, "flip.service.spina"), "A") == sorted(["10.30.0.1", address])
        consul(agent, f"/v1/agent/service/deregister/{instance}")
        assert records(ask(agent, "flip.service.spina"), "A") == ["10.30.0.1"]


def test_concurrent_lookups_never_see_an_instance_after_its_deregistration_is_acknowledged(
        agent: AgentProcess) -> None:
    consul(agent, "/v1/agent/service/register", {"Name": "churn", "ID": "churn-0", "Address": "10.31.0.1", "Port": 80})
    with StaleAnswerWatch(lambda: records(ask(agent, "churn.service.spina"), "A")) as watch:
        for number in range(60):
            address = f"10.31.1.{number + 1}"
            consul(agent, "/v1/agent/service/register",
                   {"Name": "churn", "ID": f"churn-{number + 1}", "Address": address, "Port": 80})
            # Seen once: the serving thread now holds an answer with it, which the deregistration must drop.
            assert address in records(ask(agent, "churn.service.spina"), "A")
            consul(agent, f"/v1/agent/service/deregister/churn-{number + 1}")
            watch.removed(address)
    assert not watch.stale, watch.stale[:5]
    assert all(watch.answered), watch.answered
