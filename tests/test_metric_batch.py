"""Batched hot-path counts read exactly as prometheus-client's own observe()/inc() would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from signing_proxy.metrics import ProxyMetrics

BOUNDARIES = st.sampled_from([0.0, 0.0005, 0.001, 0.0025, 0.01, 0.5, 1.0, 30.0, 31.0])
SECONDS = BOUNDARIES | st.floats(0, 100, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(100, 599), SECONDS), max_size=40)
)
def test_exposition_equals_unbatched_observations(
    calls: list[tuple[str, int, float]],
) -> None:
    batched = ProxyMetrics(CollectorRegistry())
    direct = ProxyMetrics(CollectorRegistry())
    for route, status, seconds in calls:
        batched.count_request("up", "GET", route, status, seconds)
        batched.observe_upstream("up", seconds)
        batched.count_signature("cred", "ES256", seconds / 1000, 2)
        # prometheus-client's own calls, one by one
        direct.requests.labels("up", "GET", route, f"{status // 100}xx").inc()
        direct.request_duration.labels("up", route).observe(seconds)
        direct.upstream_duration.labels("up").observe(seconds)
        direct.tokens.labels("cred", "ES256").inc(2)
        direct.signing_duration.labels("ES256").observe(seconds / 1000)
    assert _samples(batched) == _samples(direct)


def _samples(metrics: ProxyMetrics) -> list[str]:
    """The exposition without the ``_created`` timestamps (when each child was made)."""
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if "_created{" not in line]


def test_in_flight_is_current_at_every_collection() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    metrics.request_started()
    metrics.request_started()
    assert metrics.registry.get_sample_value("signing_proxy_in_flight_requests") == 2
    metrics.request_finished()
    assert metrics.registry.get_sample_value("signing_proxy_in_flight_requests") == 1


async def test_pending_counts_are_flushed_within_flush_seconds_without_a_scrape() -> None:
    metrics = ProxyMetrics(CollectorRegistry())
    metrics.count_request("up", "GET", "/x", 200, 0.01)
    child = metrics.requests.labels("up", "GET", "/x", "2xx")
    assert child._value.get() == 0  # pending: not yet in the child
    from .helpers import wait_for

    await wait_for(lambda: child._value.get() == 1, within=3, what="the timed flush")
