"""The registry as plain Python: the model the Cython store is tested against, and its benchmark peer.

Straightforward on purpose (dicts of dataclasses, list filters, ``sorted`` with a key) and written
without the store's code: its own SemVer and range parsing, its own ordering. It trusts its input: the
property tests give it only registrations the store accepted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

VersionKey = tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]

_ACCEPTED = {"any": ("passing", "warning", "critical"), "healthy": ("passing", "warning"), "passing": ("passing",)}
_OPERATORS = (">=", "<=", "!=", "==", ">", "<", "=", "^", "~")   # longest first, so ">=" is not read as ">"
_LOWEST_PRERELEASE: tuple[tuple[int, int | str], ...] = ((0, 0),)


def version_key(text: str) -> VersionKey:
    """SemVer precedence as a tuple: (major, minor, patch, 1 for a release / 0 for a prerelease, identifiers)."""
    body = text[1:] if text.startswith("v") else text
    body = body.split("+", 1)[0]
    core, dash, prerelease = body.partition("-")
    numbers = [int(part) for part in core.split(".")] + [0, 0]
    if not dash:
        return (numbers[0], numbers[1], numbers[2], 1, ())
    identifiers = tuple((0, int(part)) if part.isdigit() else (1, part) for part in prerelease.split("."))
    return (numbers[0], numbers[1], numbers[2], 0, identifiers)


def range_bounds(text: str) -> list[tuple[str, VersionKey]]:
    """``>=1.2,<2.0`` as [(operator, key)], with ``^`` / ``~`` expanded and ``<X`` below X's prereleases."""
    bounds: list[tuple[str, VersionKey]] = []
    for piece in text.split(","):
        piece = piece.strip()
        operator = next((candidate for candidate in _OPERATORS if piece.startswith(candidate)), "=")
        version = piece[len(operator):].strip() if piece.startswith(operator) else piece
        key = version_key(version)
        given = len(version.lstrip("v").split("+")[0].split("-")[0].split("."))
        if operator in ("^", "~"):
            major, minor, patch = key[0], key[1], key[2]
            if operator == "~":
                upper = (major + 1, 0, 0) if given == 1 else (major, minor + 1, 0)
            elif major > 0 or given == 1:
                upper = (major + 1, 0, 0)
            elif minor > 0 or given == 2:
                upper = (0, minor + 1, 0)
            else:
                upper = (0, 0, patch + 1)
            bounds.append((">=", key))
            bounds.append(("<", (upper[0], upper[1], upper[2], 0, _LOWEST_PRERELEASE)))
        elif operator == "<" and key[3] == 1:
            bounds.append(("<", (key[0], key[1], key[2], 0, _LOWEST_PRERELEASE)))
        else:
            bounds.append(("==" if operator == "=" else operator, key))
    return bounds


def admits(bounds: list[tuple[str, VersionKey]], key: VersionKey) -> bool:
    for operator, bound in bounds:
        holds = {"==": key == bound, "!=": key != bound, "<": key < bound, "<=": key <= bound,
                 ">": key > bound, ">=": key >= bound}[operator]
        if not holds:
            return False
    return True


@dataclass(slots=True)
class ReferenceInstance:
    service: str
    instance_id: str
    address: str
    packed_address: bytes
    port: int
    version: str
    version_key: VersionKey | None
    api_versions: tuple[str, ...]
    weight: int
    max_load: int
    load: int
    zone: str
    region: str
    tags: tuple[str, ...]
    meta: dict[str, str]
    status: str
    check_ttl_ms: int = 0
    deregister_after_ms: int = 0
    create_index: int = 0
    modify_index: int = 0

    def replicated(self) -> tuple[object, ...]:
        """The registered content: everything but the leader-local load and the indexes."""
        return (self.packed_address, self.version, self.api_versions, self.weight, self.max_load, self.zone,
                self.region, self.tags, self.meta, self.status, self.check_ttl_ms, self.deregister_after_ms)


