"""Prometheus metrics, all registered on an injected registry (tests build a fresh one).

Labels are bounded: upstream (configured hosts), method (known verbs or OTHER), route (a template
from routing.RouteTemplates), status class, error kind (a fixed code), credential (a config name).
No label ever carries a raw path, a key or a token.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__

__all__ = ["ProxyMetrics", "method_label", "status_class"]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_SIGNING_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        ns = "signing_proxy"
        Info(f"{ns}_build", "signing-proxy version", registry=registry).info(
            {"version": __version__}
        )
        self.requests = Counter(
            f"{ns}_requests_total",
            "Requests answered, by upstream, method, route template and status class",
            ["upstream", "method", "route", "status_class"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{ns}_request_duration_seconds",
            "Whole request time as the proxy saw it, until the last response byte",
            ["upstream", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            f"{ns}_upstream_duration_seconds",
            "Time from sending upstream to its response headers",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.signing_duration = Histogram(
            f"{ns}_signing_duration_seconds",
            "Time to sign one request",
            ["scheme"],
            buckets=_SIGNING_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            f"{ns}_errors_total",
            "Requests the proxy answered with its own error, or broke off, by error code",
            ["kind"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{ns}_in_flight_requests", "Requests being handled now", registry=registry
        )
        self.tokens = Counter(
            f"{ns}_tokens_minted_total",
            "Signatures made (JWTs minted or HMACs computed), by credential and algorithm",
            ["credential", "algorithm"],
            registry=registry,
        )
        self.credential_loaded = Gauge(
            f"{ns}_credential_loaded",
            "1 when the credential's key is loaded and usable, else 0",
            ["credential"],
            registry=registry,
        )
        self.credential_reload_errors = Counter(
            f"{ns}_credential_reload_errors_total",
            "Changed key files that could not be loaded (the last good key stays in use)",
            ["credential"],
            registry=registry,
        )
        self.credential_last_reload = Gauge(
            f"{ns}_credential_last_reload_timestamp_seconds",
            "Unix time the credential's key was last loaded successfully",
            ["credential"],
            registry=registry,
        )
        self.retries = Counter(
            f"{ns}_retries_total",
            "Requests sent again, freshly signed, after failing before reaching the upstream",
            ["upstream"],
            registry=registry,
        )
        self.clock_skew = Gauge(
            f"{ns}_upstream_clock_skew_seconds",
            "Upstream Date header minus the local clock (JWT nbf/exp follow the local clock)",
            ["upstream"],
            registry=registry,
        )
        self.unauthorized = Counter(
            f"{ns}_upstream_unauthorized_total",
            "Signed requests the upstream answered 401, by credential",
            ["credential"],
            registry=registry,
        )
        self.policy_denied = Counter(
            f"{ns}_policy_denied_total",
            "Requests refused by a policy rule before signing, by credential ('-': unsigned)",
            ["credential"],
            registry=registry,
        )
        self.rate_limited = Counter(
            f"{ns}_rate_limited_total",
            "Requests answered 429 by the proxy's own per-credential rate limit",
            ["credential"],
            registry=registry,
        )
