"""One request on the proxy listener, as its handler sees it: the head, the body, the answer.

``Request`` is what ``http_server`` hands to the handler. It holds the head exactly as the
client sent it (method, raw target, version, raw headers), streams the body with flow control,
answers ``Expect: 100-continue`` when the handler says so, and writes the response:

- ``await respond(status, reason, headers, body)``: a whole response in one write;
- ``start(...)`` then ``await write(chunk)`` and ``await end()``: a streamed response, framed by
  Content-Length, chunked (HTTP/1.1) or the connection's close (HTTP/1.0);
- ``abort()``: reset the connection (an upstream that failed mid-body);
- ``close_after_response()``: the connection closes after this answer (and an unread body is
  never parsed); ``detach()`` hands an Upgrade request's connection to a new owner.

Headers passed to the response methods are the caller's: the server adds only the framing
(Content-Length / Transfer-Encoding) and Connection, so callers must not pass those.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from .http_response import BODYLESS, encode_head

__all__ = ["Channel", "Request"]

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


class Channel(Protocol):
    """What a request needs from its connection (``http_server.Connection`` implements it)."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    async def drain(self) -> None: ...
    def may_keep_alive(self) -> bool: ...
    def response_done(self, request: Request, keep_alive: bool) -> None: ...
    def detach(self, request: Request) -> tuple[asyncio.Transport, bytes]: ...


