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
from typing import Final

from aiohttp import web

from .config import DEFAULT_MAX_HEADER_BYTES
from .credentials import CredentialStore
from .diagnostics import ClockSkewMonitor, UnauthorizedReporter
from .errors import JSON_CONTENT_TYPE, ProxyError, RequestRejected
from .logs import AccessLog
from .metrics import ProxyMetrics, method_label
from .ratelimit import TokenBucket
from .relay import END_TO_END, Exchange, Relay, connection_tokens
from .routing import Router, Target
from .signers import Signer
from .topper import ALGORITHM, BOOTSTRAP_PATH, CREDENTIAL_LABEL, TopperEndpoint
from .websocket import WebSocketRelay, is_websocket_upgrade

__all__ = ["ProxyHandler", "error_response"]

log = logging.getLogger(__name__)

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TOKEN_HEADER: Final = "X-Signing-Proxy-Token"  # noqa: S105 - a header name
_WS_FINISH_SECONDS: Final = 5.0  # how long a relay whose client vanished gets to close up
_METHOD: Final = re.compile(r"[A-Z]{1,20}")
# Headers some frameworks read as "use this method instead" (Rails, Express, ASP.NET).
_METHOD_OVERRIDES: Final = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _answer_and_close(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Send a refusal whose request body was never read, then close: aiohttp would otherwise
    linger up to 10 s reading (and so paying for) a body nobody wants."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the answer is written; closing flushes it first


async def _send_continue(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` once the request has passed every check: only then may
    the client send its body (RFC 9110 §10.1.1). A refused request never gets one, and its body
    is never read (the connection is closed after the error)."""
    if request.version >= (1, 1) and "Expect" in request.headers and not request.content.is_eof():
        await request.writer.write(_CONTINUE)


def _frames(exc: BaseException) -> list[str]:
    """Where an exception came from, without its message (which could quote a value)."""
    return [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)[-6:]
    ]


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    response = web.Response(
        status=exc.status, body=exc.body(), content_type=JSON_CONTENT_TYPE,
        headers={**exc.headers, "X-Request-Id": request_id},
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
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ):
        self.access_log = access_log
        self.topper = topper
        self.router = router
        self.credentials = credentials
        self.relay = relay
        self.metrics = metrics
        self._token = inbound_token.encode() if inbound_token else None
        self.max_header_bytes = max_header_bytes
        self.buckets = {
            cred.name: TokenBucket(cred.config.rate_limit)
            for cred in credentials
            if cred.config.rate_limit is not None
        }
        self.websockets = WebSocketRelay(
            relay.session, relay.endpoints, credentials, metrics, buckets=self.buckets
        )
        topper_limit = topper.settings.rate_limit if topper is not None else None
        self._topper_bucket = TokenBucket(topper_limit) if topper_limit is not None else None
        self.skew = ClockSkewMonitor(metrics)
        self.unauthorized = UnauthorizedReporter(metrics)

    def _check_framing(self, request: web.BaseRequest) -> None:
        """What aiohttp's parser lets through but a signing proxy should not forward."""
        if request.version < (1, 0):
            # aiohttp reads "GET /path" (no version) as HTTP/0.9; nothing legitimate sends that.
            raise RequestRejected(
                "HTTP/0.9 requests are not supported", code="http_version_not_supported", status=505
            )
        size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > self.max_header_bytes:
            raise RequestRejected(
                f"request headers total {size} bytes, over max_header_bytes ({self.max_header_bytes})",
                code="headers_too_large",
                status=431,
            )
        if not _METHOD.fullmatch(request.method):
            # "post" is another method than POST to HTTP, but not to every server; the JWT signs
            # the upper-case form, so only that form is forwarded.
            raise RequestRejected(
                f"method {request.method[:20]!r} is not an upper-case HTTP method",
                code="bad_method",
            )
        for name in _METHOD_OVERRIDES:
            if name in request.headers:
                raise RequestRejected(
                    f"{name} is refused: the upstream could execute another method than the one "
                    "checked and signed; send the real method",
                    code="method_override_refused",
                )
        named = connection_tokens(request.headers)
        if named & END_TO_END:
            raise RequestRejected(
                f"Connection names {', '.join(sorted(named & END_TO_END))}, which describe the "
                "request for every recipient and cannot be hop-by-hop",
                code="bad_connection_header",
            )
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            raise RequestRejected(
                "only 'Expect: 100-continue' is supported", code="expectation_failed", status=417
            )
        coding = request.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # e.g. "gzip, chunked": aiohttp undoes only the chunking, so the bytes it hands over
            # are not the body the client meant; forwarding them would change the request.
            raise RequestRejected(
                "only 'Transfer-Encoding: chunked' is supported",
                code="unsupported_transfer_encoding",
                status=501,
            )

    def _check_policy(self, request: web.BaseRequest, target: Target) -> None:
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

    def _learn(
        self, request: web.BaseRequest, target: Target, signer: Signer | None, ex: Exchange
    ) -> None:
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
        ws_task: asyncio.Future[web.StreamResponse] | None = None
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
            self._check_framing(request)
            self._check_inbound_auth(request)
            if self.topper is not None and self.topper.handles(request):
                # Minted here, not routed: the answer is the token (docs/coinbase-auth.md, "Topper bootstrap tokens").
                local_route, credential = BOOTSTRAP_PATH, CREDENTIAL_LABEL
                self._check_rate(CREDENTIAL_LABEL, self._topper_bucket)
                await _send_continue(request)
                response = await self.topper(request)
                ex.status = response.status
                self.metrics.tokens.labels(CREDENTIAL_LABEL, ALGORITHM).inc()
            else:
                target = self.router.resolve(request.raw_path)
                credential = target.credential
                self._check_policy(request, target)
                self._check_rate(credential)
                signer = self.credentials.signer(credential) if credential else None
                upgrade = is_websocket_upgrade(request)
                if upgrade and not target.upstream.websocket:
                    raise RequestRejected(
                        f"{target.upstream.name} is not configured for WebSocket: give it a "
                        "wss:// url (or websocket: true) to relay upgrades to it",
                        code="websocket_not_allowed",
                        status=403,
                    )
                if not upgrade:
                    await _send_continue(request)
                if upgrade:
                    # The handshake is not signed: the relay puts JWTs in subscribe messages.
                    # Shielded: aiohttp cancels the handler when the client's TCP connection
                    # ends, but the relay must still close the upstream and count the close.
                    ws_task = asyncio.ensure_future(
                        self.websockets.relay(request, target, signer, ex)
                    )
                    response = await asyncio.shield(ws_task)
                else:
                    try:
                        response = await self.relay.forward(request, target, signer, ex)
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
            response = error_response(exc, request_id)
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
            internal = ProxyError(f"internal error (request id {request_id}); see the proxy's log")
            ex.status, ex.error = internal.status, internal.code
            response = error_response(internal, request_id)
        finally:
            self.metrics.in_flight.dec()
        self._account(
            request, request_id, target, credential, ex, time.perf_counter() - started, local_route
        )
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        if ex.error:
            self.metrics.errors.labels(ex.error).inc()  # rare: no child cache needed
            if not response.prepared and request.body_exists and not request.content.is_eof():
                await _answer_and_close(request, response)
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
                    "path": target.path if target else request.raw_path[:256],
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
