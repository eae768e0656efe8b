"""HTTP/1.1 on one upstream connection: the request head in one buffer, the response parsed by
httptools (llhttp, the parser uvicorn and Node use) as it arrives, its body handed out under flow
control (the socket is not read while more than ``HIGH_WATER`` bytes wait for the consumer).

One request at a time (no pipelining). ``Connection`` is an ``asyncio.Protocol``; the pool in
``upstream_pool.py`` owns connections, deadlines and the translation of the failures raised here
(``ConnectionClosed``, ``BadResponse``, ``ResponseTimeout``) into the proxy's error codes.

Framing rules (RFC 9112 §6.3): a response to HEAD, any 1xx, 204 and 304 has no body; a 1xx other
than 101 is interim and the final response follows; a response with neither Content-Length nor
chunked encoding ends when the connection closes and the connection is not reused.
"""

from __future__ import annotations

import asyncio
import re
import select
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, cast

import httptools

__all__ = [
    "HIGH_WATER",
    "BadResponse",
    "Connection",
    "ConnectionClosed",
    "ResponseTimeout",
    "serialize_head",
]

HIGH_WATER: Final = 256 * 1024  # buffered response bytes above which the socket is not read
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_TARGET_BAD: Final = re.compile(rb"[\x00-\x20\x7f]")  # controls and space end the request line


class ConnectionClosed(Exception):
    """The peer closed or reset the connection (``cause``: the socket/TLS error, None for EOF)."""

    def __init__(self, cause: BaseException | None, *, before_write: bool = False):
        super().__init__(str(cause) if cause else "connection closed")
        self.cause = cause
        self.before_write = before_write  # found closed before any byte of the request was written


class BadResponse(Exception):
    """The bytes received are not a valid HTTP/1.1 response."""


class ResponseTimeout(Exception):
    """The request's deadline passed before the exchange was complete."""


_GOOD_TOKENS: set[bytes] = set()  # methods and header names already checked (a bounded few)
_MAX_GOOD_TOKENS: Final = 256


