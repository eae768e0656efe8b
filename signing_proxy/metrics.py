"""Prometheus metrics, all registered on an injected registry (tests build a fresh one).

Labels are bounded: upstream (configured hosts), method (known verbs or OTHER), route (a template
from routing.RouteTemplates), status class, error kind (a fixed code), credential (a config name).
No label ever carries a raw path, a key or a token.
"""

from __future__ import annotations

from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .metric_batch import MetricBatch, PendingCounter, PendingHistogram, batchable

__all__ = ["ProxyMetrics", "close_code_label", "method_label", "status_class"]

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_SIGNING_BUCKETS: Final = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
# RFC 6455 §7.4.1 codes (1006: the connection dropped without a close frame); any other → "other".
_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def method_label(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def close_code_label(code: int) -> str:
    return str(code) if code in _CLOSE_CODES else "other"


class _Direct:
    """A histogram child observed at once (a prometheus-client without the batch's internals)."""

    def __init__(self, child: Any):
        self.observe = child.observe


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        # First on the registry: every collection flushes the hot path's pending counts.
        self.batch = MetricBatch()
        registry.register(self.batch)
        ns = "signing_proxy"
        # A gauge rather than an Info: Info does not work in multiprocess (--workers) mode.
        Gauge(
            f"{ns}_build_info", "signing-proxy version", ["version"],
            multiprocess_mode="livemax", registry=registry,
        ).labels(__version__).set(1)  # fmt: skip
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
            f"{ns}_in_flight_requests", "Requests being handled now",
            multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
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
            multiprocess_mode="livemin",  # with --workers: 0 if any worker lacks the key
            registry=registry,
        )
        self.ws_connections = Gauge(
            f"{ns}_websocket_connections",
            "WebSocket relays open now",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.ws_messages = Counter(
            f"{ns}_websocket_messages_total",
            "WebSocket text and binary messages relayed, by direction (to_upstream, to_client)",
            ["direction"],
            registry=registry,
        )
        self.ws_jwts = Counter(
            f"{ns}_websocket_jwts_injected_total",
            "JWTs put into outgoing WebSocket subscribe/unsubscribe messages, by credential",
            ["credential"],
            registry=registry,
        )
        self.ws_closes = Counter(
            f"{ns}_websocket_closes_total",
            "WebSocket relays ended, by the close code they ended with (1006: connection lost)",
            ["code"],
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
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.wallet_tokens = Counter(
            f"{ns}_wallet_tokens_minted_total",
            "CDP v2 X-Wallet-Auth tokens minted (Server Wallet operations), by credential",
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
            multiprocess_mode="livemostrecent",
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
        self.malformed_requests = Counter(
            f"{ns}_malformed_requests_total",
            "Requests aiohttp's HTTP parser refused with 400 before the proxy saw them, by kind",
            ["kind"],
            registry=registry,
        )
        self.token_exchanges = Counter(
            f"{ns}_token_exchanges_total",
            "Access-token exchanges (public/auth) by credential, transport (http, websocket) "
            "and outcome (ok, rejected, http_error, bad_answer, unreachable, timeout)",
            ["credential", "transport", "outcome"],
            registry=registry,
        )
        self.token_expiry = Gauge(
            f"{ns}_token_expiry_seconds",
            "Seconds until the credential's current access token expires (0: none); kept "
            "current every second",
            ["credential"],
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.token_rejected_retries = Counter(
            f"{ns}_token_rejected_retries_total",
            "Calls sent again with a fresh access token after the gateway rejected the token",
            ["credential"],
            registry=registry,
        )

        # The hot path's children by key, each behind its pending counts (metric_batch.py):
        # labels() costs ~2.5 µs with its lock and checks, a dict lookup does not. Keys are
        # bounded (see the module docstring), so these dicts are too.
        self._requests: dict[tuple[str, str, str, str], PendingCounter] = {}
        self._durations: dict[tuple[str, str], PendingHistogram | _Direct] = {}
        self._tokens: dict[tuple[str, str], PendingCounter] = {}
        self._signing: dict[str, PendingHistogram | _Direct] = {}
        self._upstreams: dict[str, PendingHistogram | _Direct] = {}
        self._in_flight = self._pending_counter(self.in_flight)

    def _pending_counter(self, child: Any) -> PendingCounter:
        pending = PendingCounter(child)
        self.batch.track(pending)
        return pending

    def _pending_histogram(self, child: Any) -> PendingHistogram | _Direct:
        if not batchable(child):
            return _Direct(child)
        pending = PendingHistogram(child)
        self.batch.track(pending)
        return pending

    def request_started(self) -> None:
        self._in_flight.amount += 1
        self.batch.touched()

    def request_finished(self) -> None:
        self._in_flight.amount -= 1
        self.batch.touched()

    def count_request(
        self, upstream: str, method: str, route: str, status: int, seconds: float
    ) -> None:
        key = (upstream, method, route, status_class(status))
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self._pending_counter(self.requests.labels(*key))
        counter.amount += 1
        histogram = self._durations.get((upstream, route))
        if histogram is None:
            child = self.request_duration.labels(upstream, route)
            histogram = self._durations[(upstream, route)] = self._pending_histogram(child)
        histogram.observe(seconds)
        self.batch.touched()

    def count_signature(self, credential: str, scheme: str, seconds: float, count: int = 1) -> None:
        """``count`` signatures (more than one when a request was retried, signed afresh)."""
        counter = self._tokens.get((credential, scheme))
        if counter is None:
            child = self.tokens.labels(credential, scheme)
            counter = self._tokens[(credential, scheme)] = self._pending_counter(child)
        counter.amount += count
        histogram = self._signing.get(scheme)
        if histogram is None:
            timing = self.signing_duration.labels(scheme)
            histogram = self._signing[scheme] = self._pending_histogram(timing)
        histogram.observe(seconds)
        self.batch.touched()

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        histogram = self._upstreams.get(upstream)
        if histogram is None:
            child = self.upstream_duration.labels(upstream)
            histogram = self._upstreams[upstream] = self._pending_histogram(child)
        histogram.observe(seconds)
        self.batch.touched()

    def flush(self) -> None:
        """Add every pending count to its metric now (shutdown; readers that bypass collect)."""
        self.batch.flush()
