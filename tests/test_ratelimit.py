"""Per-credential token buckets: 429 with Retry-After, counted, other credentials untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError
from signing_proxy.ratelimit import RateLimit, TokenBucket

from .conftest import MakeProxy
from .helpers import base, fetch, metric
from .upstream import VerifyingUpstream


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(RateLimit(rate=2.0, burst=3), clock=lambda: now[0])
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire() == pytest.approx(0.5)  # one token every 0.5 s
    now[0] = 0.25
    assert bucket.acquire() == pytest.approx(0.25)  # half a token so far
    now[0] = 0.5
    assert bucket.acquire() == 0.0
    now[0] = 100.0
    assert [bucket.acquire() for _ in range(4)][-1] > 0  # refill stops at the burst size


def test_slow_rate_and_retry_after_is_whole_seconds_at_least_one() -> None:
    now = [0.0]
    bucket = TokenBucket(RateLimit(rate=0.1, burst=1), clock=lambda: now[0])
    assert bucket.acquire() == 0.0
    wait = bucket.acquire()
    assert wait == pytest.approx(10.0)
    assert TokenBucket.retry_after(wait) == 10
    assert TokenBucket.retry_after(0.01) == 1
    assert TokenBucket.retry_after(1.2) == 2


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    now = [10.0]
    bucket = TokenBucket(RateLimit(rate=1.0, burst=1), clock=lambda: now[0])
    assert bucket.acquire() == 0.0
    now[0] = 5.0
    assert bucket.acquire() > 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"rate": 0}, "rate: must be greater than 0"),
        ({"rate": "10/s"}, "rate: expected a number"),
        ({"rate": 5, "burst": 0}, "burst: expected a whole number >= 1"),
        ({"rate": 5, "brust": 3}, "did you mean 'burst'"),
    ],
)
def test_bad_rate_limit_config(
    config_dict: dict[str, Any], tmp_path: Path, value: dict[str, Any], problem: str
) -> None:
    config_dict["credentials"]["legacy"]["rate_limit"] = value
    with pytest.raises(ConfigError) as info:
        parse_config(config_dict, tmp_path / "c.yaml")
    assert "credentials.legacy.rate_limit" in str(info.value) and problem in str(info.value)


async def test_rate_limited_credential_answers_429_locally(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    config_dict["credentials"]["trading"]["rate_limit"] = {"rate": 0.5, "burst": 2}
    proxy = await make_proxy(config_dict)
    url = f"{base(proxy)}/api/v3/brokerage/accounts"
    statuses = []
    for _ in range(3):
        status, data, resp, _ = await fetch(client, "GET", url)
        statuses.append(status)
    assert statuses == [200, 200, 429]
    assert data is not None and data["error"] == "rate_limited" and "trading" in data["message"]
    assert resp.headers["Retry-After"] == "2"  # one token every 2 s
    assert len(upstream.received) == 2  # the third never left the proxy
    assert metric(proxy, "signing_proxy_rate_limited_total", credential="trading") == 1
    # Other credentials have their own (here: no) limit.
    for _ in range(3):
        status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/onramp/v1/token")
        assert status == 200
