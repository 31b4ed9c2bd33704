"""The checker must accept linearizable histories and reject the classic anomalies."""

from __future__ import annotations

import random

from tests.linearizability import Operation, check_history


def op(kind: str, value: object, output: object, call: float, ret: float, outcome: str = "ok",
       process: int = 0, key: str = "k") -> Operation:
    return Operation(process, key, kind, value, output, call, ret, outcome)


def test_sequential_history_is_linearizable() -> None:
    history = [op("write", 1, None, 0, 1), op("read", None, 1, 2, 3), op("cas", (1, 2), True, 4, 5),
               op("read", None, 2, 6, 7)]
    assert check_history(history).ok


def test_stale_read_after_acknowledged_write_is_rejected() -> None:
    history = [op("write", 1, None, 0, 1), op("write", 2, None, 2, 3), op("read", None, 1, 4, 5, process=1)]
    result = check_history(history)
    assert not result.linearizable and not result.timed_out and result.key == "k"


def test_concurrent_read_may_see_either_value() -> None:
    for seen in (None, 1):
        history = [op("write", 1, None, 0, 10), op("read", None, seen, 2, 3, process=1)]
        assert check_history(history).ok


def test_lost_cas_is_rejected() -> None:
    # Both CAS(0 -> x) succeed: only one can have, unless something wrote 0 back in between.
    history = [op("write", 0, None, 0, 1), op("cas", (0, 1), True, 2, 5, process=1),
               op("cas", (0, 2), True, 3, 6, process=2), op("read", None, 2, 7, 8)]
    assert not check_history(history).linearizable


def test_failed_cas_must_be_justified_by_the_state() -> None:
    history = [op("write", 0, None, 0, 1), op("cas", (0, 1), False, 2, 3)]
    assert not check_history(history).linearizable


def test_info_write_may_take_effect_late_or_never() -> None:
    late = [op("write", 1, None, 0, 1), op("write", 2, None, 2, 3, outcome="info"),
            op("read", None, 1, 4, 5), op("read", None, 2, 6, 7)]
    never = [op("write", 1, None, 0, 1), op("write", 2, None, 2, 3, outcome="info"), op("read", None, 1, 4, 5)]
    assert check_history(late).ok and check_history(never).ok


def test_info_write_cannot_take_effect_before_it_was_called() -> None:
    history = [op("read", None, 2, 0, 1), op("write", 2, None, 2, 3, outcome="info")]
    assert not check_history(history).linearizable


def test_failed_write_never_happened() -> None:
    history = [op("write", 1, None, 0, 1), op("write", 2, None, 2, 3, outcome="fail"), op("read", None, 2, 4, 5)]
    assert not check_history(history).linearizable


def test_keys_are_checked_independently() -> None:
    history = [op("write", 1, None, 0, 1, key="a"), op("write", 9, None, 0, 1, key="b"),
               op("read", None, 1, 2, 3, key="a"), op("read", None, 1, 2, 3, key="b")]
    result = check_history(history)
    assert not result.linearizable and result.key == "b"


def test_step_budget_exhausted_counts_as_failure() -> None:
    history = [op("write", i, None, 0, 100, process=i) for i in range(12)] + [op("read", None, 99, 200, 201)]
    result = check_history(history, max_steps=50)
    assert result.timed_out and not result.ok


def test_random_linearizable_histories_pass() -> None:
    seed = 20261127
    rng = random.Random(seed)
    for _ in range(200):
        # Simulate an atomic register: each op takes effect at a random point inside its interval.
        state: int | None = None
        ops: list[tuple[float, Operation]] = []
        for process in range(4):
            now = rng.random()
            for _ in range(5):
                call = now + rng.random()
                ret = call + rng.random() * 2
                now = ret
                ops.append((rng.uniform(call, ret), Operation(process, "k", rng.choice(["read", "write", "cas"]),
                                                               None, None, call, ret)))
        history = []
        for _, pending in sorted(ops, key=lambda item: item[0]):
            if pending.kind == "read":
                history.append(Operation(pending.process, "k", "read", None, state, pending.call, pending.ret))
            elif pending.kind == "write":
                state = rng.randrange(1000)
                history.append(Operation(pending.process, "k", "write", state, None, pending.call, pending.ret))
            else:
                old, new = rng.choice([state, rng.randrange(1000)]), rng.randrange(1000)
                success = state == old
                if success:
                    state = new
                history.append(Operation(pending.process, "k", "cas", (old, new), success, pending.call,
                                         pending.ret))
        assert check_history(history).ok, f"seed {seed}"
