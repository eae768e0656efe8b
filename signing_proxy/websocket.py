"""WebSocket relay (Advanced Trade): one client socket ↔ one upstream socket, JWTs put in messages.

An upgrade on a route is relayed to the route's upstream over TLS (its ``url`` and ``ca_file``;
the upstream sees its own name as Host). When the route has a CDP credential, every client→upstream
JSON text message whose ``type`` is ``subscribe`` or ``unsubscribe`` gets a fresh ``jwt``: the REST
header and claims without ``uri`` (docs/coinbase-auth.md, "Advanced Trade WebSocket"), replacing any jwt the client sent.
Other signers declare their own WebSocket form (``Signer.websocket_messages`` and
``websocket_auth``): an Exchange key puts key, passphrase, timestamp and signature into each
``subscribe``; signers without one are refused at the upgrade.
Everything else (other text, binary, pings, pongs, close codes) passes unchanged both ways.

Each direction is a reader and a writer around a queue. The reader never waits: when the queue
towards a side outgrows its limits, that side is too slow, and both sockets are closed with 1013
(Try Again Later) instead of buffering without bound. A close frame from either side is passed on,
with its code and reason, after the messages queued before it; a connection that drops without one
closes the other side with 1001 (client gone) or 1014 (upstream gone). ``close_all()`` ends every
relay with 1001 (Going Away) when the proxy stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from prometheus_client import Counter
from yarl import URL

from .credentials import CredentialStore
from .drb_websocket import SocketAuth
from .errors import RequestRejected, UpstreamError
from .http_request import Request
from .metrics import ProxyMetrics, close_code_label
from .ratelimit import TokenBucket
from .relay import Exchange, UpstreamEndpoint, filter_request_headers, translate_client_error
from .routing import Target
from .signers import Signer

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "QueueLimits",
    "WebSocketRelay",
    "inject_auth",
    "inject_jwt",
    "is_websocket_upgrade",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024  # level2 snapshots run to megabytes; 1009 above this
CLOSE_TIMEOUT: Final = 5.0  # seconds a closing side gets to flush and answer the close
_SIGNED_TYPES: Final = frozenset({"subscribe", "unsubscribe"})
# aiohttp makes its own handshake upstream; the client's subprotocols are passed as `protocols`.
_HANDSHAKE_HEADERS: Final = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)
# Codes a close frame cannot carry (RFC 6455 §7.4.1), and what is sent on in their place.
_UNSENDABLE: Final = {0: WSCloseCode.OK, 1005: WSCloseCode.OK, 1006: WSCloseCode.INTERNAL_ERROR,
                      1015: WSCloseCode.INTERNAL_ERROR}  # fmt: skip
_CLIENT_GONE: Final = WSCloseCode.GOING_AWAY
_UPSTREAM_GONE: Final = WSCloseCode.BAD_GATEWAY
_TOO_SLOW: Final = WSCloseCode.TRY_AGAIN_LATER
_LOST: Final = WSCloseCode.ABNORMAL_CLOSURE  # what metrics call a connection that just dropped

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def is_websocket_upgrade(request: Request | web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def inject_auth(
    text: str, types: frozenset[str], fields: Callable[[], dict[str, str]]
) -> str | None:
    """``text`` with ``fields()`` set in it if it is a JSON object whose ``type`` is in ``types``.

    The fields replace any the client sent under those names. None means "send the message as
    it is": not JSON, not an object, or another ``type``.
    """
    if not types:
        return None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("type") not in types:
        return None
    message.update(fields())
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


class _RateLimited(Exception):
    """A subscribe message over its credential's rate limit: answered with an error frame."""

    def __init__(self, credential: str, bucket: TokenBucket, wait: float):
        super().__init__(credential)
        self.credential, self.bucket, self.wait = credential, bucket, wait

    def frame(self) -> str:
        limit = self.bucket.limit
        return json.dumps(
            {
                "type": "error",
                "error": "rate_limited",
                "message": f"rate limit of credential {self.credential!r} reached "
                f"({limit.rate:g}/s, burst {limit.burst}); this message was not forwarded, "
                f"send it again in {TokenBucket.retry_after(self.wait)}s",
            }
        )


