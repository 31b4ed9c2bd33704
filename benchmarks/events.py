"""The event bus end to end: Spina's producer + consumer pipelines beside raw confluent-kafka, same broker, same run.

1. Throughput: N events with 200-byte payloads over 1,000 aggregates to a 16-partition topic, produced by one
   process and consumed by another (consumer started and assigned first; the time runs from the first produce
   to the last event consumed). Spina: ``EventProducer.submit_batch`` (1,000-event batches, envelopes, idempotent
   acks=all, delivery reports per batch, librdkafka's C API called once per batch) -> ``EventConsumer``
   (librdkafka's consumer C API: one fetch per batch, envelopes decoded from its buffers, a handler that checks
   per-aggregate order, offsets stored after the handler and committed after every batch). The peer,
   the physical limit of this client here: raw ``Producer.produce`` of the 200-byte JSON payload (same
   producer settings, lz4 included; no envelope, no headers, no delivery callbacks) -> raw
   ``Consumer.consume(num_messages=5000)`` counting messages. A third row is the same work as Spina's written
   by hand on confluent-kafka (orjson envelope, traceparent header, a delivery callback per event, decode
   and order check per event), to show what the guarantees cost apart from Spina's code.
2. Compression: Spina's pipeline again without compression and with zstd (the default, lz4, measured best).
3. Priority lane: one event every 2 ms through a priority producer (``linger.ms=0``) to its own topic and a
   latency-tuned consumer in a third process, while a paced bulk producer pushes ``--bulk-rate`` events/s
   through the bulk lane to a bulk consumer; latency = consumed - sent (CLOCK_MONOTONIC, same machine). The
   peer, measured at the same time on its own topic: plain confluent-kafka with the same latency settings.

Every run is checked: each pipeline must deliver exactly N events (the Spina handler also checks the order per
aggregate); a run that fails a check is an error, not a number.

    python benchmarks/events.py [--events 300000] [--runs 3] [--bulk-rate 100000] [--json]
Needs: a Kafka broker (scripts/services.sh start kafka, used by default at 127.0.0.1:9092).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import machine, median, percentile, print_table

from spina_fast.events import (
    ConsumerConfig,
    Event,
    EventConsumer,
    EventProducer,
    ProducerConfig,
    TopicAdmin,
    TopicSpec,
)

AGGREGATES = 1_000
BATCH = 1_000
IN_FLIGHT = 64
PRIORITY_INTERVAL_S = 0.002


def _now() -> int:
    return time.monotonic_ns()  # CLOCK_MONOTONIC: comparable between processes on one machine


def _emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


_PAD_FRAME = len('{"seq":,"pad":""}')
_PADS: dict[int, str] = {}


def _payload(seq: int, size: int) -> dict[str, Any]:
    """A JSON payload of exactly ``size`` bytes (compact JSON, as orjson writes it). Cheap: the paced bulk
    producer of the priority run builds 100,000 a second on the clock (a json.dumps per payload to measure
    the frame held it to 60-75k/s on a core of its own)."""
    length = size - _PAD_FRAME - len(str(seq))
    pad = _PADS.get(length)
    if pad is None:
        pad = _PADS[length] = "x" * length
    return {"seq": seq, "pad": pad}


def _librdkafka(config: Any) -> dict[str, Any]:
    settings = config.librdkafka()
    settings.pop("logger", None)
    return dict(settings)


def _conf(text: str) -> dict[str, Any]:
    """``key=value,key=value`` librdkafka overrides (--producer-conf / --consumer-conf), applied to every
    pipeline alike so the peer keeps the same settings."""
    conf: dict[str, Any] = {}
    for pair in filter(None, text.split(",")):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"bad librdkafka override {pair!r}: expected key=value")
        conf[name.strip()] = value.strip()
    return conf


# ------------------------------------------------------------------ roles (child processes) ----

def role_raw_producer(args: argparse.Namespace) -> None:
    """The peer. With --full, hand-written confluent-kafka doing what Spina's pipeline does per event: an
    orjson envelope, a traceparent header and a delivery report (counted by a plain Python callback)."""
    import orjson
    from confluent_kafka import Producer

    producer = Producer(_librdkafka(ProducerConfig(args.bootstrap, compression=args.compression,
                                                   extra=_conf(args.producer_conf))))
    value = orjson.dumps(_payload(0, args.payload_bytes))  # the same 200-byte JSON payload Spina carries
    keys = [f"agg-{i}".encode() for i in range(AGGREGATES)]
    names = [f"agg-{i}" for i in range(AGGREGATES)]
    payloads = [_payload(i // AGGREGATES, args.payload_bytes) for i in range(args.events)] if args.full else []
    produce, poll, dumps = producer.produce, producer.poll, orjson.dumps
    failed = [0]

    def on_delivery(error: Any, _message: Any) -> None:
        if error is not None:
            failed[0] += 1

    cpu = time.process_time()
    start = _now()
    for i in range(args.events):
        aggregate = i % AGGREGATES
        if args.full:
            event_id = uuid.uuid4().hex
            value = dumps({"id": event_id, "type": args.topic, "source": "bench", "aggregate_id": names[aggregate],
                           "time": "2026-01-01T00:00:00.000Z", "schema_version": 1, "correlation_id": None,
                           "payload": payloads[i]})
        while True:
            try:
                if args.full:
                    produce(args.topic, value, keys[aggregate], on_delivery=on_delivery,
                            headers=[("traceparent", f"00-{event_id}-{event_id[:16]}-01".encode())])
                else:
                    produce(args.topic, value, keys[aggregate])
                break
            except BufferError:
                poll(0.001)
        if i % 1_000 == 0:
            poll(0)
    left = producer.flush(120)
    _emit({"start_ns": start, "end_ns": _now(), "unsent": left + failed[0], "cpu_s": time.process_time() - cpu})


def role_raw_consumer(args: argparse.Namespace) -> None:
    """The peer's consumer: counts messages; with --full it also decodes each value and checks the order."""
    import orjson
    from confluent_kafka import Consumer

    settings = _librdkafka(ConsumerConfig(args.bootstrap, group_id=f"raw-{uuid.uuid4().hex}",
                                          extra=_conf(args.consumer_conf)))
    settings["enable.auto.offset.store"] = True
    consumer = Consumer(settings)
    assigned: list[Any] = []
    consumer.subscribe([args.topic], on_assign=lambda _c, parts: assigned.extend(parts))
    while not assigned:
        consumer.poll(0.1)
    _emit({"ready": True})
    cpu = time.process_time()
    count = 0
    last = 0
    last_seq: dict[bytes, int] = {}
    disorder = 0
    deadline = time.monotonic() + 300
    while count < args.events and time.monotonic() < deadline:
        message: Any
        for message in consumer.consume(5_000, 0.02):
            if message.error() is None:
                count += 1
                if args.full:
                    seq = orjson.loads(message.value())["payload"]["seq"]
                    key = message.key()
                    if seq != last_seq.get(key, -1) + 1:
                        disorder += 1
                    last_seq[key] = seq
        last = _now()
    _emit({"count": count, "last_ns": last, "cpu_s": time.process_time() - cpu, "disorder": disorder})
    consumer.close()


