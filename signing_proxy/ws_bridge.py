"""One relayed WebSocket connection: a reader and a writer per direction, around bounded queues.

Each direction is a reader and a writer around a queue. The reader never waits: when the queue
towards a side outgrows its limits, that side is too slow, and both sockets are closed with 1013
(Try Again Later) instead of buffering without bound. A close frame from either side is passed on,
with its code and reason, after the messages queued before it; a connection that drops without one
closes the other side with 1001 (client gone) or 1014 (upstream gone). Text, binary, pings and
pongs pass unchanged both ways, except the client's messages that ``sign`` (ws_signing.py) or the
in-band ``auth`` of a token_exchange upstream (drb_websocket.py) rewrites or answers itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from prometheus_client import Counter

from .aiohttp_client import CLIENT_FAILURES
from .drb_websocket import SocketAuth
from .metrics import ProxyMetrics
from .ws_signing import SubscribeRateLimited

__all__ = [
    "CLIENT_GONE",
    "CLOSE_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "Bridge",
    "QueueLimits",
    "close_socket",
]

# The relay's log lines keep the logger name they had before the relay was split into modules.
log = logging.getLogger("signing_proxy.websocket")

MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024  # level2 snapshots run to megabytes; 1009 above this
CLOSE_TIMEOUT: Final = 5.0  # seconds a closing side gets to flush and answer the close
# Codes a close frame cannot carry (RFC 6455 §7.4.1), and what is sent on in their place.
_UNSENDABLE: Final = {0: WSCloseCode.OK, 1005: WSCloseCode.OK, 1006: WSCloseCode.INTERNAL_ERROR,
                      1015: WSCloseCode.INTERNAL_ERROR}  # fmt: skip
CLIENT_GONE: Final = WSCloseCode.GOING_AWAY
_UPSTREAM_GONE: Final = WSCloseCode.BAD_GATEWAY
_TOO_SLOW: Final = WSCloseCode.TRY_AGAIN_LATER
_LOST: Final = WSCloseCode.ABNORMAL_CLOSURE  # what metrics call a connection that just dropped

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """What one direction may hold for a side that reads slower than the other side sends.

    A queue that is empty always takes one message (up to MAX_MESSAGE_BYTES), so the bound per
    direction is max(bytes, MAX_MESSAGE_BYTES) plus the socket buffers.
    """

    messages: int = 4096
    bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Close:
    """Queued after the last message for a side: close it with ``code``, then end the relay."""

    code: int  # sent to the side the queue leads to
    reason: str
    ended_with: int  # for metrics: the received code, or 1006 when the connection dropped
    error: str | None = None


class _Queue:
    """One direction's messages, counted in messages and bytes."""

    def __init__(self, limits: QueueLimits):
        self.limits = limits
        self.items: asyncio.Queue[tuple[WSMessage | _Close, int]] = asyncio.Queue()
        self.size = 0
        self.peak_size = 0
        self.peak_count = 0

    def offer(self, msg: WSMessage, size: int) -> bool:
        """Queue ``msg`` unless that would pass the limits; never waits."""
        count = self.items.qsize()
        if count and (count >= self.limits.messages or self.size + size > self.limits.bytes):
            return False
        self.items.put_nowait((msg, size))
        self.size += size
        self.peak_size = max(self.peak_size, self.size)
        self.peak_count = max(self.peak_count, count + 1)
        return True

    def close(self, item: _Close) -> None:
        self.items.put_nowait((item, 0))


async def close_socket(ws: _Socket, code: int, reason: str) -> bool:
    """Close ``ws`` with ``code``; False when it could not be done cleanly within CLOSE_TIMEOUT."""
    if ws.closed:
        return True
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=reason.encode()[:123])
    except CLIENT_FAILURES:  # the client's socket fails the same ways (aiohttp's server side)
        return False
    except asyncio.CancelledError:
        # aiohttp shares one drain future between everything waiting on a paused transport; if
        # another waiter was cancelled, close() sees that cancellation although we were not.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return False
    return True


