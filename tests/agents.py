"""Run real `spina agent` processes for tests: ports chosen by the OS, read back from the ready line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"^spina agent ready http=(\S+) dns=(\S+) raft=(\S+) leader=(\S*)$")


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    http: str
    dns: str
    raft: str
    leader: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_agent(*args: str, timeout: float = 30.0, cwd: Path | None = None) -> AgentProcess:
    """Start `python -m spina_fast agent ARGS` and wait for its ready line (or its early exit)."""
    command = [sys.executable, "-m", "spina_fast", "agent", "--http-addr", "127.0.0.1:0", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr_lines: list[str] = []

    def drain_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr_lines.append(line)

    threading.Thread(target=drain_stderr, daemon=True).start()
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    # readline blocks; a watchdog kills the process if the ready line does not come in time.
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            match = READY.match(line.strip())
            if match:
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return AgentProcess(process, *match.groups(), stderr_lines=stderr_lines)
    finally:
        watchdog.cancel()
    process.wait(max(0.0, deadline - time.monotonic()) + 5)
    raise RuntimeError(
        f"agent exited with {process.returncode} before it was ready:\n{''.join(stderr_lines)[-4000:]}"
    )