class Request:
    """The head as received, the body as a stream, and the response methods."""

    __slots__ = (
        "_body_started", "_buffer", "_buffered", "_channel", "_chunked_out", "_continue_sent",
        "_eof", "_error", "_expect_continue", "_headers", "_high_water", "_index", "_keep_alive",
        "_no_body", "_remaining", "_state", "_waiter", "body_timeout", "chunked",
        "content_length", "method", "raw_headers", "raw_target", "remote", "target", "upgrade",
        "version",
    )  # fmt: skip

    def __init__(
        self,
        channel: Channel,
        method: str,
        raw_target: bytes,
        version: tuple[int, int],
        raw_headers: list[tuple[bytes, bytes]],
        remote: str | None,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        expect_continue: bool,
        upgrade: bool,
        high_water: int,
        body_timeout: float | None,
    ):
        self._channel = channel
        self.method = method
        self.raw_target = raw_target
        # The request-target exactly as on the request line (llhttp admits only ASCII there).
        self.target = raw_target.decode("latin-1")
        self.version = version
        self.raw_headers = raw_headers
        self.remote = remote
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade
        self.body_timeout = body_timeout  # seconds read_chunk waits for bytes; None: no bound
        self._keep_alive = keep_alive
        self._expect_continue = expect_continue
        self._high_water = high_water
        self._headers: CIMultiDictProxy[str] | None = None
        self._index: dict[bytes, list[bytes]] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body_started = False
        self._continue_sent = False
        self._state = 0  # 0: no response yet, 1: streaming, 2: done
        self._chunked_out = False
        self._no_body = False
        self._remaining: int | None = None

    # --- the head ------------------------------------------------------------------------------

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """Case-insensitive view of the headers (latin-1 decoded, order and repeats kept)."""
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw_headers)
            )
        return self._headers

    def values(self, lower_name: bytes) -> list[bytes]:
        """Every value of a header, as received; ``lower_name`` in lower case (b"connection").
        The hot path's lookup: cheaper than building ``headers``."""
        index = self._index
        if index is None:
            index = self._index = {}
            for name, value in self.raw_headers:
                lower = name.lower()
                found = index.get(lower)
                if found is None:
                    index[lower] = [value]
                else:
                    found.append(value)
        return index.get(lower_name) or []

    def first(self, lower_name: bytes) -> bytes | None:
        """The first value of a header as received, or None (see ``values``)."""
        found = self.values(lower_name)
        return found[0] if found else None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        return self.headers.get(name)

    def head_bytes(self) -> bytes:
        """The head re-serialised from what was parsed (same order, names and values as
        received; whitespace around values normalised): for handing an Upgrade to another
        HTTP implementation after ``detach()``."""
        lines = [b"%s %s HTTP/%d.%d\r\n" % (self.method.encode(), self.raw_target, *self.version)]
        lines += [b"%s: %s\r\n" % pair for pair in self.raw_headers]
        lines.append(b"\r\n")
        return b"".join(lines)

    @property
    def body_exists(self) -> bool:
        return self.chunked or bool(self.content_length)

    # --- the body ------------------------------------------------------------------------------

    def is_eof(self) -> bool:
        """True once the whole body has arrived and been read."""
        return self._eof and not self._buffer

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at the end.

        Raises ConnectionResetError if the body's framing broke, and TimeoutError if no bytes
        came within ``body_timeout``. Reading implies consent: a pending 100 Continue is sent.
        """
        while True:
            if self._buffer:
                chunk = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
                self._buffer.clear()
                self._buffered = 0
                self._channel.resume_body()
                return chunk
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self.send_continue()
            await self._wait_for_bytes()

    async def _wait_for_bytes(self) -> None:
        loop = self._channel.loop
        waiter = self._waiter = loop.create_future()
        timer = None
        if self.body_timeout is not None:
            timer = loop.call_later(self.body_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def send_continue(self) -> None:
        """Write ``100 Continue`` if the client asked for it (HTTP/1.1), no body byte has come
        yet and no answer has started; at most once. The handler decides when (after its
        checks); a request refused before this is answered without its body ever being read."""
        if (
            self._expect_continue
            and not self._continue_sent
            and not self._body_started
            and not self._eof
            and self._state == 0
        ):
            self._continue_sent = True
            self._channel.transport.write(_CONTINUE)

    # Called by the connection as the parser goes.
    def feed(self, data: bytes) -> None:
        self._body_started = True
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water:
            self._channel.pause_body()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def feed_eof(self) -> None:
        self._eof = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """The body cannot complete (bad framing, connection lost)."""
        if not self._eof:
            self._error = error
            self._keep_alive = False
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    # --- the response --------------------------------------------------------------------------

    @property
    def response_started(self) -> bool:
        return self._state != 0

    @property
    def response_done(self) -> bool:
        return self._state == 2

    def close_after_response(self) -> None:
        """Close the connection after this answer; an unread body is then never parsed (what
        still arrives is dropped for a moment, so the client gets the answer, not a reset)."""
        self._keep_alive = False

    def _framing(self, length: int | None) -> list[bytes]:
        lines = [] if length is None else [b"Content-Length: %d\r\n" % length]
        # A body not fully received: its remaining bytes would be parsed as the next request;
        # after an Upgrade request they belong to the other protocol (here refused).
        if not (
            self._keep_alive and self._eof and not self.upgrade and self._channel.may_keep_alive()
        ):
            self._keep_alive = False
            lines.append(_CLOSE)
        elif self.version == (1, 0):
            lines.append(_KEEP_ALIVE)
        return lines

    def _check_new(self, status: int) -> None:
        if self._state != 0:
            raise RuntimeError("the response was already started")
        if status < 200:
            raise ValueError("an interim (1xx) status cannot be the response")

    async def respond(
        self, status: int, reason: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> None:
        """The whole response in one write, with Content-Length (none for 204/304; a HEAD
        answer says the body's length and sends no body)."""
        self._check_new(status)
        bodyless = status in BODYLESS
        head = encode_head(status, reason, headers, self._framing(None if bodyless else len(body)))
        self._state = 2
        if bodyless or self.method == "HEAD" or not body:
            self._channel.transport.write(head)
        else:
            self._channel.transport.write(head + body)
        self._channel.response_done(self, self._keep_alive)
        await self._channel.drain()

    def start(
        self,
        status: int,
        reason: str,
        headers: list[tuple[bytes, bytes]],
        *,
        content_length: int | None = None,
    ) -> None:
        """Begin a streamed response: Content-Length when given, else chunked for HTTP/1.1
        clients and close-delimited for HTTP/1.0. For HEAD, 204 and 304 no body is sent (a given
        length is still announced, except for 204). The head is written at once."""
        self._check_new(status)
        self._no_body = status in BODYLESS or self.method == "HEAD"
        if status == 204:
            content_length = None
        if content_length is not None:
            framing = self._framing(content_length)
            self._remaining = 0 if self._no_body else content_length
        elif self._no_body:
            framing = self._framing(None)
        elif self.version >= (1, 1):
            framing = [_CHUNKED, *self._framing(None)]
            self._chunked_out = True
        else:
            self._keep_alive = False
            framing = self._framing(None)
        self._state = 1
        self._channel.transport.write(encode_head(status, reason, headers, framing))

    async def write(self, chunk: bytes) -> None:
        """Send body bytes, waiting while the client reads slower than we write."""
        if self._state != 1:
            raise RuntimeError("write() needs start() first, and not after end()")
        if not chunk or self._no_body:
            return
        if self._remaining is not None:
            if len(chunk) > self._remaining:
                self.abort()
                raise ValueError("response body longer than its Content-Length")
            self._remaining -= len(chunk)
        transport = self._channel.transport
        if transport.is_closing():
            raise ConnectionResetError("the client connection is closed")
        if self._chunked_out:
            transport.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")))
        else:
            transport.write(chunk)
        await self._channel.drain()

    async def end(self) -> None:
        """Finish a streamed response (the last chunk, or nothing more for a known length)."""
        if self._state != 1:
            raise RuntimeError("end() needs start() first, once")
        if self._remaining:
            self.abort()
            raise ValueError("response body shorter than its Content-Length")
        self._state = 2
        if self._chunked_out:
            self._channel.transport.write(_LAST_CHUNK)
        self._channel.response_done(self, self._keep_alive)
        await self._channel.drain()

    def abort(self) -> None:
        """Reset the connection at once (the client sees the response fail, never a short
        body that looks whole). The handler is not cancelled by it."""
        self._state = 2
        self._keep_alive = False
        self._channel.transport.abort()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Hand an Upgrade (e.g. WebSocket) request's connection to a new owner: returns the
        transport (reading paused) and the bytes that followed the head. The server forgets the
        connection; the new owner sets its protocol, feeds it the bytes, resumes reading."""
        if not self.upgrade:
            raise RuntimeError("only an Upgrade request's connection can be taken over")
        if self._state != 0:
            raise RuntimeError("the response was already started")
        self._state = 2
        return self._channel.detach(self)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no request body bytes within body_timeout"))
