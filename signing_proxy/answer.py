"""Writing an answer to the client through the listener's ``Request``: headers fit to pass on,
and a body in one write or streamed.

An upstream's headers pass unchanged but for the hop-by-hop ones (RFC 9110 §7.6.1), the framing
(the server writes Content-Length / Transfer-Encoding itself) and X-Request-Id (the proxy's own).
A body that fails mid-way resets the client's connection: the headers are gone already, and a
short body must never look whole.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from .errors import JSON_CONTENT_TYPE, ProxyError
from .http_request import Request
from .http_response import reason_phrase

__all__ = [
    "HOP_BY_HOP",
    "ClientHead",
    "client_head",
    "connection_names",
    "connection_names_raw",
    "fold_name",
    "refuse",
    "stream_body",
]

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers, plus the proxy's own inbound credentials.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_PASSED: Final = HOP_BY_HOP | {"content-length", "x-request-id"}
_NOT_PASSED_RAW: Final = frozenset(name.encode() for name in _NOT_PASSED)
_JSON: Final = JSON_CONTENT_TYPE.encode()


@dataclass(slots=True)
class ClientHead:
    """An upstream answer's head as the client gets it."""

    headers: list[tuple[bytes, bytes]]
    date: str | None  # the upstream's Date, for the clock skew gauge
    declared: int | None  # its Content-Length (what a HEAD answer announces)


def connection_names(values: Iterable[str]) -> set[str]:
    """The header names listed in these Connection header values."""
    return {
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    }


def fold_name(name: bytes) -> bytes:
    """A header name in lower case, as ``str.lower`` folds its latin-1 text ('À' to 'à' too)."""
    return name.lower() if name.isascii() else name.decode("latin-1").lower().encode("latin-1")


_NAMED: dict[bytes, frozenset[bytes]] = {}  # Connection value -> the names it lists
_MAX_NAMED: Final = 64


def connection_names_raw(value: bytes) -> frozenset[bytes]:
    """``connection_names`` of one Connection value as received, in bytes; the few values seen
    in practice (``keep-alive``, ``close``) are remembered."""
    named = _NAMED.get(value)
    if named is None:
        named = frozenset(t.encode("latin-1") for t in connection_names([value.decode("latin-1")]))
        if len(_NAMED) < _MAX_NAMED:
            _NAMED[value] = named
    return named


def client_head(raw: Iterable[tuple[bytes, bytes]], request_id: str) -> ClientHead:
    """The upstream's headers minus hop-by-hop and framing ones, plus X-Request-Id."""
    lowered = [(fold_name(name), name, value) for name, value in raw]
    named: frozenset[bytes] = frozenset()
    for lower, _, value in lowered:
        if lower == b"connection":
            named |= connection_names_raw(value)
    headers: list[tuple[bytes, bytes]] = []
    date: str | None = None
    declared: int | None = None
    for lower, name, value in lowered:
        if lower == b"content-length" and value.strip().isdigit():
            declared = int(value)
        if lower in _NOT_PASSED_RAW or lower in named:
            continue
        if lower == b"date" and date is None:
            date = value.decode("latin-1")
        headers.append((name, value))
    headers.append((b"X-Request-Id", request_id.encode()))
    return ClientHead(headers, date, declared)


async def stream_body(
    request: Request,
    chunks: AsyncIterator[bytes],
    failure: Callable[[BaseException], str | None],
    upstream: str,
) -> tuple[int, str | None]:
    """Write ``chunks`` after ``request.start(...)``, then end the answer.

    Returns (bytes written, error code or None). ``failure`` names the error code of an
    exception raised while reading ``chunks`` (None: not an upstream failure, re-raised); such a
    failure resets the client's connection. A client that leaves is ``client_disconnected``."""
    sent = 0
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except Exception as exc:
            code = failure(exc)
            if code is None:
                raise
            log.warning(
                "upstream failed mid-response; closing the client connection",
                extra={"fields": {"upstream": upstream, "error": code}},
            )
            request.abort()
            return sent, code
        try:
            await request.write(chunk)
        except ConnectionResetError:  # the client went away; stop reading from upstream
            return sent, "client_disconnected"
        sent += len(chunk)
    try:
        await request.end()
    except ConnectionResetError:
        return sent, "client_disconnected"
    return sent, None


async def refuse(
    request: Request, exc: ProxyError, request_id: str, extra: Mapping[str, str] | None = None
) -> None:
    """The JSON error answer; a request whose body was not read is closed after it (its body
    is then never read: the client learns at once, and nobody pays for bytes not wanted)."""
    headers = [(b"Content-Type", _JSON)]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    if extra:
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    headers.append((b"X-Request-Id", request_id.encode()))
    if request.body_exists and not request.is_eof():
        request.close_after_response()
    await request.respond(exc.status, reason_phrase(exc.status), headers, exc.body())
