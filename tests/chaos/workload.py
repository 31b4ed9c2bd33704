"""A bounded client workload against every node: consistent reads, unique writes, CAS after a consistent read.

Each client is a thread with its own seeded RNG. Every request goes on a fresh connection with a timeout,
which makes the outcome of an operation decidable from how the request ended:

- ``ok``: it happened (a 200 answer; a CAS answered ``false`` is also ``ok``, with output False, so that the
  checker verifies the refusal was justified);
- ``fail``: it definitely did not happen: the connection was never made, a 4xx answer, or a read that got no
  answer (a read has no effect either way);
- ``info``: unknown: a write or CAS whose request may have reached the cluster but got a 5xx, a timeout or a
  lost connection (Spina answers 503 to writes caught by a shutdown or leader change after proposing them).

Keys rotate: every ``ops_per_key`` operations a slot moves on to a fresh key, which keeps each key's
sub-history short enough for the linearizability search however long the run lasts.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from tests.chaos.cluster import ChaosCluster
from tests.linearizability import Operation

KEY_PREFIX = "chaos/"


@dataclass(frozen=True)
class WorkloadConfig:
    clients: int = 6
    key_slots: int = 4
    ops_per_key: int = 150
    request_timeout: float = 4.0
    # A short random pause between a client's operations spreads them out; the stop event cuts it short.
    think_seconds: float = 0.02
    max_ops_per_client: int = 20_000

    def __post_init__(self) -> None:
        if self.clients < 1 or self.key_slots < 1 or self.ops_per_key < 1 or self.max_ops_per_client < 1:
            raise ValueError(f"a workload needs at least one client, key slot and operation: {self}")
        if self.request_timeout <= 0:
            raise ValueError(f"request timeout {self.request_timeout} must be positive")


class RequestNotSent(Exception):
    """The connection could not be made: the request never reached any node."""


def _request(port: int, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            connection.connect()
        except OSError as exc:
            raise RequestNotSent(str(exc)) from exc
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def write_outcome(status: int | None, sent: bool) -> str:
    """The outcome of a write or CAS from its answer (``status`` None: no answer)."""
    if not sent:
        return "fail"
    if status is None or status >= 500:
        return "info"
    return "ok" if status == 200 else "fail"


class Workload:
    def __init__(self, cluster: ChaosCluster, config: WorkloadConfig, seed: int, started: float) -> None:
        self.cluster = cluster
        self.config = config
        self.seed = seed
        self.started = started
        self.history: list[Operation] = []
        self.keys_used: set[str] = set()
        self._lock = threading.Lock()
        self._ok_write = threading.Condition(self._lock)
        self._last_ok_write_call = -1.0
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._slot_ops: Counter[int] = Counter()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        return time.monotonic() - self.started

    def start(self, max_seconds: float) -> None:
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._client, args=(process,), name=f"chaos-client-{process}",
                                          daemon=True) for process in range(self.config.clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            # A client finishes its current request (bounded by the request timeout) and returns.
            thread.join(self.config.request_timeout * 3 + 10)
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop")

    def wait_ok_write(self, invoked_after: float, timeout: float) -> bool:
        """Wait until a write invoked at or after ``invoked_after`` (run time) has succeeded."""
        with self._ok_write:
            return self._ok_write.wait_for(lambda: self._last_ok_write_call >= invoked_after, timeout)

    def _record(self, op: Operation) -> None:
        with self._lock:
            self.history.append(op)
            self.keys_used.add(op.key)
            if op.outcome == "ok" and (op.kind == "write" or (op.kind == "cas" and op.output)):
                self._last_ok_write_call = max(self._last_ok_write_call, op.call)
                self._ok_write.notify_all()

    def _key(self, slot: int) -> str:
        with self._lock:
            generation = self._slot_ops[slot] // self.config.ops_per_key
            self._slot_ops[slot] += 1
        return f"{KEY_PREFIX}{slot}/{generation}"

    def _client(self, process: int) -> None:
        rng = random.Random(self.seed * 1000 + process)
        for sequence in range(self.config.max_ops_per_client):
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            node = rng.choice(self.cluster.ids)
            key = self._key(rng.randrange(self.config.key_slots))
            kind = rng.choices(["read", "write", "cas"], weights=[4, 3, 3])[0]
            if kind == "read":
                self.read(process, node, key)
            elif kind == "write":
                self.write(process, node, key, f"p{process}-{sequence}")
            else:
                self.cas(process, node, key, f"p{process}-{sequence}")
            self._stop.wait(rng.random() * self.config.think_seconds)

    # --- operations -----------------------------------------------------------------------------------

    def read(self, process: int, node: str, key: str) -> tuple[Operation, int | None]:
        """A consistent read; also returns the key's ModifyIndex (0 if absent, None if the read failed)."""
        call = self.now()
        status: int | None = None
        body = b""
        try:
            status, body = _request(self.cluster.http_ports[node], "GET", f"/v1/kv/{key}?consistent", None,
                                    self.config.request_timeout)
        except (RequestNotSent, OSError, http.client.HTTPException):
            status = None
        ret = self.now()
        value: str | None = None
        modify_index: int | None = None
        if status == 200:
            entry = json.loads(body)[0]
            value = base64.b64decode(entry["Value"]).decode() if entry["Value"] is not None else ""
            modify_index = int(entry["ModifyIndex"])
        elif status == 404:
            modify_index = 0
        # A read changes nothing, so one without an answer is simply dropped by the checker.
        outcome = "ok" if status in (200, 404) else "fail"
        op = Operation(process, key, "read", None, value, call, ret, outcome)
        self._record(op)
        return op, modify_index

    def _put(self, node: str, path: str, value: str) -> tuple[int | None, bytes, bool]:
        try:
            status, body = _request(self.cluster.http_ports[node], "PUT", path, value.encode(),
                                    self.config.request_timeout)
        except RequestNotSent:
            return None, b"", False
        except (OSError, http.client.HTTPException):
            return None, b"", True
        return status, body, True

    def write(self, process: int, node: str, key: str, value: str) -> Operation:
        call = self.now()
        status, _, sent = self._put(node, f"/v1/kv/{key}", value)
        op = Operation(process, key, "write", value, None, call, self.now(), write_outcome(status, sent))
        self._record(op)
        return op

    def cas(self, process: int, node: str, key: str, value: str) -> Operation | None:
        """A consistent read, then a CAS on the ModifyIndex it returned (None if the read failed)."""
        read, modify_index = self.read(process, node, key)
        if modify_index is None:
            return None
        call = self.now()
        status, body, sent = self._put(node, f"/v1/kv/{key}?cas={modify_index}", value)
        outcome = write_outcome(status, sent)
        output = body.strip() == b"true" if outcome == "ok" else None
        op = Operation(process, key, "cas", (read.output, value), output, call, self.now(), outcome)
        self._record(op)
        return op

    def final_reads(self, node: str, attempts: int = 20) -> dict[str, str | None]:
        """A consistent read of every key used, recorded in the history; retried while the answer is unknown."""
        final: dict[str, str | None] = {}
        for key in sorted(self.keys_used):
            for _ in range(attempts):
                op, _ = self.read(-1, node, key)
                if op.outcome == "ok":
                    final[key] = op.output
                    break
            else:
                raise RuntimeError(f"no consistent read of {key} succeeded in {attempts} attempts")
        return final

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for op in self.history:
            counts[f"{op.kind} {op.outcome}"] += 1
            if op.kind == "cas" and op.outcome == "ok":
                counts["cas ok true" if op.output else "cas ok false"] += 1
        return counts
