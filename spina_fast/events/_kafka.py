"""What the producer and consumer share: waiting for a reachable cluster, KafkaError helpers."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from spina_fast.errors import Unavailable

log = logging.getLogger("spina_fast.events")


def kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


async def wait_for_cluster(client: Any, bootstrap_servers: str, timeout_s: float) -> Any:
    """The cluster's metadata, asking again with backoff until ``timeout_s``: a broker that is still
    starting (or restarting) is waited for, one that never answers is a clear Unavailable error."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    attempts = 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            return await loop.run_in_executor(None, functools.partial(client.list_topics,
                                                                      timeout=max(0.5, min(2.0, remaining))))
        except KafkaException as exc:
            last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"no Kafka broker answered at {bootstrap_servers} within {timeout_s:g}s "
                              f"({attempts} attempts; last error: {last_error}); is Kafka running there?")
        if attempts == 1:
            log.warning("Kafka at %s not reachable yet, retrying for up to %.0fs: %s", bootstrap_servers,
                        remaining, last_error)
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 1.0)
