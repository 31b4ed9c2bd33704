"""Prometheus service discovery from the registry: ``GET /v1/spina/prometheus/sd``.

The answer is in the ``http_sd_configs`` format (https://prometheus.io/docs/prometheus/latest/http_sd/):
a JSON list of target groups ``{"targets": ["host:port", ...], "labels": {...}}``. Targets are the
healthy (passing or warning) instances; instances of a service whose labels are equal share one group,
so a service whose instances carry the same metadata is one group. Labels of each group:

- ``__meta_spina_service``, ``__meta_spina_tags`` (Consul's ``,a,b,`` form, so ``regex: .*,critical,.*``
  works as with ``__meta_consul_tags``), ``__meta_spina_zone``, ``__meta_spina_region``,
  ``__meta_spina_version``, ``__meta_spina_health`` (passing or warning);
- ``__meta_spina_meta_<key>`` per meta pair, the key sanitized to a Prometheus label name (every character
  outside ``[a-zA-Z0-9_]`` becomes ``_``; when two keys sanitize alike, the first in sorted order wins);
- ``__scrape_interval__`` / ``__scrape_timeout__``: 15s / 10s, and 5s / 5s for an instance tagged
  ``critical``. Prometheus (since 2.30, so also Debian's 2.42) takes a target's scrape interval and timeout
  from these labels when the discovery sets them, and drops a target whose timeout exceeds its interval,
  which is why the timeout is always sent as well.

``?service=NAME`` (repeatable) keeps only those services. Blocking queries as on the Consul endpoints:
``?index=N&wait=D`` waits while the index (that service's with one ``?service``, else the catalog's) is
still <= N; ``X-Consul-Index`` carries it. Answers are cached as bytes (``SDCache``): between changes a
poll costs a dictionary lookup, and a change re-encodes only the services it touched.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from spina_fast.api.kv import apply_consistency, read_headers
from spina_fast.api.registry import Query, block
from spina_fast.api.responses import AGENT_KEY, JSON, Reply, web_response
from spina_fast.errors import InvalidRequest
from spina_fast.registry.watch import CATALOG

if TYPE_CHECKING:
    from spina_fast._registry import InstanceView, RegistryStore
    from spina_fast.agent import Agent

ROUTE = "/v1/spina/prometheus/sd"
CRITICAL_TAG = "critical"
# (interval, timeout) as Prometheus durations; a timeout above its interval makes Prometheus drop the target.
NORMAL_SCRAPE = ("15s", "10s")
CRITICAL_SCRAPE = ("5s", "5s")
META_PREFIX = "__meta_spina_"
SCRAPE_INTERVAL_LABEL = "__scrape_interval__"
SCRAPE_TIMEOUT_LABEL = "__scrape_timeout__"
MAX_CACHED_FILTERS = 256
_INVALID_LABEL_CHARACTERS = re.compile(r"[^a-zA-Z0-9_]")

Labels = dict[str, str]
TargetGroup = dict[str, Any]  # {"targets": [str, ...], "labels": Labels}


def scrape_settings(tags: Iterable[str]) -> tuple[str, str]:
    """(scrape interval, scrape timeout) of an instance with these tags."""
    return CRITICAL_SCRAPE if CRITICAL_TAG in tags else NORMAL_SCRAPE


def label_name(text: str) -> str:
    """``text`` as the tail of a Prometheus label name (Prometheus 2.x accepts only ``[a-zA-Z0-9_]``)."""
    return _INVALID_LABEL_CHARACTERS.sub("_", text)


def target_address(view: InstanceView) -> str:
    address = view.address
    return f"[{address}]:{view.port}" if ":" in address else f"{address}:{view.port}"


def instance_labels(view: InstanceView) -> Labels:
    tags = view.tags
    interval, timeout = scrape_settings(tags)
    labels = {
        f"{META_PREFIX}service": view.service,
        # Consul's form: separator-wrapped, so a tag matches as ".*,tag,.*" without partial hits.
        f"{META_PREFIX}tags": "," + ",".join(tags) + ",",
        f"{META_PREFIX}zone": view.zone,
        f"{META_PREFIX}region": view.region,
        f"{META_PREFIX}version": view.version,
        f"{META_PREFIX}health": view.status,
    }
    meta = view.meta
    for key in sorted(meta):
        labels.setdefault(f"{META_PREFIX}meta_{label_name(key)}", meta[key])
    labels[SCRAPE_INTERVAL_LABEL] = interval
    labels[SCRAPE_TIMEOUT_LABEL] = timeout
    return labels


def service_groups(registry: RegistryStore, service: str) -> list[TargetGroup]:
    """One service's target groups: one per distinct label set, targets in registry order."""
    by_labels: dict[tuple[tuple[str, str], ...], TargetGroup] = {}
    for view in registry.instances(service, health="healthy"):
        labels = instance_labels(view)
        key = tuple(sorted(labels.items()))
        group = by_labels.get(key)
        if group is None:
            group = by_labels[key] = {"targets": [], "labels": labels}
        group["targets"].append(target_address(view))
    return list(by_labels.values())


