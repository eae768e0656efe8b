"""The proxy listener's own HTTP/1.1 server: an ``asyncio.Protocol`` per connection on llhttp.

``HttpServer(handler, limits)`` is the protocol factory for ``loop.create_server``; the handler
is ``async def handler(request: Request) -> None`` and answers through the request
(http_request.py). Per connection:

- llhttp (``httptools``) parses with every leniency off, except ``data_after_close``, which
  only lets llhttp skip (never parse) bytes after a request that closes the connection;
- one handler task per request; pipelined requests are parsed ahead (reading pauses while one
  waits) but each handler starts only when the previous response is complete;
- keep-alive per RFC 9112 §9.3: HTTP/1.0 closes unless it asks for keep-alive, ``Connection:
  close`` closes, and so does an answer sent before its request body was fully received;
- the request head must be complete within ``header_timeout`` of the connection's start or of
  the previous answer, and the first byte must come within ``idle_timeout``: otherwise the
  connection is closed without an answer (slowloris);
- what the listener refuses itself gets one JSON line (``{"error": code, "message": ...}``) and
  the connection closes: 400 ``bad_request`` (llhttp's reason, never the client's bytes),
  ``bad_method``, 431 ``headers_too_large``, 501 ``unsupported_transfer_encoding``, 505
  ``http_version_not_supported``, 503 ``too_many_connections``;
- beyond ``max_connections`` a connection is still accepted, its request answered 503 and closed:
  the client learns why at once, instead of waiting in a backlog nobody serves.

Closing after an answer half-closes first and discards what still arrives for ``linger_seconds``,
so an unread request body cannot make the kernel reset the connection over the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, cast

import httptools

from .http_request import Request
from .http_response import error_answer

__all__ = ["Handler", "HttpServer", "ServerLimits"]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[None]]
_VERSIONS: Final = {"1.1": (1, 1), "1.0": (1, 0)}
_BODY, _QUEUE, _HELD = 1, 2, 4  # why reading is paused (any of them pauses it)
_FRAMING: Final = frozenset({14, 17, 6})  # len("content-length"), "transfer-encoding", "expect"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_line_bytes: int = 8190  # request line (400 above), as aiohttp
    max_field_bytes: int = 8190  # one header line (400 above)
    max_header_bytes: int = 32 * 1024  # all header lines (431 above), as max_header_bytes
    max_headers: int = 128  # (400 above)
    header_timeout: float = 60.0
    idle_timeout: float = 60.0
    body_timeout: float | None = None  # default Request.body_timeout
    max_connections: int = 8192
    max_pipelined: int = 32  # requests parsed ahead of their turn; beyond: closed after those
    read_high_water: int = 256 * 1024  # buffered body bytes that pause reading
    linger_seconds: float = 2.0


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def answer(self) -> bytes:
        return error_answer(self.status, self.code, self.message)


class HttpServer:
    """Protocol factory plus what a graceful stop needs: live connections and handlers."""

    def __init__(self, handler: Handler, limits: ServerLimits | None = None):
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.stopping = False
        self._connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> Connection:
        return Connection(self)

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Requests whose handler is running."""
        return len(self._tasks)

    def close_idle(self) -> int:
        """Close every connection that is between requests; the others close after their answer."""
        closed = 0
        for conn in list(self._connections):
            closed += conn.close_if_idle()
        return closed

    async def shutdown(self, grace: float) -> bool:
        """Refuse new connections, close idle ones, give handlers ``grace`` seconds, then cancel
        them and reset what is left. True if every handler finished in time."""
        self.stopping = True
        self.close_idle()
        finished = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            finished = not pending
        for conn in list(self._connections):
            if conn.close_if_idle() == 0 and not conn.lingering:
                conn.transport.abort()
        if self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(set(self._tasks))
        return finished


