"""``spina events ...`` as a user runs it, against the real broker."""

from __future__ import annotations

import json
import subprocess
import sys

from spina_fast.events import TopicAdmin
from tests.services.conftest import REPO_ROOT

from .conftest import unique_topic


def spina(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spina_fast", "events", *args], cwd=REPO_ROOT, input=stdin,
                          capture_output=True, text=True, timeout=180, check=False)


def test_cli_creates_checks_produces_and_consumes(kafka_bootstrap: str) -> None:
    topic = unique_topic("noted")
    try:
        created = spina("--bootstrap", kafka_bootstrap, "topics", "create", topic, "--retention", "audit",
                        "--partitions", "2")
        assert created.returncode == 0, created.stderr
        assert created.stdout.split("\n")[:2] == [f"created {topic}", f"created {topic}.dlq"]
        again = spina("--bootstrap", kafka_bootstrap, "topics", "create", topic, "--retention", "audit",
                      "--partitions", "2", "--no-dlq")
        assert again.returncode == 0 and again.stdout.strip() == f"exists  {topic} (as specified)"
        differs = spina("--bootstrap", kafka_bootstrap, "topics", "check", topic, "--partitions", "2")
        assert differs.returncode == 1
        assert f"differs {topic}: retention.ms is -1, expected 604800000 (not changed)" in differs.stdout
        listed = spina("--bootstrap", kafka_bootstrap, "topics", "list")
        assert f"{topic}\t2" in listed.stdout.splitlines()

        produced = spina("--bootstrap", kafka_bootstrap, "produce", topic, "-", "--aggregate-id", "note-1",
                         "--correlation-id", "req-5", stdin='{"n": 1}\n{"n": 2}\n\n{"n": 3}\n')
        assert produced.returncode == 0, produced.stderr
        assert len(produced.stdout.splitlines()) == 3 and f"{topic}[" in produced.stdout

        consumed = spina("--bootstrap", kafka_bootstrap, "consume", topic, "--max", "3")
        assert consumed.returncode == 0, consumed.stderr
        events = [json.loads(line) for line in consumed.stdout.splitlines()]
        assert [e["payload"] for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert {(e["aggregate_id"], e["correlation_id"], e["source"], e["type"]) for e in events} == {
            ("note-1", "req-5", "spina-cli", topic)}
        assert all(e["traceparent"].startswith("00-") for e in events)
    finally:
        TopicAdmin(kafka_bootstrap).delete([topic, f"{topic}.dlq"])


def test_cli_explains_bad_input(kafka_bootstrap: str) -> None:
    bad_name = spina("--bootstrap", kafka_bootstrap, "topics", "create", "Orders.Created")
    assert bad_name.returncode == 1 and "does not follow <context>.<aggregate>.<event>" in bad_name.stderr
    missing = unique_topic("missing")
    unknown = spina("--bootstrap", kafka_bootstrap, "produce", missing, "{}", "--aggregate-id", "a")
    assert unknown.returncode == 1 and f"topic '{missing}' does not exist" in unknown.stderr
    not_json = spina("--bootstrap", kafka_bootstrap, "produce", missing, "{nope", "--aggregate-id", "a")
    assert not_json.returncode == 1 and "PAYLOAD is not JSON" in not_json.stderr
    down = spina("--bootstrap", "127.0.0.1:1", "consume", "a.b.c")
    assert down.returncode == 1 and "no Kafka broker answered at 127.0.0.1:1" in down.stderr
    assert "Traceback" not in down.stderr


def test_cli_bench_measures_a_round_trip(kafka_bootstrap: str) -> None:
    result = spina("--bootstrap", kafka_bootstrap, "bench", "--events", "5000")
    assert result.returncode == 0, result.stderr
    assert "5,000 events" in result.stdout and "end to end" in result.stdout
