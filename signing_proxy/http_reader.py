"""Bytes in, requests out: llhttp (``httptools``) held to the listener's limits and rules.

``RequestReader.feed(data)`` runs the parser's callbacks, builds a ``Request`` for every head
and hands it to its connection, and streams body bytes into it. Every leniency llhttp has is off,
except ``data_after_close``, which only lets llhttp skip (never parse) the bytes that follow a
request that closes the connection. On top of llhttp's own checks (one Content-Length, no
Content-Length with Transfer-Encoding, no obs-fold, CRLF only, no NUL or raw UTF-8 in the
target, known upper-case methods), it refuses:

- a request line over ``max_line_bytes`` or a header line over ``max_field_bytes`` (400), more
  than ``max_headers`` headers (400), header lines over ``max_header_bytes`` in total (431);
- versions other than HTTP/1.0 and 1.1 (505: llhttp reads ``GET /x`` as HTTP/0.9, and
  ``RTSP/1.0`` or ``ICE/1.0`` as 1.0, so those request lines are looked at again), an empty
  target (400), Transfer-Encoding other than ``chunked`` alone (501 when chunked comes last,
  else 400), an Upgrade or CONNECT request that announces a body (400);
- more than ``max_header_bytes`` that reach no callback (a header value, chunk extensions or
  trailers that never end: llhttp would keep them in memory).

A refusal of the head raises ``Refusal``; a body that breaks is failed on its request instead,
as its handler may already be reading it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from .http_request import Channel, Request
from .http_response import error_answer

if TYPE_CHECKING:
    from .http_server import ServerLimits

__all__ = ["Refusal", "RequestReader", "Sink"]

_VERSIONS: Final = {"1.1": (1, 1), "1.0": (1, 0)}
_OWS: Final = frozenset(b" \t")
_FRAMING: Final = frozenset({14, 17, 6})  # len("content-length"), "transfer-encoding", "expect"


class Refusal(Exception):
    """A request the listener answers itself with a JSON error, then closes the connection."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def answer(self) -> bytes:
        return error_answer(self.status, self.code, self.message)


def too_large(size: int, limit: int) -> Refusal:
    return Refusal(
        431,
        "headers_too_large",
        f"request headers total {size} bytes, over max_header_bytes ({limit})",
    )


class Sink(Channel, Protocol):
    """The connection a reader hands its requests to (``http_server.Connection``)."""

    remote: str | None
    over_cap: bool

    def dispatch(self, request: Request) -> None: ...
    def waiting(self) -> int: ...


