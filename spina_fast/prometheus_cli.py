"""``spina prometheus config``: a complete Prometheus configuration generated from the live registry.

    spina prometheus config --output prometheus.yml                 # one scrape job per service
    spina prometheus config --discovery http --output prometheus.yml  # one job, targets from the agent
    promtool check config prometheus.yml

``--discovery static`` (the default) writes what the registry holds now: one job per service (job name
``<prefix><service>``) listing its healthy instances, to be regenerated when services change.
``--discovery http`` writes one job whose targets Prometheus itself fetches from the agent's
``/v1/spina/prometheus/sd`` every ``--refresh-interval``, so it follows the registry without
regenerating; a relabel rule names each target's job ``<prefix><service>`` all the same.

Either way each target keeps the discovery labels of ``api/prometheus.py`` (``__meta_spina_*``), its
scrape interval is 15 s, or 5 s for instances tagged ``critical`` (per target, through the
``__scrape_interval__`` / ``__scrape_timeout__`` labels, which Prometheus honours since 2.30), and the
zone and region become the target labels ``zone`` and ``region``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, cast

from spina_fast.api.prometheus import (
    CRITICAL_SCRAPE,
    META_PREFIX,
    NORMAL_SCRAPE,
    ROUTE,
    SCRAPE_INTERVAL_LABEL,
    TargetGroup,
)
from spina_fast.config import DEFAULT_HTTP_ADDR
from spina_fast.errors import InvalidRequest

__all__ = ["add_parsers", "build_config", "render_config", "run_prometheus"]

GLOBAL_SECTION = {"scrape_interval": NORMAL_SCRAPE[0], "scrape_timeout": NORMAL_SCRAPE[1],
                  "evaluation_interval": NORMAL_SCRAPE[0]}
HTTP_SD_JOB = "spina-registry"
# Prometheus durations (model.ParseDuration): units from largest to smallest, each at most once.
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
# The labels every target keeps after relabeling, besides job and instance.
_KEPT_LABELS = ("zone", "region")


def _duration(text: str) -> str:
    if not text or text == "0" or not _DURATION.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Prometheus duration like 30s, 1m or 1h30m")
    return text


def add_parsers(commands: argparse._SubParsersAction[Any]) -> None:
    prometheus = commands.add_parser(
        "prometheus", help="Prometheus integration: scrape configuration from the registry",
        description="Prometheus integration. Targets are also served live in http_sd format at "
                    f"GET {ROUTE} (?service=NAME, blocking with ?index=&wait=).")
    actions = prometheus.add_subparsers(dest="prometheus_command", metavar="ACTION")
    actions.required = True
    config = actions.add_parser(
        "config", help="write a complete Prometheus configuration that scrapes every registered service",
        description="Write a Prometheus configuration (global section and scrape jobs) generated from the live "
                    "registry of the agent at --http-addr. Healthy instances (passing or warning) are scraped "
                    f"every {NORMAL_SCRAPE[0]}, those tagged 'critical' every {CRITICAL_SCRAPE[0]}. "
                    "Check the result with 'promtool check config FILE'.")
    config.add_argument("--http-addr", default=DEFAULT_HTTP_ADDR, metavar="HOST:PORT",
                        help="the agent to read the registry from (and, with --discovery http, the address "
                             "Prometheus will ask)")
    config.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                        help="write the configuration to FILE (replaced atomically) instead of standard output")
    config.add_argument("--job-prefix", default="", metavar="P",
                        help="job names (and job labels) are P<service> (default: the service name)")
    config.add_argument("--discovery", choices=("static", "http"), default="static",
                        help="static: one job per service with today's instances (default); http: one job "
                             "whose targets Prometheus fetches from the agent, following every change")
    config.add_argument("--refresh-interval", type=_duration, default="30s", metavar="DURATION",
                        help="with --discovery http: how often Prometheus asks the agent (default 30s)")
    config.add_argument("--service", action="append", default=None, metavar="NAME",
                        help="only this service (repeatable; default: every service)")


def _relabel_rules() -> list[dict[str, Any]]:
    return [{"source_labels": [f"{META_PREFIX}{name}"], "target_label": name} for name in _KEPT_LABELS]


def _static_job(name: str, groups: list[TargetGroup]) -> dict[str, Any]:
    # The job's own interval is the shortest of its targets; each target's labels still set its own.
    critical = any(group["labels"].get(SCRAPE_INTERVAL_LABEL) == CRITICAL_SCRAPE[0] for group in groups)
    interval, timeout = CRITICAL_SCRAPE if critical else NORMAL_SCRAPE
    return {"job_name": name, "scrape_interval": interval, "scrape_timeout": timeout,
            "static_configs": [{"targets": list(group["targets"]), "labels": dict(group["labels"])}
                               for group in groups],
            "relabel_configs": _relabel_rules()}


def build_config(groups: list[TargetGroup], *, discovery: str, job_prefix: str = "", agent_url: str = "",
                 refresh_interval: str = "30s", services: list[str] | None = None) -> dict[str, Any]:
    """The Prometheus configuration for these http_sd target groups (as the agent answered them)."""
    if discovery == "http":
        query = urllib.parse.urlencode([("service", name) for name in services or ()])
        sd = {"url": f"{agent_url}{ROUTE}" + (f"?{query}" if query else ""), "refresh_interval": refresh_interval}
        # Relabeling reads "$" as a group reference; "$$" is a literal dollar sign.
        job_relabel = {"source_labels": [f"{META_PREFIX}service"], "target_label": "job",
                       "replacement": job_prefix.replace("$", "$$") + "${1}"}
        job = {"job_name": f"{job_prefix}{HTTP_SD_JOB}", "scrape_interval": NORMAL_SCRAPE[0],
               "scrape_timeout": NORMAL_SCRAPE[1], "http_sd_configs": [sd],
               "relabel_configs": [job_relabel, *_relabel_rules()]}
        return {"global": dict(GLOBAL_SECTION), "scrape_configs": [job]}
    if discovery != "static":
        raise InvalidRequest(f"discovery {discovery!r} is not static or http")
    by_service: dict[str, list[TargetGroup]] = {}
    for group in groups:
        by_service.setdefault(group["labels"][f"{META_PREFIX}service"], []).append(group)
    jobs = [_static_job(f"{job_prefix}{name}", by_service[name]) for name in sorted(by_service)]
    return {"global": dict(GLOBAL_SECTION), "scrape_configs": jobs}


def render_config(config: dict[str, Any], header: str) -> str:
    import yaml

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _write(path: Path, text: str) -> None:
    # Write beside the target and rename, so a Prometheus reloading meanwhile never reads half a file.
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def run_prometheus(args: argparse.Namespace) -> int:
    from spina_fast.client.http import AgentClient

    client = AgentClient(args.http_addr)
    response = client.request("GET", ROUTE)
    groups = cast("list[TargetGroup]", response.json())
    wanted = set(args.service or ())
    if wanted:
        groups = [group for group in groups if group["labels"][f"{META_PREFIX}service"] in wanted]
        found = {group["labels"][f"{META_PREFIX}service"] for group in groups}
        for name in sorted(wanted - found):
            print(f"spina prometheus config: warning: service {name!r} has no healthy instance now",
                  file=sys.stderr)
    config = build_config(groups, discovery=args.discovery, job_prefix=args.job_prefix,
                          agent_url=client.base_url, refresh_interval=args.refresh_interval,
                          services=args.service)
    index = response.headers.get("X-Consul-Index", "?")
    text = render_config(config, f"Generated by 'spina prometheus config --discovery {args.discovery}' from "
                                 f"{client.base_url} at registry index {index}.")
    if args.output is None:
        sys.stdout.write(text)
        return 0
    _write(args.output, text)
    targets = sum(len(group["targets"]) for group in groups)
    print(f"wrote {args.output}: {len(config['scrape_configs'])} job(s); {targets} target(s) in the registry now",
          file=sys.stderr)
    return 0
