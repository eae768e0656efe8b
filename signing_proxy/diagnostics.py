"""What upstream answers say about our signing: clock skew (from ``Date``) and 401s.

Both are the classic causes of "my key does not work": a JWT's ``nbf``/``exp`` follow the local
clock, so a skewed clock gives 401s that look like key errors (docs/coinbase-auth.md, "Clock skew and 401s"). The operator
gets a gauge and one warning for skew, and one log line per credential per minute for 401s saying
what was signed (credential, algorithm, ``uri``, ``kid``), never the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Final

from cachetools import TTLCache

from .metrics import ProxyMetrics

__all__ = ["SKEW_WARNING_SECONDS", "ClockSkewMonitor", "UnauthorizedReporter"]

log = logging.getLogger(__name__)

SKEW_WARNING_SECONDS: Final = 10.0
_SAMPLE_INTERVAL: Final = 1.0  # parse at most one Date header per second per upstream


class ClockSkewMonitor:
    """Upstream ``Date`` minus local time, sampled at most once a second per upstream."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._next_sample: dict[str, float] = {}
        self._warned: set[str] = set()
        self.skew: dict[str, float] = {}

    def observe(self, upstream: str, date: str | None) -> None:
        if not date:
            return
        now = self._monotonic()
        if now < self._next_sample.get(upstream, 0.0):
            return  # the hot path: one dict lookup
        self._next_sample[upstream] = now + _SAMPLE_INTERVAL
        try:
            remote = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        # Date has whole seconds and is stamped before we read it: up to ~1 s reads as noise.
        skew = round(remote - self._clock(), 3)
        self.skew[upstream] = skew
        self._metrics.clock_skew.labels(upstream).set(skew)
        if abs(skew) <= SKEW_WARNING_SECONDS:
            self._warned.discard(upstream)  # warn again if it drifts off later
        elif upstream not in self._warned:
            self._warned.add(upstream)
            log.warning(
                "clock skew against upstream: JWT nbf/exp follow the local clock and the upstream "
                "may reject tokens; fix NTP on this host",
                extra={"fields": {"upstream": upstream, "skew_seconds": skew}},
            )


class UnauthorizedReporter:
    """Counts upstream 401s per credential and explains them, once per credential per minute."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        *,
        interval: float = 60.0,
        maxsize: int = 1024,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._metrics = metrics
        self._recent: TTLCache[str, bool] = TTLCache(maxsize=maxsize, ttl=interval, timer=monotonic)

    def report(
        self,
        credential: str,
        *,
        algorithm: str,
        key_id: str,
        signed: str,
        request_id: str,
        skew: float | None,
    ) -> None:
        self._metrics.unauthorized.labels(credential).inc()
        if credential in self._recent:
            return
        self._recent[credential] = True
        fields: dict[str, object] = {
            "credential": credential,
            "algorithm": algorithm,
            "kid": key_id,
            "signed": signed,  # the JWT `uri`, or the HMAC method + requestPath
            "request_id": request_id,
        }
        hint = (
            "check that the key is active and has the needed scopes, and that the path is the "
            "one the API expects"
        )
        if skew is not None and abs(skew) > SKEW_WARNING_SECONDS:
            fields["clock_skew_seconds"] = skew
            hint = "the local clock is off: fix NTP (JWT nbf/exp follow the local clock)"
        log.warning(f"upstream answered 401 to a signed request; {hint}", extra={"fields": fields})