class RequestReader:
    """One connection's parser and the head it is building."""

    def __init__(self, sink: Sink, limits: ServerLimits):
        self.sink = sink
        self.limits = limits
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(
            lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
            lenient_transfer_encoding=False, lenient_version=False,
            lenient_data_after_close=True,
            lenient_optional_lf_after_cr=False, lenient_optional_cr_before_lf=False,
            lenient_optional_crlf_after_chunk=False, lenient_spaces_after_chunk_size=False,
        )  # fmt: skip
        self.in_head = True  # between requests, or inside a head
        self.head_bytes = 0  # bytes fed since the head began (0: none yet)
        self.current: Request | None = None  # the request whose body is being read
        self._data = b""  # the bytes being fed
        self._line: list[bytes] | None = None  # the bytes fed since the head began
        self._max_head = limits.max_header_bytes + limits.max_line_bytes + 4096
        self._max_field = limits.max_field_bytes - 2  # name + value, without ": "
        self._max_total = limits.max_header_bytes
        self._max_count = limits.max_headers
        self._stalled = 0
        self._progress = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._content_length: int | None = None
        self._coding: bytes | None = None
        self._expect = False

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``. Returns the bytes after an Upgrade request's head (the parser is done
        then), else None. Raises Refusal for a head the listener answers itself."""
        parser = self.parser
        if parser is None:
            return None
        if self.in_head:
            self.head_bytes += len(data)
            if self._line is not None:
                self._line.append(data)
        self._data = data
        self._progress = False
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.parser = None
            return data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            self._failed(_refusal_for(exc))
            return None
        if self.in_head and self.head_bytes > self._max_head:  # the head alone is too big
            self._failed(too_large(self.head_bytes, self.limits.max_header_bytes))
        # Bytes that reached no callback pile up inside the parser: bound them like a head.
        self._stalled = 0 if self._progress else self._stalled + len(data)
        if self._stalled > self.limits.max_header_bytes:
            self._failed(too_large(self._stalled, self.limits.max_header_bytes))
        return None

    def _failed(self, refusal: Refusal) -> None:
        self.parser = None
        request, self.current = self.current, None
        if request is None:
            raise refusal
        # The body broke: its handler learns it from read_chunk, and the connection closes.
        request.fail(ConnectionResetError(f"request body: {refusal.message}"))

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._progress = True
        if self.sink.waiting() >= self.limits.max_pipelined:
            raise Refusal(400, "bad_request", "too many pipelined requests")
        self._line = [self._data]  # where this request line is, for the RTSP check
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._content_length = None
        self._coding = None
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._url += url
        if len(self._url) > self.limits.max_line_bytes:
            raise Refusal(
                400, "bad_request", f"request line over {self.limits.max_line_bytes} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        if not self.in_head:
            return  # a trailer: not forwarded, and bounded by the stall check
        size = len(name) + len(value)
        self._header_bytes += size + 4
        headers = self._headers
        if (
            size > self._max_field
            or self._header_bytes > self._max_total
            or len(headers) >= self._max_count
        ):
            self._over_limit(size)
        if value and value[-1] in _OWS:
            value = value.rstrip(b" \t")  # llhttp strips leading whitespace only
        headers.append((name, value))
        if len(name) in _FRAMING:
            lower = name.lower()
            if lower == b"content-length":
                self._content_length = int(value)  # llhttp checked: digits, one value
            elif lower == b"transfer-encoding":
                self._coding = value if self._coding is None else self._coding + b"," + value
            elif lower == b"expect":
                self._expect = value.lower() == b"100-continue"

    def _over_limit(self, size: int) -> None:
        limits = self.limits
        if size > self._max_field:
            raise Refusal(
                400, "bad_request", f"a header line is over {limits.max_field_bytes} bytes"
            )
        if self._header_bytes > self._max_total:
            raise too_large(self._header_bytes, limits.max_header_bytes)
        raise Refusal(400, "bad_request", f"more than {limits.max_headers} headers")

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        assert parser is not None
        if not self._url:
            raise Refusal(400, "bad_request", "the request line has no target")
        version = _VERSIONS.get(parser.get_http_version())
        line, self._line = self._line, None
        if version == (1, 0) and line is not None and _not_http(line, self._url):
            version = None  # llhttp reports RTSP/1.0 and ICE/1.0 as version 1.0
        if version is None:
            raise Refusal(
                505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported"
            )
        chunked = self._coding is not None
        if chunked:
            codings = [c.strip().lower() for c in self._coding.split(b",")]  # type: ignore[union-attr]
            if codings[-1] != b"chunked":  # no length at all: the body could not be delimited
                raise Refusal(400, "bad_request", "Transfer-Encoding must end in chunked")
            if len(codings) > 1:  # "gzip, chunked": undoing only the chunking alters the body
                raise Refusal(
                    501, "unsupported_transfer_encoding",
                    "only 'Transfer-Encoding: chunked' is supported",
                )  # fmt: skip
        upgrade = parser.should_upgrade()
        if upgrade and (chunked or self._content_length):
            # llhttp hands over right after the head: the body would be read as the new protocol.
            raise Refusal(400, "bad_request", "an Upgrade or CONNECT request cannot carry a body")
        sink, limits = self.sink, self.limits
        if sink.over_cap:
            raise Refusal(
                503, "too_many_connections",
                f"the proxy holds its maximum of {limits.max_connections} connections; retry",
            )  # fmt: skip
        self.current = Request(
            sink, parser.get_method().decode("ascii"), self._url, version, self._headers,
            sink.remote, self._content_length, chunked, parser.should_keep_alive(),
            self._expect and version >= (1, 1), upgrade, limits.read_high_water,
            limits.body_timeout,
        )  # fmt: skip
        sink.dispatch(self.current)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        assert self.current is not None
        self.current.feed(body)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        if self.current is not None:
            self.current.feed_eof()
            self.current = None
        self.in_head = True
        self.head_bytes = 0


def _not_http(chunks: list[bytes], url: bytes) -> bool:
    """Whether the request line that carried ``url`` named another protocol than HTTP."""
    return re.search(re.escape(url) + rb" +(?:RTSP|ICE)/", b"".join(chunks)) is not None


def _refusal_for(exc: httptools.HttpParserError) -> Refusal:
    cause = exc.__context__  # what a callback raised
    if isinstance(cause, Refusal):
        return cause
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return Refusal(400, "bad_method", "the method is not an upper-case HTTP method")
    reason = str(exc)[:120]  # llhttp's fixed reason text; never the client's bytes
    return Refusal(400, "bad_request", f"the request could not be parsed: {reason}")
