"""Access tokens for the derivatives gateway (drb.coinbase.com): every broker of one proxy.

An upstream with ``auth: token_exchange`` is not signed per request: its CDP key is exchanged for a
short-lived access token that private calls carry (docs/coinbase-auth.md, "Derivatives gateway").
This module holds ``TokenBrokers``, the brokers of one proxy by (credential, upstream), their start,
stop and readiness. The parts live in their own modules, whose public names are re-exported here:
``public_auth`` (the ``public/auth`` call and answer, ``Grant``, ``ExchangeFailed``, the refresh
and backoff rules, ``redact``) and ``token_broker`` (one ``TokenBroker``: the token of one
credential on one upstream, exchanged, cached and refreshed; ``TokenUnavailable``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp

from .config import Config
from .credentials import CredentialStore
from .metrics import ProxyMetrics
from .public_auth import (
    AUTH_METHOD,
    AUTH_PATH,
    BACKOFF_CAP,
    BACKOFF_FIRST,
    GRANT_TYPE,
    REFRESH_RATIO,
    TOKEN_REJECTED_CODES,
    ExchangeFailed,
    Grant,
    auth_call,
    parse_auth_answer,
    redact,
)
from .token_broker import MIN_REJECTED_AGE, TokenBroker, TokenUnavailable
from .upstream_endpoint import UpstreamEndpoint

__all__ = [
    "AUTH_METHOD",
    "AUTH_PATH",
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "GRANT_TYPE",
    "MIN_REJECTED_AGE",
    "REFRESH_RATIO",
    "TOKEN_REJECTED_CODES",
    "ExchangeFailed",
    "Grant",
    "TokenBroker",
    "TokenBrokers",
    "TokenUnavailable",
    "auth_call",
    "parse_auth_answer",
    "redact",
]


class TokenBrokers:
    """Every broker of one proxy, by (credential, upstream); made at start, or on first use."""

    def __init__(
        self,
        credentials: CredentialStore,
        endpoints: Mapping[str, UpstreamEndpoint],
        session: aiohttp.ClientSession,
        metrics: ProxyMetrics,
    ):
        self._credentials = credentials
        self._endpoints = endpoints
        self._session = session
        self._metrics = metrics
        self._brokers: dict[tuple[str, str], TokenBroker] = {}
        self._running = False

    def __iter__(self) -> Iterator[TokenBroker]:
        return iter(self._brokers.values())

    def get(self, credential: str, upstream: str) -> TokenBroker:
        broker = self._brokers.get((credential, upstream))
        if broker is None:
            broker = TokenBroker(
                self._credentials[credential],
                self._endpoints[upstream],
                self._session,
                self._metrics,
            )
            self._brokers[(credential, upstream)] = broker
            if self._running:
                broker.start()
        return broker

    def start(self, config: Config) -> None:
        """A broker (and its first exchange) for every credential that signs such an upstream."""
        self._running = True
        for up in config.upstreams.values():
            if up.auth == "token_exchange" and up.credential is not None:
                self.get(up.credential, up.name)
        for route in config.routes:
            if route.credential and config.upstreams[route.upstream].auth == "token_exchange":
                self.get(route.credential, route.upstream)
        for broker in self:
            broker.start()

    async def stop(self) -> None:
        self._running = False
        for broker in self:
            await broker.stop()

    def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """Ready unless some broker has no valid token and its last exchange failed."""
        states = [broker.describe() for broker in self]
        return all(broker.usable() for broker in self), states
