"""A WebSocket upgrade leaves the listener's own server for aiohttp, which runs the relay.

The upgrade has passed every check of the request walk (proxy.py) on our ``Request``; its
connection is then detached from ``http_server`` and given to a fresh aiohttp ``web.Server``,
which parses the handshake again and calls the WebSocket relay (websocket.py) with aiohttp's
request, as before the listener had a server of its own. A refusal the relay makes before the
handshake (an upstream that refuses the upgrade, a bad handshake) is answered by aiohttp as the
same JSON error.

The relay runs in a task of its own: aiohttp cancels its handler when the client's TCP
connection ends, but the relay must still close the upstream and count the close.
"""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from .errors import JSON_CONTENT_TYPE, ProxyError
from .http_request import Request
from .request_record import Exchange
from .routing import Target
from .signers import Signer
from .websocket import WebSocketRelay

__all__ = ["HANDSHAKE_SECONDS", "WebSocketHandoff", "error_response"]

HANDSHAKE_SECONDS: Final = 10.0  # aiohttp parses a head we parsed already: this is a backstop


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    """The JSON error answer in aiohttp's form (for a refusal after the handover)."""
    return web.Response(
        status=exc.status, body=exc.body(), content_type=JSON_CONTENT_TYPE,
        headers={**exc.headers, "X-Request-Id": request_id},
    )  # fmt: skip


class WebSocketHandoff:
    def __init__(self, relay: WebSocketRelay):
        self.relay = relay

    async def start(
        self, request: Request, target: Target, signer: Signer | None, ex: Exchange
    ) -> asyncio.Future[web.StreamResponse] | None:
        """Hand the connection over; the relay's task once aiohttp has parsed the handshake
        (None if it never did: the connection is then closed, counted as a bad upgrade)."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[asyncio.Future[web.StreamResponse]] = loop.create_future()

        async def run(aio_request: web.BaseRequest) -> web.StreamResponse:
            try:
                return await self.relay.relay(aio_request, target, signer, ex)
            except ProxyError as exc:
                ex.status, ex.error = exc.status, exc.code
                return error_response(exc, ex.request_id)

        async def handle(aio_request: web.BaseRequest) -> web.StreamResponse:
            task = asyncio.ensure_future(run(aio_request))
            if not started.done():
                started.set_result(task)
            return await asyncio.shield(task)

        server = web.Server(
            handle, access_log=None, handler_cancellation=True, auto_decompress=False
        )
        head = request.head_bytes()
        transport, rest = request.detach()
        protocol = server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head + rest)
        transport.resume_reading()
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                return await started
        except TimeoutError:
            transport.abort()
            ex.status, ex.error = 400, "bad_websocket_upgrade"
            return None
