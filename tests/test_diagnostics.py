"""Clock skew read from the upstream's Date header, and 401s explained (never with the token)."""

from __future__ import annotations

import logging
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from signing_proxy.diagnostics import ClockSkewMonitor, UnauthorizedReporter
from signing_proxy.metrics import ProxyMetrics

from .conftest import EC_KEY_NAME, HMAC_KEY, HMAC_SECRET, MakeProxy
from .helpers import base, fetch, metric
from .upstream import VerifyingUpstream

SKEW_GAUGE = "signing_proxy_upstream_clock_skew_seconds"


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 100.0

    def date(self, offset: float) -> str:
        return formatdate(self.wall + offset, usegmt=True)


def _skew_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("clock skew")]


def test_skew_is_sampled_once_a_second_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    metrics = ProxyMetrics(CollectorRegistry())
    clocks = Clocks()
    monitor = ClockSkewMonitor(metrics, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)

    def gauge() -> float | None:
        return metrics.registry.get_sample_value(SKEW_GAUGE, {"upstream": "u"})

    monitor.observe("u", clocks.date(30))
    assert gauge() == 30.0
    monitor.observe("u", clocks.date(-60))  # same second: not even parsed
    assert gauge() == 30.0
    clocks.mono += 1.0
    monitor.observe("u", clocks.date(-60))
    assert gauge() == -60.0
    assert len(_skew_warnings(caplog)) == 1  # still skewed: no second warning
    clocks.mono += 1.0
    monitor.observe("u", clocks.date(1))
    assert gauge() == 1.0
    clocks.mono += 1.0
    monitor.observe("u", clocks.date(20))  # drifted off again: warned again
    assert len(_skew_warnings(caplog)) == 2
    fields = _skew_warnings(caplog)[0].fields  # type: ignore[attr-defined]
    assert fields == {"upstream": "u", "skew_seconds": 30.0}
    clocks.mono += 1.0
    monitor.observe("u", "not a date")  # ignored, no exception
    monitor.observe("u", None)
    assert gauge() == 20.0


async def test_skewed_upstream_clock_is_exported_and_warned(
    proxy: Any, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING)
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 200
    assert abs(metric(proxy, SKEW_GAUGE, upstream="api.coinbase.com")) <= 1.5
    assert _skew_warnings(caplog) == []

    upstream.date_offset = -45
    handler = proxy.state.handler
    assert handler is not None
    handler.ledger.skew._next_sample.clear()  # don't wait out the once-a-second sampling
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 200
    assert -46.5 <= metric(proxy, SKEW_GAUGE, upstream="api.coinbase.com") <= -44
    assert len(_skew_warnings(caplog)) == 1


# --- 401 ----------------------------------------------------------------------------------------------


def _diagnoses(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("upstream answered 401")]


async def test_upstream_401_is_diagnosed_once_per_credential_and_counted(
    proxy: Any, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    del upstream.keys[EC_KEY_NAME]  # Coinbase no longer knows the key: every request is a 401
    for _ in range(3):
        status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
        assert status == 401
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/hmac/status/401?x=1")
    assert status == 401

    assert metric(proxy, "signing_proxy_upstream_unauthorized_total", credential="trading") == 3
    assert metric(proxy, "signing_proxy_upstream_unauthorized_total", credential="legacy") == 1
    logged = _diagnoses(caplog)
    assert [r.fields["credential"] for r in logged] == ["trading", "legacy"]  # type: ignore[attr-defined]
    jwt_fields = logged[0].fields  # type: ignore[attr-defined]
    assert jwt_fields["algorithm"] == "ES256" and jwt_fields["kid"] == EC_KEY_NAME
    assert jwt_fields["signed"] == "GET api.coinbase.com/api/v3/brokerage/accounts"
    hmac_fields = logged[1].fields  # type: ignore[attr-defined]
    assert hmac_fields["algorithm"] == "HMAC" and hmac_fields["kid"] == HMAC_KEY
    assert hmac_fields["signed"] == "GET /status/401?x=1"  # v2 rule: HMAC signs the query
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    tokens = [t for t in (r.token for r in upstream.received) if t]
    assert HMAC_SECRET not in text
    for token in tokens:
        assert token not in text and token.split(".")[2] not in text


def test_401_log_is_rate_limited_per_credential_per_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    now = [0.0]
    reporter = UnauthorizedReporter(ProxyMetrics(CollectorRegistry()), monotonic=lambda: now[0])

    def report(credential: str, skew: float | None = None) -> None:
        reporter.report(
            credential, algorithm="ES256", key_id="k", signed="GET h/p", request_id="r", skew=skew
        )

    report("a")
    report("a")
    report("b")
    now[0] = 59.0
    report("a")
    assert len(_diagnoses(caplog)) == 2
    now[0] = 61.0
    report("a", skew=-30.0)
    records = _diagnoses(caplog)
    assert len(records) == 3
    assert "clock" in records[-1].getMessage()
    assert records[-1].fields["clock_skew_seconds"] == -30.0  # type: ignore[attr-defined]


async def test_401_with_skewed_clock_points_at_the_clock(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING)
    upstream.date_offset = 600
    proxy = await make_proxy(config_dict)
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/status/401")
    assert status == 401
    (record,) = _diagnoses(caplog)
    assert "clock" in record.getMessage()
    assert record.fields["clock_skew_seconds"] > 590  # type: ignore[attr-defined]
