"""The REST relay: a request sent upstream over the connection pool, its answer streamed back.

Bodies stream through in both directions unless the signer needs the request body (HMAC), in
which case it is read up to ``max_body_bytes`` (413 above) within the upstream's timeout (408).
Streamed bodies may be capped too (``max_stream_body_bytes``). Responses are never decompressed or
followed: what the upstream says is what the client gets, minus hop-by-hop headers.

A request that fails before it reached the upstream is sent again, signed afresh (a token is never
replayed), up to the upstream's ``retries``: any method when the connection could not be opened,
and GET/HEAD/OPTIONS when the connection broke before the response, provided the request body was
not consumed yet. All attempts share the upstream's ``timeout``.

Beside it: which request headers go upstream (request_headers.py), where an upstream is and how to
reach it (upstream_endpoint.py), and the aiohttp client for WebSockets and the proxy's own calls
(aiohttp_client.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Final

from yarl import URL

from .answer import client_head, stream_body
from .errors import RequestRejected, UpstreamError
from .http_request import Request
from .outbound_session import OutboundSession
from .request_body import read_capped_body
from .request_headers import wire_request_headers
from .request_record import Exchange
from .routing import Target
from .signers import Signer
from .upstream_endpoint import UpstreamEndpoint
from .upstream_pool import Response, StaleConnection, UpstreamFailure, UpstreamPool
from .wallet_auth import WALLET_HEADER

if TYPE_CHECKING:
    from .token_relay import TokenRelay

__all__ = ["Relay"]

log = logging.getLogger(__name__)

_SMALL_BODY: Final = 64 * 1024  # responses up to this size are sent in one write
# RFC 9110 §9.2.2 lists PUT and DELETE as idempotent too, but a retried DELETE or PUT that the
# upstream did execute is a second, freshly authorised order operation: only safe methods retry.
_RETRY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class _BodyTooLarge(Exception):
    pass


class _BodyStream:
    """The client's body streamed upstream; remembers whether it was touched (then no retry)."""

    def __init__(self, request: Request, cap: int | None):
        self._request = request
        self._cap = cap
        self.started = False
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        size = 0
        while chunk := await self._request.read_chunk():
            size += len(chunk)
            if self._cap is not None and size > self._cap:
                self.too_large = True
                raise _BodyTooLarge
            yield chunk


def _too_large(cap: int, what: str) -> RequestRejected:
    return RequestRejected(
        f"request body exceeds {what} ({cap} bytes)", code="body_too_large", status=413
    )


def _retryable(exc: UpstreamFailure, method: str, body: _BodyStream | None) -> bool:
    """Did this attempt fail before the upstream could have acted on it, and can it be resent?"""
    if body is not None and body.started:
        return False  # the client's bytes are gone: they cannot be sent twice
    if exc.code in ("upstream_tls_error", "upstream_timeout"):
        return False  # a bad certificate stays bad; a timeout has used up the time
    if not exc.reached or isinstance(exc, StaleConnection):
        return True  # nothing was sent, or a pooled connection died under it (RFC 9112 §9.3.1)
    return method in _RETRY_METHODS and exc.code == "upstream_connection_reset"


def _pool(endpoint: UpstreamEndpoint) -> UpstreamPool:
    url = URL(endpoint.origin)
    context = endpoint.ssl if isinstance(endpoint.ssl, ssl.SSLContext) else _default_tls()
    host = endpoint.config.name
    return UpstreamPool(
        url.raw_host or host,
        url.port or 443,
        context,
        endpoint.server_hostname or url.raw_host,
        name=host,
    )


def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()


