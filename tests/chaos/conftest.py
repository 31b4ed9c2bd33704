"""Options of the chaos suite, and the summary tables printed at the end of the session.

    pytest tests/chaos                                    # the CI version: a few minutes in all
    SPINA_CHAOS_MINUTES=30 pytest tests/chaos -m chaos_long   # each long run injects faults for 30 minutes
    SPINA_CHAOS_SEED=1234 pytest tests/chaos              # replay a seed (printed in every summary)
"""

from __future__ import annotations

import pytest

from tests.chaos.harness import SUMMARIES, chaos_minutes

# The per-test timeout of the default runs (pytest-timeout); long runs get their fault time on top.
DEFAULT_TIMEOUT_SECONDS = 300


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    minutes = chaos_minutes()
    for item in items:
        if item.get_closest_marker("chaos_long") is None:
            continue
        if minutes is None:
            item.add_marker(pytest.mark.skip(reason="long chaos run: set SPINA_CHAOS_MINUTES to run it"))
        else:
            # Faults for the given time, then healing, final reads, convergence and the checks.
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_SECONDS + minutes * 60 * 1.5))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SUMMARIES:
        return
    terminalreporter.section("chaos runs")
    for summary in SUMMARIES:
        terminalreporter.write_line(summary.table())
        terminalreporter.write_line("")
