"""WebSocket relay (Advanced Trade): accepts upgrades, connects upstream, ends every relay at stop.

An upgrade on a route is relayed to the route's upstream over TLS (its ``url`` and ``ca_file``;
the upstream sees its own name as Host). When the route has a CDP credential, every client→upstream
JSON text message whose ``type`` is ``subscribe`` or ``unsubscribe`` gets a fresh ``jwt``: the REST
header and claims without ``uri`` (docs/coinbase-auth.md, "Advanced Trade WebSocket"), replacing any jwt the client sent.
Other signers declare their own WebSocket form (``Signer.websocket_messages`` and
``websocket_auth``): an Exchange key puts key, passphrase, timestamp and signature into each
``subscribe``; signers without one are refused at the upgrade.
Everything else (other text, binary, pings, pongs, close codes) passes unchanged both ways.

This module holds the connection's life around the relay: the checks before the upgrade, the
upstream handshake, the client's, and the set of open relays, which ``close_all()`` ends with 1001
(Going Away) when the proxy stops. The relay loop itself is ws_bridge.py; what is written into
subscribe messages is ws_signing.py. Their names used elsewhere are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Final

import aiohttp
from aiohttp import WSCloseCode, web
from yarl import URL

from .aiohttp_client import CLIENT_FAILURES, translate_client_error
from .credentials import CredentialStore
from .drb_websocket import SocketAuth
from .errors import RequestRejected, UpstreamError
from .http_request import Request
from .metrics import ProxyMetrics, close_code_label
from .ratelimit import TokenBucket
from .request_headers import filter_request_headers
from .request_record import Exchange
from .routing import Target
from .signers import Signer
from .upstream_endpoint import UpstreamEndpoint
from .ws_bridge import (
    CLIENT_GONE,
    CLOSE_TIMEOUT,
    MAX_MESSAGE_BYTES,
    Bridge,
    QueueLimits,
    close_socket,
)
from .ws_signing import MessageSigner, inject_auth, inject_jwt

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "QueueLimits",
    "WebSocketRelay",
    "inject_auth",
    "inject_jwt",
    "is_websocket_upgrade",
]

# aiohttp makes its own handshake upstream; the client's subprotocols are passed as `protocols`.
_HANDSHAKE_HEADERS: Final = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)


def is_websocket_upgrade(request: Request | web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


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
        self._open: set[Bridge] = set()
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
                await close_socket(upstream, CLIENT_GONE, "not authenticated")
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
            await close_socket(upstream, CLIENT_GONE, "client went away")
            raise
        ex.status = client.status
        credential = target.credential if signer is not None and auth is None else None
        sign = (
            MessageSigner(self.credentials, credential, self.buckets, self.metrics)
            if credential is not None
            else None
        )
        bridge = Bridge(request, client, upstream, self.metrics, self.limits, sign=sign, auth=auth)
        self._open.add(bridge)
        self.metrics.ws_connections.inc()
        try:
            await bridge.run()
        finally:
            self._open.discard(bridge)
            self.peak_queued_bytes = max(self.peak_queued_bytes, bridge.peak_queued_bytes)
            self.peak_queued_messages = max(self.peak_queued_messages, bridge.peak_queued_messages)
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
        except CLIENT_FAILURES as exc:
            raise translate_client_error(exc, host, timeout) from None
        ex.upstream_seconds = time.perf_counter() - started
        return upstream
