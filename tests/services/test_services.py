"""End-to-end checks that the real test servers of scripts/services.sh work.

Every wait polls a condition against a generous deadline; nothing sleeps to
let a server "settle".
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
import warnings
from datetime import timedelta

import pytest
import redis
import redis.asyncio
import redis.utils
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from redis._parsers.hiredis import _AsyncHiredisParser, _HiredisParser
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from .conftest import services_sh

DEADLINE_S = 60.0


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------- kafka -----


def _create_topic(bootstrap: str, topic: str, rf: int, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=rf, config=config or {})],
        operation_timeout=30,
    )
    futures[topic].result(timeout=DEADLINE_S)
    # Wait until the partition has a leader and all rf replicas are in sync.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        md = admin.list_topics(topic, timeout=10).topics[topic]
        if md.error is None and md.partitions:
            part = md.partitions[0]
            if part.leader >= 0 and len(part.replicas) == rf and len(part.isrs) == rf:
                return
        assert time.monotonic() < deadline, f"topic {topic} not fully replicated: {md.partitions}"
        time.sleep(0.1)


def _delete_topic(bootstrap: str, topic: str) -> None:
    """Best-effort cleanup: must not hide the failure of the test itself."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=DEADLINE_S)
    except Exception as exc:
        warnings.warn(f"could not delete topic {topic}: {exc}", stacklevel=2)


def _produce_one(bootstrap: str, topic: str, key: bytes, value: bytes, conf: dict[str, object] | None = None) -> None:
    delivered: list[object] = []

    def on_delivery(err: KafkaError | None, msg: object) -> None:
        delivered.append(err if err is not None else msg)

    producer = Producer({"bootstrap.servers": bootstrap, **(conf or {})})
    producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    remaining = producer.flush(DEADLINE_S)
    assert remaining == 0, f"{remaining} message(s) not delivered to {topic}"
    assert len(delivered) == 1 and not isinstance(delivered[0], KafkaError), delivered


def _consume_one(bootstrap: str, topic: str) -> tuple[bytes | None, bytes | None]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": _unique("spina-services-test"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            return msg.key(), msg.value()
        pytest.fail(f"no message consumed from {topic} within {DEADLINE_S}s")
    finally:
        consumer.close()


def test_kafka_produce_consume(kafka_bootstrap: str) -> None:
    topic = _unique("spina-services-kafka")
    _create_topic(kafka_bootstrap, topic, rf=1)
    try:
        _produce_one(kafka_bootstrap, topic, b"k1", b"hello kafka")
        assert _consume_one(kafka_bootstrap, topic) == (b"k1", b"hello kafka")
    finally:
        _delete_topic(kafka_bootstrap, topic)


def test_kafka3_replicated_produce_consume(kafka3_bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka3_bootstrap})
    assert len(admin.list_topics(timeout=10).brokers) == 3
    topic = _unique("spina-services-kafka3")
    _create_topic(kafka3_bootstrap, topic, rf=3, config={"min.insync.replicas": "2"})
    try:
        acks_all = {"acks": "all", "enable.idempotence": True}
        _produce_one(kafka3_bootstrap, topic, b"k3", b"hello kafka3", acks_all)
        assert _consume_one(kafka3_bootstrap, topic) == (b"k3", b"hello kafka3")
    finally:
        _delete_topic(kafka3_bootstrap, topic)


# --------------------------------------------------------------- redis -----


def test_redis_ping_uses_hiredis(redis_url: str) -> None:
    assert redis.utils.HIREDIS_AVAILABLE, "hiredis is not installed: redis-py falls back to pure Python"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        conn = client.connection_pool.get_connection()
        try:
            assert isinstance(conn._parser, _HiredisParser), type(conn._parser)
        finally:
            client.connection_pool.release(conn)
        key = _unique("spina-services")
        assert client.set(key, b"v", ex=60)
        assert client.get(key) == b"v"
    finally:
        client.close()


@pytest.mark.asyncio
async def test_redis_asyncio_ping_uses_hiredis(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping() is True
        conn = await client.connection_pool.get_connection()
        try:
            assert isinstance(conn._parser, _AsyncHiredisParser), type(conn._parser)
        finally:
            await client.connection_pool.release(conn)
    finally:
        await client.aclose()


# ---------------------------------------------------------- prometheus -----


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


def test_prometheus_ready_and_scrapes_itself(prometheus_url: str) -> None:
    status, _ = _get(f"{prometheus_url}/-/ready")
    assert status == 200

    # The self-scrape target is listed at once and turns "up" after its
    # first scrape (every 2 s).
    self_url = f"{prometheus_url.replace('http://', '')}/metrics"
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status, body = _get(f"{prometheus_url}/api/v1/targets")
        assert status == 200
        targets = json.loads(body)["data"]["activeTargets"]
        own = [t for t in targets if t["labels"].get("job") == "prometheus"]
        assert own, f"no self-scrape target in {targets}"
        assert own[0]["scrapeUrl"].endswith(self_url), own[0]
        if own[0]["health"] == "up":
            break
        assert time.monotonic() < deadline, f"self-scrape never up: {own[0]}"
        time.sleep(0.2)


# ------------------------------------------------------------ temporal -----


@activity.defn
async def greet(name: str) -> str:
    return f"hello {name}"


@workflow.defn
class GreetWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(greet, name, start_to_close_timeout=timedelta(seconds=30))


@pytest.mark.asyncio
async def test_temporal_runs_a_workflow(temporal_address: str) -> None:
    client = await Client.connect(temporal_address)
    task_queue = _unique("spina-services-tq")
    # Unsandboxed: the sandbox would re-import this module and its C extensions.
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[GreetWorkflow],
        activities=[greet],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        result = await asyncio.wait_for(
            client.execute_workflow(GreetWorkflow.run, "spina", id=_unique("spina-services-wf"), task_queue=task_queue),
            timeout=DEADLINE_S,
        )
    assert result == "hello spina"


# ------------------------------------------------------ services.sh --------


def test_services_sh_stop_and_start_redis(redis_url: str) -> None:
    """stop/start are idempotent and really stop/start the server (redis only:
    it is the cheap one). Leaves redis running for whatever runs next."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    try:
        for _ in range(2):  # the second stop is a no-op that still succeeds
            proc = services_sh("stop", "redis")
            assert proc.returncode == 0, proc.stdout + proc.stderr
        status = services_sh("status", "redis")
        assert status.returncode == 3 and "redis: stopped" in status.stdout, status.stdout
        with pytest.raises(redis.ConnectionError):
            client.ping()

        for expected in ("ready on", "already running"):
            proc = services_sh("start", "redis")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert expected in proc.stdout, proc.stdout
        client.connection_pool.disconnect()
        assert client.ping() is True
        assert services_sh("status", "redis").returncode == 0
    finally:
        client.close()
