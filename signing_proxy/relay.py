"""The upstream side: one pooled ClientSession, header hygiene, streaming, error translation.

Bodies stream through in both directions unless the signer needs the request body (HMAC), in
which case it is read up to ``max_body_bytes`` (413 above) within the upstream's timeout (408).
Streamed bodies may be capped too (``max_stream_body_bytes``). Responses are never decompressed or
followed: what the upstream says is what the client gets, minus hop-by-hop headers.

A request that fails before it reached the upstream is sent again, signed afresh (a token is never
replayed), up to the upstream's ``retries``: any method when the connection could not be opened,
and GET/HEAD/OPTIONS when the connection broke before the response, provided the request body was
not consumed yet. All attempts share the upstream's ``timeout``.

aiohttp client exceptions are translated into UpstreamError here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .answer import HOP_BY_HOP, client_head, connection_names, fold_name, stream_body
from .config import UpstreamConfig
from .errors import ConfigError, RequestRejected, UpstreamError
from .http_request import Request
from .request_record import Exchange
from .routing import Target
from .signers import Signer
from .upstream_pool import Response, StaleConnection, UpstreamFailure, UpstreamPool
from .wallet_auth import WALLET_HEADER

if TYPE_CHECKING:
    from .token_relay import TokenRelay

__all__ = [
    "END_TO_END",
    "HOP_BY_HOP",
    "Exchange",
    "Relay",
    "UpstreamEndpoint",
    "connection_names",
    "connection_tokens",
    "create_session",
    "filter_request_headers",
    "translate_client_error",
    "wire_request_headers",
]

log = logging.getLogger(__name__)

_SMALL_BODY: Final = 64 * 1024  # responses up to this size are sent in one write
# RFC 9110 §9.2.2 lists PUT and DELETE as idempotent too, but a retried DELETE or PUT that the
# upstream did execute is a second, freshly authorised order operation: only safe methods retry.
_RETRY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Never forwarded from the client: the proxy owns authentication and framing.
_REQUEST_DROP: Final = HOP_BY_HOP | {
    "authorization",
    "host",
    "content-length",
    "expect",
    "x-signing-proxy-token",
}
# Request headers a client may not name in Connection: they describe the body or the target for
# every recipient (RFC 9110 §7.6.1), so dropping them would change what the upstream executes.
END_TO_END: Final = frozenset(
    {"content-length", "content-encoding", "content-type", "content-range", "host", "expect"}
)
# Owned by the proxy whatever the spelling: some servers read '_' as '-' (CGI, WSGI), so
# CB_ACCESS_SIGN must not slip past a filter on CB-ACCESS-*.
_OWNED_PREFIXES: Final = ("cb-access-", "x-cb-access-")
_OWNED: Final = _REQUEST_DROP | {"x-wallet-auth"}
# aiohttp adds these when absent; a proxy must send only what the client sent.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """The header names listed in every Connection header (a client may send several)."""
    return connection_names(headers.getall("Connection", ()))


_OWNED_RAW: Final = frozenset(name.encode() for name in _OWNED)
_OWNED_PREFIXES_RAW: Final = tuple(prefix.encode() for prefix in _OWNED_PREFIXES)


def wire_request_headers(raw: list[tuple[bytes, bytes]], host: str) -> list[tuple[bytes, bytes]]:
    """``filter_request_headers`` on the bytes as received (the hot path): the same headers
    dropped, the rest byte for byte in their order, then ``Host: host``."""
    lowered = [(fold_name(name), name, value) for name, value in raw]
    named: set[bytes] = set()
    for lower, _, value in lowered:
        if lower == b"connection":
            named |= {t.encode("latin-1") for t in connection_names([value.decode("latin-1")])}
    out = []
    for lower, name, value in lowered:
        if b"_" in lower:
            lower = lower.replace(b"_", b"-")
        if lower in _OWNED_RAW or lower in named or lower.startswith(_OWNED_PREFIXES_RAW):
            continue
        out.append((name, value))
    out.append((b"Host", host.encode("latin-1")))
    return out


def filter_request_headers(headers: CIMultiDictProxy[str], host: str) -> CIMultiDict[str]:
    """Client headers fit to send upstream: no hop-by-hop, no client auth, Host = upstream name."""
    named = connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if "_" in lower:
            lower = lower.replace("_", "-")
        if lower in _OWNED or lower in named or lower.startswith(_OWNED_PREFIXES):
            continue
        out.add(name, value)
    out["Host"] = host
    return out


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's short reason (e.g. WRONG_VERSION_NUMBER), or the exception's type."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


def translate_client_error(exc: BaseException, upstream: str, timeout: float) -> UpstreamError:
    """Map aiohttp/asyncio failures to stable codes. Order matters: subclasses first."""
    if isinstance(exc, TimeoutError):  # includes aiohttp.ServerTimeoutError
        return UpstreamError(
            f"{upstream} did not answer within {timeout:g}s (upstream timeout)",
            code="upstream_timeout",
            status=504,
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        # The reason (hostname mismatch, unknown CA, expired) and the address are not secret,
        # and without them a user pointing url: at a gateway or an IP cannot tell what is wrong.
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or _ssl_reason(cert_error)
        return UpstreamError(
            f"TLS certificate of {upstream} could not be verified at {exc.host}:{exc.port} "
            f"({reason}); check the upstream's url, ca_file and tls_server_name",
            code="upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        at = f" at {exc.host}:{exc.port}" if isinstance(exc, aiohttp.ClientConnectorError) else ""
        cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
        return UpstreamError(
            f"TLS handshake with {upstream}{at} failed ({_ssl_reason(cause)})",
            code="upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, ConnectionResetError
    ):
        return UpstreamError(
            f"{upstream} reset the connection while it was being opened",
            code="upstream_connection_reset",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return UpstreamError(
            f"cannot connect to {upstream} ({reason})", code="upstream_unreachable"
        )
    if isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | ConnectionError
    ) or (
        # The connection closed before the body was complete: aiohttp reports it as a payload error.
        isinstance(exc, aiohttp.ClientPayloadError)
        and str(exc).startswith("Response payload is not completed")
    ):
        return UpstreamError(
            f"{upstream} closed or reset the connection before answering",
            code="upstream_connection_reset",
        )
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamError(
            f"{upstream} sent a response that is not valid HTTP", code="upstream_bad_response"
        )
    return UpstreamError(f"request to {upstream} failed ({type(exc).__name__})")


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """Per-upstream things built once: where to connect, TLS context, timeout."""

    config: UpstreamConfig
    origin: str  # scheme://host[:port] to connect to (http(s) form for REST)
    ssl: ssl.SSLContext | bool
    timeout: aiohttp.ClientTimeout
    server_hostname: str | None = None  # tls_server_name: SNI and the name verified

    @classmethod
    def build(cls, config: UpstreamConfig) -> UpstreamEndpoint:
        context: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:  # missing, a directory, not PEM certificates
                reason = "no PEM certificate in it"
                if not isinstance(exc, ssl.SSLError):
                    reason = exc.strerror or type(exc).__name__
                raise ConfigError(
                    f"upstreams.{config.name}.ca_file: cannot use {config.ca_file} ({reason})"
                ) from None
        origin = config.url.replace("wss://", "https://", 1)
        timeout = aiohttp.ClientTimeout(total=config.timeout)
        return cls(config, origin, context, timeout, config.tls_server_name)


def create_session() -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, ttl_dns_cache=300),
        auto_decompress=False,  # bodies pass through untouched
        cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
        trust_env=False,  # the config's url: is the only way to reach an upstream
        skip_auto_headers=_NO_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    # aiohttp silently resends idempotent requests (PUT and DELETE included) once when a
    # connection breaks, with the same headers: a replayed JWT nonce, and a second DELETE. The
    # Relay does its own, re-signed retries instead. No public switch exists; aiohttp's own
    # test_utils flips the same attribute (tests/test_faults.py proves it stays off).
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


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


async def read_capped_body(
    request: Request,
    cap: int,
    *,
    limit: str = "max_body_bytes",
    why: str = "signing must read the whole body",
) -> bytes:
    """The whole request body, refused with 413 above ``cap`` bytes (read no further than that)."""
    declared = request.content_length
    if declared is not None and declared > cap:
        raise RequestRejected(
            f"request body of {declared} bytes exceeds {limit} ({cap}); {why}",
            code="body_too_large",
            status=413,
        )
    parts: list[bytes] = []
    size = 0
    while chunk := await request.read_chunk():
        size += len(chunk)
        if size > cap:
            raise RequestRejected(
                f"request body exceeds {limit} ({cap}); {why}", code="body_too_large", status=413
            )
        parts.append(chunk)
    return b"".join(parts)


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

    ``session`` (aiohttp) serves what is not on the hot path: WebSocket upgrades and the
    proxy's own outbound calls."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Mapping[str, UpstreamEndpoint],
        max_body_bytes: int,
        max_stream_body_bytes: int | None = None,
    ):
        self.session = session
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
        loop = asyncio.get_running_loop()
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