async def _spina_producer(args: argparse.Namespace) -> None:
    config = ProducerConfig(args.bootstrap, source="bench", compression=args.compression,
                            trace_headers=args.trace_headers, extra=_conf(args.producer_conf))
    sequence = [0] * AGGREGATES
    failures = 0
    names = [f"agg-{a}" for a in range(AGGREGATES)]

    def make_batch(first: int) -> list[tuple[str, dict[str, Any]]]:
        items = []
        for i in range(first, first + BATCH):
            aggregate = i % AGGREGATES
            items.append((names[aggregate], _payload(sequence[aggregate], args.payload_bytes)))
            sequence[aggregate] += 1
        return items

    # The application's own work (building payload dicts) happens before the clock starts, as the peer's
    # does (it sends one prepared value): what is timed is the pipeline.
    prepared = [make_batch(first) for first in range(0, args.events, BATCH)] if args.events else []
    async with EventProducer(config) as producer:
        pending: list[asyncio.Future[Any]] = []
        cpu = time.process_time()
        start = _now()
        interval = BATCH / args.rate if args.rate else 0.0
        next_send = time.monotonic()
        end_at = time.monotonic() + args.seconds if args.seconds else None
        sent = 0
        while (sent < args.events) if end_at is None else (time.monotonic() < end_at):
            items = prepared[sent // BATCH] if prepared else make_batch(sent)
            pending.append(await producer.submit_batch(args.topic, items))
            sent += BATCH
            while len(pending) > IN_FLIGHT:
                failures += len((await pending.pop(0)).failed)
            if interval:
                next_send += interval
                delay = next_send - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        for future in pending:
            failures += len((await future).failed)
        acked = _now()
    _emit({"start_ns": start, "acked_ns": acked, "sent": sent, "failures": failures,
           "cpu_s": time.process_time() - cpu})


async def _spina_consumer(args: argparse.Namespace) -> None:
    last_seq: dict[str, int] = {}
    state = {"count": 0, "last_ns": 0, "disorder": 0}
    timeline: list[tuple[int, int]] = []
    done = asyncio.Event()

    def handle(events: list[Event]) -> None:
        disorder = 0
        for event in events:
            aggregate = event.aggregate_id
            seq = event.payload["seq"]
            if seq != last_seq.get(aggregate, -1) + 1:
                disorder += 1
            last_seq[aggregate] = seq
        state["disorder"] += disorder
        state["count"] += len(events)
        state["last_ns"] = _now()
        if args.events and state["count"] >= args.events:
            done.set()

    config = ConsumerConfig(args.bootstrap, group_id=f"spina-{uuid.uuid4().hex}", lane=args.lane,
                            extra=_conf(args.consumer_conf),
                            **({"batch_wait_s": args.batch_wait} if args.batch_wait >= 0 else {}),
                            **({"max_batch": args.max_batch} if args.max_batch else {}),
                            **({"commit_mode": args.commit_mode} if args.commit_mode else {}))
    consumer = EventConsumer(config, [args.topic], handle, registry=None)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    task = asyncio.create_task(consumer.run())
    while not consumer.assigned:
        if task.done():
            await task
        await asyncio.sleep(0.01)
    _emit({"ready": True})
    cpu = time.process_time()

    async def sample() -> None:
        while True:
            timeline.append((_now(), state["count"]))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.wait_for(done.wait(), 300)
        cpu = time.process_time() - cpu
    finally:
        sampler.cancel()
        consumer.stop()
        await task
    _emit({**state, "timeline": timeline, "cpu_s": cpu})


def _raise_priority(args: argparse.Namespace) -> None:
    """--priority-nice: the diagnostic run, priority-lane processes (Spina's and the peer's alike) scheduled
    ahead of the bulk lane's (needs root or CAP_SYS_NICE)."""
    if args.priority_nice:
        os.nice(-args.priority_nice)


async def _priority(args: argparse.Namespace) -> None:
    latencies: list[float] = []
    measuring = False
    _raise_priority(args)

    warm: list[int] = []

    def handle(events: list[Event]) -> None:
        now = _now()
        warm.append(len(events))
        if measuring:
            latencies.extend((now - e.payload["sent_ns"]) / 1e6 for e in events)

    config = ConsumerConfig(args.bootstrap, group_id=f"prio-{uuid.uuid4().hex}", lane="priority",
                            auto_offset_reset="latest")
    consumer = EventConsumer(config, [args.topic], handle, registry=None)
    task = asyncio.create_task(consumer.run())
    async with EventProducer(ProducerConfig(args.bootstrap, source="bench", lane="priority")) as producer:
        while not consumer.assigned:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        # Warm-up: events until one comes through, then 50 more. Until then the window would time start-up,
        # not the lane: the partition's metadata, the idempotent producer id, and the fetch position (the
        # reset to "latest" resolves after the assignment); both lanes saw 0.5-1 s of it in their p99.
        deadline = time.monotonic() + 60
        while not warm:
            if time.monotonic() > deadline:
                raise RuntimeError("priority lane: no warm-up event came through in 60 s")
            await producer.stream(args.topic, "alert-1", {"sent_ns": _now()})
            await asyncio.sleep(PRIORITY_INTERVAL_S)
        for _ in range(50):
            await producer.stream(args.topic, "alert-1", {"sent_ns": _now()})
            await asyncio.sleep(PRIORITY_INTERVAL_S)
        _emit({"ready": True})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        measuring = True
        window_start = _now()
        end = time.monotonic() + args.seconds
        sent = 0
        while time.monotonic() < end:
            await producer.stream(args.topic, f"alert-{sent % 4}", {"sent_ns": _now()})
            sent += 1
            await asyncio.sleep(PRIORITY_INTERVAL_S)
        window_end = _now()
        deadline = time.monotonic() + 10
        while len(latencies) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    consumer.stop()
    await task
    _emit({"sent": sent, "received": len(latencies), "latencies_ms": latencies,
           "window": [window_start, window_end]})


def role_raw_priority(args: argparse.Namespace) -> None:
    """The priority lane's peer: plain confluent-kafka, linger.ms=0 producer and a poll() loop on a thread,
    the same cadence and latency settings, measured at the same time as Spina's lane."""
    import threading

    from confluent_kafka import Consumer, Producer

    _raise_priority(args)
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": f"rawprio-{uuid.uuid4().hex}",
                         "auto.offset.reset": "latest", "fetch.wait.max.ms": 10, "fetch.min.bytes": 1,
                         "socket.nagle.disable": True})
    assigned: list[Any] = []
    consumer.subscribe([args.topic], on_assign=lambda _c, parts: assigned.extend(parts))
    while not assigned:
        consumer.poll(0.1)
    producer = Producer({"bootstrap.servers": args.bootstrap, "linger.ms": 0, "enable.idempotence": True,
                         "acks": "all", "socket.nagle.disable": True})
    latencies: list[float] = []
    state = {"measuring": False, "stop": False}

    warm: list[int] = []

    def consume() -> None:
        while not state["stop"]:
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                warm.append(1)
            if message is not None and message.error() is None and state["measuring"]:
                latencies.append((_now() - int(message.value() or b"0")) / 1e6)

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 60  # the same warm-up as Spina's lane
    while not warm:
        if time.monotonic() > deadline:
            raise RuntimeError("raw priority lane: no warm-up event came through in 60 s")
        producer.produce(args.topic, str(_now()).encode())
        producer.poll(0)
        time.sleep(PRIORITY_INTERVAL_S)
    for _ in range(50):
        producer.produce(args.topic, str(_now()).encode())
        producer.poll(0)
        time.sleep(PRIORITY_INTERVAL_S)
    _emit({"ready": True})
    sys.stdin.readline()  # "go"
    state["measuring"] = True
    end = time.monotonic() + args.seconds
    sent = 0
    while time.monotonic() < end:
        producer.produce(args.topic, str(_now()).encode())
        producer.poll(0)
        sent += 1
        time.sleep(PRIORITY_INTERVAL_S)
    deadline = time.monotonic() + 10
    while len(latencies) < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    state["stop"] = True
    thread.join()
    producer.flush(10)
    consumer.close()
    _emit({"sent": sent, "received": len(latencies), "latencies_ms": latencies})


