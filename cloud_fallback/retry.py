"""Retry and cooldown as small objects with explicit inputs (attempt number, random draw, clock reading).

Neither reads a clock nor draws random numbers itself, so both are tested by plain calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from .config import CooldownConfig, RetryConfig


@dataclass(frozen=True)
class Backoff:
    config: RetryConfig = field(default_factory=RetryConfig)

    def delay(self, attempt: int, *, retry_after: float | None, rand: float) -> float | None:
        """Seconds to wait after failed try ``attempt`` (0-based), or None: stop trying this model.

        ``retry_after`` (the server's Retry-After, seconds) wins over the exponential schedule; one over
        ``max_retry_after_s`` means "move on".  ``rand`` in [0, 1) scales the schedule down by up to
        ``jitter`` so that clients that failed together do not retry together.
        """
        if attempt + 1 >= self.config.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.config.max_retry_after_s else None
        base = min(self.config.max_delay_s, self.config.base_delay_s * (2**attempt))
        return base * (1.0 - self.config.jitter * rand)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """A Retry-After header (delay seconds or an HTTP date) as seconds from ``now`` (epoch seconds)."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


class Cooldown:
    """Per cloud target: after ``failures`` failed calls in a row, skip it for ``seconds``.

    Hold one instance for as long as the failures should be remembered (a server keeps one; a CLI run
    makes a fresh one).  Every method takes the clock reading ``now`` (monotonic seconds).
    """

    def __init__(self, config: CooldownConfig | None = None):
        self.config = config or CooldownConfig()
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def remaining(self, key: str, now: float) -> float:
        return max(0.0, self._until.get(key, 0.0) - now)

    def available(self, key: str, now: float) -> bool:
        return self.remaining(key, now) == 0.0

    def failed(self, key: str, now: float) -> None:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if count >= self.config.failures:
            self._until[key] = now + self.config.seconds
            self._failures[key] = 0

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
        self._until.pop(key, None)
