"""At-least-once across a consumer process killed with SIGKILL, and no loss or duplicate across a broker crash."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson

from spina_fast.events import BatchResult, EventProducer, ProducerConfig, TopicAdmin, TopicSpec
from tests.services.conftest import REPO_ROOT, services_sh

from .conftest import DEADLINE_S, read_all, unique_topic


def _lines(path: Path) -> list[tuple[str, int, int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        aggregate, seq, partition, offset = line.split()
        out.append((aggregate, int(seq), int(partition), int(offset)))
    return out


def _wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"consumer exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _spawn(bootstrap: str, topic: str, group: str, out: Path, max_batch: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.events.consumer_child", bootstrap, topic, group, str(out),
                             str(max_batch)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


def _check_runs(runs: list[list[tuple[str, int, int, int]]], seed: int) -> None:
    """Within one process's life, each aggregate's events come in sequence without gaps."""
    for number, run in enumerate(runs):
        last: dict[str, int] = {}
        for aggregate, seq, _partition, _offset in run:
            if aggregate in last:
                assert seq == last[aggregate] + 1, f"seed {seed}, run {number}: {aggregate} {last[aggregate]}->{seq}"
            last[aggregate] = seq


async def test_consumer_killed_mid_batch_loses_nothing_and_redelivers_at_most_a_batch(
        kafka_bootstrap: str, make_topic: Callable[..., str], tmp_path: Path) -> None:
    seed = 11
    rng = random.Random(seed)
    topic = make_topic("settled", partitions=8)
    total, max_batch = 20_000, 200
    sequence: dict[str, int] = defaultdict(int)
    items = []
    for _ in range(total):
        aggregate = f"acct-{rng.randrange(100)}"
        items.append((aggregate, {"seq": sequence[aggregate]}))
        sequence[aggregate] += 1
    async with EventProducer(ProducerConfig(kafka_bootstrap)) as producer:
        (await producer.publish_batch(topic, items)).raise_for_failures()

    group = f"crash-{uuid.uuid4().hex[:8]}"
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"
    first = _spawn(kafka_bootstrap, topic, group, first_out, max_batch)
    try:
        await asyncio.to_thread(_wait_for, lambda: len(_lines(first_out)) >= total // 4, "a quarter handled", first)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    handled_before = _lines(first_out)
    assert len(handled_before) < total, "the first consumer finished before it could be killed"

    second = _spawn(kafka_bootstrap, topic, group, second_out, max_batch)
    try:
        def all_seen() -> bool:
            return len({(a, s) for a, s, _p, _o in handled_before + _lines(second_out)}) >= total
        await asyncio.to_thread(_wait_for, all_seen, f"all {total} events across both runs (seed {seed})", second)
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            second.kill()

    runs = [handled_before, _lines(second_out)]
    everything = runs[0] + runs[1]
    assert {(a, s) for a, s, _p, _o in everything} == {(a, s) for a, n in sequence.items() for s in range(n)}
    duplicates = len(everything) - total
    assert 0 <= duplicates <= max_batch, f"seed {seed}: {duplicates} redelivered, more than one batch"
    _check_runs(runs, seed)


async def test_broker_killed_and_restarted_under_acks_all_loses_and_duplicates_nothing(kafka3_bootstrap: str) -> None:
    seed = 23
    rng = random.Random(seed)
    admin = TopicAdmin(kafka3_bootstrap)
    topic = unique_topic("recorded")
    report = admin.ensure([TopicSpec(topic, partitions=6)], with_dlq=False)
    assert report.ok
    configs = admin.describe([topic])[topic]
    assert configs["min.insync.replicas"] == "2"
    assert admin.replication() == (3, 2)
    leaders = {p.leader for p in admin._metadata().topics[topic].partitions.values()}
    assert 2 in leaders, f"broker 2 leads none of {topic}'s partitions: killing it would prove nothing"
    sequence: dict[str, int] = defaultdict(int)
    killed = restarted = False
    results = []
    batches = 0

    def next_batch() -> list[tuple[str, dict[str, int]]]:
        batch = []
        for _ in range(500):
            aggregate = f"ledger-{rng.randrange(200)}"
            batch.append((aggregate, {"seq": sequence[aggregate]}))
            sequence[aggregate] += 1
        return batch

    try:
        async with EventProducer(ProducerConfig(kafka3_bootstrap, source="durability")) as producer:
            in_flight: list[asyncio.Future[BatchResult]] = []

            async def publish(count: int, until: asyncio.Task[object] | None = None) -> None:
                nonlocal batches
                sent = 0
                while sent < count or (until is not None and not until.done()):
                    in_flight.append(await producer.submit_batch(topic, next_batch()))
                    batches += 1
                    sent += 1
                    while len(in_flight) > 8:
                        results.append(await in_flight.pop(0))
                    await asyncio.sleep(0.01)  # pace the load so each phase spans the broker's restart

            await publish(10)
            proc = await asyncio.to_thread(services_sh, "kill-broker", "kafka3", "2")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            killed = True
            await publish(20)  # broker 2 down: its partitions move to the other two replicas
            restart = asyncio.create_task(asyncio.to_thread(services_sh, "start-broker", "kafka3", "2"))
            await publish(1, until=restart)  # while it restarts and catches up
            proc = await restart
            assert proc.returncode == 0, proc.stdout + proc.stderr
            restarted = True
            await publish(10)
            results.extend(await asyncio.gather(*in_flight))
    finally:
        if killed and not restarted:
            services_sh("start-broker", "kafka3", "2")
    try:
        failures = [f for r in results for f in r.failed]
        assert not failures, f"seed {seed}: {len(failures)} events not acknowledged, first: {failures[0].message}"
        total = batches * 500
        messages = read_all(kafka3_bootstrap, topic, expected=total)
        docs = [orjson.loads(m.value()) for m in sorted(messages, key=lambda m: (m.partition(), m.offset()))]
        ids = [d["id"] for d in docs]
        assert len(ids) == total and len(set(ids)) == total, f"seed {seed}: {len(ids) - len(set(ids))} duplicates"
        last: dict[str, int] = {}
        for doc in docs:
            aggregate, seq = doc["aggregate_id"], doc["payload"]["seq"]
            assert seq == last.get(aggregate, -1) + 1, f"seed {seed}: {aggregate} out of order"
            last[aggregate] = seq
        assert last == {a: n - 1 for a, n in sequence.items()}
    finally:
        admin.delete([topic])
