"""Where every request on the proxy listener enters: refuse, route, sign, relay, count, log.

The flow is one straight line in ``ProxyHandler.__call__``; each step raises a ProxyError that is
turned into the JSON error answer here, so no step has to know about HTTP error formatting.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
import traceback
from pathlib import Path
from typing import Final

from aiohttp import web

from .credentials import CredentialStore
from .errors import JSON_CONTENT_TYPE, ProxyError, RequestRejected
from .logs import AccessLog
from .metrics import ProxyMetrics, method_label
from .relay import Exchange, Relay
from .routing import Router, Target
from .topper import ALGORITHM, BOOTSTRAP_PATH, CREDENTIAL_LABEL, TopperEndpoint
from .websocket import WebSocketRelay, is_websocket_upgrade

__all__ = ["ProxyHandler", "error_response"]

log = logging.getLogger(__name__)

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TOKEN_HEADER: Final = "X-Signing-Proxy-Token"  # noqa: S105 - a header name


def _frames(exc: BaseException) -> list[str]:
    """Where an exception came from, without its message (which could quote a value)."""
    return [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-6:]
    ]


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    response = web.Response(
        status=exc.status, body=exc.body(), content_type=JSON_CONTENT_TYPE,
        headers={"X-Request-Id": request_id},
    )  # fmt: skip
    if exc.code == "proxy_auth_required":
        response.headers["Proxy-Authenticate"] = 'Bearer realm="signing-proxy"'
    return response


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
        self.router = router
        self.credentials = credentials
        self.relay = relay
        self.metrics = metrics
        self.websockets = WebSocketRelay(relay.session, relay.endpoints, credentials, metrics)
        self.topper = topper
        self._token = inbound_token.encode() if inbound_token else None

    def _check_inbound_auth(self, request: web.BaseRequest) -> None:
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

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        offered_id = request.headers.get("X-Request-Id", "")
        request_id = offered_id if _REQUEST_ID.fullmatch(offered_id) else secrets.token_hex(8)
        ex = Exchange(request_id)
        target: Target | None = None
        credential: str | None = None
        local_route = "-"  # the route label of an answer the proxy makes itself
        response: web.StreamResponse
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
            self._check_inbound_auth(request)
            if self.topper is not None and self.topper.handles(request):
                # Minted here, not routed: the answer is the token (COINBASE_AUTH.md §5).
                local_route, credential = BOOTSTRAP_PATH, CREDENTIAL_LABEL
                response = await self.topper(request)
                ex.status = response.status
                self.metrics.tokens.labels(CREDENTIAL_LABEL, ALGORITHM).inc()
            else:
                target = self.router.resolve(request.raw_path)
                credential = target.credential
                signer = self.credentials.signer(credential) if credential else None
                if is_websocket_upgrade(request):
                    # The handshake is not signed: the relay puts JWTs in subscribe messages.
                    response = await self.websockets.relay(request, target, signer, ex)
                else:
                    response = await self.relay.forward(request, target, signer, ex)
                    if signer is not None and credential is not None:
                        self.metrics.count_signature(credential, signer.scheme, ex.sign_seconds)
                self.metrics.observe_upstream(target.upstream.name, ex.upstream_seconds)
        except ProxyError as exc:
            ex.status, ex.error = exc.status, exc.code
            response = error_response(exc, request_id)
        except Exception as exc:  # a bug: answer JSON; log the type, not values that may be secret
            log.error(
                "internal error",
                extra={"fields": {"request_id": request_id, "exc_type": type(exc).__name__,
                                  "where": _frames(exc)}},
            )  # fmt: skip
            internal = ProxyError(f"internal error (request id {request_id}); see the proxy's log")
            ex.status, ex.error = internal.status, internal.code
            response = error_response(internal, request_id)
        finally:
            self.metrics.in_flight.dec()
        if ex.error:
            self.metrics.errors.labels(ex.error).inc()  # rare: no child cache needed
        self._account(
            request, request_id, target, credential, ex, time.perf_counter() - started, local_route
        )
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    def _account(
        self,
        request: web.BaseRequest,
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
                    "path": target.path if target else request.path[:256],
                    "credential": credential,
                    "status": ex.status,
                    "error": ex.error,
                    "bytes_out": ex.bytes_out,
                    "duration_ms": round(seconds * 1000, 3),
                    "upstream_ms": round(ex.upstream_seconds * 1000, 3),
                    "sign_ms": round(ex.sign_seconds * 1000, 3),
                    "client": request.remote,
                }
            )
