"""What can go wrong between the proxy and an upstream, in the proxy's stable error codes.

``classify`` is the one place where socket, TLS, HTTP parse and deadline failures of the upstream
pool (upstream_pool.py, http1.py) become an ``UpstreamFailure``, the way httpx maps httpcore's
exceptions in one function:

    code                        status  when
    upstream_unreachable        502     the connection could not be opened (refused, no route, DNS)
    upstream_connection_reset   502     reset or closed: while opening, before or during the answer
    upstream_tls_error          502     certificate not verified (the reason is named), TLS failure
    upstream_bad_response       502     the bytes received are not HTTP/1.1 (garbage, bad framing)
    upstream_timeout            504     the request's budget ran out (connection wait, connect,
                                        answer or body)

``reached`` tells a caller whether any byte of the request can have reached the upstream: when
False, nothing was sent and any method may be sent again (signed afresh). ``StaleConnection`` is
the keep-alive race: a reused connection closed by the upstream before any response byte.
"""

from __future__ import annotations

import os
import ssl

from .errors import UpstreamError
from .http1 import BadResponse, ConnectionClosed, ResponseTimeout

__all__ = ["StaleConnection", "UpstreamFailure", "classify"]


class UpstreamFailure(UpstreamError):
    """An upstream failure with a stable code; ``reached`` is False when no byte of the request
    can have reached the upstream (it may be resent, signed afresh, whatever the method)."""

    def __init__(self, message: str, *, code: str, reached: bool, status: int | None = None):
        super().__init__(message, code=code, status=status)
        self.reached = reached


class StaleConnection(UpstreamFailure):
    """A reused keep-alive connection was closed or reset by the upstream before any byte of a
    response: the upstream closed it while idle, as the request went out (RFC 9112 §9.3.1 allows
    such a request to be sent again on a new connection). Retry once, signed afresh."""


def classify(
    exc: BaseException,
    upstream: str,
    timeout: float,
    *,
    reached: bool = False,
    stale: bool = False,
    in_body: bool = False,
    address: str = "",
) -> UpstreamFailure:
    """Every socket, TLS, parse and deadline failure, mapped to a code. Subclasses first.

    ``address`` (host:port actually contacted) is named in TLS and connect failures: with ``url:``
    pointing at a gateway or an IP, the upstream's name alone does not say where it failed."""
    at = f" at {address}" if address else ""
    if isinstance(exc, ResponseTimeout | TimeoutError):
        return UpstreamFailure(
            f"{upstream} did not answer within {timeout:g}s (upstream timeout)",
            code="upstream_timeout",
            status=504,
            reached=reached,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamFailure(
            f"TLS certificate of {upstream} could not be verified{at} ({exc.verify_message}); "
            "check the upstream's url, ca_file and tls_server_name",
            code="upstream_tls_error",
            reached=False,
        )
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailure(
            f"TLS with {upstream}{at} failed ({exc.reason or type(exc).__name__})",
            code="upstream_tls_error",
            reached=reached,
        )
    if isinstance(exc, BadResponse):
        return UpstreamFailure(
            f"{upstream} sent a response that is not valid HTTP ({exc})",
            code="upstream_bad_response",
            reached=reached,
        )
    if isinstance(exc, ConnectionClosed):
        if isinstance(exc.cause, ssl.SSLError):
            return classify(exc.cause, upstream, timeout, reached=reached, address=address)
        if stale or exc.before_write:
            return StaleConnection(
                f"{upstream} closed a pooled keep-alive connection before answering",
                code="upstream_connection_reset",
                reached=reached and not exc.before_write,
            )
        what = "before the body was complete" if in_body else "before answering"
        return UpstreamFailure(
            f"{upstream} closed or reset the connection {what}",
            code="upstream_connection_reset",
            reached=reached,
        )
    if isinstance(exc, ConnectionResetError):
        return UpstreamFailure(
            f"{upstream} reset the connection while it was being opened",
            code="upstream_connection_reset",
            reached=False,
        )
    if isinstance(exc, OSError):
        # asyncio's strerror names the address ("Connect call failed (...)"); the errno says why.
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror or type(exc).__name__
        return UpstreamFailure(
            f"cannot connect to {upstream}{at} ({reason})",
            code="upstream_unreachable",
            reached=False,
        )
    return UpstreamFailure(
        f"request to {upstream} failed ({type(exc).__name__})",
        code="upstream_error",
        reached=reached,
    )
