"""Prometheus discovers and scrapes the registry, checked with clients nobody here wrote.

- The Debian ``prometheus`` binary, run per test on loopback with the configuration that
  ``spina prometheus config`` wrote, finds every healthy instance through ``http_sd_configs`` (its
  ``/api/v1/targets``), with the discovery labels and per-target scrape intervals, scrapes each one (small
  ``/metrics`` servers registered as the instances), and follows registrations and deregistrations.
- ``promtool check config`` accepts every generated configuration.
- HashiCorp's own Consul client (``github.com/hashicorp/consul/api``, what Prometheus's ``consul_sd_configs``
  uses), in the Go program ``tests/go/consulcheck``, makes Prometheus's Consul discovery calls: every instance
  is found, and a blocking query sees a change within one wait. Debian's Prometheus is built without
  ``consul_sd_configs``; with ``SPINA_PROMETHEUS_CONSUL_SD=1`` a Prometheus built from the Go module proxy
  (``tests/go/prometheus/build.sh``, run by the test if its binary is missing: 15-30 minutes on 2 cores)
  runs ``consul_sd_configs`` against the agent as well.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from spina_fast.api.prometheus import SDCache, label_name, scrape_settings, target_groups
from spina_fast.prometheus_cli import build_config, render_config
from spina_fast.registry import RegistryStore
from spina_fast.testing import free_ports
from tests.agents import AgentProcess, start_agent, wait_until
from tests.agents import request_json as http

REPO_ROOT = Path(__file__).resolve().parents[2]
GO_SOURCES = REPO_ROOT / "tests" / "go" / "consulcheck"
GO_BIN_DIR = REPO_ROOT / ".services" / "go" / "bin"
PROMETHEUS_CONSUL_BINARY = GO_BIN_DIR / "prometheus-consul-sd"
DEADLINE = 90.0  # seconds; a normal target is first scraped up to 15 s after discovery


# --- helpers ------------------------------------------------------------------------------------------------

def register(agent: AgentProcess, document: dict[str, Any]) -> None:
    status, _, body = http("PUT", f"{agent.base_url}/v1/agent/service/register", document)
    assert status == 200, body


def deregister(agent: AgentProcess, instance_id: str) -> None:
    status, _, body = http("PUT", f"{agent.base_url}/v1/agent/service/deregister/{instance_id}")
    assert status == 200, body


class MetricsServer:
    """A /metrics endpoint on loopback standing in for one service instance; counts its scrapes."""

    def __init__(self, name: str) -> None:
        self.scrapes = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                owner.scrapes += 1
                body = f"# TYPE demo_requests_total counter\ndemo_requests_total{{name=\"{name}\"}} 7\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # keep pytest's output clean; scrapes are counted instead

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.target = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    process = start_agent("--dev")
    yield process
    process.kill()


@pytest.fixture
def metrics_servers() -> Iterator[Callable[[str], MetricsServer]]:
    servers: list[MetricsServer] = []

    def make(name: str) -> MetricsServer:
        servers.append(MetricsServer(name))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def spina(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spina_fast", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def promtool_check(path: Path) -> None:
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"promtool rejected {path}:\n{result.stdout}{result.stderr}\n{path.read_text()}"


class Prometheus:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path

    def targets(self) -> list[dict[str, Any]]:
        _, _, body = http("GET", f"{self.url}/api/v1/targets?state=active")
        return list(body["data"]["activeTargets"])

    def by_instance(self) -> dict[str, dict[str, Any]]:
        return {target["labels"]["instance"]: target for target in self.targets()}

    def log_tail(self) -> str:
        return "prometheus log (tail):\n" + self.log_path.read_text(errors="replace")[-3000:]


@contextmanager
def run_prometheus(binary: str, config: Path, work_dir: Path) -> Iterator[Prometheus]:
    """One Prometheus process on a free loopback port, its data under work_dir; killed on exit."""
    (port,) = free_ports(1)
    log_path = work_dir / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=debug"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited with {process.returncode}\n{prometheus.log_tail()}")
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:  # not listening yet, or 503 while it starts (HTTPError is an OSError)
                return False

        wait_until(ready, 60, "prometheus to be ready", prometheus.log_tail)
        yield prometheus
    finally:
        process.kill()
        process.wait(30)


# --- the configuration and labels, without a server -------------------------------------------------------------

def test_meta_keys_become_valid_label_names() -> None:
    assert label_name("git-sha") == "git_sha"
    assert label_name("9.x/y z") == "9_x_y_z"
    assert label_name("team_A1") == "team_A1"
    assert scrape_settings(["a", "critical"]) == ("5s", "5s")
    assert scrape_settings(["criticality"]) == ("15s", "10s")


def test_instances_with_equal_labels_share_a_group_and_unhealthy_ones_are_left_out() -> None:
    registry = RegistryStore()
    options: dict[str, Any] = {"tags": ("critical",), "zone": "z1", "meta": {"b-x": "1", "b.x": "2"}}
    registry.register(1, "api", "api-1", "10.0.0.1", 80, **options)
    registry.register(2, "api", "api-2", "10.0.0.2", 80, **options)
    registry.register(3, "api", "api-3", "10.0.0.3", 80, **{**options, "zone": "z2"})
    registry.register(4, "api", "api-4", "fd00::4", 80, **options, status="warning")
    registry.register(5, "api", "api-5", "10.0.0.5", 80, **options, status="critical")
    groups = target_groups(registry)
    assert [group["targets"] for group in groups] == [["10.0.0.1:80", "10.0.0.2:80"], ["10.0.0.3:80"],
                                                      ["[fd00::4]:80"]]
    labels = groups[0]["labels"]
    # "b-x" and "b.x" both sanitize to b_x: the first key in sorted order ("b-x") wins, deterministically.
    assert labels["__meta_spina_meta_b_x"] == "1"
    assert (labels["__meta_spina_tags"], labels["__scrape_interval__"], labels["__scrape_timeout__"]) == \
        (",critical,", "5s", "5s")
    assert groups[2]["labels"]["__meta_spina_health"] == "warning"
    assert target_groups(registry, ["nope"]) == []


def test_cached_answers_follow_every_change() -> None:
    registry = RegistryStore()
    cache = SDCache()
    rng = random.Random(6)
    instances: list[tuple[str, str]] = []

    def answer(services: list[str] | None = None) -> Any:
        return json.loads(asyncio.run(cache.body(registry, services)))

    # Random registrations, status changes and deregistrations; after each, the cached answer (full and
    # filtered) must be exactly a fresh encoding of the registry.
    for index in range(1, 400):
        action = rng.random()
        if action < 0.5 or not instances:
            service, instance_id = f"svc-{rng.randrange(40)}", f"i-{index}"
            registry.register(index, service, instance_id, f"10.0.{index // 250}.{index % 250}", 80,
                              tags=("critical",) if rng.random() < 0.2 else ())
            instances.append((service, instance_id))
        elif action < 0.8:
            registry.set_status(index, *rng.choice(instances), rng.choice(["passing", "warning", "critical"]))
        else:
            registry.deregister(index, *instances.pop(rng.randrange(len(instances))))
        if index % 7 == 0:
            assert answer() == target_groups(registry), f"seed 6, step {index}"
            chosen = [f"svc-{rng.randrange(40)}", f"svc-{rng.randrange(40)}"]
            assert answer(chosen) == target_groups(registry, chosen), f"seed 6, step {index}"


def test_promtool_accepts_configurations_for_awkward_names(tmp_path: Path) -> None:
    registry = RegistryStore()
    registry.register(1, "pay.v2-api", "p1", "10.0.0.1", 80, tags=("critical", "a b"),
                      meta={"9.lives": "x y", "quote": "it's \"q\"", "dollar": "$1"})
    registry.register(2, "ledger", "l1", "::1", 9100, version="1.2.3-rc.1", zone="eu-1a", region="eu-1")
    groups = target_groups(registry)
    for discovery in ("static", "http"):
        config = build_config(groups, discovery=discovery, job_prefix="team$x-",
                              agent_url="http://127.0.0.1:8700", services=["pay.v2-api", "ledger"])
        path = tmp_path / f"{discovery}.yml"
        path.write_text(render_config(config, "a header\nof two lines"))
        promtool_check(path)
        assert yaml.safe_load(path.read_text()) == config


# --- the SD endpoint over HTTP ----------------------------------------------------------------------------

def test_sd_endpoint_filters_blocks_and_rejects_bad_input(agent: AgentProcess) -> None:
    base = f"{agent.base_url}/v1/spina/prometheus/sd"
    register(agent, {"Name": "alpha", "ID": "alpha-1", "Address": "127.0.0.2", "Port": 81})
    register(agent, {"Name": "beta", "ID": "beta-1", "Address": "127.0.0.3", "Port": 82})
    status, headers, groups = http("GET", f"{base}?service=alpha")
    assert status == 200 and [group["targets"] for group in groups] == [["127.0.0.2:81"]]
    index = int(headers["X-Consul-Index"])
    status, headers, groups = http("GET", f"{base}?service=never-registered")
    assert status == 200 and groups == [] and int(headers["X-Consul-Index"]) >= 1
    status, _, body = http("GET", f"{base}?service=")
    assert status == 400 and body["code"] == "invalid_request" and "service" in body["error"]
    status, _, body = http("GET", f"{base}?service=alpha&index=x")
    assert status == 400 and "index" in body["error"]
    # A blocking query on alpha returns with alpha's change (and its new index), not with beta's.
    result: dict[str, Any] = {}
    watcher = threading.Thread(target=lambda: result.update(
        answer=http("GET", f"{base}?service=alpha&index={index}&wait=30s", timeout=60)))
    watcher.start()
    register(agent, {"Name": "beta", "ID": "beta-2", "Address": "127.0.0.4", "Port": 82})
    watcher.join(0.5)
    assert watcher.is_alive(), "a change to beta ended a blocking query on alpha"
    register(agent, {"Name": "alpha", "ID": "alpha-2", "Address": "127.0.0.5", "Port": 81})
    watcher.join(60)
    status, headers, groups = result["answer"]
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert groups[0]["targets"] == ["127.0.0.2:81", "127.0.0.5:81"]
    status, _, groups = http("GET", base)
    assert {group["labels"]["__meta_spina_service"] for group in groups} == {"alpha", "beta", "spina"}


# --- the real Prometheus ------------------------------------------------------------------------------------

def test_prometheus_discovers_and_scrapes_every_instance_through_http_sd(
        agent: AgentProcess, metrics_servers: Callable[[str], MetricsServer], tmp_path: Path) -> None:
    checkout = [metrics_servers("checkout-1"), metrics_servers("checkout-2")]
    ledger = metrics_servers("ledger-1")
    down = metrics_servers("ledger-down")
    register(agent, {"Name": "checkout", "ID": "checkout-1", "Address": "127.0.0.1", "Port": checkout[0].port,
                     "Tags": ["http", "critical"], "Meta": {"git-sha": "abc123", "team": "pay"},
                     "Zone": "eu-1a", "Region": "eu-1", "Version": "2.1.0"})
    register(agent, {"Name": "checkout", "ID": "checkout-2", "Address": "127.0.0.1", "Port": checkout[1].port,
                     "Tags": ["http", "critical"], "Meta": {"git-sha": "abc123", "team": "pay"},
                     "Zone": "eu-1a", "Region": "eu-1", "Version": "2.1.0"})
    # warning is still healthy and discovered; a TTL check without a status starts critical: left out.
    register(agent, {"Name": "ledger", "ID": "ledger-1", "Address": "127.0.0.1", "Port": ledger.port,
                     "Check": {"TTL": "10m", "Status": "warning"}})
    register(agent, {"Name": "ledger", "ID": "ledger-down", "Address": "127.0.0.1", "Port": down.port,
                     "Check": {"TTL": "10m"}})
    config = tmp_path / "prometheus.yml"
    result = spina("prometheus", "config", "--http-addr", agent.http, "--discovery", "http",
                   "--refresh-interval", "1s", "--job-prefix", "demo-", "--output", str(config))
    assert result.returncode == 0, result.stderr
    promtool_check(config)
    agent_target = agent.http
    expected = {server.target for server in [*checkout, ledger]} | {agent_target}
    with run_prometheus("prometheus", config, tmp_path) as prometheus:
        targets = wait_until(lambda: (found := prometheus.by_instance()).keys() == expected and found,
                             DEADLINE, "every healthy instance as a target",
                             lambda: f"{prometheus.targets()}\n{prometheus.log_tail()}")
        first = targets[checkout[0].target]
        assert first["labels"] == {**first["labels"], "job": "demo-checkout", "zone": "eu-1a", "region": "eu-1"}
        assert first["discoveredLabels"] == {
            **first["discoveredLabels"], "__meta_spina_service": "checkout", "__meta_spina_tags": ",http,critical,",
            "__meta_spina_version": "2.1.0", "__meta_spina_meta_git_sha": "abc123", "__meta_spina_meta_team": "pay",
            "__meta_spina_health": "passing", "__scrape_interval__": "5s", "__scrape_timeout__": "5s"}
        # The per-target interval is the one Prometheus scrapes with (not the job's 15s).
        assert [targets[server.target]["scrapeInterval"] for server in checkout] == ["5s", "5s"]
        assert targets[ledger.target]["scrapeInterval"] == "15s"
        assert targets[ledger.target]["discoveredLabels"]["__meta_spina_health"] == "warning"
        assert targets[agent_target]["labels"]["job"] == "demo-spina"
        wait_until(lambda: all(target["health"] == "up" for target in prometheus.targets()), DEADLINE,
                   "every target to be scraped", lambda: f"{prometheus.targets()}")
        assert all(server.scrapes > 0 for server in [*checkout, ledger]) and down.scrapes == 0
        # Changes reach Prometheus with its next refresh: a new instance, a deregistration, a failing check.
        late = metrics_servers("ledger-2")
        register(agent, {"Name": "ledger", "ID": "ledger-2", "Address": "127.0.0.1", "Port": late.port})
        deregister(agent, "checkout-2")
        http("PUT", f"{agent.base_url}/v1/agent/check/fail/service:ledger-1")
        expected = {checkout[0].target, late.target, agent_target}
        wait_until(lambda: prometheus.by_instance().keys() == expected, DEADLINE,
                   "the new instance in, the deregistered and failing ones out", lambda: f"{prometheus.targets()}")


def test_static_configuration_has_a_job_per_service_with_its_intervals(
        agent: AgentProcess, metrics_servers: Callable[[str], MetricsServer], tmp_path: Path) -> None:
    fast, slow = metrics_servers("fast"), metrics_servers("slow")
    register(agent, {"Name": "orders", "ID": "orders-1", "Address": "127.0.0.1", "Port": fast.port,
                     "Tags": ["critical"]})
    register(agent, {"Name": "orders", "ID": "orders-2", "Address": "127.0.0.1", "Port": slow.port})
    register(agent, {"Name": "search", "ID": "search-1", "Address": "127.0.0.1", "Port": slow.port,
                     "Zone": "eu-1b"})
    config = tmp_path / "static.yml"
    result = spina("prometheus", "config", "--http-addr", agent.http, "--service", "orders", "--service", "search",
                   "--service", "absent", "--output", str(config))
    assert result.returncode == 0, result.stderr
    assert "'absent' has no healthy instance" in result.stderr
    promtool_check(config)
    document = yaml.safe_load(config.read_text())
    assert document["global"] == {"scrape_interval": "15s", "scrape_timeout": "10s", "evaluation_interval": "15s"}
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert sorted(jobs) == ["orders", "search"]
    assert (jobs["orders"]["scrape_interval"], jobs["search"]["scrape_interval"]) == ("5s", "15s")
    assert sorted(target for group in jobs["orders"]["static_configs"] for target in group["targets"]) == \
        sorted([fast.target, slow.target])
    with run_prometheus("prometheus", config, tmp_path) as prometheus:
        def intervals() -> dict[tuple[str, str], str]:
            return {(target["labels"]["job"], target["labels"]["instance"]): target["scrapeInterval"]
                    for target in prometheus.targets()}

        wait_until(lambda: intervals() == {("orders", fast.target): "5s", ("orders", slow.target): "15s",
                                           ("search", slow.target): "15s"},
                   DEADLINE, "the static targets with their intervals", lambda: f"{prometheus.targets()}")
        zones = {target["labels"]["job"]: target["labels"].get("zone") for target in prometheus.targets()}
        assert zones["search"] == "eu-1b"


def test_prometheus_config_reports_an_unreachable_agent() -> None:
    (port,) = free_ports(1)
    result = spina("prometheus", "config", "--http-addr", f"127.0.0.1:{port}")
    assert result.returncode == 1 and "cannot reach the agent" in result.stderr


# --- Consul discovery with HashiCorp's client ---------------------------------------------------------------

def _build_go(package: Path, output: Path) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed to build tests/go (scripts/install-services.sh checks for it)",
                    pytrace=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    # go's build cache makes this a quick relink when nothing changed.
    result = subprocess.run([go, "build", "-o", str(output), "."], cwd=package, capture_output=True, text=True,
                            timeout=900, check=False)
    if result.returncode != 0:
        pytest.fail(f"go build in {package} failed:\n{result.stdout}{result.stderr}", pytrace=False)
    return str(output)


@pytest.fixture(scope="session")
def consulcheck() -> str:
    return _build_go(GO_SOURCES, GO_BIN_DIR / "consulcheck")


def consul_client(binary: str, agent: AgentProcess, *args: str) -> dict[str, Any]:
    result = subprocess.run([binary, "-addr", agent.http, *args], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_hashicorp_consul_client_discovers_every_instance_and_sees_changes_within_one_wait(
        agent: AgentProcess, consulcheck: str) -> None:
    register(agent, {"Name": "web", "ID": "web-1", "Address": "10.9.0.1", "Port": 8080, "Tags": ["blue"],
                     "Meta": {"team": "edge"}})
    register(agent, {"Name": "web", "ID": "web-2", "Address": "10.9.0.2", "Port": 8080,
                     "Check": {"TTL": "10m", "Status": "warning"}})
    register(agent, {"Name": "db", "ID": "db-1", "Address": "10.9.0.3", "Port": 5432, "Check": {"TTL": "10m"}})
    found = consul_client(consulcheck, agent, "discover")
    assert found["datacenter"] == "dc1" and found["catalog_index"] > 0
    assert sorted(found["services"]) == ["db", "spina", "web"]
    web = found["services"]["web"]
    assert web["index"] > 0
    assert [(item["id"], item["target"], item["tags"], item["meta"], item["health"])
            for item in web["instances"]] == [("web-1", "10.9.0.1:8080", ["blue"], {"team": "edge"}, "passing"),
                                              ("web-2", "10.9.0.2:8080", [], {}, "warning")]
    assert [(item["id"], item["health"]) for item in found["services"]["db"]["instances"]] == [("db-1", "critical")]
    # Prometheus's service watch: a blocking health query returns with the change and a larger index.
    with subprocess.Popen([consulcheck, "-addr", agent.http, "watch", "-service", "web", "-index",
                           str(web["index"]), "-wait", "60s"], stdout=subprocess.PIPE, text=True) as watcher:
        register(agent, {"Name": "web", "ID": "web-3", "Address": "10.9.0.4", "Port": 8080})
        output, _ = watcher.communicate(timeout=120)
    changed = json.loads(output)
    assert changed["index"] > web["index"]
    assert [item["id"] for item in changed["instances"]] == ["web-1", "web-2", "web-3"]
    # ... and the catalog watch (how Prometheus learns of new services) with a deregistration.
    current = consul_client(consulcheck, agent, "watch-catalog", "-index", "0")
    assert current["index"] >= changed["index"] and current["services"] == ["db", "spina", "web"]
    with subprocess.Popen([consulcheck, "-addr", agent.http, "watch-catalog", "-index", str(current["index"]),
                           "-wait", "60s"], stdout=subprocess.PIPE, text=True) as watcher:
        deregister(agent, "db-1")
        output, _ = watcher.communicate(timeout=120)
    catalog = json.loads(output)
    assert catalog["index"] > current["index"] and catalog["services"] == ["spina", "web"]
    # A wait that sees no change returns the same index (Prometheus then keeps its targets).
    unchanged = consul_client(consulcheck, agent, "watch", "-service", "web", "-index", str(changed["index"]),
                              "-wait", "1s")
    assert unchanged["index"] == changed["index"]


@pytest.mark.skipif(os.environ.get("SPINA_PROMETHEUS_CONSUL_SD") != "1",
                    reason="set SPINA_PROMETHEUS_CONSUL_SD=1 for consul_sd_configs with a Prometheus built from "
                           "the Go module proxy (tests/go/prometheus/build.sh, 15-30 minutes the first time)")
def test_prometheus_consul_sd_discovers_every_instance(
        agent: AgentProcess, metrics_servers: Callable[[str], MetricsServer], tmp_path: Path) -> None:
    if not PROMETHEUS_CONSUL_BINARY.exists():
        build = subprocess.run(["bash", str(REPO_ROOT / "tests" / "go" / "prometheus" / "build.sh")],
                               capture_output=True, text=True, timeout=3600, check=False)
        if build.returncode != 0:
            pytest.fail(f"tests/go/prometheus/build.sh failed:\n{build.stdout[-3000:]}{build.stderr[-3000:]}",
                        pytrace=False)
    servers = [metrics_servers("a"), metrics_servers("b")]
    for position, server in enumerate(servers):
        register(agent, {"Name": "shop", "ID": f"shop-{position}", "Address": "127.0.0.1", "Port": server.port,
                         "Tags": ["critical"] if position else [], "Meta": {"team": "retail"}})
    config = tmp_path / "consul.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "2s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "consul", "consul_sd_configs": [
            {"server": agent.http, "refresh_interval": "1s"}]}]}))
    with run_prometheus(str(PROMETHEUS_CONSUL_BINARY), config, tmp_path) as prometheus:
        expected = {server.target for server in servers} | {agent.http}
        targets = wait_until(lambda: (found := prometheus.by_instance()).keys() == expected and found, DEADLINE,
                             "every instance through consul_sd", lambda: f"{prometheus.targets()}\n"
                                                                         f"{prometheus.log_tail()}")
        labels = targets[servers[1].target]["discoveredLabels"]
        assert labels == {**labels, "__meta_consul_service": "shop", "__meta_consul_tags": ",critical,",
                          "__meta_consul_service_metadata_team": "retail", "__meta_consul_health": "passing",
                          "__meta_consul_dc": "dc1", "__meta_consul_service_id": "shop-1"}
        wait_until(lambda: all(target["health"] == "up" for target in prometheus.targets()), DEADLINE,
                   "every consul_sd target to be scraped", lambda: f"{prometheus.targets()}")
        late = metrics_servers("c")
        register(agent, {"Name": "shop", "ID": "shop-late", "Address": "127.0.0.1", "Port": late.port})
        deregister(agent, "shop-0")
        expected = {servers[1].target, late.target, agent.http}
        wait_until(lambda: prometheus.by_instance().keys() == expected, DEADLINE,
                   "consul_sd to follow a registration and a deregistration", lambda: f"{prometheus.targets()}")
