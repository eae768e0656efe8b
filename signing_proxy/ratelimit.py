"""A token bucket per credential: ``rate`` requests per second on average, bursts up to ``burst``.

Requests over the limit are answered 429 locally with ``Retry-After`` and never reach Coinbase,
whose own limits (and the bans that follow) apply per key. The clock is injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBucket"]


@dataclass(frozen=True)
class RateLimit:
    rate: float  # tokens added per second
    burst: int  # bucket size: requests allowed back to back


class TokenBucket:
    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self._clock = clock
        self._tokens = float(limit.burst)
        self._stamp = clock()

    def acquire(self) -> float:
        """Take one token: 0.0 if granted, else the seconds until one will be available."""
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(float(self.limit.burst), self._tokens + elapsed * self.limit.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.limit.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """``Retry-After`` is whole seconds (RFC 9110 §10.2.3); never 0, which invites a hot loop."""
        return max(1, math.ceil(wait))