class ReferenceRegistry:
    def __init__(self) -> None:
        self._services: dict[str, dict[str, ReferenceInstance]] = {}
        self._modify_index: dict[str, int] = {}
        self.index = 0
        self.removed_index = 0

    def _check_index(self, index: int) -> None:
        if index < 1 or index < self.index:
            raise ValueError(f"index {index} is 0 or older than {self.index}")

    def _changed(self, index: int, service: str) -> bool:
        self._modify_index[service] = index
        self.index = index
        return True

    def register(self, index: int, service: str, instance_id: str | None, address: str, port: int | None, *,
                 version: str = "", api_versions: Iterable[str] = (), weight: int = 1, max_load: int = 0,
                 zone: str = "", region: str = "", tags: Iterable[str] = (), meta: Mapping[str, str] | None = None,
                 status: str = "passing", check_ttl_ms: int = 0, deregister_after_ms: int = 0) -> bool:
        self._check_index(index)
        if port is None:
            raise ValueError("port is missing")
        instance_id = instance_id or service
        owner = self.owner_of(instance_id)
        if owner is not None and owner != service:
            # Instance ids are unique across services: registering one elsewhere moves it.
            self.deregister(index, owner, instance_id)
        packed = ipaddress.ip_address(address).packed + port.to_bytes(2, "big")
        instance = ReferenceInstance(
            service=service, instance_id=instance_id, address=address, packed_address=packed, port=port,
            version=version, version_key=version_key(version) if version else None,
            api_versions=tuple(sorted(set(api_versions))), weight=weight, max_load=max_load, load=0, zone=zone,
            region=region, tags=tuple(dict.fromkeys(tags)), meta=dict(sorted((meta or {}).items())), status=status,
            check_ttl_ms=check_ttl_ms, deregister_after_ms=deregister_after_ms, create_index=index,
            modify_index=index)
        instances = self._services.setdefault(service, {})
        held = instances.get(instance_id)
        if held is not None:
            if held.replicated() == instance.replicated():
                return False
            instance.load = held.load
            instance.create_index = held.create_index
        instances[instance_id] = instance
        return self._changed(index, service)

    def deregister(self, index: int, service: str, instance_id: str) -> bool:
        self._check_index(index)
        instances = self._services.get(service, {})
        if instances.pop(instance_id, None) is None:
            return False
        if instances:
            return self._changed(index, service)
        del self._services[service]
        del self._modify_index[service]
        self.removed_index = self.index = index
        return True

    def set_status(self, index: int, service: str, instance_id: str, status: str) -> bool:
        self._check_index(index)
        held = self._services.get(service, {}).get(instance_id)
        if held is None or held.status == status:
            return False
        held.status = status
        held.modify_index = index
        return self._changed(index, service)

    def report_load(self, service: str, instance_id: str, load: int) -> bool:
        held = self._services.get(service, {}).get(instance_id)
        if held is None:
            return False
        held.load = load
        return True

    def instances(self, service: str, *, health: str = "any", tags: Iterable[str] = (), version: str | None = None,
                  api_version: str | None = None, near_zone: str | None = None, near_region: str | None = None,
                  by_load: bool = False, limit: int = 0) -> list[ReferenceInstance]:
        accepted = _ACCEPTED[health]
        bounds = range_bounds(version) if version is not None else None
        wanted = list(tags)
        found = [
            instance for instance in self._services.get(service, {}).values()
            if instance.status in accepted
            and all(tag in instance.tags for tag in wanted)
            and (bounds is None or (instance.version_key is not None and admits(bounds, instance.version_key)))
            and (not api_version or api_version in instance.api_versions)
        ]

        def order(instance: ReferenceInstance) -> tuple[int, int, str]:
            tier = 0
            if near_zone or near_region:
                tier = 0 if near_zone and instance.zone == near_zone else \
                    1 if near_region and instance.region == near_region else 2
            free = max(instance.max_load - instance.load, 0) * instance.weight if by_load else 0
            return (tier, -free, instance.instance_id)

        found.sort(key=order)
        return found[:limit] if limit else found

    def owner_of(self, instance_id: str) -> str | None:
        return next((name for name, instances in self._services.items() if instance_id in instances), None)

    def get(self, service: str, instance_id: str) -> ReferenceInstance | None:
        return self._services.get(service, {}).get(instance_id)

    def services(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(sorted({tag for instance in self._services[name].values() for tag in instance.tags}))
                for name in sorted(self._services)}

    def service_index(self, service: str) -> int:
        return self._modify_index.get(service, self.removed_index)

    def all_instances(self) -> list[ReferenceInstance]:
        return [instance for name in sorted(self._services)
                for _, instance in sorted(self._services[name].items())]

    def __len__(self) -> int:
        return sum(len(instances) for instances in self._services.values())
