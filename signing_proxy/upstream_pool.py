"""Keep-alive HTTP/1.1 connections to one upstream origin over TLS: the relay's way out.

    pool = UpstreamPool("api.coinbase.com", 443, context, "api.coinbase.com")
    resp = await pool.request("GET", b"/api/v3/x?a=1", [(b"Host", b"api.coinbase.com")], None,
                              timeout=10.0)
    try:
        async for chunk in resp.body(): ...
    finally:
        resp.release()  # back to the pool if fully read and keep-alive allows; closed otherwise

The pool sends the target and headers exactly as given, in order (no header is added but the
Content-Length / ``Transfer-Encoding: chunked`` framing of the body it is given), never
decompresses, never follows redirects and never resends: a retry needs a fresh signature, so the
caller decides, helped by ``UpstreamFailure.reached`` and ``StaleConnection``: every failure is
an ``UpstreamFailure`` with a stable code (upstream_errors.py).

Connections are bounded per pool (``max_connections``; more requests wait in line), reused last in
first out (the warmest connection, and idle ones at the back expire), closed after ``idle_timeout``
seconds idle (below the usual 20-75 s upstream keep-alive, so we close first), and checked at
checkout: one the upstream closed while idle is dropped, not used. ``timeout`` bounds the whole
exchange (waiting for a connection, connecting, sending, and reading the response and its body).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Final

from .http1 import BadResponse, Connection, ConnectionClosed, ResponseTimeout, serialize_head
from .upstream_errors import StaleConnection, UpstreamFailure, classify

__all__ = ["Response", "StaleConnection", "UpstreamFailure", "UpstreamPool", "classify"]

DEFAULT_IDLE_TIMEOUT: Final = 15.0
DEFAULT_MAX_CONNECTIONS: Final = 100
_NO_BODY: Final = frozenset({204, 304})


class Response:
    """The final response's head; the body is read with ``body()`` (or ``read()``), then the
    connection given back with ``release()`` (or dropped with ``close()``). Call one of them."""

    __slots__ = (
        "_conn",
        "_pool",
        "_timeout",
        "content_length",
        "headers",
        "http_version",
        "reason",
        "status",
    )

    def __init__(self, pool: UpstreamPool, conn: Connection, timeout: float):
        self._pool = pool
        self._conn: Connection | None = conn
        self._timeout = timeout
        self.status: int = conn.status
        self.reason: str = b"".join(conn.reason).decode("latin-1")
        self.headers: list[tuple[bytes, bytes]] = conn.headers  # as received, duplicates kept
        self.http_version: str = conn.http_version
        # Body bytes to expect: 0 without a body, None when chunked or delimited by the close.
        self.content_length: int | None = (
            0 if conn.head_request or self.status in _NO_BODY else conn.content_length
        )

    @property
    def complete(self) -> bool:
        """The whole response has arrived (its body may still be buffered, unread)."""
        return self._conn is None or self._conn.done

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; the upstream is not read while the consumer lags."""
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.done:
                return
            elif conn.error is not None:
                raise self._failure(conn)
            else:
                await conn.wait()

    async def read(self) -> bytes:
        """The whole body (for answers known to be small)."""
        conn = self._conn
        if conn is None:
            return b""
        parts: list[bytes] = []
        while True:
            if conn.chunks:
                parts.append(conn.take())
            if conn.done:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn.error is not None:
                raise self._failure(conn)
            await conn.wait()

    def release(self) -> None:
        """Give the connection back if the response was read to its end and it may be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.done and conn.keep_alive and conn.request_sent and not conn.chunks:
                self._pool._reuse(conn)
            else:
                self._pool._drop(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._drop(conn)

    def _failure(self, conn: Connection) -> UpstreamFailure:
        assert conn.error is not None
        return classify(
            conn.error, self._pool.name, self._timeout, reached=True, in_body=True,
            address=self._pool.address,
        )  # fmt: skip


class UpstreamPool:
    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        name: str | None = None,
    ):
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.name = name or self.server_hostname  # in error messages
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.opened = 0  # connections opened so far
        self._idle: list[Connection] = []  # oldest first; reuse takes the last
        self._live: set[Connection] = set()
        self._slots = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool (and every connection in it) runs on, asked for once: on
        Python 3.11 each asyncio.get_running_loop() is a getpid() system call."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        timeout: float,  # noqa: ASYNC109 - it bounds the body read after the return too
        deadline: float | None = None,
    ) -> Response:
        """Send one request; return once the final response's head arrived (1xx are skipped).

        ``target`` (path?query) and ``headers`` go out byte for byte, in order, duplicates kept:
        give ``Host`` and leave out Content-Length, Transfer-Encoding and Expect. A bytes body
        goes in the same write as the head, with Content-Length; a streamed one is sent with
        Content-Length when ``content_length`` is given, else chunked. Exceptions raised by a
        streamed body's iterator propagate unchanged; every other failure is an
        ``UpstreamFailure``. ``ValueError``: a CR, LF or NUL that would split the request.
        ``deadline`` (loop time): when the exchange must be over, if earlier attempts already
        used part of ``timeout`` (which messages still name); default now + ``timeout``."""
        if body is None:
            framing = b""
        elif isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
        elif content_length is not None:
            framing = b"Content-Length: %d\r\n" % content_length
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
        head = serialize_head(method, target, headers, framing)
        if deadline is None:
            deadline = self.running_loop().time() + timeout
        conn = await self._checkout(deadline, timeout)
        conn.begin(method == "HEAD", deadline)
        try:
            if body is None or isinstance(body, bytes):
                conn.write(head + body if body else head)
                conn.request_sent = True
            else:
                conn.write(head)
                await _upload(conn, body, content_length)
            while not conn.head_ready:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except (ConnectionClosed, BadResponse, ResponseTimeout) as exc:
            self._drop(conn)
            stale = conn.served > 0 and not conn.received
            raise classify(
                exc, self.name, timeout, reached=conn.wrote, stale=stale, address=self.address
            ) from None
        except BaseException:  # cancelled, or the body's own failure: the exchange is unfinished
            self._drop(conn)
            raise
        return Response(self, conn, timeout)

    async def close(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        while self._waiters:  # first: no slot freed below may pass to them
            self._waiters.popleft().cancel()
        for conn in list(self._live):
            self._drop(conn, graceful=conn in self._idle)

    # -- connections -----------------------------------------------------------------------------
    async def _checkout(self, deadline: float, budget: float) -> Connection:
        if self._closed:
            raise UpstreamFailure(f"the pool for {self.name} is closed", code="upstream_error",
                                  reached=False)  # fmt: skip
        loop = self.running_loop()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if loop.time() - conn.idle_since < self.idle_timeout and conn.usable():
                return conn
            self._drop(conn, graceful=True)  # expired or closed by the upstream: nothing sent
        if self._slots < self.max_connections:
            self._slots += 1
            return await self._open(deadline, budget)
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                conn_or_slot = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # handed over as we gave up: pass it on
                self._hand_back(waiter.result())
            waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise UpstreamFailure(
                    f"no connection to {self.name} came free within {budget:g}s "
                    f"(max_connections {self.max_connections})",
                    code="upstream_timeout",
                    status=504,
                    reached=False,
                ) from None
            raise
        if conn_or_slot is None:  # a slot, not a connection: open one
            return await self._open(deadline, budget)
        return conn_or_slot

    async def _open(self, deadline: float, budget: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, OSError):  # refused, reset, TLS (ssl.SSLError), timeout
                raise classify(exc, self.name, budget, address=self.address) from None
            raise
        conn.on_lost = self._forget
        self._live.add(conn)
        self.opened += 1
        return conn

    def _reuse(self, conn: Connection) -> None:
        conn.disarm(keep_timer=True)
        if self._closed or conn not in self._live:
            self._drop(conn)
            return
        conn.idle_since = conn.loop.time()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)
        self._schedule_sweep()

    def _hand_back(self, conn: Connection | None) -> None:
        if conn is None:
            self._free_slot()
        else:
            self._reuse(conn)

    def _drop(self, conn: Connection, *, graceful: bool = False) -> None:
        conn.disarm()
        if conn.transport is not None and not conn.closed:
            if graceful:
                conn.transport.close()  # TLS close_notify; the upstream sees a clean close
            else:
                conn.transport.abort()
        self._forget(conn)

    def _forget(self, conn: Connection) -> None:
        if conn in self._live:
            self._live.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the first in line
                return
        self._slots -= 1

    def _schedule_sweep(self) -> None:
        if self._sweeper is None and self._idle:
            when = self._idle[0].idle_since + self.idle_timeout
            self._sweeper = self.running_loop().call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        limit = self.running_loop().time() - self.idle_timeout
        while self._idle and self._idle[0].idle_since <= limit:
            self._drop(self._idle[0], graceful=True)
        self._schedule_sweep()


async def _upload(conn: Connection, body: AsyncIterator[bytes], content_length: int | None) -> None:
    """Stream the body, paced by the socket. Stops early if the upstream failed or answered with an
    error (e.g. 413, then closed); the connection is then not reused: its request was cut short."""
    sent = 0
    async for chunk in body:
        if conn.stop_sending:
            return
        if not chunk:
            continue
        sent += len(chunk)
        if content_length is None:
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        elif sent > content_length:
            raise ValueError(f"request body longer than its Content-Length ({content_length})")
        else:
            conn.write(chunk)
        await conn.drain()
    if conn.stop_sending:
        return
    if content_length is None:
        conn.write(b"0\r\n\r\n")
    elif sent != content_length:
        raise ValueError(f"request body shorter than its Content-Length ({content_length})")
    conn.request_sent = True
