"""The aiohttp client, for what is not on the REST hot path.

WebSocket upgrades (websocket.py), the derivatives token exchange (token_exchange.py,
token_relay.py) and the proxy's own outbound calls (Onramp) go through one aiohttp
``ClientSession`` per process, built by ``create_session``: bodies pass through untouched, no
cookies, no proxy from the environment, no headers the client did not send, no silent resend.

aiohttp client exceptions are translated into UpstreamError here (``translate_client_error``) and
nowhere else; every call site catches the same set, ``CLIENT_FAILURES``. The REST relay's own pool
classifies its failures in upstream_errors.py.
"""

from __future__ import annotations

import ssl
from typing import Final

import aiohttp
from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError

from .errors import UpstreamError

__all__ = ["CLIENT_FAILURES", "create_session", "translate_client_error"]

# What a failed aiohttp client call (a request, reading its body, a WebSocket upgrade, sending on
# the socket) raises: catch exactly this wherever the failure goes to translate_client_error or
# is treated as "the upstream call failed", so no call site forgets a member.
CLIENT_FAILURES: Final[tuple[type[BaseException], ...]] = (
    # aiohttp's own tree: refused and reset connections (ClientConnectorError, ClientOSError,
    # ServerDisconnectedError), TLS failures it wraps (ClientSSLError), bad responses and bodies.
    aiohttp.ClientError,
    # asyncio.timeout and ClientTimeout; aiohttp's ServerTimeoutError is one too. An OSError as
    # well, listed so the reader sees timeouts are caught (and the first except must be it when a
    # timeout is told apart from the rest).
    TimeoutError,
    # What the transport raises without aiohttp wrapping it: a reset or broken pipe while writing,
    # and ssl.SSLError (an OSError) from a TLS layer that fails after the handshake.
    OSError,
)

# The parser's "the body ended short" errors: aiohttp makes one the cause of the
# ClientPayloadError it raises when the connection closes mid-body (client_proto.connection_lost).
_ENDED_SHORT: Final = (ContentLengthError, TransferEncodingError)

# aiohttp adds these when absent; a proxy must send only what the client sent.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


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
        isinstance(exc, aiohttp.ClientPayloadError) and isinstance(exc.__cause__, _ENDED_SHORT)
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
