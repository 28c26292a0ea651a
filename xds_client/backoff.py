"""How long to wait before the next stream to the control plane: exponential backoff with full
jitter, reset by every stream that delivered a resource.

Pure: the client tells it how each stream went and draws the jitter itself. Istio's agent has no
retry of its own (Envoy's ADS retry drives it: 500 ms base, jittered); pilotfish retries by itself
with the same base.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


@dataclass
class Backoff:
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    failures: int = 0  # streams in a row that ended without delivering a resource

    def after_stream(self, delivered: bool) -> float:
        """Record how the stream that just ended went; return the longest wait before the next.

        A stream that delivered resets the count however it ended: a control plane that restarts
        ends a healthy stream with an error (UNAVAILABLE), and that is no reason to wait longer.
        Then: the base, doubled per further stream in a row that delivered nothing, up to the cap.
        The caller waits a uniform random fraction of it (full jitter).
        """
        self.failures = 0 if delivered else self.failures + 1
        return min(self.cap, self.base * 2.0 ** max(0, self.failures - 1))
