"""The registry's data on the Python side: one registration as plain data, the comparable content of an
answered instance (whichever store answered it), and a seeded workload of typical registrations.

The compact store itself is ``spina_fast._registry.RegistryStore``; its plain-Python twin is
``spina_fast.registry.reference.ReferenceRegistry``. Both take registrations through the same
``register(index, service, instance_id, address, port, **options)`` call.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from spina_fast._registry import encode_register

if TYPE_CHECKING:
    from spina_fast._registry import Status


class Registrar(Protocol):
    def register(self, index: int, service: str, instance_id: str | None, address: str, port: int | None, *,
                 version: str = "", api_versions: Any = (), weight: int = 1, max_load: int = 0, zone: str = "",
                 region: str = "", tags: Any = (), meta: Mapping[str, str] | None = None,
                 status: Status = "passing", check_ttl_ms: int = 0, deregister_after_ms: int = 0) -> bool: ...


class InstanceLike(Protocol):
    """What a query answers per instance: the store's InstanceView and the reference's instances alike."""

    @property
    def service(self) -> str: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def packed_address(self) -> bytes: ...

    @property
    def port(self) -> int: ...

    @property
    def version(self) -> str: ...

    @property
    def api_versions(self) -> tuple[str, ...]: ...

    @property
    def weight(self) -> int: ...

    @property
    def max_load(self) -> int: ...

    @property
    def load(self) -> int: ...

    @property
    def zone(self) -> str: ...

    @property
    def region(self) -> str: ...

    @property
    def tags(self) -> tuple[str, ...]: ...

    @property
    def meta(self) -> dict[str, str]: ...

    @property
    def status(self) -> str: ...

    @property
    def check_ttl_ms(self) -> int: ...

    @property
    def deregister_after_ms(self) -> int: ...

    @property
    def create_index(self) -> int: ...

    @property
    def modify_index(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Registration:
    """One instance's registration as given by the service (before validation)."""

    service: str
    instance_id: str
    address: str
    port: int
    version: str = ""
    api_versions: tuple[str, ...] = ()
    weight: int = 1
    max_load: int = 0
    zone: str = ""
    region: str = ""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    status: Status = "passing"
    check_ttl_ms: int = 0
    deregister_after_ms: int = 0

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``register`` beyond service, instance id, address and port."""
        return {
            "version": self.version, "api_versions": self.api_versions, "weight": self.weight,
            "max_load": self.max_load, "zone": self.zone, "region": self.region, "tags": self.tags,
            "meta": self.meta, "status": self.status, "check_ttl_ms": self.check_ttl_ms,
            "deregister_after_ms": self.deregister_after_ms,
        }

    def document(self) -> dict[str, Any]:
        """Every field by its ``register`` keyword, as a JSON body would carry it."""
        return {"service": self.service, "instance_id": self.instance_id, "address": self.address,
                "port": self.port, **self.options()}

    def register_into(self, registry: Registrar, index: int) -> bool:
        return registry.register(index, self.service, self.instance_id, self.address, self.port, **self.options())

    def encode(self) -> bytes:
        return encode_register(self.service, self.instance_id, self.address, self.port, **self.options())


def describe(instance: InstanceLike) -> tuple[Any, ...]:
    """The comparable content of an answered instance (the address compared in its packed form)."""
    return (instance.service, instance.instance_id, instance.packed_address, instance.port, instance.version,
            instance.api_versions, instance.weight, instance.max_load, instance.load, instance.zone,
            instance.region, instance.tags, tuple(sorted(instance.meta.items())), instance.status,
            instance.check_ttl_ms, instance.deregister_after_ms, instance.create_index, instance.modify_index)


# --- a seeded workload of typical registrations --------------------------------------------------------

REGIONS = ("eu-central-1", "us-east-1")
ZONES = (("eu-central-1a", "eu-central-1"), ("eu-central-1b", "eu-central-1"), ("us-east-1a", "us-east-1"))
API_VERSIONS = ("v1", "v2", "v3", "v1beta1", "v2alpha1")
META_KEYS = ("team", "owner", "git_sha", "build", "env", "tier", "language", "framework", "protocol",
             "cost_center")
_TAG_WORDS = ("primary", "secondary", "canary", "stable", "blue", "green", "http", "grpc", "tls", "metrics",
              "internal", "public", "batch", "stream", "cache", "db", "queue", "edge", "gpu", "arm64")
_NAME_WORDS = ("payments", "orders", "users", "search", "catalog", "billing", "auth", "ledger", "notify",
               "inventory", "pricing", "shipping", "reviews", "media", "gateway", "reports")
_NAME_KINDS = ("api", "worker", "svc", "grpc", "consumer")


def _vocabulary(rng: random.Random) -> tuple[list[str], list[str]]:
    tags = list(_TAG_WORDS) + [f"{word}-{rng.randrange(100)}" for word in rng.sample(_TAG_WORDS, 10)] * 3
    tags = sorted(set(tags))[:50]
    values = [f"{rng.choice(_NAME_WORDS)}-{rng.getrandbits(24):06x}" for _ in range(200)]
    return tags, values


def sample_registrations(count: int, *, seed: int = 1, per_service: int = 10,
                         skewed: bool = False) -> Iterator[Registration]:
    """``count`` typical registrations over ``count // per_service`` services, seeded.

    Each: 4 tags of ~50, 4 meta pairs (keys of 10, values of 200), a version, 2 API versions, a zone of 3
    in one of 2 regions, weight and capacity, a pod-like instance id; 1 in 10 on IPv6, a few warning or
    critical. ``skewed`` spreads instances over services unevenly (a few big services, many small), as a
    real catalog does; otherwise every service holds ``per_service`` instances.
    """
    rng = random.Random(seed)
    tags, values = _vocabulary(rng)
    services = max(1, count // per_service)
    names = [f"{rng.choice(_NAME_WORDS)}-{rng.choice(_NAME_KINDS)}-{number:05d}" for number in range(services)]
    versions = [(f"{rng.randrange(4)}.{rng.randrange(12)}.{rng.randrange(10)}",
                 f"{rng.randrange(4)}.{rng.randrange(12)}.{rng.randrange(10)}") for _ in range(services)]
    if skewed:
        weights = [rng.paretovariate(1.2) for _ in range(services)]
        owners = list(range(services)) + rng.choices(range(services), weights, k=max(0, count - services))
        owners = owners[:count]
        owners.sort()
    else:
        owners = [number % services for number in range(count)]
        owners.sort()
    for number, owner in enumerate(owners):
        zone, region = rng.choice(ZONES)
        address = f"fd00::{number >> 16:x}:{number & 0xFFFF:x}" if rng.random() < 0.1 else \
            f"10.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"
        roll = rng.random()
        yield Registration(
            service=names[owner],
            instance_id=f"{names[owner]}-{rng.getrandbits(40):010x}",
            address=address,
            port=rng.choice((80, 443, 3000, 5000, 8080, 8443, 9090)),
            version=rng.choice(versions[owner]),
            api_versions=tuple(rng.sample(API_VERSIONS, 2)),
            weight=rng.choice((1, 1, 1, 2, 5, 10)),
            max_load=rng.choice((100, 200, 500, 1000)),
            zone=zone,
            region=region,
            tags=tuple(rng.sample(tags, 4)),
            meta={key: rng.choice(values) for key in rng.sample(META_KEYS, 4)},
            status="critical" if roll < 0.03 else "warning" if roll < 0.08 else "passing",
        )
