"""A consumer process for the crash test: ``python -m tests.events.consumer_child BOOTSTRAP TOPIC GROUP OUT BATCH``.

Handles batches with Spina's pipeline and appends ``aggregate seq partition offset`` per event to OUT (flushed
per event, so a SIGKILL loses nothing the handler wrote). SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from spina_fast.events import ConsumerConfig, Event, EventConsumer


async def main(bootstrap: str, topic: str, group: str, out_path: str, max_batch: int) -> None:
    with open(out_path, "a", buffering=1) as out:

        def handle(events: list[Event]) -> None:
            for event in events:
                out.write(f"{event.aggregate_id} {event.payload['seq']} {event.partition} {event.offset}\n")
                out.flush()

        config = ConsumerConfig(bootstrap, group, max_batch=max_batch, group_instance_id=f"{group}-member",
                                session_timeout_ms=10_000, poll_timeout_s=0.1)
        consumer = EventConsumer(config, [topic], handle, registry=None)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
        await consumer.run()


if __name__ == "__main__":
    bootstrap, topic, group, out_path, max_batch = sys.argv[1:6]
    uvloop.run(main(bootstrap, topic, group, out_path, int(max_batch)))
