"""Parsing and validating the agent's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from spina_fast.config import AgentConfig, HostPort, parse_host_port, parse_peers


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8700", HostPort("127.0.0.1", 8700)),
    ("[::1]:53", HostPort("::1", 53)),
    ("localhost:0", HostPort("localhost", 0)),
])
def test_host_port_parses_v4_v6_and_localhost(text: str, expected: HostPort) -> None:
    parsed = parse_host_port(text, what="x")
    assert parsed == expected and str(parsed) == text


def test_peers_parse_into_an_ordered_mapping() -> None:
    peers = parse_peers("n2=127.0.0.1:8702, n3=[::1]:8703")
    assert list(peers) == ["n2", "n3"] and peers["n3"] == HostPort("::1", 8703)


def test_peer_with_port_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a real port"):
        parse_peers("n2=127.0.0.1:0")


def test_config_is_frozen_and_validated(tmp_path: Path) -> None:
    config = AgentConfig(node_id="n1", data_dir=tmp_path)
    with pytest.raises(AttributeError):
        config.node_id = "n2"  # type: ignore[misc]
    with pytest.raises(ValueError, match="datacenter"):
        AgentConfig(node_id="n1", data_dir=tmp_path, datacenter="DC One")
