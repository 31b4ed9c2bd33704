"""Topic names by convention, retention classes, and provisioning through the Kafka AdminClient.

Existing topics are compared with what they should be and differences are *reported*: changing
retention or partition counts of a live topic loses data or breaks per-key ordering, so that stays a
human decision.
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from spina_fast.errors import InvalidRequest, NotFound, Unavailable

TOPIC_FORM = "<context>.<aggregate>.<event>"
_PART = r"[a-z][a-z0-9_-]{0,62}"
_TOPIC_RE = re.compile(rf"^{_PART}\.{_PART}\.{_PART}$")
DLQ_SUFFIX = ".dlq"

# One partition per this many events/s of expected traffic: a partition is consumed by one consumer
# at a time, and one Python consumer process handles roughly this much with a light handler.
EVENTS_PER_PARTITION = 10_000
DEFAULT_PARTITIONS = 6
MAX_PARTITIONS = 256
# Cluster mode (>= 3 brokers): survive one broker down with acks=all still accepted.
CLUSTER_REPLICATION_FACTOR = 3
CLUSTER_MIN_INSYNC_REPLICAS = 2

_WEEK_MS = 7 * 24 * 3600 * 1000


class RetentionClass(enum.StrEnum):
    DEFAULT = "default"  # deleted after 7 days
    COMPACTED = "compacted"  # the last event per key kept forever (event-sourced state)
    AUDIT = "audit"  # never deleted


RETENTION_CONFIGS: dict[RetentionClass, dict[str, str]] = {
    RetentionClass.DEFAULT: {"cleanup.policy": "delete", "retention.ms": str(_WEEK_MS)},
    RetentionClass.COMPACTED: {"cleanup.policy": "compact"},
    RetentionClass.AUDIT: {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
}


def validate_topic(name: str, *, allow_dlq: bool = False) -> str:
    """Returns ``name`` if it follows the convention, else raises InvalidRequest showing the form."""
    base = name[: -len(DLQ_SUFFIX)] if allow_dlq and name.endswith(DLQ_SUFFIX) else name
    if not isinstance(name, str) or not _TOPIC_RE.match(base):
        raise InvalidRequest(
            f"topic name {name!r} does not follow {TOPIC_FORM}: three dot-separated lower-case parts of "
            f"letters, digits, '-' or '_', each starting with a letter (e.g. 'orders.order.created')",
            field="topic")
    return name


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def partitions_for_rate(events_per_s: float) -> int:
    if events_per_s <= 0:
        raise ValueError(f"expected throughput must be positive, got {events_per_s}")
    return max(1, min(MAX_PARTITIONS, math.ceil(events_per_s / EVENTS_PER_PARTITION)))


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What a topic should look like. ``partitions`` wins over ``expected_events_per_s``."""

    name: str
    retention: RetentionClass = RetentionClass.DEFAULT
    partitions: int | None = None
    expected_events_per_s: float | None = None
    # Extra topic-level settings (e.g. segment.ms for tests); they are checked like the class's own.
    config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_topic(self.name, allow_dlq=True)
        try:
            object.__setattr__(self, "retention", RetentionClass(self.retention))
        except ValueError:
            raise ValueError(f"unknown retention class {self.retention!r}; expected one of "
                             f"{', '.join(c.value for c in RetentionClass)}") from None
        if self.partitions is not None and not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1..{MAX_PARTITIONS}, got {self.partitions}")
        if self.expected_events_per_s is not None:
            partitions_for_rate(self.expected_events_per_s)

    @property
    def partition_count(self) -> int:
        if self.partitions is not None:
            return self.partitions
        if self.expected_events_per_s is not None:
            return partitions_for_rate(self.expected_events_per_s)
        return DEFAULT_PARTITIONS

    def topic_config(self, min_insync_replicas: int) -> dict[str, str]:
        return {**RETENTION_CONFIGS[self.retention], "min.insync.replicas": str(min_insync_replicas),
                **self.config}

    def dead_letter(self) -> TopicSpec:
        """The spec of this topic's DLQ: every failure kept (never compacted away), audit topics' forever."""
        retention = RetentionClass.AUDIT if self.retention is RetentionClass.AUDIT else RetentionClass.DEFAULT
        return TopicSpec(dlq_topic(self.name), retention, partitions=1)


@dataclass(frozen=True, slots=True)
class Mismatch:
    topic: str
    setting: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.topic}: {self.setting} is {self.actual}, expected {self.expected}"


@dataclass(slots=True)
class ProvisionReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


class TopicAdmin:
    """Creates and checks topics. Replication follows the cluster: with >= 3 brokers every topic gets
    replication factor 3 and min.insync.replicas 2, on smaller (development) clusters all brokers and 1."""

    def __init__(self, bootstrap_servers: str, *, replication_factor: int | None = None,
                 min_insync_replicas: int | None = None, timeout_s: float = 30.0,
                 client_config: Mapping[str, Any] | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self._admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(client_config or {})})
        self._replication_factor = replication_factor
        self._min_insync_replicas = min_insync_replicas

    def _metadata(self) -> Any:
        try:
            return self._admin.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise Unavailable(f"Kafka at {self.bootstrap_servers} did not answer a metadata request within "
                              f"{self.timeout_s:g}s: {exc}") from exc

    def replication(self) -> tuple[int, int]:
        """(replication factor, min.insync.replicas) for new topics on this cluster."""
        if self._replication_factor is not None:
            rf = self._replication_factor
        else:
            brokers = len(self._metadata().brokers)
            rf = CLUSTER_REPLICATION_FACTOR if brokers >= CLUSTER_REPLICATION_FACTOR else max(1, brokers)
        isr = self._min_insync_replicas
        if isr is None:
            isr = CLUSTER_MIN_INSYNC_REPLICAS if rf >= CLUSTER_REPLICATION_FACTOR else 1
        return rf, isr

    def ensure(self, specs: Iterable[TopicSpec], *, with_dlq: bool = True) -> ProvisionReport:
        """Creates the missing topics (and their ``.dlq`` topics) and reports existing ones that differ."""
        wanted: list[TopicSpec] = []
        for spec in specs:
            wanted.append(spec)
            if with_dlq and not spec.name.endswith(DLQ_SUFFIX):
                wanted.append(spec.dead_letter())
        rf, isr = self.replication()
        existing = set(self._metadata().topics)
        report = ProvisionReport()
        new = [NewTopic(s.name, s.partition_count, rf, config=s.topic_config(isr))
               for s in wanted if s.name not in existing]
        if new:
            for name, future in self._admin.create_topics(new, request_timeout=self.timeout_s).items():
                try:
                    future.result()
                    report.created.append(name)
                except KafkaException as exc:
                    error = _kafka_error(exc)
                    if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise Unavailable(f"could not create topic {name!r}: {exc}") from exc
                    existing.add(name)  # created concurrently by someone else: check it like the others
        if report.created:
            self._wait_until_visible(report.created)
        checked = [s for s in wanted if s.name in existing]
        report.mismatches.extend(self.check(checked, replication=(rf, isr)))
        bad = {m.topic for m in report.mismatches}
        report.unchanged.extend(s.name for s in checked if s.name not in bad)
        return report

    def _wait_until_visible(self, names: list[str]) -> None:
        """A new topic reaches every broker's metadata a moment after the controller created it; until then a
        broker answers UNKNOWN_TOPIC_OR_PART. Returns once the cluster describes all of ``names``."""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        while True:
            try:
                self.describe(names)
                return
            except NotFound:
                if time.monotonic() > deadline:
                    raise Unavailable(f"topics {', '.join(names)} were created but are still unknown to the "
                                      f"cluster after {self.timeout_s:g}s") from None
            time.sleep(delay)  # a broker-side propagation with no event to wait on
            delay = min(delay * 2, 1.0)

    def check(self, specs: Iterable[TopicSpec], *, replication: tuple[int, int] | None = None) -> list[Mismatch]:
        """Differences between the broker's topics and ``specs``; a missing topic raises NotFound."""
        specs = list(specs)
        if not specs:
            return []
        rf, isr = replication or self.replication()
        metadata = self._metadata().topics
        missing = [s.name for s in specs if s.name not in metadata]
        if missing:
            raise NotFound(f"topic(s) {', '.join(missing)} do not exist")
        configs = self.describe([s.name for s in specs])
        mismatches: list[Mismatch] = []
        for spec in specs:
            partitions = metadata[spec.name].partitions
            if len(partitions) != spec.partition_count:
                mismatches.append(Mismatch(spec.name, "partitions", str(spec.partition_count), str(len(partitions))))
            actual_rf = min((len(p.replicas) for p in partitions.values()), default=0)
            if actual_rf != rf:
                mismatches.append(Mismatch(spec.name, "replication.factor", str(rf), str(actual_rf)))
            actual = configs[spec.name]
            for key, value in spec.topic_config(isr).items():
                if actual.get(key) != value:
                    mismatches.append(Mismatch(spec.name, key, value, str(actual.get(key))))
        return mismatches

    def describe(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """Each topic's effective configuration (``describe_configs``), as plain strings."""
        resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
        if not resources:
            return {}
        result: dict[str, dict[str, str]] = {}
        for resource, future in self._admin.describe_configs(resources, request_timeout=self.timeout_s).items():
            try:
                entries = future.result()
            except KafkaException as exc:
                error = _kafka_error(exc)
                if error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise NotFound(f"topic {resource.name!r} does not exist") from exc
                raise Unavailable(f"could not describe topic {resource.name!r}: {exc}") from exc
            result[resource.name] = {key: entry.value for key, entry in entries.items() if entry.value is not None}
        return result

    def list_topics(self) -> dict[str, int]:
        """Topic name -> partition count, internal topics left out."""
        return {name: len(t.partitions) for name, t in self._metadata().topics.items() if not name.startswith("__")}

    def delete(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        for name, future in self._admin.delete_topics(names, request_timeout=self.timeout_s).items():
            try:
                future.result()
            except KafkaException as exc:
                error = _kafka_error(exc)
                if error is None or error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise Unavailable(f"could not delete topic {name!r}: {exc}") from exc