# ------------------------------------------------------------------------ orchestration ----

def _spawn(role: str, args: argparse.Namespace, **extra: Any) -> subprocess.Popen[str]:
    options = {"bootstrap": args.bootstrap, "payload_bytes": args.payload_bytes, "batch_wait": args.batch_wait,
               "max_batch": args.max_batch, "producer_conf": args.producer_conf,
               "priority_nice": args.priority_nice,
               "commit_mode": args.commit_mode,
               "consumer_conf": args.consumer_conf, **extra}
    command = [sys.executable, __file__, "--role", role]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read(process: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        raise RuntimeError(f"{process.args!r} gave no answer (exit {process.poll()})")
    doc: dict[str, Any] = json.loads(line)
    return doc


def _finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    doc = _read(process)
    process.wait(60)
    return doc


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _broker_pids() -> list[int]:
    """The single broker of scripts/services.sh, if that is what we measure against (for CPU accounting)."""
    pidfile = Path(__file__).resolve().parents[1] / ".services" / "kafka" / "kafka.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        _cpu_seconds(pid)
    except (OSError, ValueError, IndexError):
        return []
    return [pid]


def _e2e(args: argparse.Namespace, admin: TopicAdmin, kind: str, compression: str = "lz4",
         trace_headers: str = "always") -> dict[str, float]:
    """events/s end to end, and CPU µs per event of the two client processes and of the broker."""
    topic = f"bench.events{uuid.uuid4().hex[:8]}.{kind.replace('_', '-')}"
    admin.ensure([TopicSpec(topic, partitions=args.partitions)], with_dlq=(kind == "spina"))
    try:
        role = "spina" if kind == "spina" else "raw"
        full = kind == "raw_full"
        consumer = _spawn(f"{role}-consumer", args, topic=topic, events=args.events, full=full)
        _read(consumer)
        brokers = _broker_pids()
        broker_cpu = sum(_cpu_seconds(pid) for pid in brokers)
        producer = _spawn(f"{role}-producer", args, topic=topic, events=args.events, compression=compression,
                          full=full, trace_headers=trace_headers)
        sent = _finish(producer)
        received = _finish(consumer)
        broker_cpu = sum(_cpu_seconds(pid) for pid in brokers) - broker_cpu
        if kind == "spina":
            if sent["failures"] or received["count"] != args.events or received["disorder"]:
                raise RuntimeError(f"spina pipeline check failed: {sent['failures']} failed deliveries, "
                                   f"{received['count']} of {args.events} consumed, {received['disorder']} "
                                   "out of order")
        elif sent["unsent"] or received["count"] != args.events or received["disorder"]:
            raise RuntimeError(f"{kind} check failed: {received['count']} of {args.events} consumed, "
                               f"{received['disorder']} out of order")
        per_event = 1e6 / args.events
        return {"events_per_s": args.events / ((received["last_ns"] - sent["start_ns"]) / 1e9),
                "producer_cpu_us": sent["cpu_s"] * per_event, "consumer_cpu_us": received["cpu_s"] * per_event,
                "broker_cpu_us": broker_cpu * per_event if brokers else float("nan")}
    finally:
        admin.delete([topic, f"{topic}.dlq"])


def _priority_run(args: argparse.Namespace, admin: TopicAdmin) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    bulk_topic, priority_topic = f"bench.bulk{tag}.happened", f"bench.priority{tag}.alerted"
    raw_topic = f"bench.rawprio{tag}.alerted"
    admin.ensure([TopicSpec(bulk_topic, partitions=args.partitions), TopicSpec(priority_topic, partitions=1)])
    admin.ensure([TopicSpec(raw_topic, partitions=1)], with_dlq=False)
    processes: list[subprocess.Popen[str]] = []
    try:
        bulk_consumer = _spawn("spina-consumer", args, topic=bulk_topic, events=0)
        processes.append(bulk_consumer)
        priority = _spawn("priority", args, topic=priority_topic, seconds=args.priority_seconds)
        processes.append(priority)
        raw_priority = _spawn("raw-priority", args, topic=raw_topic, seconds=args.priority_seconds)
        processes.append(raw_priority)
        _read(bulk_consumer)
        _read(priority)
        _read(raw_priority)
        bulk_producer = None
        if args.bulk_rate > 0:
            bulk_producer = _spawn("spina-producer", args, topic=bulk_topic, events=0, rate=args.bulk_rate,
                                   seconds=args.priority_seconds + 3)
            processes.append(bulk_producer)
            time.sleep(1.5)  # benchmark warm-up: the bulk lane reaches its rate before the window opens
        for lane in (priority, raw_priority):
            assert lane.stdin is not None
            lane.stdin.write("go\n")
            lane.stdin.flush()
        measured = _finish(priority)
        peer = _finish(raw_priority)
        sent = _finish(bulk_producer) if bulk_producer is not None else {"failures": 0}
        bulk_consumer.send_signal(signal.SIGTERM)
        consumed = _finish(bulk_consumer)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        admin.delete([bulk_topic, priority_topic, raw_topic, f"{bulk_topic}.dlq", f"{priority_topic}.dlq"])
    if sent["failures"] or consumed["disorder"] or measured["received"] < measured["sent"]:
        raise RuntimeError(f"priority run check failed: {sent['failures']} bulk failures, {consumed['disorder']} "
                           f"out of order, {measured['received']} of {measured['sent']} priority events")
    start, end = measured["window"]
    inside = [count for t, count in consumed["timeline"] if start <= t <= end]
    times = [t for t, _count in consumed["timeline"] if start <= t <= end]
    bulk_rate = (inside[-1] - inside[0]) / ((times[-1] - times[0]) / 1e9) if len(inside) > 1 else 0.0
    latencies, peer_latencies = measured["latencies_ms"], peer["latencies_ms"]
    return {"p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies),
            "samples": len(latencies), "bulk_events_per_s": bulk_rate,
            "raw_p50_ms": percentile(peer_latencies, 0.50), "raw_p99_ms": percentile(peer_latencies, 0.99),
            "raw_max_ms": max(peer_latencies, default=float("nan"))}


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    admin = TopicAdmin(args.bootstrap)
    compressions = [c for c in args.compressions.split(",") if c and c != "lz4"]
    runs: list[dict[str, Any]] = []
    for number in range(args.runs):
        run: dict[str, Any] = {}
        order = ["raw", "raw_full", "spina"] if number % 2 == 0 else ["spina", "raw_full", "raw"]
        if args.events:
            for kind in order:
                run[kind] = _e2e(args, admin, kind)
            for compression in compressions:
                run[f"spina_{compression}"] = _e2e(args, admin, "spina", compression)
            if args.lean:
                run["spina_lean"] = _e2e(args, admin, "spina", trace_headers="caller")
            run["ratio"] = run["spina"]["events_per_s"] / run["raw"]["events_per_s"]
        if args.priority_seconds > 0:
            run["priority"] = _priority_run(args, admin)
        runs.append(run)
        print(f"run {number + 1}: " + json.dumps(run, default=str), file=sys.stderr)

    from spina_fast._kafka_native import library

    result: dict[str, Any] = {
        "events": args.events, "payload_bytes": args.payload_bytes, "partitions": args.partitions, "runs": args.runs,
        "machine": machine(), "librdkafka": library()[1], "load_average": os.getloadavg(), "per_run": runs,
    }
    if args.events:
        result.update(_throughput_summary(runs, compressions))
    if args.priority_seconds > 0:
        priority = [r["priority"] for r in runs]
        result.update({
            "priority_p50_ms": median([p["p50_ms"] for p in priority]),
            "priority_p99_ms": median([p["p99_ms"] for p in priority]),
            "priority_max_ms": max(p["max_ms"] for p in priority),
            "raw_priority_p50_ms": median([p["raw_p50_ms"] for p in priority]),
            "raw_priority_p99_ms": median([p["raw_p99_ms"] for p in priority]),
            "raw_priority_max_ms": max(p["raw_max_ms"] for p in priority),
            "bulk_events_per_s_during_priority": median([p["bulk_events_per_s"] for p in priority]),
        })
    return result


def _throughput_summary(runs: list[dict[str, Any]], compressions: list[str]) -> dict[str, Any]:
    def med(kind: str, field: str = "events_per_s") -> float:
        return median([r[kind][field] for r in runs])

    return {
        "e2e_events_per_s": med("spina"),
        "raw_events_per_s": med("raw"),
        "ratio": median([r["ratio"] for r in runs]),
        "cpu_us_per_event": {kind: {part: med(kind, f"{part}_cpu_us") for part in ("producer", "consumer", "broker")}
                             for kind in ("raw", "raw_full", "spina")},
        "raw_full_events_per_s": med("raw_full"),
        "compression_events_per_s": {c: med(f"spina_{c}") for c in compressions},
        **({"lean_events_per_s": med("spina_lean"),
            "lean_cpu_us_per_event": {part: med("spina_lean", f"{part}_cpu_us")
                                      for part in ("producer", "consumer", "broker")}}
           if "spina_lean" in runs[0] else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--events", type=int, default=300_000, help="events per throughput run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--payload-bytes", type=int, default=200)
    parser.add_argument("--bulk-rate", type=float, default=100_000,
                        help="target bulk events/s during the priority test (0: no bulk load)")
    parser.add_argument("--priority-seconds", type=float, default=5.0, help="0 skips the priority test")
    parser.add_argument("--compressions", default="none,zstd",
                        help="compression types to measure besides the default (lz4)")
    parser.add_argument("--batch-wait", type=float, default=-1.0,
                        help="Spina consumer batch_wait_s (default: the library's)")
    parser.add_argument("--max-batch", type=int, default=0, help="Spina consumer max_batch (default: the library's)")
    parser.add_argument("--commit-mode", default="", choices=["", "batch", "async", "interval"],
                        help="Spina bulk consumer commit_mode (default: the library's, 'batch')")
    parser.add_argument("--producer-conf", default="",
                        help="librdkafka overrides for every bulk producer, Spina's and the peer's: key=value,...")
    parser.add_argument("--consumer-conf", default="",
                        help="librdkafka overrides for every bulk consumer, Spina's and the peer's: key=value,...")
    parser.add_argument("--no-lean", dest="lean", action="store_false",
                        help="skip the row for ProducerConfig(trace_headers='caller')")
    parser.add_argument("--priority-nice", type=int, default=0,
                        help="diagnostic: run both priority-lane processes at nice -N (root only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # child process roles
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--topic", default="", help=argparse.SUPPRESS)
    parser.add_argument("--compression", default="lz4", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--lane", default="bulk", help=argparse.SUPPRESS)
    parser.add_argument("--trace-headers", default="always", help=argparse.SUPPRESS)
    parser.add_argument("--full", default="False", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.full = args.full == "True"
    if args.role is not None:
        import uvloop

        roles = {"raw-producer": role_raw_producer, "raw-consumer": role_raw_consumer,
                 "raw-priority": role_raw_priority}
        coroutines = {"spina-producer": _spina_producer, "spina-consumer": _spina_consumer, "priority": _priority}
        if args.role in roles:
            roles[args.role](args)
        else:
            uvloop.run(coroutines[args.role](args))
        return
    if args.payload_bytes < 32:
        parser.error("--payload-bytes must be at least 32")
    result = orchestrate(args)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "per_run"} | {"per_run": result["per_run"]}))
        return
    m = result["machine"]
    print(f"events: {args.events:,} x {args.payload_bytes}-byte payloads, {args.partitions} partitions, "
          f"{args.runs} runs (medians); {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
          f"librdkafka {result['librdkafka']}")
    if args.events:
        _print_throughput(result)
    if args.priority_seconds > 0:
        print_table(f"priority lane latency (one event / {PRIORITY_INTERVAL_S * 1000:g} ms), bulk lane paced at "
                    f"{args.bulk_rate:,.0f}/s, reached {result['bulk_events_per_s_during_priority']:,.0f}/s",
                    ["lane", "p50 ms", "p99 ms", "max ms"],
                    [["spina priority producer -> consumer", result["priority_p50_ms"], result["priority_p99_ms"],
                      result["priority_max_ms"]],
                     ["raw confluent-kafka, same settings (peer)", result["raw_priority_p50_ms"],
                      result["raw_priority_p99_ms"], result["raw_priority_max_ms"]]])
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in result['load_average'])}")


def _print_throughput(result: dict[str, Any]) -> None:
    rows: list[list[object]] = [
        ["raw confluent-kafka produce -> consume (peer)", round(result["raw_events_per_s"]), "1.00"],
        ["hand-written: + envelope, traceparent, delivery reports, decode", round(result["raw_full_events_per_s"]),
         f"{result['raw_full_events_per_s'] / result['raw_events_per_s']:.2f}"],
        ["spina EventProducer -> EventConsumer", round(result["e2e_events_per_s"]), f"{result['ratio']:.2f}"],
    ]
    for compression, rate in result["compression_events_per_s"].items():
        rows.append([f"spina, compression {compression}", round(rate),
                     f"{rate / result['raw_events_per_s']:.2f}"])
    if "lean_events_per_s" in result:
        lean = result["lean_events_per_s"]
        rows.append(["spina, trace_headers='caller' (no derived traceparent header)", round(lean),
                     f"{lean / result['raw_events_per_s']:.2f}"])
    print_table("end to end throughput (events/s)", ["pipeline", "events/s", "vs raw"], rows)
    cpu = result["cpu_us_per_event"]
    print_table("CPU per event (µs; medians)", ["pipeline", "producer process", "consumer process", "broker"],
                [[kind, round(cpu[kind]["producer"], 2), round(cpu[kind]["consumer"], 2), round(cpu[kind]["broker"], 2)]
                 for kind in ("raw", "raw_full", "spina")]
                + ([["spina_lean", *(round(result["lean_cpu_us_per_event"][part], 2)
                                     for part in ("producer", "consumer", "broker"))]]
                   if "lean_cpu_us_per_event" in result else []))
    spread = [round(r["ratio"], 2) for r in result["per_run"]]
    print(f"\nspina / raw per run: {spread} (median {statistics.median(spread):.2f})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
