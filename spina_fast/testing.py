"""Helpers for tests and benchmarks that run real agents on loopback."""

from __future__ import annotations

import random
import socket


def free_ports(count: int, seed: int | None = None) -> list[int]:
    """Ports that are free now, below Linux's ephemeral range (32768-60999), so that outgoing connections
    cannot take them between this check and the agent binding them (a cluster's peers need fixed ports)."""
    rng = random.Random(seed)
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports
