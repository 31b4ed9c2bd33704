"""Options of the Raft simulation suite.

    pytest tests/raft --raft-seeds 5000      # many seeds (the option needs tests/raft on the command line)
    SPINA_RAFT_SEEDS=5000 pytest              # the same from anywhere
    SPINA_RAFT_SEED=1234 pytest tests/raft/test_simulation.py   # replay one seed
"""

from __future__ import annotations

import os

import pytest

DEFAULT_SEEDS = 300


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--raft-seeds", type=int, default=None,
                     help=f"how many seeds the Raft simulation runs (default {DEFAULT_SEEDS}, or SPINA_RAFT_SEEDS)")
    parser.addoption("--raft-first-seed", type=int, default=0, help="the first seed of the simulation range")


def simulation_seeds(config: pytest.Config) -> list[int]:
    if os.environ.get("SPINA_RAFT_SEED"):
        return [int(os.environ["SPINA_RAFT_SEED"])]
    count = config.getoption("raft_seeds", default=None) or int(os.environ.get("SPINA_RAFT_SEEDS", DEFAULT_SEEDS))
    first = config.getoption("raft_first_seed", default=0) or 0
    return list(range(first, first + count))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "raft_seed" in metafunc.fixturenames:
        metafunc.parametrize("raft_seed", simulation_seeds(metafunc.config), ids=lambda seed: f"seed={seed}")