class Bridge:
    """One relayed connection: four tasks (a reader and a writer per direction) until it ends."""

    def __init__(
        self,
        request: web.BaseRequest,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        metrics: ProxyMetrics,
        limits: QueueLimits,
        *,
        sign: Callable[[str], str | None] | None = None,
        auth: SocketAuth | None = None,
    ):
        """``sign``: rewrites the client's messages (ws_signing.MessageSigner), None to relay
        them as they are; ``auth``: the in-band auth of a token_exchange upstream."""
        self.metrics = metrics
        self.sign = sign
        self.auth = auth  # in-band auth (token_exchange upstreams): its own calls and answers
        self.request = request
        self.client = client
        self.upstream = upstream
        self.to_upstream = _Queue(limits)
        self.to_client = _Queue(limits)
        self.done = asyncio.Event()
        self.finished = asyncio.Event()  # both sockets closed, the relay counted
        self.code: int = WSCloseCode.OK
        self.reason = ""
        self.error: str | None = None
        self.bytes_out = 0
        self._closing = False  # a close is under way: readers seeing their socket end stay quiet
        self._deadline: asyncio.TimerHandle | None = None

    def end(self, code: int, reason: str, error: str | None = None) -> None:
        """End the relay; the first reason given wins."""
        if self.done.is_set():
            return
        self._closing = True
        self.code, self.reason, self.error = code, reason, error
        self.done.set()

    async def run(self) -> None:
        metrics = self.metrics
        readers = [
            self._task(self._read(self.client, self.to_upstream, from_client=True)),
            self._task(self._read(self.upstream, self.to_client, from_client=False)),
        ]
        writers = [
            self._task(
                self._write(
                    self.to_upstream, self.upstream, metrics.ws_messages.labels("to_upstream")
                )
            ),
            self._task(
                self._write(self.to_client, self.client, metrics.ws_messages.labels("to_client"))
            ),
        ]
        if self.auth is not None:
            for early in self.auth.early:  # sent by the upstream while it was authenticated
                self.to_client.offer(early, len(early.data))
            writers.append(self._task(self._reauthenticate(self.auth)))
        try:
            await self.done.wait()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            # Close first: that wakes a reader waiting in receive() (with CLOSING) and makes a
            # writer's next send fail. Writers are cancelled only then, because cancelling one
            # that waits for a drain would cancel the drain close() waits for too.
            code = _UNSENDABLE.get(self.code, self.code)
            _, client_ok = await asyncio.gather(
                close_socket(self.upstream, code, self.reason),
                close_socket(self.client, code, self.reason),
            )
            if not client_ok and self.request.transport is not None:
                self.request.transport.abort()  # a client that reads nothing keeps no buffers
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, *readers, return_exceptions=True)

    @property
    def peak_queued_bytes(self) -> int:
        return max(self.to_upstream.peak_size, self.to_client.peak_size)

    @property
    def peak_queued_messages(self) -> int:
        return max(self.to_upstream.peak_count, self.to_client.peak_count)

    def _task(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:  # a bug must end this relay, not leave it hanging
                log.error(
                    "websocket relay failed",
                    extra={"fields": {"exc_type": type(exc).__name__}},
                )
                self.end(WSCloseCode.INTERNAL_ERROR, "proxy error", "internal_error")

        return asyncio.get_running_loop().create_task(guarded())

    async def _reauthenticate(self, auth: SocketAuth) -> None:
        def send(text: str) -> bool:
            return self.to_upstream.offer(WSMessage(WSMsgType.TEXT, text, None), len(text))

        reason = await auth.run(send)
        self.end(WSCloseCode.INTERNAL_ERROR, reason[:120], "token_exchange_failed")

    async def _read(self, source: _Socket, queue: _Queue, *, from_client: bool) -> None:
        sign = self.sign if from_client else None
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT and self.auth is not None:
                if from_client and (refusal := self.auth.from_client(msg.data)) is not None:
                    if not self.to_client.offer(
                        WSMessage(WSMsgType.TEXT, refusal, None), len(refusal)
                    ):
                        self.end(_TOO_SLOW, "client too slow", "websocket_client_too_slow")
                        return
                    continue
                if not from_client:
                    relayed = self.auth.from_upstream(msg.data)
                    if relayed is None:
                        continue  # the answer to the proxy's own public/auth: holds the token
                    if relayed is not msg.data:
                        msg = WSMessage(WSMsgType.TEXT, relayed, None)
            if msg.type is WSMsgType.TEXT:
                try:
                    if sign is not None and (signed := sign(msg.data)) is not None:
                        msg = WSMessage(WSMsgType.TEXT, signed, None)
                except SubscribeRateLimited as limited:
                    # Not forwarded: the client hears why, and may send it again later.
                    error = limited.frame()
                    if not self.to_client.offer(WSMessage(WSMsgType.TEXT, error, None), len(error)):
                        self.end(_TOO_SLOW, "client too slow", "websocket_client_too_slow")
                        return
                    continue
                size = len(msg.data)
            elif msg.type in (WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG):
                size = len(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                code, reason = int(msg.data), msg.extra or ""
                self._close_after_queue(queue, _Close(_UNSENDABLE.get(code, code), reason, code))
                return
            else:  # CLOSING (our own close() woke us), CLOSED or ERROR (the connection is gone)
                if not self._closing:
                    gone = (
                        _Close(CLIENT_GONE, "client went away", _LOST, "client_disconnected")
                        if from_client
                        else _Close(_UPSTREAM_GONE, "upstream went away", _LOST,
                                    "upstream_connection_reset")
                    )  # fmt: skip
                    self._close_after_queue(queue, gone)
                return
            if not queue.offer(msg, size):
                slow = "upstream" if from_client else "client"
                self.end(_TOO_SLOW, f"{slow} too slow", f"websocket_{slow}_too_slow")
                return

    def _close_after_queue(self, queue: _Queue, close: _Close) -> None:
        """Let the other side get what was queued before the close, within CLOSE_TIMEOUT."""
        self._closing = True
        queue.close(close)
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, self.end, close.ended_with, close.reason, close.error
            )

    async def _write(self, queue: _Queue, dest: _Socket, relayed: Counter) -> None:
        to_client = dest is self.client
        while True:
            item, size = await queue.items.get()
            if isinstance(item, _Close):
                await close_socket(dest, item.code, item.reason)
                self.end(item.ended_with, item.reason, item.error)
                return
            queue.size -= size
            try:
                if item.type is WSMsgType.TEXT:
                    await dest.send_str(item.data)
                elif item.type is WSMsgType.BINARY:
                    await dest.send_bytes(item.data)
                elif item.type is WSMsgType.PING:
                    await dest.ping(item.data)
                else:
                    await dest.pong(item.data)
            except CLIENT_FAILURES:
                side = "client" if to_client else "upstream"
                error = "client_disconnected" if to_client else "upstream_connection_reset"
                self.end(_LOST, f"{side} went away", error)
                return
            if item.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                relayed.inc()
            if to_client:
                self.bytes_out += size
