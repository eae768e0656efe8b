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
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .answer import connection_names, refuse
from .credentials import CredentialStore
from .errors import ProxyError, RequestRejected
from .http_request import Request
from .logs import AccessLog
from .metrics import ProxyMetrics
from .ratelimit import TokenBucket
from .relay import Relay
from .request_headers import END_TO_END
from .request_record import Exchange, Ledger
from .routing import Router, Target
from .signers import Signer
from .topper import ALGORITHM, BOOTSTRAP_PATH, CREDENTIAL_LABEL, TopperEndpoint

if TYPE_CHECKING:
    from .websocket import WebSocketRelay
    from .ws_handoff import WebSocketHandoff

__all__ = ["ProxyHandler"]

log = logging.getLogger(__name__)

TOKEN_HEADER: Final = "X-Signing-Proxy-Token"  # noqa: S105 - a header name
_WS_FINISH_SECONDS: Final = 5.0  # how long a relay whose client vanished gets to close up
# Headers some frameworks read as "use this method instead" (Rails, Express, ASP.NET).
_METHOD_OVERRIDES: Final = tuple(
    (name, name.lower().encode())
    for name in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
)
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
        self._websockets: WebSocketRelay | None = None  # made at the first upgrade
        self._handoff: WebSocketHandoff | None = None
        topper_limit = topper.settings.rate_limit if topper is not None else None
        self._topper_bucket = TokenBucket(topper_limit) if topper_limit is not None else None
        self.ledger = Ledger(metrics, credentials, access_log)

    @property
    def websockets(self) -> WebSocketRelay:
        """The WebSocket relays (aiohttp's client and server): built, and aiohttp loaded, at the
        first upgrade, so a proxy that relays REST only never loads them."""
        if self._websockets is None:
            from .websocket import WebSocketRelay

            relay = self.relay
            self._websockets = WebSocketRelay(
                relay.sessions.get(), relay.endpoints, self.credentials, self.metrics,
                buckets=self.buckets,
            )  # fmt: skip
        return self._websockets

    def _ws_handoff(self) -> WebSocketHandoff:
        if self._handoff is None:
            from .ws_handoff import WebSocketHandoff

            self._handoff = WebSocketHandoff(self.websockets)
        return self._handoff

    async def close_websockets(self) -> None:
        """Close every open WebSocket with 1001 (shutdown); nothing to do if none was relayed."""
        if self._websockets is not None:
            await self._websockets.close_all()

    def _check_framing(self, request: Request) -> None:
        """What the listener's parser lets through but a signing proxy should not forward.

        The server (http_server.py) refuses bad versions, oversized heads, methods not in upper
        case and transfer codings other than chunked itself."""
        for name, lower in _METHOD_OVERRIDES:
            if request.values(lower):
                raise RequestRejected(
                    f"{name} is refused: the upstream could execute another method than the one "
                    "checked and signed; send the real method",
                    code="method_override_refused",
                )
        connection = request.values(b"connection")
        named = connection_names(v.decode("latin-1") for v in connection) if connection else None
        if named and named & END_TO_END:
            raise RequestRejected(
                f"Connection names {', '.join(sorted(named & END_TO_END))}, which describe the "
                "request for every recipient and cannot be hop-by-hop",
                code="bad_connection_header",
            )
        expect = request.first(b"expect")
        if expect is not None and expect.decode("latin-1").strip().lower() != "100-continue":
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
        """The listener's handler: one request, answered through ``request``, counted once."""
        ex = Exchange.begin(request)
        self.metrics.request_started()
        try:
            try:
                await self._walk(request, ex)
            except ProxyError as exc:
                ex.status, ex.error = exc.status, exc.code
                await self._refuse(request, ex, exc)
            except asyncio.CancelledError:  # the client went away (or shutdown ran out of time)
                if not ex.relayed:
                    ex.status, ex.error = 499, "cancelled"
                raise
            except (
                Exception
            ) as exc:  # a bug: answer JSON; log the type, not values that may be secret
                log.error(
                    "internal error",
                    extra={"fields": {"request_id": ex.request_id, "exc_type": type(exc).__name__,
                                      "where": _frames(exc)}},
                )  # fmt: skip
                refusal = ProxyError(
                    f"internal error (request id {ex.request_id}); see the proxy's log"
                )
                ex.status, ex.error = refusal.status, refusal.code
                await self._refuse(request, ex, refusal)
        finally:
            self.metrics.request_finished()
            self.ledger.finish(ex)

    async def _walk(self, request: Request, ex: Exchange) -> None:
        """Refuse, route, check, sign and relay: each step raises a ProxyError to refuse."""
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
            await self._mint_topper_token(request, ex)
            return
        target = ex.target = self.router.resolve(request.target)
        credential = ex.credential = target.credential
        self._check_policy(request, target)
        self._check_rate(credential)
        signer = ex.signer = self.credentials.signer(credential) if credential else None
        if request.method == "GET" and (request.first(b"upgrade") or b"").lower() == b"websocket":
            await self._relay_websocket(request, target, signer, ex)
            return
        if signer is not None:  # a request its signer refuses (a wallet write without a
            # Wallet Secret) is refused here, before any 100 Continue
            signer.needs_body(request.method, target.upstream.name, target.path)
        await request.send_continue()
        await self.relay.forward(request, target, signer, ex)
        ex.relayed = True

    async def _mint_topper_token(self, request: Request, ex: Exchange) -> None:
        # Minted here, not routed: the answer is the token (docs/coinbase-auth.md, "Topper bootstrap tokens").
        assert self.topper is not None
        ex.route, ex.credential = BOOTSTRAP_PATH, CREDENTIAL_LABEL
        self._check_rate(CREDENTIAL_LABEL, self._topper_bucket)
        await request.send_continue()
        token = await self.topper(request)
        ex.status = 200
        headers = [*_TOPPER_TYPE, (b"X-Request-Id", ex.request_id.encode())]
        await request.respond(200, "OK", headers, token)
        self.metrics.tokens.labels(CREDENTIAL_LABEL, ALGORITHM).inc()

    async def _relay_websocket(
        self, request: Request, target: Target, signer: Signer | None, ex: Exchange
    ) -> None:
        if not target.upstream.websocket:
            raise RequestRejected(
                f"{target.upstream.name} is not configured for WebSocket: give it a "
                "wss:// url (or websocket: true) to relay upgrades to it",
                code="websocket_not_allowed",
                status=403,
            )
        # The handshake is not signed: the relay puts JWTs in subscribe messages.
        # aiohttp runs the relay on the connection from here (ws_handoff.py).
        ws_task = await self._ws_handoff().start(request, target, signer, ex)
        if ws_task is None:  # never a handshake: counted as a bad upgrade
            return
        try:
            await asyncio.shield(ws_task)
        except asyncio.CancelledError:
            # The client went away: a relay ends itself, so let it finish its closing.
            await asyncio.wait([ws_task], timeout=_WS_FINISH_SECONDS)
            ex.relayed = ws_task.done() and not ws_task.cancelled() and not ws_task.exception()
            raise
        ex.relayed = True

    async def _refuse(self, request: Request, ex: Exchange, refusal: ProxyError) -> None:
        if request.response_started:
            if not request.response_done:
                request.abort()  # a bug mid-answer: never a short body that looks whole
            return
        extra = _PROXY_AUTHENTICATE if refusal.code == "proxy_auth_required" else None
        await refuse(request, refusal, ex.request_id, extra)
