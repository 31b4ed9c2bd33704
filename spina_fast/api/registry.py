"""Service registry over HTTP: the Consul agent / catalog / health endpoints and Spina's native ones.

Consul-compatible (``../shared/DESIGN.md`` §3):

- ``PUT /v1/agent/service/register``  Name, ID, Address, Port, Tags, Meta, Weights, Check / Checks
  (TTL, DeregisterCriticalServiceAfter, Status). As in Consul a TTL check starts ``critical`` unless its
  Status says otherwise, and a service without checks is ``passing``. A missing Address means the
  caller's address. Extensions Consul ignores: Version, APIVersions, Zone, Region, MaxLoad.
- ``PUT /v1/agent/service/deregister/<id>``
- ``PUT /v1/agent/check/pass|warn|fail/<check-id>`` and ``PUT /v1/agent/check/update/<check-id>``
  (``{"Status", "Output"}``): the heartbeats. A service's one check is ``service:<id>``.
- ``GET /v1/agent/services``, ``GET /v1/catalog/services``, ``GET /v1/catalog/service/<name>``,
  ``GET /v1/health/service/<name>`` (``?passing``, repeated ``?tag=``).

Native (``/v1/spina/services``):

- ``PUT /v1/spina/services/register``  one registration or a list, snake_case fields
  (service, instance_id, address, port, version, api_versions, weight, max_load, zone, region, tags,
  meta, status, ttl, deregister_after) in ONE Raft entry: all are validated first, and a bad one fails
  the request (400 naming the item and field) with nothing stored. ``ttl`` defaults to 30 s (three
  10-second heartbeats), ``deregister_after`` to 3 minutes.
- ``PUT /v1/spina/services/heartbeat/<instance-id>?status=&load=``  the native heartbeat, with load.
- ``GET /v1/spina/services/<name>?health=any|healthy|passing&tag=..&version=>=1.2,<2&api_version=
  &zone=&region=&by_load&limit=``  the richer query, in a stable order.

Every GET blocks with ``?index=N&wait=D``; ``X-Consul-Index`` is the service's own modify index (the
catalog's for the catalog), never 0 and never going backwards. Heartbeats are leader-local leases
(``registry/leases.py``): a follower forwards them to the leader's HTTP address, which it finds in the
catalog under the ``spina`` service that every agent registers for itself.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web
from multidict import MultiDict, MultiMapping

from spina_fast.api.kv import apply_consistency, parse_uint, parse_wait, read_headers
from spina_fast.api.responses import AGENT_KEY, JSON, Reply, json_reply, web_response
from spina_fast.errors import InvalidRequest, NotFound, NotLeader, Unavailable
from spina_fast.registry import STATUSES, InstanceView, InvalidRegistration, encode_deregister, encode_register
from spina_fast.registry.watch import CATALOG
from spina_fast.state import encode_registry_batch

if TYPE_CHECKING:
    from spina_fast._registry import Health, Status
    from spina_fast.agent import Agent

SERVER_SERVICE = "spina"  # every agent registers itself under it (as Consul's servers do under "consul")
DEFAULT_TTL_MS = 30_000
DEFAULT_DEREGISTER_AFTER_MS = 180_000
MIN_DURATION_MS = 1_000
DEFAULT_WAIT_SECONDS = 300.0
MAX_BATCH_REGISTRATIONS = 10_000
FORWARDED_HEADER = "X-Spina-Forwarded"
_CHECK_STATUSES: dict[str, Status] = {"pass": "passing", "warn": "warning", "fail": "critical"}
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


# aiohttp's request.query; the fast front end builds a MultiDict the same way.
Query = MultiMapping[str]


# --- input ---------------------------------------------------------------------------------------------

def parse_duration_ms(value: object, field: str) -> int:
    """A Go duration string ("10s", "1m30s", "500ms") or a number of seconds, as whole milliseconds >= 1 s."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidRequest(f"{field} must be a duration like \"10s\" or a number of seconds", field=field)
    if isinstance(value, str):
        text = value.strip()
        position, total = 0, 0.0
        for match in _GO_DURATION.finditer(text):
            if match.start() != position:
                break
            total += float(match.group(1)) * _GO_UNITS_MS[match.group(2)]
            position = match.end()
        if not text or position != len(text):
            raise InvalidRequest(f"{field} {value!r} is not a duration like 10s, 1m30s or 500ms", field=field)
        milliseconds = total
    else:
        milliseconds = float(value) * 1000
    if milliseconds < MIN_DURATION_MS:
        raise InvalidRequest(f"{field} {value!r} is below the minimum of 1s", field=field)
    if milliseconds > 0xFFFFFFFF:
        raise InvalidRequest(f"{field} {value!r} is longer than the maximum of 49 days", field=field)
    return int(milliseconds)


