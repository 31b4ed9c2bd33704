"""`spina agent` as a user runs it: a real process, real HTTP, real signals."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import AgentProcess, free_ports, start_agent


def get(agent: AgentProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(agent.base_url + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def dev_agent() -> AgentProcess:
    agent = start_agent("--dev")
    yield agent
    agent.kill()


def test_dev_agent_prints_ready_line_with_its_addresses(dev_agent: AgentProcess) -> None:
    assert dev_agent.http.startswith("127.0.0.1:") and not dev_agent.http.endswith(":0")
    assert dev_agent.leader == dev_agent.raft


def test_status_leader_names_the_single_node(dev_agent: AgentProcess) -> None:
    status, headers, body = get(dev_agent, "/v1/status/leader")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == dev_agent.raft


def test_status_peers_lists_the_voters(dev_agent: AgentProcess) -> None:
    status, _, body = get(dev_agent, "/v1/status/peers")
    assert status == 200 and json.loads(body) == [dev_agent.raft]


def test_agent_self_has_consul_config_fields(dev_agent: AgentProcess) -> None:
    status, _, body = get(dev_agent, "/v1/agent/self")
    document = json.loads(body)
    assert status == 200
    assert document["Config"]["Datacenter"] == "dc1"
    assert document["Config"]["NodeName"] == "dev"
    assert len(document["Config"]["NodeID"]) == 36
    assert document["Member"]["Name"] == "dev"


def test_metrics_parse_and_count_requests(dev_agent: AgentProcess) -> None:
    get(dev_agent, "/v1/status/leader")
    status, headers, body = get(dev_agent, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert "process_resident_memory_bytes" in families
    assert "python_gc_objects_collected" in families
    leader_requests = [
        sample for sample in families["spina_http_requests"].samples
        if sample.name == "spina_http_requests_total" and sample.labels["route"] == "/v1/status/leader"
    ]
    assert leader_requests and leader_requests[0].value >= 1
    assert leader_requests[0].labels["status"] == "200"
    latency = families["spina_http_request_duration_seconds"].samples
    assert sum(sample.value for sample in latency if sample.name.endswith("_count")) >= 1


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/nothing-here", 404, "not_found"),
    ("POST", "/v1/status/leader", 405, "method_not_allowed"),
])
def test_errors_are_json_with_a_code(dev_agent: AgentProcess, method: str, path: str, status: int,
                                     code: str) -> None:
    body = b"" if method != "GET" else None
    request = urllib.request.Request(dev_agent.base_url + path, method=method, data=body)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == status
    document = json.loads(caught.value.read())
    assert document["code"] == code and path in document["error"]


def test_sigterm_stops_the_agent_with_exit_code_zero_within_five_seconds() -> None:
    agent = start_agent("--dev")
    started = time.monotonic()
    assert agent.terminate(timeout=5) == 0
    assert time.monotonic() - started < 5


def test_dev_mode_removes_its_temporary_data_dir() -> None:
    agent = start_agent("--dev", "--log-format", "json", "--log-level", "info")
    assert agent.terminate() == 0
    records = [json.loads(line) for line in agent.stderr_lines if line.startswith("{")]
    started = next(record for record in records if record["msg"] == "agent started")
    assert started["node_id"] == "dev" and started["level"] == "info"
    assert "spina-dev-" in started["data_dir"] and not Path(started["data_dir"]).exists()


def test_json_logs_are_one_object_per_line() -> None:
    agent = start_agent("--dev", "--log-format", "json")
    assert agent.terminate() == 0
    lines = [line for line in agent.stderr_lines if line.strip()]
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)


def test_data_dir_keeps_identity_across_restarts_and_refuses_a_second_agent(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    first = start_agent("--node-id", "n1", "--data-dir", str(data_dir))
    try:
        node_uuid = json.loads(get(first, "/v1/agent/self")[2])["Config"]["NodeID"]
        second = subprocess.run(
            [sys.executable, "-m", "spina_fast", "agent", "--node-id", "n1", "--data-dir", str(data_dir),
             "--http-addr", "127.0.0.1:0"], capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1 and "in use by another running agent" in second.stderr
    finally:
        assert first.terminate() == 0
    again = start_agent("--node-id", "n1", "--data-dir", str(data_dir))
    try:
        assert json.loads(get(again, "/v1/agent/self")[2])["Config"]["NodeID"] == node_uuid
    finally:
        again.terminate()
    other = subprocess.run(
        [sys.executable, "-m", "spina_fast", "agent", "--node-id", "n2", "--data-dir", str(data_dir),
         "--http-addr", "127.0.0.1:0"], capture_output=True, text=True, timeout=30,
    )
    assert other.returncode == 1 and "belongs to node 'n1'" in other.stderr


def test_agent_with_peers_reports_no_leader_until_a_cluster_forms(tmp_path: Path) -> None:
    own, second, third = free_ports(3)
    agent = start_agent("--node-id", "n1", "--data-dir", str(tmp_path), "--raft-addr", f"127.0.0.1:{own}",
                        "--peers", f"n2=127.0.0.1:{second},n3=127.0.0.1:{third}")
    try:
        assert agent.leader == ""
        assert json.loads(get(agent, "/v1/status/leader")[2]) == ""
        assert json.loads(get(agent, "/v1/status/peers")[2]) == [
            f"127.0.0.1:{own}", f"127.0.0.1:{second}", f"127.0.0.1:{third}"]
    finally:
        agent.terminate()


def test_http_port_in_use_is_a_clear_error(dev_agent: AgentProcess) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spina_fast", "agent", "--dev", "--http-addr", dev_agent.http],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()


@pytest.mark.parametrize(("flags", "message"), [
    (["--http-addr", "nohost"], "is not HOST:PORT"),
    (["--http-addr", "127.0.0.1:99999"], "outside 0..65535"),
    (["--dns-addr", "example.com:53"], "must be an IP address"),
    (["--peers", "n2"], "is not ID=HOST:PORT"),
    (["--peers", "n2=127.0.0.1:1,n2=127.0.0.1:2"], "given twice"),
    (["--node-id", "bad id!"], "node id"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--dev", "--peers", "n2=127.0.0.1:9"], "--dev runs a single node"),
    (["--node-id", "n1", "--peers", "n1=127.0.0.1:9"], "own id"),
])
def test_bad_flags_exit_2_with_one_line(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "spina_fast", "agent", *flags],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


def test_help_explains_the_agent_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "spina_fast", "agent", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--node-id", "--data-dir", "--http-addr", "--dns-addr", "--raft-addr", "--peers", "--dev"):
        assert flag in result.stdout