def inject_jwt(text: str, mint: Callable[[], str]) -> str | None:
    """``text`` with ``jwt`` set to ``mint()`` if it is a JSON subscribe/unsubscribe object."""
    return inject_auth(text, _SIGNED_TYPES, lambda: {"jwt": mint()})


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


async def _close(ws: _Socket, code: int, reason: str) -> bool:
    """Close ``ws`` with ``code``; False when it could not be done cleanly within CLOSE_TIMEOUT."""
    if ws.closed:
        return True
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=code, message=reason.encode()[:123])
    except (TimeoutError, ConnectionError, aiohttp.ClientError):
        return False
    except asyncio.CancelledError:
        # aiohttp shares one drain future between everything waiting on a paused transport; if
        # another waiter was cancelled, close() sees that cancellation although we were not.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return False
    return True


class _Bridge:
    """One relayed connection: four tasks (a reader and a writer per direction) until it ends."""

    def __init__(
        self,
        relay: WebSocketRelay,
        request: web.BaseRequest,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        credential: str | None,
        auth: SocketAuth | None = None,
    ):
        self.relay = relay
        self.auth = auth  # in-band auth (token_exchange upstreams): its own calls and answers
        self.request = request
        self.client = client
        self.upstream = upstream
        self.credential = credential
        self.to_upstream = _Queue(relay.limits)
        self.to_client = _Queue(relay.limits)
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
        metrics = self.relay.metrics
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
                _close(self.upstream, code, self.reason), _close(self.client, code, self.reason)
            )
            if not client_ok and self.request.transport is not None:
                self.request.transport.abort()  # a client that reads nothing keeps no buffers
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, *readers, return_exceptions=True)
            for queue in (self.to_upstream, self.to_client):
                self.relay.peak_queued_bytes = max(self.relay.peak_queued_bytes, queue.peak_size)
                self.relay.peak_queued_messages = max(
                    self.relay.peak_queued_messages, queue.peak_count
                )

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

    def _sign(self, text: str) -> str | None:
        """``text`` with the signer's WebSocket auth fields set, if it is a message it signs."""
        credential = self.credential
        assert credential is not None
        # Asked per message, so a key rotated while the socket is open is used from then on.
        signer = self.relay.credentials.signer(credential)

        def fields() -> dict[str, str]:
            # Each signed message counts against the credential's rate limit, like a request.
            bucket = self.relay.buckets.get(credential)
            if bucket is not None and (wait := bucket.acquire()) > 0:
                self.relay.metrics.rate_limited.labels(credential).inc()
                raise _RateLimited(credential, bucket, wait)
            auth = signer.websocket_auth()
            self.relay.metrics.ws_jwts.labels(credential).inc()
            self.relay.metrics.tokens.labels(credential, signer.scheme).inc()
            return auth

        return inject_auth(text, signer.websocket_messages, fields)

    async def _read(self, source: _Socket, queue: _Queue, *, from_client: bool) -> None:
        sign = from_client and self.credential is not None
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
                    if sign and (signed := self._sign(msg.data)) is not None:
                        msg = WSMessage(WSMsgType.TEXT, signed, None)
                except _RateLimited as limited:
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
                        _Close(_CLIENT_GONE, "client went away", _LOST, "client_disconnected")
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
                await _close(dest, item.code, item.reason)
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
            except (ConnectionError, aiohttp.ClientError):
                side = "client" if to_client else "upstream"
                error = "client_disconnected" if to_client else "upstream_connection_reset"
                self.end(_LOST, f"{side} went away", error)
                return
            if item.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                relayed.inc()
            if to_client:
                self.bytes_out += size


