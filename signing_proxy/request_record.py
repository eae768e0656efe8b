"""One request's record, and ``Ledger.finish``: the one place a finished request is counted.

``Exchange`` is filled in as the request walks through the proxy (proxy.py, relay.py and the
relays for WebSocket and token-exchange upstreams); ``Ledger.finish`` reads it once, at the end,
whatever the outcome: request and error metrics, signatures, retries, upstream time, the access
log line, and what the upstream's answer says about our signing (clock skew, 401s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .diagnostics import ClockSkewMonitor, UnauthorizedReporter
from .metrics import ProxyMetrics, method_label
from .random_hex import RandomHex

if TYPE_CHECKING:
    from .credentials import CredentialStore
    from .http_request import Request
    from .logs import AccessLog
    from .routing import Target
    from .signers import Signer

__all__ = ["Exchange", "Ledger", "request_id_for"]

_ID_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_new_id: Final = RandomHex(8, batch=512)  # 16 hex digits


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def request_id_for(offered: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short and plain (1-64 of ``A-Za-z0-9._:-``),
    else a fresh random one."""
    if offered and len(offered) <= 64 and _ID_CHARS.issuperset(offered):
        return offered
    return _new_id()


@dataclass(slots=True)
class Exchange:
    """What one request did, filled in as it goes; read once by ``Ledger.finish``."""

    request_id: str = ""
    method: str = ""
    started: float = 0.0  # time.perf_counter() when the request's head was complete
    raw_target: str = ""
    client: str | None = None
    target: Target | None = None  # set once routed
    credential: str | None = None
    route: str = "-"  # the route label of an answer the proxy makes itself (no target)
    signer: Signer | None = None  # signs every attempt of this request (None: unsigned)
    relayed: bool = False  # the upstream's answer (or the WebSocket session) is complete
    status: int = 0
    error: str | None = None  # the error code, when the request failed or was refused
    signatures: int = 0  # tokens minted (one per attempt)
    sign_seconds: float = 0.0
    upstream_seconds: float = 0.0
    bytes_out: int = 0
    retries: int = 0
    upstream_date: str | None = None  # the upstream's Date header, for the clock skew gauge
    wallet_tokens: int = 0  # X-Wallet-Auth tokens minted (one per attempt)

    @classmethod
    def begin(cls, request: Request) -> Exchange:
        return cls(
            request_id=request_id_for(_latin1(request.first(b"x-request-id"))),
            method=request.method,
            started=time.perf_counter(),
            raw_target=request.target,
            client=request.remote,
        )


class Ledger:
    """Counts, logs and learns from every finished request (see the module docstring)."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        credentials: CredentialStore,
        access_log: AccessLog | None = None,
    ):
        self.metrics = metrics
        self.credentials = credentials
        self.access_log = access_log
        self.skew = ClockSkewMonitor(metrics)
        self.unauthorized = UnauthorizedReporter(metrics)

    def finish(self, ex: Exchange) -> None:
        seconds = time.perf_counter() - ex.started
        metrics = self.metrics
        target = ex.target
        upstream = target.upstream.name if target is not None else "-"
        route = target.route if target is not None else ex.route
        metrics.count_request(upstream, method_label(ex.method), route, ex.status, seconds)
        if ex.error:
            metrics.errors.labels(ex.error).inc()  # rare: no child cache needed
        if target is not None:
            if ex.retries:
                metrics.retries.labels(upstream).inc(ex.retries)
            if ex.signatures and ex.signer is not None and ex.credential is not None:
                metrics.count_signature(
                    ex.credential, ex.signer.scheme, ex.sign_seconds, ex.signatures
                )
                if ex.wallet_tokens:
                    metrics.wallet_tokens.labels(ex.credential).inc(ex.wallet_tokens)
            if ex.relayed:
                metrics.observe_upstream(upstream, ex.upstream_seconds)
                self._learn(ex, target)
        if self.access_log is not None:  # logs.ACCESS_FIELDS, in order
            self.access_log.request(
                (
                    ex.request_id,
                    ex.method,
                    upstream,
                    route,
                    target.path if target is not None else ex.raw_target[:256],
                    ex.credential,
                    ex.status,
                    ex.error,
                    ex.bytes_out,
                    ex.retries,
                    round(seconds * 1000, 3),
                    round(ex.upstream_seconds * 1000, 3),
                    round(ex.sign_seconds * 1000, 3),
                    ex.client,
                )
            )

    def _learn(self, ex: Exchange, target: Target) -> None:
        """What the upstream's answer says about our signing: clock skew, and 401s."""
        upstream = target.upstream.name
        self.skew.observe(upstream, ex.upstream_date)
        signer = ex.signer if target.upstream.auth is None else None  # token_exchange: no JWT
        if ex.status == 401 and signer is not None and ex.credential is not None:
            info = self.credentials[ex.credential].info
            signed = signer.describe(ex.method, upstream, target.path, target.query)
            self.unauthorized.report(
                ex.credential,
                algorithm=signer.scheme,
                key_id=info.key_id if info is not None else "?",
                signed=signed[:512],
                request_id=ex.request_id,
                skew=self.skew.skew.get(upstream),
            )
