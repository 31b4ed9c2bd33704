"""Session fixtures for the real test servers run by ``scripts/services.sh``.

Each fixture runs ``scripts/services.sh start <name>``, which is idempotent, so
servers that CI (or a developer) already started are reused, and returns the
server's address as a string. A server that cannot be started FAILS the tests
that need it, with the script's output as the reason: these tests never skip.

Servers are left running when the session ends, so the next run starts in well
under a second; ``scripts/services.sh stop all`` stops them. Needs
``scripts/install-services.sh`` to have run once on the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"

# Must match the ports in scripts/services.sh.
KAFKA_BOOTSTRAP = "127.0.0.1:9092"
KAFKA3_BOOTSTRAP = "127.0.0.1:9192,127.0.0.1:9292,127.0.0.1:9392"
REDIS_URL = "redis://127.0.0.1:6390/0"
PROMETHEUS_URL = "http://127.0.0.1:9095"
TEMPORAL_ADDRESS = "127.0.0.1:7233"

# services.sh waits up to 90 s per server itself; this only guards a hang.
_SCRIPT_TIMEOUT_S = 240


def services_sh(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs scripts/services.sh with this interpreter (it has confluent-kafka and
    the temporal-test-server executable) and returns the finished process."""
    env = {**os.environ}
    env.setdefault("PYTHON", sys.executable)
    return subprocess.run(
        ["bash", str(SERVICES_SH), *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_SCRIPT_TIMEOUT_S,
        check=False,
    )


def start_service(name: str) -> None:
    """Starts one server or fails the requesting test with the reason."""
    try:
        proc = services_sh("start", name)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/services.sh start {name} hung for {exc.timeout}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/services.sh start {name} exited {proc.returncode}\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """One Kafka 4.x broker (KRaft), bootstrap servers string."""
    start_service("kafka")
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def kafka3_bootstrap() -> str:
    """Three Kafka brokers (RF 3, min ISR 2), bootstrap servers string."""
    start_service("kafka3")
    return KAFKA3_BOOTSTRAP


@pytest.fixture(scope="session")
def redis_url() -> str:
    start_service("redis")
    return REDIS_URL


@pytest.fixture(scope="session")
def prometheus_url() -> str:
    start_service("prometheus")
    return PROMETHEUS_URL


@pytest.fixture(scope="session")
def temporal_address() -> str:
    """Temporal test server (in-memory, real time), host:port for Client.connect."""
    start_service("temporal")
    return TEMPORAL_ADDRESS