def target_groups(registry: RegistryStore, services: Iterable[str] | None = None) -> list[TargetGroup]:
    """The http_sd document: the groups of every service (or of ``services``), services in sorted order."""
    names = sorted(registry.services()) if services is None else sorted(set(services))
    return [group for name in names for group in service_groups(registry, name)]


def _requested_services(query: Query) -> list[str] | None:
    if "service" not in query:
        return None
    names = query.getall("service")
    if not all(names):
        raise InvalidRequest("service must name a service (?service=NAME, repeatable)", field="service")
    return names


def _index(registry: RegistryStore, watched: str) -> int:
    # Never 0, as Consul clients treat 0 as "no blocking index" (the same rule as api/registry.py).
    return max(registry.index if watched == CATALOG else registry.service_index(watched), 1)


class SDCache:
    """Encoded answers, rebuilt only where the registry changed.

    Each service's groups are encoded once per change of that service (its own index), and a whole answer
    is the join of those pieces, kept per service filter until the registry's index moves. So after one
    change among 10,000 services a poll re-encodes one service, not all; and a first build yields to the
    event loop every ``YIELD_EVERY`` services, so lookups on the same loop keep flowing meanwhile.
    """

    YIELD_EVERY = 256

    def __init__(self) -> None:
        self._services: dict[str, tuple[int, bytes]] = {}
        self._answers: dict[tuple[str, ...] | None, tuple[int, bytes]] = {}

    def _service_piece(self, registry: RegistryStore, service: str) -> bytes:
        index = registry.service_index(service)
        cached = self._services.get(service)
        if cached is not None and cached[0] == index:
            return cached[1]
        piece = orjson.dumps(service_groups(registry, service))[1:-1]  # the groups without the list's brackets
        self._services[service] = (index, piece)
        return piece

    async def body(self, registry: RegistryStore, services: list[str] | None) -> bytes:
        key = None if services is None else tuple(sorted(set(services)))
        index = registry.index
        cached = self._answers.get(key)
        if cached is not None and cached[0] == index:
            return cached[1]
        present = registry.services()
        names = sorted(present) if key is None else [name for name in key if name in present]
        pieces = []
        for position, name in enumerate(names, 1):
            piece = self._service_piece(registry, name)
            if piece:
                pieces.append(piece)
            if position % self.YIELD_EVERY == 0:
                await asyncio.sleep(0)
        body = b"[" + b",".join(pieces) + b"]"
        if key is None:
            # A full answer saw every service: forget the pieces of services that are gone.
            for name in [name for name in self._services if name not in present]:
                del self._services[name]
        if len(self._answers) >= MAX_CACHED_FILTERS:
            self._answers.clear()  # filters are few (one per Prometheus job); this only bounds a misuse
        # Stored at the index read before building: a change while it was built makes the next poll rebuild.
        self._answers[key] = (index, body)
        return body


def watched_service(query: Query) -> str:
    """What a blocking query on this request waits for: the one requested service, else the whole catalog."""
    services = _requested_services(query)
    return services[0] if services is not None and len(set(services)) == 1 else CATALOG


async def sd_reply(agent: Agent, query: Query, cache: SDCache) -> Reply:
    body = await cache.body(agent.state.registry, _requested_services(query))
    headers = read_headers(agent.node)
    headers["X-Consul-Index"] = str(_index(agent.state.registry, watched_service(query)))
    return Reply(200, body, JSON, headers)


_CACHE_KEY: web.AppKey[SDCache] = web.AppKey("prometheus_sd_cache", SDCache)


async def _sd(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    query = request.query
    await block(agent, query, watched_service(query))
    await apply_consistency(agent.node, query)
    return web_response(await sd_reply(agent, query, request.app[_CACHE_KEY]))


def add_routes(app: web.Application) -> None:
    app[_CACHE_KEY] = SDCache()
    app.router.add_get(ROUTE, _sd)


__all__ = ["CRITICAL_SCRAPE", "CRITICAL_TAG", "NORMAL_SCRAPE", "ROUTE", "add_routes", "instance_labels",
           "label_name", "scrape_settings", "service_groups", "target_groups"]
