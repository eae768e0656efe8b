"""The hot path's counts, kept in plain Python and added to prometheus-client in one go.

Every proxied request is counted in three histograms, two counters and a gauge; prometheus-client
takes a lock for each and walks the buckets of each histogram (~12 µs a request on the bench
machine). ``MetricBatch`` keeps those counts in lists and adds them to the real metric children
before anything reads them: it is registered first on the registry, so every collection (a
scrape, ``get_sample_value``) flushes it before the metrics are read. It also flushes at least
every ``FLUSH_SECONDS`` while counts are pending, so with ``--workers`` the shared files that the
other workers' scrapes read are never further behind than that.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client.registry import Collector

__all__ = ["MetricBatch", "PendingCounter", "PendingHistogram", "batchable"]

FLUSH_SECONDS: Final = 1.0


class PendingCounter:
    """Increments of one counter child (or gauge: a signed increment) not yet added to it."""

    __slots__ = ("amount", "child")

    def __init__(self, child: Any):
        self.child = child
        self.amount: float = 0

    def flush(self) -> None:
        if self.amount:
            amount, self.amount = self.amount, 0
            self.child.inc(amount)


class PendingHistogram:
    """Observations of one histogram child not yet added to it, by bucket.

    A bucket is found as prometheus-client's ``Histogram.observe`` finds it (the first upper
    bound >= the value); flushing adds each bucket's count and the sum to the child's own
    values, which is what that many ``observe`` calls would have done."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any):
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.total = self.total, 0.0
        child = self.child
        child._sum.inc(total)
        for i, count in enumerate(counts):
            if count:
                child._buckets[i].inc(count)


def batchable(histogram_child: Any) -> bool:
    """prometheus-client's histogram child keeps ``_upper_bounds``, ``_buckets`` and ``_sum``
    (every release since 0.4); should a release not, observations go to it one by one."""
    return all(hasattr(histogram_child, a) for a in ("_upper_bounds", "_buckets", "_sum"))


class MetricBatch(Collector):
    """Registered first on a registry: collecting it flushes everything pending; it yields no
    metric of its own."""

    def __init__(self) -> None:
        self._pending: list[PendingCounter | PendingHistogram] = []
        self._armed = False

    def track(self, pending: PendingCounter | PendingHistogram) -> None:
        self._pending.append(pending)

    def touched(self) -> None:
        """Counts are pending: make sure a flush comes within FLUSH_SECONDS."""
        if self._armed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing would flush later, so now
            self.flush()
            return
        self._armed = True
        loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        self._armed = False
        for pending in self._pending:
            pending.flush()

    def collect(self) -> Iterable[Any]:
        self.flush()
        return []
