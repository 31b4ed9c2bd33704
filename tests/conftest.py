"""Fixtures every test module may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agents import AgentProcess, start_agent


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    """One ``spina agent --dev`` process per test module (a module may define its own ``agent`` instead)."""
    process = start_agent("--dev")
    yield process
    process.kill()
