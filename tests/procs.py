"""Running pilotfish commands (and their peers) as real processes in tests, with their log."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PILOTFISH = str(Path(sys.executable).with_name("pilotfish"))


class Process:
    """A running command whose stderr is collected into a file, to wait for log lines."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log = log
        self._file = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._file, env=env, cwd=cwd)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the log past offset `after`, within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern).search(self.text(), after)
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)  # a poll's pace: the log is read again, not waited for
        raise AssertionError(f"{pattern!r} not in log:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self._file.close()