class Connection(asyncio.Protocol):
    """One client connection: parser callbacks, the pipeline, timers, flow control."""

    transport: asyncio.Transport

    def __init__(self, server: HttpServer):
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(
            lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
            lenient_transfer_encoding=False, lenient_version=False,
            lenient_data_after_close=True,  # skip, never parse, bytes after a closing request
            lenient_optional_lf_after_cr=False, lenient_optional_cr_before_lf=False,
            lenient_optional_crlf_after_chunk=False, lenient_spaces_after_chunk_size=False,
        )  # fmt: skip
        self.remote: str | None = None
        self._max_head = self.limits.max_header_bytes + self.limits.max_line_bytes + 4096
        self._paused = 0
        self._write_waiter: asyncio.Future[None] | None = None
        self._writable = True
        self._timer: asyncio.TimerHandle | None = None
        self._head_deadline = 0.0
        self._idle_deadline: float | None = None
        self._active: Request | None = None  # the request whose answer is being made
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[Request | _Refusal] = deque()
        self._current: Request | None = None  # the request the parser is reading
        self._in_head = True
        self._head_bytes = 0
        self._stalled = 0
        self._progress = False
        self._refusal: _Refusal | None = None
        self._upgrade: bytes | None = None  # bytes after an Upgrade request's head
        self.lingering = False
        self._over_cap = False
        # head under construction
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._content_length: int | None = None
        self._coding: bytes | None = None
        self._expect = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        if server.stopping:
            transport.close()
            return
        self._over_cap = len(server._connections) >= self.limits.max_connections
        server._connections.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._arm_head_timer(1.0 if self._over_cap else None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self._cancel_timer()
        self.parser = None
        lost = ConnectionResetError("the client connection was lost")
        if self._current is not None:
            self._current.fail(lost)
        for item in self._queue:
            if isinstance(item, Request):
                item.fail(lost)
        self._queue.clear()
        if self._active is not None and not self._active.response_done and self._task is not None:
            self._task.cancel()  # nobody is left to answer: the handler stops (and so upstream)
        self._writable = True
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(lost)

    def eof_received(self) -> bool | None:
        # The client is gone (or half-closed: not supported, as aiohttp): close the transport.
        return None

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:
            self._upgrade += data
            return
        if self.lingering or self.parser is None:
            return  # discarded: the connection is closing
        if self._in_head:
            self._idle_deadline = None
            self._head_bytes += len(data)
        self._progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade = data[exc.args[0] :]
            self._pause(_HELD)
            self.parser = None
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self._in_head and self._head_bytes > self._max_head:  # the head alone is too big
            self._refuse(_too_large(self._head_bytes, self.limits.max_header_bytes))
            return
        # Bytes that reached no callback (a header value, chunk extensions, trailers) pile up
        # inside the parser: bound them like a head.
        self._stalled = 0 if self._progress else self._stalled + len(data)
        if self._stalled > self.limits.max_header_bytes:
            self._parse_failed(_too_large(self._stalled, self.limits.max_header_bytes))

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._progress = True
        if len(self._queue) >= self.limits.max_pipelined:
            raise _Refusal(400, "bad_request", "too many pipelined requests")
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
            raise _Refusal(
                400, "bad_request", f"request line over {self.limits.max_line_bytes} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        if not self._in_head:
            return  # a trailer: not forwarded, and bounded by the stall check
        size = len(name) + len(value)
        if size + 2 > self.limits.max_field_bytes:
            raise _Refusal(
                400, "bad_request", f"a header line is over {self.limits.max_field_bytes} bytes"
            )
        self._header_bytes += size + 4
        if self._header_bytes > self.limits.max_header_bytes:
            raise _too_large(self._header_bytes, self.limits.max_header_bytes)
        if value[-1:] in (b" ", b"\t"):
            value = value.rstrip(b" \t")  # llhttp strips leading whitespace only
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self.limits.max_headers:
            raise _Refusal(400, "bad_request", f"more than {self.limits.max_headers} headers")
        if len(name) in _FRAMING:
            lower = name.lower()
            if lower == b"content-length":
                self._content_length = int(value)  # llhttp checked: digits, one value
            elif lower == b"transfer-encoding":
                self._coding = value if self._coding is None else self._coding + b"," + value
            elif lower == b"expect":
                self._expect = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        parser = self.parser
        assert parser is not None
        if not self._url:
            raise _Refusal(400, "bad_request", "the request line has no target")
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Refusal(
                505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported"
            )
        chunked = self._coding is not None
        if chunked:
            codings = [c.strip().lower() for c in self._coding.split(b",")]  # type: ignore[union-attr]
            if codings[-1] != b"chunked":  # no length at all: the body could not be delimited
                raise _Refusal(400, "bad_request", "Transfer-Encoding must end in chunked")
            if len(codings) > 1:  # "gzip, chunked": undoing only the chunking alters the body
                raise _Refusal(
                    501, "unsupported_transfer_encoding",
                    "only 'Transfer-Encoding: chunked' is supported",
                )  # fmt: skip
        upgrade = parser.should_upgrade()
        if upgrade and (chunked or self._content_length):
            # llhttp hands over right after the head: the body would be read as the new protocol.
            raise _Refusal(400, "bad_request", "an Upgrade or CONNECT request cannot carry a body")
        if self._over_cap:
            raise _Refusal(
                503, "too_many_connections",
                f"the proxy holds its maximum of {self.limits.max_connections} connections; retry",
            )  # fmt: skip
        request = Request(
            self, parser.get_method().decode("ascii"), self._url, version, self._headers,
            remote=self.remote, content_length=self._content_length, chunked=chunked,
            keep_alive=parser.should_keep_alive(), expect_continue=self._expect and version >= (1, 1),
            upgrade=upgrade, high_water=self.limits.read_high_water,
            body_timeout=self.limits.body_timeout,
        )  # fmt: skip
        self._current = request
        self._dispatch(request)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        assert self._current is not None
        self._current.feed(body)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._progress = True
        if self._current is not None:
            self._current.feed_eof()
            self._current = None
        self._in_head = True
        self._head_bytes = 0

    # --- requests in turn ----------------------------------------------------------------------

    def _dispatch(self, item: Request | _Refusal) -> None:
        if self._active is None and not self._queue:
            self._start(item)
        else:
            self._queue.append(item)
            self._pause(_QUEUE)

    def _start(self, item: Request | _Refusal) -> None:
        if isinstance(item, _Refusal):
            self.transport.write(item.answer())
            self._close_lingering()
            return
        self._active = item
        task = self._task = self.loop.create_task(self._run(item))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    async def _run(self, request: Request) -> None:
        try:
            await self.server.handler(request)
        except Exception as exc:  # a bug in the handler: log the type, never the values
            log.error("request handler failed", extra={"fields": {"exc_type": type(exc).__name__}})
        if request.response_done:
            return
        if request.response_started:
            request.abort()
        elif not self.transport.is_closing():
            self.transport.write(
                error_answer(500, "internal_error", "the request handler did not answer")
            )
            self._close_lingering()

    def response_done(self, request: Request, keep_alive: bool) -> None:
        if request is not self._active:
            return
        self._active = None
        self._task = None
        if not keep_alive or self.transport.is_closing():
            self._close_lingering()
            return
        if self._queue:
            item = self._queue.popleft()
            if not self._queue:
                self._resume(_QUEUE)
            self._start(item)
        elif self._in_head:
            self._arm_head_timer(None)
            if self._head_bytes:  # the next head has begun: only its deadline applies
                self._idle_deadline = None

    def may_keep_alive(self) -> bool:
        return not (self.server.stopping or self.lingering or self._upgrade is not None)

    def close_if_idle(self) -> int:
        if self._active is None and not self._queue and not self.lingering:
            self.transport.close()
            return 1
        return 0

    def detach(self, request: Request) -> tuple[asyncio.Transport, bytes]:
        rest = self._upgrade or b""
        self._upgrade = None
        self._active = self._task = None
        self._queue.clear()
        self._cancel_timer()
        self.server._connections.discard(self)
        self.parser = None
        self.lingering = True  # this protocol ignores anything more
        return self.transport, rest

    # --- refusals and closing ------------------------------------------------------------------

    def _parse_failed(self, exc: Exception) -> None:
        refusal = self._refusal_for(exc)
        self.parser = None
        self._pause(_HELD)
        request = self._current
        if request is not None:  # the body broke: its handler learns it from read_chunk, and
            request.fail(ConnectionResetError(f"request body: {refusal.message}"))
            self._current = None  # the connection closes after its answer
            return
        self._refuse(refusal)

    def _refusal_for(self, exc: Exception) -> _Refusal:
        if isinstance(exc, _Refusal):
            return exc
        cause = exc.__context__
        if isinstance(cause, _Refusal):
            return cause
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            return _Refusal(400, "bad_method", "the method is not an upper-case HTTP method")
        reason = str(exc)[:120] if str(exc).isascii() else "invalid request"
        return _Refusal(400, "bad_request", f"the request could not be parsed: {reason}")

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer once every earlier request is answered, then close."""
        self.parser = None
        self._pause(_HELD)
        self._dispatch(refusal)

    def _close_lingering(self) -> None:
        self.lingering = True
        self._queue.clear()
        self._cancel_timer()
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            self._resume(self._paused)  # read, and drop, until the client closes too
            self._timer = self.loop.call_later(self.limits.linger_seconds, transport.close)
        else:
            transport.close()

    # --- timers and flow control ---------------------------------------------------------------

    def _arm_head_timer(self, idle: float | None) -> None:
        now = self.loop.time()
        self._head_deadline = now + self.limits.header_timeout
        self._idle_deadline = now + (self.limits.idle_timeout if idle is None else idle)
        self._timer = self.loop.call_at(
            min(self._head_deadline, self._idle_deadline), self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._idle_deadline is None and now < self._head_deadline:  # bytes came: head deadline
            self._timer = self.loop.call_at(self._head_deadline, self._on_timer)
        elif self._active is None and not self._queue:
            self.transport.close()  # idle, or the head is too slow: closed without an answer

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause(self, why: int) -> None:
        if not self._paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        if not self._paused:
            return
        self._paused &= ~why
        if not self._paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_body(self) -> None:
        self._pause(_BODY)

    def resume_body(self) -> None:
        self._resume(_BODY)

    async def drain(self) -> None:
        if self._writable or self.transport.is_closing():
            return
        waiter = self._write_waiter
        if waiter is None or waiter.done():
            waiter = self._write_waiter = self.loop.create_future()
        await asyncio.shield(waiter)


def _too_large(size: int, limit: int) -> _Refusal:
    return _Refusal(
        431,
        "headers_too_large",
        f"request headers total {size} bytes, over max_header_bytes ({limit})",
    )