class Relay:
    """The REST hot path: one keep-alive connection pool per upstream (upstream_pool.py).

    ``sessions`` (aiohttp, made on first use) serves what is not on the hot path: WebSocket
    upgrades and the proxy's own outbound calls."""

    def __init__(
        self,
        sessions: OutboundSession,
        endpoints: Mapping[str, UpstreamEndpoint],
        max_body_bytes: int,
        max_stream_body_bytes: int | None = None,
    ):
        self.sessions = sessions
        self.endpoints = endpoints
        self.max_body_bytes = max_body_bytes
        self.max_stream_body_bytes = max_stream_body_bytes
        self.tokens: TokenRelay | None = None  # upstreams with auth: token_exchange (app.py)
        self.pools = {name: _pool(endpoint) for name, endpoint in endpoints.items()}

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    async def _read_body(self, request: Request, seconds: float) -> bytes:
        try:
            async with asyncio.timeout(seconds):
                return await read_capped_body(request, self.max_body_bytes)
        except TimeoutError:
            raise RequestRejected(
                f"the request body did not arrive within {seconds:g}s",
                code="body_timeout",
                status=408,
            ) from None

    async def _send(
        self,
        request: Request,
        target: Target,
        signer: Signer | None,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        stream: _BodyStream | None,
    ) -> Response:
        """Sign and send, again if the attempt failed before reaching the upstream."""
        host = target.upstream.name
        pool = self.pools[host]
        method = request.method
        wire_target = (target.path + ("?" + target.query if target.query else "")).encode(
            "latin-1"
        )  # the path exactly as signed
        timeout = target.upstream.timeout
        loop = pool.running_loop()
        deadline = loop.time() + timeout
        base = headers
        declared = request.content_length if stream is not None else None
        t0 = time.perf_counter()
        stale_retried = False
        while True:
            wire = base
            if signer is not None:
                s0 = time.perf_counter()
                # Fresh for every attempt: a nonce or timestamp is never sent twice.
                signed = signer.sign(method, host, target.path, target.query, body)
                wire = base + [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in signed.items()
                ]
                ex.wallet_tokens += WALLET_HEADER in signed
                ex.signatures += 1
                ex.sign_seconds += time.perf_counter() - s0
            try:
                if stream is None:  # the pool's own deadline covers its socket
                    upstream = await pool.request(
                        method, wire_target, wire, body, timeout=timeout, deadline=deadline
                    )
                else:  # this one also covers a client whose streamed body stalls the upload
                    async with asyncio.timeout_at(deadline):
                        upstream = await pool.request(
                            method, wire_target, wire, stream.chunks(), content_length=declared,
                            timeout=timeout, deadline=deadline,
                        )  # fmt: skip
            except TimeoutError:
                raise UpstreamError(
                    f"{host} did not answer within {timeout:g}s (upstream timeout)",
                    code="upstream_timeout",
                    status=504,
                ) from None
            except _BodyTooLarge:
                assert self.max_stream_body_bytes is not None
                raise _too_large(self.max_stream_body_bytes, "max_stream_body_bytes") from None
            except UpstreamFailure as exc:
                # A pooled connection the upstream closed while idle is the keep-alive race,
                # not the upstream's fault: one more try on a fresh one, beyond `retries`.
                stale = isinstance(exc, StaleConnection) and not stale_retried
                if (
                    (stale or ex.retries < target.upstream.retries)
                    and deadline - loop.time() > 0.01
                    and _retryable(exc, method, stream)
                ):
                    if stale:
                        stale_retried = True
                    else:
                        ex.retries += 1
                    log.info(
                        "upstream attempt failed before reaching it; retrying, signed afresh",
                        extra={"fields": {"request_id": ex.request_id, "upstream": host,
                                          "error": exc.code, "retry": ex.retries}},
                    )  # fmt: skip
                    continue
                raise
            ex.upstream_seconds = time.perf_counter() - t0
            return upstream

    async def forward(
        self, request: Request, target: Target, signer: Signer | None, ex: Exchange
    ) -> None:
        """Send the request upstream and write its answer to the client (ex says how it went)."""
        if target.upstream.auth == "token_exchange":  # a cached access token, not a signature
            if self.tokens is None:
                raise UpstreamError("token_exchange is not set up", code="internal_error")
            await self.tokens.forward(request, target, ex)
            return
        host = target.upstream.name
        timeout = target.upstream.timeout
        headers = wire_request_headers(request.raw_headers, host)

        body: bytes | None = None
        stream: _BodyStream | None = None
        if signer is not None and signer.needs_body(request.method, host, target.path):
            body = await self._read_body(request, timeout)
            if not body and not request.body_exists:
                body = None
        elif request.body_exists:
            cap = self.max_stream_body_bytes
            declared = request.content_length
            if cap is not None and declared is not None and declared > cap:
                raise _too_large(cap, "max_stream_body_bytes")
            stream = _BodyStream(request, cap)

        upstream = await self._send(request, target, signer, ex, headers, body, stream)
        try:
            await self._answer(request, upstream, ex, host)
        finally:
            upstream.release()  # back to the pool only if read to its end; closed otherwise

    async def _answer(self, request: Request, upstream: Response, ex: Exchange, host: str) -> None:
        head = client_head(upstream.headers, ex.request_id)
        ex.upstream_date = head.date
        ex.status = status = upstream.status
        size = upstream.content_length
        if size is not None and size <= _SMALL_BODY and request.method != "HEAD":
            # Small, declared-length answers (most API calls): headers and body in one write.
            # Memory stays bounded by _SMALL_BODY.
            small = await upstream.read()
            ex.bytes_out = len(small)
            await request.respond(status, upstream.reason, head.headers, small)
            return
        # A HEAD answer announces the length a GET would have had; the rest stream as they come.
        length = head.declared if request.method == "HEAD" else size
        request.start(status, upstream.reason, head.headers, content_length=length)
        ex.bytes_out, error = await stream_body(request, upstream.body(), _failure_code, host)
        ex.error = error or ex.error


def _failure_code(exc: BaseException) -> str | None:
    return exc.code if isinstance(exc, UpstreamFailure) else None