def _text(document: Mapping[str, Any], name: str, field: str, default: str = "") -> str:
    value = document.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string, not {type(value).__name__}", field=field)
    return value


def _strings(document: Mapping[str, Any], name: str, field: str) -> list[str]:
    value = document.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest(f"{field} must be a list of strings", field=field)
    return value


def _string_map(document: Mapping[str, Any], name: str, field: str) -> dict[str, str]:
    value = document.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise InvalidRequest(f"{field} must be an object of string values", field=field)
    return value


def _integer(document: Mapping[str, Any], name: str, field: str, default: int | None = None) -> int | None:
    value = document.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be an integer, not {value!r}", field=field)
    return value


def _address(text: str, field: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidRequest(f"{field} {text!r} is not an IPv4 or IPv6 address", field=field) from None


def _encode(field_names: Mapping[str, str], service: str, instance_id: str, address: str, port: int | None,
            **options: Any) -> bytes:
    """encode_register, with its errors named by the request's own field names."""
    try:
        return encode_register(service, instance_id, address, port, **options)
    except InvalidRegistration as exc:
        field = field_names.get(exc.field, exc.field)
        message = str(exc).replace(exc.field, field, 1) if exc.field != field else str(exc)
        raise InvalidRequest(message, field=field) from None
    except (TypeError, OverflowError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None


_CONSUL_FIELDS = {"service": "Name", "instance_id": "ID", "address": "Address", "port": "Port", "tags": "Tags",
                  "meta": "Meta", "weight": "Weights.Passing", "version": "Version", "zone": "Zone",
                  "region": "Region", "api_versions": "APIVersions", "max_load": "MaxLoad",
                  "check_ttl_ms": "Check.TTL", "deregister_after_ms": "Check.DeregisterCriticalServiceAfter"}


def _lowered(document: dict[str, Any]) -> dict[str, Any]:
    # Consul decodes bodies with Go's encoding/json, which matches field names case-insensitively
    # (py-consul sends "name", "id", "check"...); Meta keys are data and keep their case.
    return {key.lower(): value for key, value in document.items()}


def _object(document: Mapping[str, Any], name: str, field: str) -> dict[str, Any]:
    value = document.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON object", field=field)
    return _lowered(value)


def consul_registration(document: object, caller_address: str) -> bytes:
    """The register command for a Consul ``/v1/agent/service/register`` body."""
    if not isinstance(document, dict):
        raise InvalidRequest("the body must be a JSON object (a Consul service registration)")
    document = _lowered(document)
    name = _text(document, "name", "Name")
    if not name:
        raise InvalidRequest("Name is missing", field="Name")
    if document.get("port") is None:
        raise InvalidRequest("Port is missing", field="Port")
    port = _integer(document, "port", "Port")
    address = _text(document, "address", "Address") or caller_address
    weights = _object(document, "weights", "Weights")
    locality = _object(document, "locality", "Locality")
    checks = document.get("checks") or []
    if not isinstance(checks, list) or not all(isinstance(item, dict) for item in checks):
        raise InvalidRequest("Checks must be a list of objects", field="Checks")
    checks = [_lowered(item) for item in checks]
    if document.get("check") is not None:
        checks.insert(0, _object(document, "check", "Check"))
    ttl_ms = deregister_ms = 0
    status: Status = "passing"
    for item in checks:
        if item.get("ttl") is None:
            if any(item.get(kind) for kind in ("http", "tcp", "grpc", "script", "args", "dockercontainerid")):
                raise InvalidRequest("Check: only TTL checks are supported (heartbeat with /v1/agent/check/pass)",
                                     field="Check")
            continue
        ttl_ms = parse_duration_ms(item["ttl"], "Check.TTL")
        if item.get("deregistercriticalserviceafter") is not None:
            deregister_ms = parse_duration_ms(item["deregistercriticalserviceafter"],
                                              "Check.DeregisterCriticalServiceAfter")
        status = parse_status(item.get("status") or "critical", "Check.Status")
        break
    return _encode(
        _CONSUL_FIELDS, name, _text(document, "id", "ID") or name, _address(address, "Address"), port,
        tags=_strings(document, "tags", "Tags"), meta=_string_map(document, "meta", "Meta"),
        weight=_integer(weights, "passing", "Weights.Passing", 1), version=_text(document, "version", "Version"),
        zone=_text(document, "zone", "Zone") or _text(locality, "zone", "Locality.Zone"),
        region=_text(document, "region", "Region") or _text(locality, "region", "Locality.Region"),
        api_versions=_strings(document, "apiversions", "APIVersions"),
        max_load=_integer(document, "maxload", "MaxLoad", 0), status=status, check_ttl_ms=ttl_ms,
        deregister_after_ms=deregister_ms)


_NATIVE_FIELDS = {"check_ttl_ms": "ttl", "deregister_after_ms": "deregister_after"}
_NATIVE_KEYS = frozenset(("service", "instance_id", "address", "port", "version", "api_versions", "weight",
                          "max_load", "zone", "region", "tags", "meta", "status", "ttl", "deregister_after"))


def native_registration(document: object, caller_address: str) -> bytes:
    """The register command for one native registration object."""
    if not isinstance(document, dict):
        raise InvalidRequest("a registration must be a JSON object")
    unknown = sorted(set(document) - _NATIVE_KEYS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}; fields are {', '.join(sorted(_NATIVE_KEYS))}",
                             field=unknown[0])
    service = _text(document, "service", "service")
    if not service:
        raise InvalidRequest("service is missing", field="service")
    if document.get("port") is None:
        raise InvalidRequest("port is missing", field="port")
    status = parse_status(document.get("status", "passing"), "status")
    ttl = document.get("ttl")
    deregister_after = document.get("deregister_after")
    return _encode(
        _NATIVE_FIELDS, service, _text(document, "instance_id", "instance_id") or service,
        _address(_text(document, "address", "address") or caller_address, "address"),
        _integer(document, "port", "port"), version=_text(document, "version", "version"),
        api_versions=_strings(document, "api_versions", "api_versions"),
        weight=_integer(document, "weight", "weight", 1), max_load=_integer(document, "max_load", "max_load", 0),
        zone=_text(document, "zone", "zone"), region=_text(document, "region", "region"),
        tags=_strings(document, "tags", "tags"), meta=_string_map(document, "meta", "meta"), status=status,
        check_ttl_ms=DEFAULT_TTL_MS if ttl is None else parse_duration_ms(ttl, "ttl"),
        deregister_after_ms=DEFAULT_DEREGISTER_AFTER_MS if deregister_after is None
        else parse_duration_ms(deregister_after, "deregister_after"))


def parse_status(value: object, field: str) -> Status:
    if value not in STATUSES:
        raise InvalidRequest(f"{field} {value!r} is not one of {', '.join(STATUSES)}", field=field)
    return cast("Status", value)


def _load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


# --- output ---------------------------------------------------------------------------------------------

def _node_fields(agent: Agent) -> dict[str, Any]:
    config = agent.config
    address = agent.bound_raft_addr.host
    return {"ID": agent.node_uuid, "Node": config.node_id, "Address": address, "Datacenter": config.datacenter,
            "TaggedAddresses": {"lan": address, "wan": address}}


def _weights(view: InstanceView) -> dict[str, int]:
    return {"Passing": view.weight, "Warning": 1}


def agent_service(view: InstanceView) -> dict[str, Any]:
    return {"ID": view.instance_id, "Service": view.service, "Tags": list(view.tags), "Meta": view.meta,
            "Port": view.port, "Address": view.address, "Weights": _weights(view), "EnableTagOverride": False,
            "CreateIndex": view.create_index, "ModifyIndex": view.modify_index}


def catalog_service(agent: Agent, view: InstanceView) -> dict[str, Any]:
    node = _node_fields(agent)
    return {**node, "NodeMeta": {}, "ServiceKind": "", "ServiceID": view.instance_id,
            "ServiceName": view.service, "ServiceTags": list(view.tags), "ServiceAddress": view.address,
            "ServiceWeights": _weights(view), "ServiceMeta": view.meta, "ServicePort": view.port,
            "ServiceEnableTagOverride": False, "CreateIndex": view.create_index,
            "ModifyIndex": view.modify_index}


def health_entry(agent: Agent, view: InstanceView) -> dict[str, Any]:
    node = {**_node_fields(agent), "Meta": {}, "CreateIndex": 1, "ModifyIndex": 1}
    checks = [{"Node": agent.config.node_id, "CheckID": f"service:{view.instance_id}",
               "Name": f"Service '{view.service}' check", "Status": view.status, "Notes": "", "Output": "",
               "ServiceID": view.instance_id, "ServiceName": view.service, "ServiceTags": list(view.tags),
               "Type": "ttl" if view.check_ttl_ms else "", "CreateIndex": view.create_index,
               "ModifyIndex": view.modify_index}]
    return {"Node": node, "Service": agent_service(view), "Checks": checks}


def native_instance(view: InstanceView) -> dict[str, Any]:
    return {"service": view.service, "instance_id": view.instance_id, "address": view.address, "port": view.port,
            "version": view.version, "api_versions": list(view.api_versions), "weight": view.weight,
            "max_load": view.max_load, "load": view.load, "zone": view.zone, "region": view.region,
            "tags": list(view.tags), "meta": view.meta, "status": view.status,
            "ttl_ms": view.check_ttl_ms, "deregister_after_ms": view.deregister_after_ms,
            "create_index": view.create_index, "modify_index": view.modify_index}


# --- reads ------------------------------------------------------------------------------------------------

def _index_of(agent: Agent, service: str) -> int:
    registry = agent.state.registry
    return max(registry.index if service == CATALOG else registry.service_index(service), 1)


async def block(agent: Agent, query: Query, service: str) -> None:
    """Consul blocking query: with ``?index=N`` wait (up to ``?wait``, jittered) while the index is <= N."""
    wanted = parse_uint(query, "index")
    if not wanted:
        return
    wait = parse_wait(query["wait"]) if "wait" in query else DEFAULT_WAIT_SECONDS
    # Jitter like Consul (up to wait/16) so that many watchers do not come back in lockstep.
    deadline = time.monotonic() + wait + random.random() * wait / 16
    watches = agent.state.registry_watches
    while _index_of(agent, service) <= wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await watches.wait(service, remaining)


def _headers(agent: Agent, index: int) -> dict[str, str]:
    headers = read_headers(agent.node)
    headers["X-Consul-Index"] = str(index)
    return headers


async def _prepare_read(agent: Agent, query: Query, service: str) -> None:
    await block(agent, query, service)
    await apply_consistency(agent.node, query)


def _tags(query: Query) -> list[str]:
    return [tag for tag in query.getall("tag", []) if tag]


_NO_QUERY: MultiDict[str] = MultiDict()


class ResponseCache:
    """Encoded lookup answers by (endpoint, service, filter), valid while the service's index is unchanged.

    A lookup is encoded once per change of its service and then served as stored bytes; only the
    per-request headers (index, leader contact) are built each time. Bounded: the oldest half goes when full.
    """

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._entries: dict[tuple[Any, ...], tuple[int, bytes]] = {}
        self.hits = self.misses = 0

    def get(self, key: tuple[Any, ...], index: int) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] == index:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def put(self, key: tuple[Any, ...], index: int, body: bytes) -> None:
        if len(self._entries) >= self.limit:
            for stale in list(self._entries)[:self.limit // 2]:
                del self._entries[stale]
        self._entries[key] = (index, body)


# Endpoint kinds: the fast front end and the aiohttp routes both answer through ``read`` / ``get``.
HEALTH, CATALOG_SERVICE, CATALOG_SERVICES, AGENT_SERVICES, NATIVE = range(5)
ROUTES = {HEALTH: "/v1/health/service/{name}", CATALOG_SERVICE: "/v1/catalog/service/{name}",
          CATALOG_SERVICES: "/v1/catalog/services", AGENT_SERVICES: "/v1/agent/services",
          NATIVE: "/v1/spina/services/{name}"}
_HEALTH_VALUES = ("any", "healthy", "passing")


def _health_body(agent: Agent, name: str, query: Query) -> bytes:
    views = agent.state.registry.instances(name, health="passing" if "passing" in query else "any",
                                           tags=_tags(query))
    return orjson.dumps([health_entry(agent, view) for view in views])


def _catalog_service_body(agent: Agent, name: str, query: Query) -> bytes:
    views = agent.state.registry.instances(name, tags=_tags(query))
    return orjson.dumps([catalog_service(agent, view) for view in views])


def _catalog_services_body(agent: Agent) -> bytes:
    return orjson.dumps({name: list(tags) for name, tags in agent.state.registry.services().items()})


def _agent_services_body(agent: Agent) -> bytes:
    registry = agent.state.registry
    return orjson.dumps({view.instance_id: agent_service(view)
                         for name in registry.services() for view in registry.instances(name)})


def _native_body(agent: Agent, name: str, query: Query) -> bytes:
    health = query.get("health", "any")
    if health not in _HEALTH_VALUES:
        raise InvalidRequest(f"health {health!r} is not one of {', '.join(_HEALTH_VALUES)}", field="health")
    limit = parse_uint(query, "limit") or 0
    try:
        views = agent.state.registry.instances(
            name, health=cast("Health", health), tags=_tags(query), version=query.get("version") or None,
            api_version=query.get("api_version") or None, near_zone=query.get("zone") or None,
            near_region=query.get("region") or None, by_load="by_load" in query, limit=limit)
    except ValueError as exc:
        field = "version" if "version" in str(exc) else None
        raise InvalidRequest(str(exc), field=field) from None
    return orjson.dumps([native_instance(view) for view in views])


def _parsed(raw_query: str) -> Query:
    return MultiDict(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else _NO_QUERY


def read(agent: Agent, kind: int, name: str, raw_query: str, query: Query | None = None) -> Reply:
    """A lookup answered from the registry as it is now (no blocking, no barrier).

    The cache is keyed by the raw query string, so a repeated lookup is answered without even parsing it;
    ``query`` is the parsed form when the caller has it already.
    """
    if kind == NATIVE:
        # Not cached: answers carry (and may be ordered by) the leader-local load, which has no index.
        native = _native_body(agent, name, query if query is not None else _parsed(raw_query))
        return Reply(200, native, JSON, _headers(agent, _index_of(agent, name)))
    if kind in (CATALOG_SERVICES, AGENT_SERVICES):
        name = CATALOG
    index = _index_of(agent, name)
    key = (kind, name, raw_query)
    body = agent.responses.get(key, index)
    if body is None:
        parsed = query if query is not None else _parsed(raw_query)
        if kind == HEALTH:
            body = _health_body(agent, name, parsed)
        elif kind == CATALOG_SERVICE:
            body = _catalog_service_body(agent, name, parsed)
        elif kind == CATALOG_SERVICES:
            body = _catalog_services_body(agent)
        else:
            body = _agent_services_body(agent)
        agent.responses.put(key, index, body)
    return Reply(200, body, JSON, _headers(agent, index))


def answers_at_once(raw_query: str) -> bool:
    """Whether a lookup with this query neither blocks nor needs a read barrier (then ``read`` serves it).

    Conservative on the raw string: a query that merely mentions them goes the careful way.
    """
    return "index" not in raw_query and "consistent" not in raw_query


async def get(agent: Agent, kind: int, name: str, raw_query: str, query: Query | None = None) -> Reply:
    parsed = query if query is not None else _parsed(raw_query)
    await _prepare_read(agent, parsed, CATALOG if kind in (CATALOG_SERVICES, AGENT_SERVICES) else name)
    return read(agent, kind, name, raw_query, parsed)


# --- writes ---------------------------------------------------------------------------------------------------

async def _propose(agent: Agent, commands: list[bytes]) -> int:
    await agent.node.propose(encode_registry_batch(commands))
    return agent.state.registry.index


async def deregister(agent: Agent, instance_id: str) -> None:
    service = agent.state.registry.owner_of(instance_id)
    if service is None:
        raise NotFound(f"unknown service ID {instance_id!r}")
    await _propose(agent, [encode_deregister(service, instance_id)])


def _check_instance(check_id: str) -> str:
    # "service:<id>" is a service's check; a bare id is accepted for clients that pass the service id.
    instance_id = check_id.removeprefix("service:")
    if not instance_id:
        raise InvalidRequest("the check id is empty; a service's check is service:<service id>", field="check_id")
    return instance_id


async def heartbeat(agent: Agent, instance_id: str, status: Status, load: int | None,
                    forward: tuple[str, str, bytes] | None) -> Reply:
    """Renew a lease on the leader; a follower forwards ``forward`` = (method, path?query, body) to it."""
    node = agent.node
    if node.is_leader:
        await agent.leases.heartbeat(instance_id, status, load)
        return Reply(200)
    if forward is None:
        raise NotLeader("this heartbeat was forwarded to a node that is no longer the leader",
                        leader=node.leader_address() or None)
    return await _forward_to_leader(agent, *forward)


async def _forward_to_leader(agent: Agent, method: str, path: str, body: bytes) -> Reply:
    leader = agent.node.leader_id
    if leader is None:
        raise Unavailable("no leader is known; the cluster may be electing one")
    server = agent.state.registry.get(SERVER_SERVICE, leader)
    if server is None:
        raise Unavailable(f"the leader {leader}'s HTTP address is not in the catalog yet; retry")
    host = f"[{server.address}]" if ":" in server.address else server.address
    try:
        async with agent.http_client().request(
                method, f"http://{host}:{server.port}{path}", data=body,
                headers={FORWARDED_HEADER: agent.config.node_id},
                timeout=aiohttp.ClientTimeout(total=10)) as response:
            payload = await response.read()
            return Reply(response.status, payload, response.content_type if payload else None)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise Unavailable(f"the leader {leader} did not answer the forwarded heartbeat: {exc}") from None


def _forward_of(request: web.Request, body: bytes) -> tuple[str, str, bytes] | None:
    # A request a follower forwarded is never forwarded again (no loops while leadership moves).
    return None if FORWARDED_HEADER in request.headers else (request.method, request.path_qs, body)


def _caller(request: web.Request) -> str:
    return request.remote or "127.0.0.1"


# --- the aiohttp routes ------------------------------------------------------------------------------------------

async def _register(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    command = consul_registration(_load_json(await request.read()), _caller(request))
    await _propose(agent, [command])
    return web.Response(status=200)


async def _deregister(request: web.Request) -> web.Response:
    await deregister(request.app[AGENT_KEY], request.match_info["instance_id"])
    return web.Response(status=200)


async def _check(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    body = await request.read()
    if action == "update":
        document = _load_json(body) if body else {}
        status = parse_status(_lowered(document).get("status") if isinstance(document, dict) else None, "Status")
    else:
        status = _CHECK_STATUSES[action]
    reply = await heartbeat(request.app[AGENT_KEY], _check_instance(request.match_info["check_id"]), status, None,
                            _forward_of(request, body))
    return web_response(reply)


async def _native_heartbeat(request: web.Request) -> web.Response:
    status = parse_status(request.query.get("status", "passing"), "status")
    load = parse_uint(request.query, "load")
    if load is not None and load > 0xFFFFFFFF:
        raise InvalidRequest(f"load {load} is above 4294967295", field="load")
    reply = await heartbeat(request.app[AGENT_KEY], request.match_info["instance_id"], status, load,
                            _forward_of(request, b""))
    return web_response(reply)


async def _native_register(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    document = _load_json(await request.read())
    items = document if isinstance(document, list) else [document]
    if not items:
        raise InvalidRequest("the list of registrations is empty")
    if len(items) > MAX_BATCH_REGISTRATIONS:
        raise InvalidRequest(f"{len(items)} registrations in one request; the limit is {MAX_BATCH_REGISTRATIONS}")
    commands = []
    for position, item in enumerate(items):
        try:
            commands.append(native_registration(item, _caller(request)))
        except InvalidRequest as exc:
            if not isinstance(document, list):
                raise
            raise InvalidRequest(f"registration [{position}]: {exc.message}", field=exc.field) from None
    index = await _propose(agent, commands)
    return web_response(json_reply({"registered": len(commands), "index": index}))


def _reader(kind: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        reply = await get(request.app[AGENT_KEY], kind, request.match_info.get("name", CATALOG),
                          request.query_string, request.query)
        return web_response(reply)
    return handler


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_put("/v1/agent/service/register", _register)
    router.add_put("/v1/agent/service/deregister/{instance_id}", _deregister)
    router.add_put("/v1/agent/check/{action:pass|warn|fail|update}/{check_id}", _check)
    for kind in (AGENT_SERVICES, CATALOG_SERVICES, CATALOG_SERVICE, HEALTH):
        router.add_get(ROUTES[kind], _reader(kind))
    router.add_put("/v1/spina/services/register", _native_register)
    router.add_put("/v1/spina/services/heartbeat/{instance_id}", _native_heartbeat)
    router.add_get(ROUTES[NATIVE], _reader(NATIVE))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def server_registration(agent: Agent) -> bytes:
    """The agent's own entry in the catalog (service ``spina``): how followers find the leader's HTTP port."""
    http = agent.bound_http_addr
    host = http.host
    unspecified = _is_ip(host) and ipaddress.ip_address(host).is_unspecified
    if unspecified or not host:
        host = "127.0.0.1"
    elif not _is_ip(host):
        host = socket.gethostbyname(host)
    return encode_register(SERVER_SERVICE, agent.config.node_id, host, http.port, tags=("server",),
                           meta={"raft": str(agent.bound_raft_addr), "dns": str(agent.bound_dns_addr)})


__all__ = ["add_routes", "consul_registration", "native_registration", "parse_duration_ms",
           "server_registration"]
