"""The proxy listener's own HTTP/1.1 server: an ``asyncio.Protocol`` per connection on llhttp.

``HttpServer(handler, limits)`` is the protocol factory for ``loop.create_server``; the handler
is ``async def handler(request: Request) -> None`` and answers through the request
(http_request.py). Per connection:

- bytes become requests in http_reader.py (llhttp, strict, with the size limits);
- one handler task per request; pipelined requests are parsed ahead (reading pauses while one
  waits) but each handler starts only when the previous response is complete;
- keep-alive per RFC 9112 §9.3: HTTP/1.0 closes unless it asks for keep-alive, ``Connection:
  close`` closes, and so does an answer sent before its request body was fully received;
- the request head must be complete within ``header_timeout`` of the connection's start or of
  the previous answer, and the first byte must come within ``idle_timeout``: otherwise the
  connection is closed without an answer (slowloris);
- a client that leaves cancels its request's handler (unless its answer was complete);
- what the listener refuses itself (http_reader.py) gets one JSON line (``{"error": code,
  "message": ...}``), after the answers to the requests before it, and the connection closes;
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
from typing import cast

from .http_reader import Refusal, RequestReader
from .http_request import Request
from .http_response import error_answer

__all__ = ["Handler", "HttpServer", "ServerLimits"]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[None]]
_BODY, _QUEUE, _HELD = 1, 2, 4  # why reading is paused (any of them pauses it)


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


class HttpServer:
    """Protocol factory plus what a graceful stop needs: live connections and handlers."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        *,
        on_refusal: Callable[[int, str], None] | None = None,
    ):
        self.handler = handler
        self.limits = limits or ServerLimits()
        # Told (status, error code) of every answer the server makes itself: for metrics.
        self.on_refusal = on_refusal
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
            await asyncio.wait(set(self._tasks), timeout=grace)  # bounded, even for a stubborn one
        return finished


class Connection(asyncio.Protocol):
    """One client connection: requests in turn, timers, flow control, closing."""

    transport: asyncio.Transport

    def __init__(self, server: HttpServer):
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.reader = RequestReader(self, self.limits)
        self.remote: str | None = None
        self.over_cap = False
        self.lingering = False
        self._paused = 0
        self._write_waiter: asyncio.Future[None] | None = None
        self._writable = True
        self._timer: asyncio.TimerHandle | None = None
        self._head_deadline = 0.0
        self._idle_deadline: float | None = None
        self._awaiting_head = True  # the deadlines apply (no request is being answered)
        self._active: Request | None = None  # the request whose answer is being made
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[Request | Refusal] = deque()
        self._upgrade: bytes | None = None  # bytes after an Upgrade request's head

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        if server.stopping:
            transport.close()
            return
        self.over_cap = len(server._connections) >= self.limits.max_connections
        server._connections.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._arm_head_timer(1.0 if self.over_cap else None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self._cancel_timer()
        self.reader.parser = None
        lost = ConnectionResetError("the client connection was lost")
        if self.reader.current is not None:
            self.reader.current.fail(lost)
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
        if self.lingering:
            return  # discarded: the connection is closing
        reader = self.reader
        if reader.in_head:
            self._idle_deadline = None
        try:
            rest = reader.feed(data)
        except Refusal as refusal:
            self._pause(_HELD)
            self.dispatch(refusal)  # answered after the requests before it
            return
        if rest is not None:
            self._upgrade = rest
            self._pause(_HELD)
        elif reader.parser is None:  # a body broke: nothing more is read here
            self._pause(_HELD)

    # --- requests in turn ----------------------------------------------------------------------

    def waiting(self) -> int:
        """Requests parsed ahead of their turn."""
        return len(self._queue)

    def dispatch(self, item: Request | Refusal) -> None:
        self._awaiting_head = False
        if self._active is None and not self._queue:
            self._start(item)
        else:
            self._queue.append(item)
            self._pause(_QUEUE)

    def _start(self, item: Request | Refusal) -> None:
        if isinstance(item, Refusal):
            self.transport.write(item.answer())
            self._close_lingering()
            if self.server.on_refusal is not None:
                self.server.on_refusal(item.status, item.code)
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
            if self.server.on_refusal is not None:
                self.server.on_refusal(500, "internal_error")

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
        elif self.reader.in_head:
            self._arm_head_timer(None)
            if self.reader.head_bytes:  # the next head has begun: only its deadline applies
                self._idle_deadline = None

    def may_keep_alive(self) -> bool:
        return not (self.server.stopping or self.lingering)

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
        self.reader.parser = None
        self.lingering = True  # this protocol ignores anything more
        return self.transport, rest

    # --- refusals and closing ------------------------------------------------------------------

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
        """From now, a head must begin within idle_timeout and end within header_timeout.

        One timer per connection, moved lazily: a busy connection's timer just finds nothing to
        do, so a keep-alive request costs no timer scheduling or cancelling."""
        now = self.loop.time()
        self._head_deadline = now + self.limits.header_timeout
        self._idle_deadline = now + (self.limits.idle_timeout if idle is None else idle)
        self._awaiting_head = True
        if self._timer is None:
            self._timer = self.loop.call_at(
                min(self._head_deadline, self._idle_deadline), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        if not self._awaiting_head or self.lingering:
            return  # a request is being answered; its end arms the timer again
        now, idle = self.loop.time(), self._idle_deadline
        if (idle is not None and now >= idle) or now >= self._head_deadline:
            self.transport.close()  # idle, or the head is too slow: closed without an answer
            return
        due = self._head_deadline if idle is None else min(idle, self._head_deadline)
        self._timer = self.loop.call_at(due, self._on_timer)

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
