"""``spina events topics|produce|consume|bench``: the event bus from the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from typing import Any

import orjson

from spina_fast.errors import InvalidRequest, SpinaError

DEFAULT_BOOTSTRAP = os.environ.get("SPINA_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    events = commands.add_parser(
        "events", help="the Kafka event bus: topics, produce, consume, bench",
        description="Spina's event bus on Kafka. Topics are named <context>.<aggregate>.<event> (lower case), "
                    "events carry an envelope (id, type, source, aggregate id = Kafka key, time, schema version, "
                    "correlation id, payload) and a W3C traceparent header.")
    events.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP, metavar="HOST:PORT[,...]",
                        help=f"Kafka bootstrap servers (default {DEFAULT_BOOTSTRAP}; env SPINA_KAFKA_BOOTSTRAP)")
    actions = events.add_subparsers(dest="events_command", metavar="ACTION", parser_class=type(events))
    actions.required = True

    topics = actions.add_parser("topics", help="list, create or check topics",
                                description="Create topics with a retention class (default: 7 days; compacted: "
                                            "last event per key; audit: forever) and a dead-letter topic each. "
                                            "Existing topics that differ are reported, never changed.")
    topic_actions = topics.add_subparsers(dest="topics_command", metavar="ACTION", parser_class=type(events))
    topic_actions.required = True
    topic_actions.add_parser("list", help="topics and their partition counts")
    for name, text in (("create", "create missing topics (and NAME.dlq), report existing ones that differ"),
                       ("check", "report how existing topics differ from the given settings")):
        action = topic_actions.add_parser(name, help=text)
        action.add_argument("names", nargs="+", metavar="NAME", help="e.g. orders.order.created")
        action.add_argument("--retention", choices=("default", "compacted", "audit"), default="default")
        size = action.add_mutually_exclusive_group()
        size.add_argument("--partitions", type=int, default=None)
        size.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S",
                          help="expected throughput; one partition per 10,000 events/s")
        if name == "create":
            action.add_argument("--no-dlq", action="store_true", help="no NAME.dlq dead-letter topic")

    produce = actions.add_parser("produce", help="publish events and wait for Kafka's acknowledgement",
                                 description="Publish one event (PAYLOAD, JSON) or, with '-', one event per line "
                                             "of standard input. Prints partition and offset of each.")
    produce.add_argument("topic")
    produce.add_argument("payload", help="the payload as JSON, or '-' for one JSON payload per stdin line")
    produce.add_argument("--aggregate-id", required=True, help="the aggregate (Kafka key: one partition, in order)")
    produce.add_argument("--correlation-id", default=None)
    produce.add_argument("--source", default="spina-cli", help="the envelope's source (default spina-cli)")
    produce.add_argument("--priority", action="store_true", help="use the priority lane (linger.ms=0)")

    consume = actions.add_parser("consume", help="print events as JSON lines (Ctrl-C stops)",
                                 description="Consume as a group member (at-least-once: offsets are committed "
                                             "after printing) and print one JSON object per event.")
    consume.add_argument("topics", nargs="+", metavar="TOPIC")
    consume.add_argument("--group", default=None, help="consumer group (default: a new one, reading from --from)")
    consume.add_argument("--from", dest="start", choices=("earliest", "latest"), default="earliest",
                         help="where a group without committed offsets starts (default earliest)")
    consume.add_argument("--max", type=int, default=None, help="stop after this many events")
    consume.add_argument("--priority", action="store_true", help="latency-tuned consumer (fetch.wait.max.ms=1)")
    consume.add_argument("--no-dlq", action="store_true",
                         help="no dead-letter topic: an undecodable message stops the consumer")

    bench = actions.add_parser("bench", help="a quick end-to-end throughput check on this cluster",
                               description="Publishes N events to a temporary 16-partition topic and consumes "
                                           "them in this process, then deletes the topic. For the comparison "
                                           "with raw confluent-kafka and the priority lane, run "
                                           "benchmarks/events.py.")
    bench.add_argument("--events", type=int, default=200_000)
    bench.add_argument("--payload-bytes", type=int, default=200)


def run_events(args: argparse.Namespace) -> int:
    import uvloop

    try:
        if args.events_command == "topics":
            return _topics(args)
        runner = {"produce": _produce, "consume": _consume, "bench": _bench}[args.events_command]
        return uvloop.run(runner(args))
    except (SpinaError, ValueError) as exc:
        message = exc.message if isinstance(exc, SpinaError) else str(exc)
        print(f"spina events {args.events_command}: error: {message}", file=sys.stderr)
        return 1


def _topics(args: argparse.Namespace) -> int:
    from spina_fast.events.topics import TopicAdmin, TopicSpec

    admin = TopicAdmin(args.bootstrap)
    if args.topics_command == "list":
        for name, partitions in sorted(admin.list_topics().items()):
            print(f"{name}\t{partitions}")
        return 0
    specs = [TopicSpec(name, args.retention, partitions=args.partitions, expected_events_per_s=args.rate)
             for name in args.names]
    if args.topics_command == "create":
        report = admin.ensure(specs, with_dlq=not args.no_dlq)
        for name in report.created:
            print(f"created {name}")
        for name in report.unchanged:
            print(f"exists  {name} (as specified)")
        mismatches = report.mismatches
    else:
        mismatches = admin.check(specs)
    for mismatch in mismatches:
        print(f"differs {mismatch} (not changed)")
    return 1 if mismatches else 0


async def _produce(args: argparse.Namespace) -> int:
    from spina_fast.events import EventProducer, ProducerConfig

    if args.payload == "-":
        lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    else:
        lines = [args.payload]
    payloads = []
    for number, line in enumerate(lines, 1):
        try:
            payloads.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            where = f"line {number}" if args.payload == "-" else "PAYLOAD"
            raise InvalidRequest(f"{where} is not JSON: {exc}") from None
    config = ProducerConfig(args.bootstrap, source=args.source, lane="priority" if args.priority else "bulk")
    async with EventProducer(config) as producer:
        for payload in payloads:
            delivery = await producer.publish(args.topic, args.aggregate_id, payload,
                                              correlation_id=args.correlation_id)
            print(f"{delivery.topic}[{delivery.partition}]@{delivery.offset} id={delivery.event_id}")
    return 0


async def _consume(args: argparse.Namespace) -> int:
    from spina_fast.events import ConsumerConfig, Event, EventConsumer

    group = args.group or f"spina-cli-{uuid.uuid4().hex[:12]}"
    config = ConsumerConfig(args.bootstrap, group, lane="priority" if args.priority else "bulk",
                            auto_offset_reset=args.start, dead_letter=not args.no_dlq,
                            max_batch=args.max if args.max else 5_000)
    printed = 0
    consumer: EventConsumer

    def show(events: list[Event]) -> None:
        nonlocal printed
        for event in events:
            if args.max is not None and printed >= args.max:
                break
            sys.stdout.buffer.write(orjson.dumps({
                "topic": event.topic, "partition": event.partition, "offset": event.offset, "id": event.id,
                "type": event.type, "source": event.source, "aggregate_id": event.aggregate_id, "time": event.time,
                "schema_version": event.schema_version, "correlation_id": event.correlation_id,
                "traceparent": event.traceparent, "payload": event.payload}) + b"\n")
            printed += 1
        sys.stdout.flush()
        if args.max is not None and printed >= args.max:
            consumer.stop()

    consumer = EventConsumer(config, args.topics, show, registry=None)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, consumer.stop)
    await consumer.run()
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from spina_fast.events import (
        ConsumerConfig,
        Event,
        EventConsumer,
        EventProducer,
        ProducerConfig,
        TopicAdmin,
        TopicSpec,
    )

    if args.events < 1000 or args.payload_bytes < 16:
        raise InvalidRequest("--events must be >= 1000 and --payload-bytes >= 16")
    admin = TopicAdmin(args.bootstrap)
    topic = f"spina.bench{uuid.uuid4().hex[:10]}.measured"
    admin.ensure([TopicSpec(topic, partitions=16)])
    done = asyncio.Event()
    consumed = 0

    def count(events: list[Event]) -> None:
        nonlocal consumed
        consumed += len(events)
        if consumed >= args.events:
            done.set()

    consumer = EventConsumer(ConsumerConfig(args.bootstrap, f"bench-{topic}"), [topic], count, registry=None)
    consuming = asyncio.create_task(consumer.run())
    payload = {"pad": "x" * max(0, args.payload_bytes - 10)}
    try:
        while not consumer.assigned:
            if consuming.done():
                await consuming
            await asyncio.sleep(0.01)
        async with EventProducer(ProducerConfig(args.bootstrap, source="spina-bench")) as producer:
            start = time.perf_counter()
            pending = []
            for first in range(0, args.events, 1000):
                batch = [(f"agg-{i % 1000}", payload) for i in range(first, min(first + 1000, args.events))]
                pending.append(await producer.submit_batch(topic, batch))
                if len(pending) > 64:
                    (await pending.pop(0)).raise_for_failures()
            for future in pending:
                (await future).raise_for_failures()
            produced = time.perf_counter() - start
        await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
    finally:
        consumer.stop()
        await consuming
        admin.delete([topic, f"{topic}.dlq"])
    print(f"{args.events:,} events, {args.payload_bytes}-byte payloads, one process: "
          f"produced (acknowledged) at {args.events / produced:,.0f}/s, end to end {args.events / elapsed:,.0f}/s")
    print("(producer and consumer share this process's GIL; benchmarks/events.py runs them apart "
          "and beside raw confluent-kafka)")
    return 0
