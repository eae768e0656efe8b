"""Where every request on the proxy listener enters: refuse, route, sign, relay, count, log.

The flow is one straight line in ``ProxyHandler.__call__``: refuse CONNECT and bad framing,
check the inbound token, route, apply policy and rate limit, sign, relay, then learn from the
answer (clock skew, 401s). Each step raises a ProxyError that is turned into the JSON error answer
here, so no step has to know about HTTP error formatting.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
import traceback
from pathlib import Path
from typing import Any, Final

from .answer import refuse
from .credentials import CredentialStore
from .diagnostics import ClockSkewMonitor, UnauthorizedReporter
from .errors import ProxyError, RequestRejected
from .http_request import Request
from .logs import AccessLog
from .metrics import ProxyMetrics, method_label
from .ratelimit import TokenBucket
from .relay import END_TO_END, Exchange, Relay, connection_tokens
from .routing import Router, Target
from .signers import Signer
from .topper import ALGORITHM, BOOTSTRAP_PATH, CREDENTIAL_LABEL, TopperEndpoint
from .websocket import WebSocketRelay, is_websocket_upgrade
from .ws_handoff import WebSocketHandoff

__all__ = ["ProxyHandler"]

log = logging.getLogger(__name__)

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TOKEN_HEADER: Final = "X-Signing-Proxy-Token"  # noqa: S105 - a header name
_WS_FINISH_SECONDS: Final = 5.0  # how long a relay whose client vanished gets to close up
# Headers some frameworks read as "use this method instead" (Rails, Express, ASP.NET).
_METHOD_OVERRIDES: Final = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_PROXY_AUTHENTICATE: Final = {"Proxy-Authenticate": 'Bearer realm="signing-proxy"'}
_TOPPER_TYPE: Final = [(b"Content-Type", b"application/json; charset=utf-8")]


def _frames(exc: BaseException) -> list[str]:
    """Where an exception came from, without its message (which could quote a value)."""
    return [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-6:]
    ]


class ProxyHandler:
    def __init__(
        self,
        router: Router,
        credentials: CredentialStore,
        relay: Relay,
        metrics: ProxyMetrics,
        inbound_token: str | None = None,
        access_log: AccessLog | None = None,
        *,
        topper: TopperEndpoint | None = None,
    ):
        self.access_log = access_log
        self.topper = topper
        self.router = router
        self.credentials = credentials
        self.relay = relay
        self.metrics = metrics
        self._token = inbound_token.encode() if inbound_token else None
        self.buckets = {
            cred.name: TokenBucket(cred.config.rate_limit)
            for cred in credentials
            if cred.config.rate_limit is not None
        }
        self.websockets = WebSocketRelay(
            relay.session, relay.endpoints, credentials, metrics, buckets=self.buckets
        )
        self.handoff = WebSocketHandoff(self.websockets)
        topper_limit = topper.settings.rate_limit if topper is not None else None
        self._topper_bucket = TokenBucket(topper_limit) if topper_limit is not None else None
        self.skew = ClockSkewMonitor(metrics)
        self.unauthorized = UnauthorizedReporter(metrics)

    def _check_framing(self, request: Request) -> None:
        """What the listener's parser lets through but a signing proxy should not forward.

        The server (http_server.py) refuses bad versions, oversized heads, methods not in upper
        case and transfer codings other than chunked itself."""
        headers = request.headers
        for name in _METHOD_OVERRIDES:
            if name in headers:
                raise RequestRejected(
                    f"{name} is refused: the upstream could execute another method than the one "
                    "checked and signed; send the real method",
                    code="method_override_refused",
                )
        named = connection_tokens(headers)
        if named & END_TO_END:
            raise RequestRejected(
                f"Connection names {', '.join(sorted(named & END_TO_END))}, which describe the "
                "request for every recipient and cannot be hop-by-hop",
                code="bad_connection_header",
            )
        expect = headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            raise RequestRejected(
                "only 'Expect: 100-continue' is supported", code="expectation_failed", status=417
            )

    def _check_policy(self, request: Request, target: Target) -> None:
        for policy in target.policies:
            why = policy.denial(request.method, target.path)
            if why is not None:
                self.metrics.policy_denied.labels(target.credential or "-").inc()
                raise RequestRejected(
                    f"{request.method} {target.path[:200]} is not allowed through this proxy "
                    f"({why}; credential {target.credential or 'none'})",
                    code="policy_denied",
                    status=403,
                )

    def _check_rate(self, credential: str | None, bucket: TokenBucket | None = None) -> None:
        if bucket is None and credential is not None:
            bucket = self.buckets.get(credential)
        if bucket is None or credential is None:
            return
        wait = bucket.acquire()
        if wait > 0:
            self.metrics.rate_limited.labels(credential).inc()
            seconds = TokenBucket.retry_after(wait)
            raise RequestRejected(
                f"rate limit of credential {credential!r} reached "
                f"({bucket.limit.rate:g}/s, burst {bucket.limit.burst}); retry in {seconds}s",
                code="rate_limited",
                status=429,
                headers={"Retry-After": str(seconds)},
            )

    def _learn(self, request: Request, target: Target, signer: Signer | None, ex: Exchange) -> None:
        """What the upstream's answer says about our signing: clock skew, and 401s."""
        upstream = target.upstream.name
        self.skew.observe(upstream, ex.upstream_date)
        if ex.status == 401 and signer is not None and target.credential is not None:
            info = self.credentials[target.credential].info
            signed = signer.describe(request.method, upstream, target.path, target.query)
            self.unauthorized.report(
                target.credential,
                algorithm=signer.scheme,
                key_id=info.key_id if info is not None else "?",
                signed=signed[:512],
                request_id=ex.request_id,
                skew=self.skew.skew.get(upstream),
            )

    def _check_inbound_auth(self, request: Request) -> None:
        if self._token is None:
            return
        offered = request.headers.get(TOKEN_HEADER, "")
        if not offered:
            scheme, _, value = request.headers.get("Proxy-Authorization", "").partition(" ")
            offered = value.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(offered.encode(), self._token):
            raise RequestRejected(
                f"this proxy requires a token: send 'Proxy-Authorization: Bearer <token>' or "
                f"'{TOKEN_HEADER}: <token>'",
                code="proxy_auth_required",
                status=407,
            )

    async def __call__(self, request: Request) -> None:
        """The listener's handler: one request, answered through ``request``."""
        started = time.perf_counter()
        offered_id = request.headers.get("X-Request-Id", "")
        request_id = offered_id if _REQUEST_ID.fullmatch(offered_id) else secrets.token_hex(8)
        ex = Exchange(request_id)
        target: Target | None = None
        credential: str | None = None
        local_route = "-"  # the route label of an answer the proxy makes itself
        ws_task: asyncio.Future[Any] | None = None
        refusal: ProxyError | None = None
        self.metrics.in_flight.inc()
        try:
            if request.method == "CONNECT":
                raise RequestRejected(
                    "CONNECT tunnels cannot be signed: the proxy must see the request to sign it. "
                    "Send plain http:// URLs through the proxy (it always uses TLS upstream), "
                    "e.g. curl -x http://127.0.0.1:8080 http://api.coinbase.com/api/v3/brokerage/accounts",
                    code="connect_not_supported",
                    status=405,
                )
            self._check_framing(request)
            self._check_inbound_auth(request)
            if self.topper is not None and self.topper.handles(request):
                # Minted here, not routed: the answer is the token (docs/coinbase-auth.md, "Topper bootstrap tokens").
                local_route, credential = BOOTSTRAP_PATH, CREDENTIAL_LABEL
                self._check_rate(CREDENTIAL_LABEL, self._topper_bucket)
                await request.send_continue()
                token = await self.topper(request)
                ex.status = 200
                headers = [*_TOPPER_TYPE, (b"X-Request-Id", request_id.encode())]
                await request.respond(200, "OK", headers, token)
                self.metrics.tokens.labels(CREDENTIAL_LABEL, ALGORITHM).inc()
            else:
                target = self.router.resolve(request.target)
                credential = target.credential
                self._check_policy(request, target)
                self._check_rate(credential)
                signer = self.credentials.signer(credential) if credential else None
                if is_websocket_upgrade(request):
                    if not target.upstream.websocket:
                        raise RequestRejected(
                            f"{target.upstream.name} is not configured for WebSocket: give it a "
                            "wss:// url (or websocket: true) to relay upgrades to it",
                            code="websocket_not_allowed",
                            status=403,
                        )
                    # The handshake is not signed: the relay puts JWTs in subscribe messages.
                    # aiohttp runs the relay on the connection from here (ws_handoff.py).
                    ws_task = await self.handoff.start(request, target, signer, ex)
                    if ws_task is not None:
                        await asyncio.shield(ws_task)
                else:
                    if signer is not None:  # a request its signer refuses (a wallet write
                        # without a Wallet Secret) is refused here, before any 100 Continue
                        signer.needs_body(request.method, target.upstream.name, target.path)
                    await request.send_continue()
                    try:
                        await self.relay.forward(request, target, signer, ex)
                    finally:
                        if ex.retries:
                            self.metrics.retries.labels(target.upstream.name).inc(ex.retries)
                    # token_exchange upstreams carry a cached token: nothing signed per request.
                    signed = signer if target.upstream.auth is None else None
                    self._learn(request, target, signed, ex)
                    if signed is not None and credential is not None:
                        self.metrics.count_signature(
                            credential, signed.scheme, ex.sign_seconds, 1 + ex.retries
                        )
                        if ex.wallet_tokens:
                            self.metrics.wallet_tokens.labels(credential).inc(ex.wallet_tokens)
                self.metrics.observe_upstream(target.upstream.name, ex.upstream_seconds)
        except ProxyError as exc:
            ex.status, ex.error = exc.status, exc.code
            refusal = exc
        except asyncio.CancelledError:  # the client went away (or shutdown ran out of time)
            if ws_task is not None:  # a WebSocket relay ends itself: let it finish its closing
                await asyncio.wait([ws_task], timeout=_WS_FINISH_SECONDS)
            if ws_task is None or not ws_task.done() or ws_task.cancelled() or ws_task.exception():
                ex.status, ex.error = 499, "cancelled"
            if ex.error:
                self.metrics.errors.labels(ex.error).inc()
            self._account(
                request, request_id, target, credential, ex, time.perf_counter() - started,
                local_route,
            )  # fmt: skip
            raise
        except Exception as exc:  # a bug: answer JSON; log the type, not values that may be secret
            log.error(
                "internal error",
                extra={"fields": {"request_id": request_id, "exc_type": type(exc).__name__,
                                  "where": _frames(exc)}},
            )  # fmt: skip
            refusal = ProxyError(f"internal error (request id {request_id}); see the proxy's log")
            ex.status, ex.error = refusal.status, refusal.code
        finally:
            self.metrics.in_flight.dec()
        self._account(
            request, request_id, target, credential, ex, time.perf_counter() - started, local_route
        )
        if ex.error:
            self.metrics.errors.labels(ex.error).inc()  # rare: no child cache needed
        if refusal is not None:
            if request.response_started:
                if not request.response_done:
                    request.abort()  # a bug mid-answer: never a short body that looks whole
                return
            extra = _PROXY_AUTHENTICATE if refusal.code == "proxy_auth_required" else None
            await refuse(request, refusal, request_id, extra)

    def _account(
        self,
        request: Request,
        request_id: str,
        target: Target | None,
        credential: str | None,
        ex: Exchange,
        seconds: float,
        local_route: str = "-",
    ) -> None:
        upstream = target.upstream.name if target else "-"
        route = target.route if target else local_route
        self.metrics.count_request(
            upstream, method_label(request.method), route, ex.status, seconds
        )
        if self.access_log is not None:
            self.access_log(
                {
                    "request_id": request_id,
                    "method": request.method,
                    "upstream": upstream,
                    "route": route,
                    "path": target.path if target else request.target[:256],
                    "credential": credential,
                    "status": ex.status,
                    "error": ex.error,
                    "bytes_out": ex.bytes_out,
                    "retries": ex.retries,
                    "duration_ms": round(seconds * 1000, 3),
                    "upstream_ms": round(ex.upstream_seconds * 1000, 3),
                    "sign_ms": round(ex.sign_seconds * 1000, 3),
                    "client": request.remote,
                }
            )
