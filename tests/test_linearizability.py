"""The checker must accept linearizable histories and reject the classic anomalies."""

from __future__ import annotations

import random

from tests.linearizability import Operation, check_history, check_keys


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


def test_read_of_a_value_nobody_wrote_is_rejected() -> None:
    history = [op("write", 1, None, 0, 1), op("read", None, 7, 2, 3)]
    assert not check_history(history).linearizable


def test_acknowledged_write_lost_after_it_was_read_is_rejected() -> None:
    # The write was acknowledged and seen, then the key went back to absent: a lost write, not a stale read.
    history = [op("write", 1, None, 0, 1), op("read", None, 1, 2, 3, process=1), op("read", None, None, 4, 5)]
    assert not check_history(history).linearizable


def test_info_cas_may_apply_or_not() -> None:
    applied = [op("write", 0, None, 0, 1), op("cas", (0, 1), None, 2, 3, outcome="info"),
               op("read", None, 1, 4, 5)]
    not_applied = [op("write", 0, None, 0, 1), op("cas", (0, 1), None, 2, 3, outcome="info"),
                   op("read", None, 0, 4, 5)]
    wrong = [op("write", 0, None, 0, 1), op("cas", (5, 1), None, 2, 3, outcome="info"), op("read", None, 1, 4, 5)]
    assert check_history(applied).ok and check_history(not_applied).ok
    assert not check_history(wrong).linearizable


def test_time_limit_exhausted_counts_as_failure() -> None:
    # Twelve concurrent writes and a read of a value none wrote: the search must try every order.
    history = [op("write", i, None, 0, 100, process=i) for i in range(12)] + [op("read", None, 99, 200, 201)]
    result = check_history(history, time_limit=0.0)
    assert result.timed_out and not result.ok


def test_check_keys_reports_every_key() -> None:
    history = [op("write", 1, None, 0, 1, key="a"), op("read", None, 2, 2, 3, key="a"),
               op("write", 1, None, 0, 1, key="b"), op("read", None, 1, 2, 3, key="b"),
               op("write", 1, None, 0, 1, key="c"), op("read", None, 3, 2, 3, key="c")]
    results = check_keys(history)
    assert [(result.key, result.ok) for result in results] == [("a", False), ("b", True), ("c", False)]


def random_register_history(rng: random.Random, processes: int, ops_each: int,
                            info_rate: float = 0.0) -> list[Operation]:
    """A history of an atomic register: each op takes effect at a random point of its interval; writes
    are unique; a fraction of writes lose their answer (info), possibly without ever taking effect."""
    state: object = None
    pending: list[tuple[float, Operation]] = []
    unique = iter(range(1, 1_000_000))
    for process in range(processes):
        now = rng.random()
        for _ in range(ops_each):
            call = now + rng.random()
            ret = call + rng.random() * 2
            now = ret
            pending.append((rng.uniform(call, ret), Operation(process, "k", rng.choice(["read", "write", "cas"]),
                                                              None, None, call, ret)))
    history = []
    for _, planned in sorted(pending, key=lambda item: item[0]):
        lost_answer = planned.kind != "read" and rng.random() < info_rate
        outcome = "info" if lost_answer else "ok"
        if planned.kind == "read":
            history.append(Operation(planned.process, "k", "read", None, state, planned.call, planned.ret))
        elif planned.kind == "write":
            value = next(unique)
            if not (lost_answer and rng.random() < 0.5):  # an unknown write may also never happen
                state = value
            history.append(Operation(planned.process, "k", "write", value, None, planned.call, planned.ret,
                                     outcome))
        else:
            old, new = rng.choice([state, -1]), next(unique)
            success = state == old
            if success:
                state = new
            history.append(Operation(planned.process, "k", "cas", (old, new), None if lost_answer else success,
                                     planned.call, planned.ret, outcome))
    return history


def test_random_histories_with_unknown_outcomes_pass() -> None:
    seed = 7_2026
    rng = random.Random(seed)
    for _ in range(100):
        history = random_register_history(rng, processes=5, ops_each=8, info_rate=0.15)
        assert check_history(history).ok, f"seed {seed}"


def test_random_histories_with_a_stale_final_read_are_rejected() -> None:
    # A value whose write completed before another acknowledged write began is overwritten for good
    # (values are unique): a read after everything has completed must not see it.
    seed = 11_2026
    rng = random.Random(seed)
    rejected = 0
    for _ in range(100):
        history = random_register_history(rng, processes=4, ops_each=6)
        writes = [o for o in history if o.kind == "write" or (o.kind == "cas" and o.output)]
        stale = [w.value if w.kind == "write" else w.value[1] for w in writes
                 if any(w.ret < later.call for later in writes)]
        if not stale:
            continue
        end = max(o.ret for o in history)
        history.append(Operation(9, "k", "read", None, rng.choice(stale), end + 1, end + 2))
        assert not check_history(history).linearizable, f"seed {seed}: a stale read was accepted"
        rejected += 1
    assert rejected > 50, f"seed {seed}: only {rejected} histories had a stale value to read"


def test_long_history_with_unknown_outcomes_is_decided_within_the_step_budget() -> None:
    # As long as one key's history in a chaos run: decided, not timed out, with the default budget.
    rng = random.Random(3_2026)
    history = random_register_history(rng, processes=6, ops_each=50, info_rate=0.1)
    result = check_history(history)
    assert result.ok and not result.timed_out
