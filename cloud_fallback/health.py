"""Local health that recovers: a small circuit breaker a long-lived caller (the server) shares across threads.

Closed: every request may run locally.  After ``local_failures_before_skip`` crashes (or
``local_misses_before_skip`` missed first-token deadlines) in a row it opens: requests go to the cloud
with the reason.  Half-open: after ``local_retry_after_s`` of cool-off, or every ``local_retry_every``-th
request sent away meanwhile, one request tries local again (``LocalHealth.probe``); its success closes
the breaker, its failure keeps it open for another cool-off.  One probe at a time; a probe that never
reports back (its request was refused before running) frees the slot after one more cool-off.

The clock is a constructor argument; nothing here reads a global.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from .config import PolicyConfig
from .policy import LocalHealth


class HealthTracker:
    def __init__(self, policy: PolicyConfig, *, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._health = LocalHealth()
        self._opened_at: float | None = None  # when the breaker last opened (or a probe last failed)
        self._sent_away = 0  # requests routed away since then
        self._probe_since: float | None = None

    @property
    def current(self) -> LocalHealth:
        with self._lock:
            return self._health

    def begin(self) -> LocalHealth:
        """The health one new request should be routed with (possibly the half-open probe)."""
        with self._lock:
            health = self._health
            if not health.skips_local(self.policy) or not health.available:
                return health
            now = self._clock()
            if self._probe_since is not None and now - self._probe_since < self.policy.local_retry_after_s:
                self._sent_away += 1
                return health  # a probe is running: the others keep going away
            self._sent_away += 1
            every = self.policy.local_retry_every
            cooled = self._opened_at is None or now - self._opened_at >= self.policy.local_retry_after_s
            if cooled or (every > 0 and self._sent_away >= every):
                self._probe_since, self._sent_away = now, 0
                return replace(health, probe=True)
            return health

    def record(self, tried: bool, error: BaseException | None, *, probe: bool = False) -> None:
        """What one request found out: ``tried`` says whether the local engine ran at all."""
        with self._lock:
            if probe:
                self._probe_since = None
            if not tried:
                return
            was_open = self._health.skips_local(self.policy)
            self._health = self._health.after(error)
            if error is None:
                self._opened_at, self._sent_away = None, 0
            elif self._health.skips_local(self.policy) and (probe or not was_open):
                self._opened_at, self._sent_away = self._clock(), 0