class WebSocketRelay:
    """Relays WebSocket upgrades; keeps the open relays so ``close_all()`` can end them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Mapping[str, UpstreamEndpoint],
        credentials: CredentialStore,
        metrics: ProxyMetrics,
        *,
        limits: QueueLimits | None = None,
        buckets: Mapping[str, TokenBucket] | None = None,
    ):
        self.buckets: Mapping[str, TokenBucket] = buckets or {}  # every minted jwt takes a token
        self.session = session
        self.endpoints = endpoints
        self.credentials = credentials
        self.metrics = metrics
        self.limits = limits or QueueLimits()
        self.peak_queued_bytes = 0  # high-water marks over all relays: the limits at work
        self.peak_queued_messages = 0
        self._open: set[_Bridge] = set()
        self._stopping = False

    async def relay(
        self, request: web.BaseRequest, target: Target, signer: Signer | None, ex: Exchange
    ) -> web.StreamResponse:
        if self._stopping:
            raise RequestRejected(
                "the proxy is shutting down; reconnect", code="shutting_down", status=503
            )
        if signer is not None and not signer.websocket_messages:
            # Advanced Trade channels take CDP key JWTs (docs/coinbase-auth.md), the Exchange feed an
            # Exchange key; other signers have no WebSocket form.
            raise RequestRejected(
                f"credential '{target.credential}' is a {signer.scheme} key, which cannot sign "
                "WebSocket subscriptions; give this route a CDP credential (Advanced Trade) or "
                "an exchange credential (Exchange feed), or none for public channels",
                code="websocket_needs_cdp_key",
            )
        if not web.WebSocketResponse().can_prepare(request).ok:
            raise RequestRejected(
                "not a valid WebSocket upgrade (needs Connection: Upgrade, Sec-WebSocket-Key and "
                "Sec-WebSocket-Version: 13)",
                code="bad_websocket_upgrade",
            )
        upstream = await self._connect(request, target, ex)
        auth = None
        if target.upstream.auth == "token_exchange" and target.credential is not None:
            auth = SocketAuth(
                self.credentials, target.credential, self.metrics, target.upstream.timeout
            )
            try:
                await auth.open(upstream, target.upstream.name)
            except BaseException:
                await _close(upstream, _CLIENT_GONE, "not authenticated")
                raise
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,  # close frames are relayed, code and all
            autoping=False,  # pings and pongs are relayed too
            max_msg_size=MAX_MESSAGE_BYTES,
            timeout=CLOSE_TIMEOUT,
        )
        client.headers["X-Request-Id"] = ex.request_id
        try:
            await client.prepare(request)
        except BaseException:
            await _close(upstream, _CLIENT_GONE, "client went away")
            raise
        ex.status = client.status
        credential = target.credential if signer is not None and auth is None else None
        bridge = _Bridge(self, request, client, upstream, credential, auth)
        self._open.add(bridge)
        self.metrics.ws_connections.inc()
        try:
            await bridge.run()
        finally:
            self._open.discard(bridge)
            self.metrics.ws_connections.dec()
            self.metrics.ws_closes.labels(close_code_label(bridge.code)).inc()
            ex.error, ex.bytes_out = bridge.error, bridge.bytes_out
            bridge.finished.set()
        return client

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Refuse new upgrades, end every open relay with ``code`` and wait for them to close."""
        self._stopping = True
        bridges = list(self._open)
        for bridge in bridges:
            bridge.end(code, "proxy shutting down")
        if bridges:  # each closes both sides within CLOSE_TIMEOUT; the margin covers the rest
            waits = (bridge.finished.wait() for bridge in bridges)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                    await asyncio.gather(*waits)

    async def _connect(
        self, request: web.BaseRequest, target: Target, ex: Exchange
    ) -> aiohttp.ClientWebSocketResponse:
        host = target.upstream.name
        endpoint = self.endpoints[host]
        headers = filter_request_headers(request.headers, host)  # Host: the upstream's name
        for name in _HANDSHAKE_HEADERS:
            headers.popall(name, None)
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        raw = endpoint.origin + target.path + ("?" + target.query if target.query else "")
        timeout = endpoint.config.timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                upstream = await self.session.ws_connect(
                    URL(raw, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    ssl=endpoint.ssl,
                    server_hostname=endpoint.server_hostname,
                    autoclose=False,
                    autoping=False,
                    max_msg_size=MAX_MESSAGE_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                f"{host} refused the WebSocket upgrade (HTTP {exc.status})",
                code="upstream_websocket_refused",
            ) from None
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise translate_client_error(exc, host, timeout) from None
        ex.upstream_seconds = time.perf_counter() - started
        return upstream
