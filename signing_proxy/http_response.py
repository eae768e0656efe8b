"""The bytes of an HTTP/1.1 response head, and the JSON refusals the listener makes itself.

Kept apart from the connection logic so the one rule that matters is easy to check: a head is
built in one buffer, and a header name, value or reason phrase that would carry a CR or LF into it
(a response-splitting bug in the caller) raises instead of going out.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

from .errors import error_body

__all__ = ["BODYLESS", "encode_head", "error_answer", "reason_phrase"]

BODYLESS: Final = frozenset({204, 304})  # with 1xx: never a body (RFC 9110 §15.3.5, §15.4.5)
_STATUS_LINES: dict[tuple[int, str], bytes] = {}
_MAX_CACHED: Final = 512  # distinct (status, reason) pairs; upstreams use a handful


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _status_line(status: int, reason: str) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"status {status} is not a three-digit HTTP status")
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1"))
        if len(_STATUS_LINES) < _MAX_CACHED:
            _STATUS_LINES[(status, reason)] = line
    return line


def encode_head(
    status: int, reason: str, headers: Iterable[tuple[bytes, bytes]], framing: list[bytes]
) -> bytes:
    """Status line, the caller's headers in order, then ``framing`` (whole lines the server
    adds: Content-Length, Transfer-Encoding, Connection) and the blank line."""
    parts = [_status_line(status, reason)]
    lines = 2 + len(framing)
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    parts += framing
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Every line ends in exactly one CRLF: any other CR or LF came from a name or value.
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("a response header name, value or reason contains CR or LF")
    return head


def error_answer(
    status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """A whole JSON error response that closes the connection: ``{"error": code, ...}``."""
    body = error_body(code, message)
    framing = [
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n",
    ]
    return encode_head(status, reason_phrase(status), headers, framing) + body