def _tokens(verb: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The method and every header name are RFC 9110 tokens (checked once per distinct one)."""
    good = _GOOD_TOKENS
    for token in (verb, *[name for name, _ in headers]):
        if token not in good:
            if _TOKEN.fullmatch(token) is None:
                return False
            if len(good) < _MAX_GOOD_TOKENS:
                good.add(token)
    return True


def serialize_head(
    method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]], framing: bytes
) -> bytes:
    """Request line and headers, exactly as given, in order; ``framing`` is the pool's own
    ``Content-Length``/``Transfer-Encoding`` line (or b""). Refuses anything that would let one
    value start another line or request (response splitting / smuggling)."""
    verb = method.encode("ascii")
    head = b"".join(
        [verb, b" ", target, b" HTTP/1.1\r\n",
         *[name + b": " + value + b"\r\n" for name, value in headers], framing, b"\r\n"]
    )  # fmt: skip
    lines = len(headers) + 2 + (1 if framing else 0)
    if (
        head.count(b"\n") != lines
        or head.count(b"\r") != lines
        or b"\x00" in head
        or not target
        or _TARGET_BAD.search(target) is not None
        or not _tokens(verb, headers)
    ):
        raise ValueError("request method, target or header not fit to send (CR, LF, NUL, space)")
    return head


class Connection(asyncio.Protocol):
    """One keep-alive TLS connection to the upstream; the state of its current exchange."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.served = 0  # complete responses read on this connection
        self.idle_since = 0.0
        self.on_lost: Callable[[Connection], None] | None = None  # the pool's, called once closed
        self._poll: select.poll | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # when the current exchange must be over
        self._reset_exchange(False)

    # -- exchange state ------------------------------------------------------------------------
    def _reset_exchange(self, head_request: bool) -> None:
        self.active = False  # a request was written and its final response is not complete yet
        self.head_request = head_request
        self.wrote = False  # any request byte was written
        self.request_sent = False  # the whole request was written (set by the pool)
        self.received = False  # any response byte arrived
        self.head_ready = False
        self.done = False  # the final response is complete
        self.keep_alive = False
        self.error: BaseException | None = None
        self.status = 0
        self.reason: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.http_version = "1.1"
        self.chunks: deque[bytes] = deque()
        self.buffered = 0

    def begin(self, head_request: bool, deadline: float) -> None:
        self._reset_exchange(head_request)
        self.active = True
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:  # else it fires first and re-arms
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._time_out)

    def disarm(self, *, keep_timer: bool = False) -> None:
        """The exchange is over: its deadline no longer applies. ``keep_timer``: leave the timer
        for the next exchange on this kept-alive connection (firing, it finds no deadline due
        and goes, or re-arms for a later one): one timer a connection, not one a request."""
        self._deadline = None
        if not keep_timer and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def usable(self) -> bool:
        """Still open and silent: a peer that closed an idle connection makes it readable (FIN or
        close_notify); the event loop may not have run the callback yet, so ask the socket."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        return self._poll is not None and not self._poll.poll(0)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise self.error or ConnectionClosed(None, before_write=not self.wrote)
        self.transport.write(data)
        self.wrote = True

    @property
    def stop_sending(self) -> bool:
        """Failed, or already answered with an error (RFC 9112 §9.5: cease sending the body)."""
        return self.error is not None or (self.head_ready and self.status >= 400)

    async def drain(self) -> None:
        while self._write_paused and not self.stop_sending:
            await self.wait()
        if self.error is not None and not self.head_ready:  # else the answer stands
            raise self.error

    async def wait(self) -> None:
        """Until something happens (data, completion, an error, the write buffer drained)."""
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> bytes:
        """Every body byte buffered so far (reading resumes once the consumer caught up)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self.buffered = 0
        return data

    def fail(self, exc: BaseException) -> None:
        """End the exchange with ``exc`` and drop the connection."""
        if self.error is None and not self.done:
            self.error = exc
        self.keep_alive = False
        self.disarm()
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _time_out(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:  # between exchanges: nothing was due
            return
        if self.loop.time() < deadline:  # a later exchange's deadline
            self._timer = self.loop.call_at(deadline, self._time_out)
            return
        self.fail(ResponseTimeout())

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # nothing was asked: an idle connection must stay silent
            self.fail(BadResponse("data received while no request was in flight"))
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(BadResponse("upgrade response to a request that asked for none"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadComplete):
                # llhttp would wait for the body a HEAD response announces: this parser is done.
                self._parser = httptools.HttpResponseParser(self)
            else:  # after a complete response this only drops the connection
                self.fail(cause if isinstance(cause, BadResponse) else BadResponse(str(exc)))

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and not self.done:
            if exc is None and self._ends_at_close():
                self._finish(False)
            else:
                self.fail(ConnectionClosed(exc))
        self.keep_alive = False
        self.disarm()
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def _ends_at_close(self) -> bool:
        return self.head_ready and self.content_length is None and not self.chunked

    def _finish(self, keep_alive: bool) -> None:
        self.done = True
        self.active = False
        self.served += 1
        self.keep_alive = keep_alive and self.error is None
        self.disarm(keep_timer=self.keep_alive)
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.done or not self.active:
            raise BadResponse("more than one response to one request")
        self.status, self.reason, self.headers = 0, [], []
        self.content_length, self.chunked = None, False

    def on_status(self, reason: bytes) -> None:
        self.reason.append(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self.content_length = int(value)  # llhttp has validated it
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self.chunked = value.rstrip().lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadResponse("101 Switching Protocols to a request that asked for none")
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        self.status = status
        self.http_version = parser.get_http_version()
        self.head_ready = True
        self._wake()
        if self.head_request:
            self._finish(self._persistent())
            raise _HeadComplete

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head_ready:  # else an interim 1xx ended
            self._finish(self._parser.should_keep_alive())

    def _persistent(self) -> bool:
        """Keep-alive per RFC 9112 §9.3, for a response whose end llhttp was not asked to find."""
        for name, value in self.headers:
            if name.lower() == b"connection" and b"close" in value.lower():
                return False
        return self.http_version == "1.1"


class _HeadComplete(Exception):
    """Raised from a callback to stop llhttp at the end of a HEAD response's header block."""
