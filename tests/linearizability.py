"""A linearizability checker for key/value histories (Wing & Gong's search with Lowe's memoization).

A history is a list of ``Operation``s, each with the time it was invoked and the time it completed and
its outcome: ``ok`` (it happened, with this output), ``fail`` (it definitely did not happen) or
``info`` (unknown: a timeout or lost connection; it may have happened at any point after its call).
Keys are independent registers, so each key is checked on its own (P-compositionality, Horn & Kroening).

Register semantics: ``read`` returns the value (None if absent); ``write(v)`` sets it; ``cas(old, new)``
sets it to ``new`` iff it is ``old`` and outputs whether it did. Test workloads write unique values, which
makes Consul's index-based CAS (cas=ModifyIndex read with value ``old``) equivalent to this one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

INFINITY = float("inf")


@dataclass(frozen=True)
class Operation:
    process: int
    key: str
    kind: str  # "read" | "write" | "cas"
    value: Any  # write: the value; cas: (old, new); read: None
    output: Any  # read: the value read; cas: True/False; write: None
    call: float
    ret: float
    outcome: str = "ok"  # "ok" | "fail" | "info"


@dataclass
class CheckResult:
    linearizable: bool
    timed_out: bool
    key: str | None = None
    steps: int = 0

    @property
    def ok(self) -> bool:
        """A check that timed out is a failure, never a pass."""
        return self.linearizable and not self.timed_out


def _step(state: Any, op: Operation) -> tuple[bool, Any]:
    if op.kind == "read":
        return state == op.output, state
    if op.kind == "write":
        return True, op.value
    if op.kind == "cas":
        old, new = op.value
        if op.outcome == "info":
            return True, new if state == old else state
        if op.output:
            return state == old, new
        return state != old, state
    raise ValueError(f"unknown operation kind {op.kind!r}")


class _Node:
    __slots__ = ("id", "is_call", "match", "next", "op", "prev")

    def __init__(self, op: Operation | None, op_id: int, is_call: bool) -> None:
        self.op = op
        self.id = op_id
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _check_key(ops: list[Operation], initial: Any, max_steps: int,
               time_limit: float | None = None) -> tuple[bool, bool, int]:
    # Definite failures never happened; info reads observed nothing: neither constrains the history.
    ops = [op for op in ops if op.outcome != "fail" and not (op.outcome == "info" and op.kind == "read")]
    events: list[tuple[float, int, int, Operation]] = []
    for op_id, op in enumerate(ops):
        ret = INFINITY if op.outcome == "info" else op.ret
        if ret < op.call:
            raise ValueError(f"operation returns before it is called: {op}")
        events.append((op.call, 0, op_id, op))
        # At equal times calls come first, so touching intervals count as concurrent.
        events.append((ret, 1, op_id, op))
    events.sort(key=lambda event: (event[0], event[1]))
    head = _Node(None, -1, False)
    tail = head
    calls: dict[int, _Node] = {}
    for _, is_return, op_id, op in events:
        node = _Node(op, op_id, not is_return)
        if is_return:
            calls[op_id].match = node
        else:
            calls[op_id] = node
        node.prev, tail.next = tail, node
        tail = node

    def lift(node: _Node) -> None:
        assert node.match is not None and node.prev is not None
        node.prev.next = node.next
        if node.next is not None:
            node.next.prev = node.prev
        match = node.match
        assert match.prev is not None
        match.prev.next = match.next
        if match.next is not None:
            match.next.prev = match.prev

    def unlift(node: _Node) -> None:
        assert node.match is not None and node.prev is not None
        match = node.match
        match_prev = match.prev
        assert match_prev is not None
        match_prev.next = match
        if match.next is not None:
            match.next.prev = match
        node.prev.next = node
        if node.next is not None:
            node.next.prev = node

    state = initial
    linearized = 0
    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[_Node, Any]] = []
    entry = head.next
    steps = 0
    deadline = None if time_limit is None else time.monotonic() + time_limit
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            return False, True, steps
        # The clock is read every 4096 steps only: a step costs about a microsecond.
        if deadline is not None and not steps & 4095 and time.monotonic() > deadline:
            return False, True, steps
        assert entry is not None
        if entry.is_call:
            assert entry.op is not None
            ok, new_state = _step(state, entry.op)
            if ok:
                candidate = (linearized | (1 << entry.id), _freeze(new_state))
                if candidate not in cache:
                    cache.add(candidate)
                    stack.append((entry, state))
                    state = new_state
                    linearized |= 1 << entry.id
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return False, False, steps
            entry, state = stack.pop()
            linearized &= ~(1 << entry.id)
            unlift(entry)
            entry = entry.next
    return True, False, steps


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check_history(history: list[Operation], initial: Any = None, max_steps: int = 2_000_000,
                  time_limit: float | None = None) -> CheckResult:
    """Check every key's sub-history; the first key that is not linearizable (or times out) is reported.

    ``max_steps`` and ``time_limit`` (seconds) bound each key's search; running out of either is a
    timeout, which ``CheckResult.ok`` counts as a failure."""
    total = 0
    for result in check_keys(history, initial, max_steps, time_limit, stop_at_first=True):
        total += result.steps
        if not result.ok:
            return CheckResult(result.linearizable, result.timed_out, result.key, total)
    return CheckResult(True, False, None, total)


def check_keys(history: list[Operation], initial: Any = None, max_steps: int = 2_000_000,
               time_limit: float | None = None, *, stop_at_first: bool = False) -> list[CheckResult]:
    """One result per key (sorted by key), so that a run can report every key that failed."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    results = []
    for key, ops in sorted(by_key.items()):
        linearizable, timed_out, steps = _check_key(ops, initial, max_steps, time_limit)
        results.append(CheckResult(linearizable, timed_out, key, steps))
        if stop_at_first and not results[-1].ok:
            break
    return results
