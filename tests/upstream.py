"""A stand-in for Coinbase: an aiohttp server over real TLS that verifies every request.

It checks what Coinbase checks (docs/coinbase-auth.md): the JWT signature with the *public* key named
by ``kid``, ``sub``/``iss``/``nbf``/``exp``, the ``uri`` against the method + Host + path it actually
received, nonces never reused; or the HMAC recomputed from the bytes it received. Anything else
gets a 401, so a functional test passes only if the proxy signed exactly what it sent.

WebSocket upgrades get an Advanced Trade stand-in (``_websocket``): subscribe/unsubscribe messages
have their ``jwt`` verified the same way, but in the WebSocket form (no ``uri``), and the
authenticated channels are refused without one. ``POST /onramp/v1/token`` checks its body and
answers a session token the way Coinbase does. Exchange, Prime and INTX keys (``venue_keys``) are
checked by ``venue_auth``, on REST requests and on Exchange feed subscribe messages. CDP v2
(``X-Wallet-Auth``, Onramp v2 sessions) is checked by ``wallet_upstream.WalletVerifier``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import re
import ssl
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import jwt
import trustme
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from . import venue_auth
from .wallet_upstream import ONRAMP_SESSIONS, WalletRejected, WalletVerifier

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
WS_AUTH_CHANNELS = frozenset({"user", "futures_balance_summary"})
WS_PROTOCOL = "coinbase.test.v1"  # the one subprotocol the stand-in speaks
FLOOD_CAP = 256 * 1024 * 1024  # a flood stops here even if nobody closes it
EVM_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


class Unauthorized(Exception):
    pass


@dataclass
class Received:
    method: str
    host: str
    path: str
    query: str
    headers: dict[str, str]
    auth: str  # "jwt", "hmac", "exchange", "prime", "intx" or "none"
    claims: dict[str, Any] = field(default_factory=dict)
    jwt_header: dict[str, Any] = field(default_factory=dict)
    token: str | None = None


@dataclass
class WsSession:
    """One WebSocket connection as the upstream saw it."""

    host: str
    path: str
    headers: dict[str, str]
    protocol: str | None
    events: list[tuple[str, Any]] = field(
        default_factory=list
    )  # ("text"|"binary"|"ping"|"pong", data)
    verified: list[tuple[dict[str, Any], dict[str, Any]]] = field(
        default_factory=list
    )  # (header, claims)
    close_code: int | None = None  # the code of the close frame it received
    flood_sent: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class VerifyingUpstream:
    def __init__(
        self,
        ca: trustme.CA,
        *,
        keys: dict[str, PublicKey] | None = None,
        hmac_secrets: dict[str, str] | None = None,
        anonymous_hosts: frozenset[str] = frozenset(),
        venue_keys: dict[str, venue_auth.VenueKey] | None = None,
        wallet: WalletVerifier | None = None,
    ):
        self.ca = ca
        self.venue_keys = venue_keys or {}  # api key → venue, secret, passphrase
        self.wallet = wallet
        self.keys = keys or {}
        self.hmac_secrets = hmac_secrets or {}
        self.anonymous_hosts = anonymous_hosts
        self.seen_nonces: set[str] = set()
        self.received: list[Received] = []
        self.rejections: list[str] = []
        self.ws_sessions: list[WsSession] = []
        self.onramp_requests: list[dict[str, Any]] = []
        self.onramp_tokens: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.date_offset = 0.0  # seconds added to the Date header: a skewed upstream clock
        self.flaked: set[str] = set()  # paths under /flaky-once/ already broken once
        self.client_gone: list[str] = []  # paths whose client (the proxy) went away mid-request
        self.connections = 0  # TCP connections accepted

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)  # any path, even %0a
        app.on_response_prepare.append(self._date)
        # shutdown_timeout: at teardown, a handler still sleeping in /slow (its client long gone)
        # is not waited out for aiohttp's default 60 s.
        # Like Coinbase, verify over the bytes that arrived: never inflate a compressed body first.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.5, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

        server = self._runner.server
        assert server is not None
        counted = server.connection_made

        def connection_made(handler: Any, transport: Any) -> None:
            self.connections += 1
            counted(handler, transport)

        server.connection_made = connection_made  # type: ignore[method-assign]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.date_offset:
            response.headers["Date"] = formatdate(time.time() + self.date_offset, usegmt=True)

    # --- verification, the way Coinbase does it -------------------------------------------

    def _verify_token(self, token: str, uri: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """A CDP JWT's header and claims; ``uri=None`` is the WebSocket form, which has no uri."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}") from None
        kid = header.get("kid")
        public = self.keys.get(kid) if isinstance(kid, str) else None
        if public is None:
            raise Unauthorized(f"unknown kid {kid!r}")
        expected_alg = "ES256" if isinstance(public, ec.EllipticCurvePublicKey) else "EdDSA"
        if header.get("alg") != expected_alg or header.get("typ") != "JWT":
            raise Unauthorized(f"bad header {header}")
        required = ["sub", "iss", "nbf", "exp"]
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=[expected_alg],
                options={"require": required, "verify_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"signature/claims rejected: {exc}") from None
        if claims["sub"] != kid or claims["iss"] != "cdp" or "aud" in claims:
            raise Unauthorized(f"bad sub/iss/aud: {claims}")
        if claims["exp"] - claims["nbf"] != 120 or abs(claims["nbf"] - time.time()) > 5:
            raise Unauthorized(f"bad lifetime: {claims}")
        if uri is None and ("uri" in claims or "uris" in claims):
            raise Unauthorized(f"a WebSocket jwt carries no uri: {claims}")
        # One of the two forms: coinbase-advanced-py's `uri`, or cdp-sdk's one-element `uris`.
        if uri is not None and [claims.get("uri")] != [uri] and claims.get("uris") != [uri]:
            raise Unauthorized(f"uri {claims.get('uri', claims.get('uris'))!r} != {uri!r}")
        if "uri" in claims and "uris" in claims:
            raise Unauthorized(f"both uri and uris: {claims}")
        nonce = header.get("nonce")
        if not isinstance(nonce, str) or len(nonce) < 16 or nonce in self.seen_nonces:
            raise Unauthorized(f"nonce missing or reused: {nonce!r}")
        self.seen_nonces.add(nonce)
        return header, claims

    def _verify_jwt(self, request: web.Request, token: str, path: str) -> Received:
        host = request.headers.get("Host", "")
        if ":" in host:
            raise Unauthorized(f"Host header carries a port: {host}")
        header, claims = self._verify_token(token, f"{request.method} {host}{path}")
        return Received(request.method, host, path, "", {}, "jwt", claims, header, token)

    def _verify_hmac(self, request: web.Request, path: str, query: str, body: bytes) -> Received:
        key = request.headers["CB-ACCESS-KEY"]
        secret = self.hmac_secrets.get(key)
        if secret is None:
            raise Unauthorized(f"unknown api key {key!r}")
        timestamp = request.headers.get("CB-ACCESS-TIMESTAMP", "")
        if not timestamp.isdigit() or abs(int(timestamp) - time.time()) > 30:
            raise Unauthorized("timestamp missing or outside ±30 s")
        request_path = path if path.startswith("/api/v3/") or not query else f"{path}?{query}"
        message = f"{timestamp}{request.method}{request_path}".encode() + body
        expected = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("CB-ACCESS-SIGN", "")):
            raise Unauthorized("HMAC mismatch")
        return Received(request.method, request.headers.get("Host", ""), path, query, {}, "hmac")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        host = request.headers.get("Host", "")
        auth = request.headers.get("Authorization", "")
        body = b""
        streaming = path.startswith("/stream/")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, path)
        try:
            if auth.startswith("Bearer "):
                rec = self._verify_jwt(request, auth[7:], path)
            elif venue_auth.claims_venue(request.headers):
                body = await request.read()
                venue = venue_auth.verify_request(
                    self.venue_keys, request.method, request.headers, path, query, body
                )
                rec = Received(request.method, host, path, query, {}, venue)
            elif "CB-ACCESS-KEY" in request.headers:
                body = await request.read()
                rec = self._verify_hmac(request, path, query, body)
            elif host in self.anonymous_hosts:
                rec = Received(request.method, host, path, query, {}, "none")
            else:
                raise Unauthorized("no credentials")
            if self.wallet is not None and not streaming:
                body = body or await request.read()
                self.wallet.check(request, path, body)
        except (Unauthorized, venue_auth.VenueRejected, WalletRejected) as exc:
            self.rejections.append(str(exc))
            return web.json_response({"error": "unauthorized", "reason": str(exc)}, status=401)
        rec.query = query
        rec.headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(rec)
        if path.startswith("/flaky-once/") and path not in self.flaked:
            # The request arrived and was authenticated, then the connection breaks, unanswered.
            self.flaked.add(path)
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if path == "/hold":  # answer nothing; note when the client goes away
            return await self._hold(request, path)
        if streaming:
            return await self._stream(request, path, query)
        if not body and request.body_exists:
            body = await request.read()
        return await self._special(request, path, query, rec, body)

    # --- behaviours the tests ask for by path ----------------------------------------------

    async def _hold(self, request: web.Request, path: str) -> web.StreamResponse:
        transport = request.transport
        for _ in range(600):  # at most 30 s
            if transport is None or transport.is_closing():
                self.client_gone.append(path)
                break
            await asyncio.sleep(0.05)
        return web.Response(text="held")

    async def _stream(self, request: web.Request, path: str, query: str) -> web.StreamResponse:
        params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        if path == "/stream/endless":  # 1 KiB every 50 ms until the client goes away (30 s max)
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            try:
                for _ in range(600):
                    await response.write(b"z" * 1024)
                    await asyncio.sleep(0.05)
            except ConnectionError:
                self.client_gone.append(path)
                raise
            return response
        if path == "/stream/download":
            size = int(params["size"])
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            response.content_length = size
            await response.prepare(request)
            block = bytes(range(256)) * 256  # 64 KiB
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                await response.write(chunk)
                left -= len(chunk)
            await response.write_eof()
            return response
        digest = hashlib.sha256()
        count = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            count += len(chunk)
        return web.json_response({"received": count, "sha256": digest.hexdigest()})

    async def _special(
        self, request: web.Request, path: str, query: str, rec: Received, body: bytes
    ) -> web.StreamResponse:
        if path == "/onramp/v1/token" and request.method == "POST":
            return self._onramp_token(body)
        if path == ONRAMP_SESSIONS and request.method == "POST" and self.wallet is not None:
            return self.wallet.onramp_session(body)
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": "https://elsewhere.example/next"})
        if path.startswith("/status/"):
            last = path.rsplit("/", 1)[1]
            code = int(last) if last.isdigit() and 200 <= int(last) <= 599 else 404
            return web.json_response({"status": code, "message": "from upstream"}, status=code)
        if path == "/slow":
            value = query.split("=", 1)[1] if "=" in query else ""
            await asyncio.sleep(float(value) if value.replace(".", "", 1).isdigit() else 5)
        if path == "/gzip":
            return web.Response(
                body=gzip.compress(b'{"compressed": true}'),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        if path == "/chunked":
            response = web.StreamResponse(
                headers={"Content-Type": "text/plain", "X-Upstream": "yes"}
            )
            await response.prepare(request)
            for i in range(5):
                await response.write(f"part{i};".encode())
            await response.write_eof()
            return response
        if path in ("/reset-mid", "/reset-small"):  # the body stops short of its Content-Length
            size = "100000" if path == "/reset-mid" else "5000"
            response = web.StreamResponse(headers={"Content-Length": size})
            await response.prepare(request)
            await response.write(b"x" * 1000)
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.Response(
            text=json.dumps(
                {
                    "method": rec.method,
                    "host": rec.host,
                    "path": path,
                    "query": query,
                    "auth": rec.auth,
                    "claims": rec.claims,
                    "body_len": len(body),
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                    "headers": rec.headers,
                }
            ),
            content_type="application/json",
            headers={"Set-Cookie": "__cf_bm=upstream-cookie; Path=/", "X-Upstream": "yes"},
        )

    # --- POST /onramp/v1/token ---------------------------------------------------------------

    def _onramp_token(self, body: bytes) -> web.Response:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        problem = _onramp_problem(data)
        if problem:
            return web.json_response({"code": "INVALID_ARGUMENT", "message": problem}, status=400)
        token = base64.b64encode(str(uuid.uuid4()).encode()).decode()
        self.onramp_requests.append(data)
        self.onramp_tokens.append(token)
        return web.json_response({"token": token, "channel_id": ""})

    # --- WebSocket: an Advanced Trade stand-in ----------------------------------------------------

    async def _websocket(self, request: web.Request, path: str) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(WS_PROTOCOL,), autoping=False)
        await ws.prepare(request)
        session = WsSession(
            request.headers.get("Host", ""),
            path,
            {k.lower(): v for k, v in request.headers.items()},
            ws.ws_protocol,
        )
        self.ws_sessions.append(session)
        flood: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    session.events.append(("text", msg.data))
                    if msg.data.startswith("flood:"):
                        size = int(msg.data.split(":")[1])
                        flood = asyncio.get_running_loop().create_task(
                            self._flood(ws, session, size)
                        )
                    else:
                        await self._ws_text(ws, session, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    session.events.append(("binary", msg.data))
                    await ws.send_bytes(msg.data)  # echo
                elif msg.type is WSMsgType.PING:
                    session.events.append(("ping", msg.data))
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    session.events.append(("pong", msg.data))
                else:
                    if msg.type is WSMsgType.CLOSE:
                        session.close_code = int(msg.data)
                    break
        finally:
            if flood is not None:
                flood.cancel()
            session.closed.set()
        return ws

    async def _ws_text(self, ws: web.WebSocketResponse, session: WsSession, text: str) -> None:
        """Commands (``close:CODE:REASON``, ``ping:DATA``), subscriptions, or an echo."""
        if text.startswith("close:"):
            _, code, reason = text.split(":", 2)
            await ws.close(code=int(code), message=reason.encode())
            return
        if text.startswith("ping:"):
            await ws.ping(text[5:].encode())
            return
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
            await ws.send_str(text)  # echo, byte for byte
            return
        token = message.get("jwt")
        if "signature" in message and message.get("type") == "subscribe":  # the Exchange feed
            try:
                venue_auth.verify_subscribe(self.venue_keys, message)
            except venue_auth.VenueRejected as exc:
                self.rejections.append(str(exc))
                await ws.send_json({"type": "error", "message": f"authentication failure: {exc}"})
                return
            session.verified.append(({"venue": "exchange"}, message))
        elif isinstance(token, str):
            try:
                header, claims = self._verify_token(token, None)
            except Unauthorized as exc:
                self.rejections.append(str(exc))
                await ws.send_json({"type": "error", "message": f"authentication failure: {exc}"})
                return
            session.verified.append((header, claims))
        elif message.get("channel") in WS_AUTH_CHANNELS:
            await ws.send_json({"type": "error", "message": "authentication failure: no jwt"})
            return
        authenticated = isinstance(token, str) or "signature" in message
        await ws.send_json(
            {"type": "subscriptions", "received": message, "authenticated": authenticated}
        )

    async def _flood(self, ws: web.WebSocketResponse, session: WsSession, size: int) -> None:
        block = bytes(range(256)) * (size // 256)
        try:
            while not ws.closed and session.flood_sent < FLOOD_CAP:
                await ws.send_bytes(block)
                session.flood_sent += len(block)
        except (ConnectionError, RuntimeError):
            pass


def _onramp_problem(data: Any) -> str | None:
    """What Coinbase would refuse in a session-token request body, or None."""
    if not isinstance(data, dict):
        return "body must be a JSON object"
    unknown = set(data) - {"addresses", "assets", "clientIp"}
    if unknown:
        return f"unknown fields {sorted(unknown)}"
    addresses = data.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        return "addresses is required"
    for entry in addresses:
        if not isinstance(entry, dict) or set(entry) != {"address", "blockchains"}:
            return "each address needs exactly address and blockchains"
        chains = entry["blockchains"]
        if not isinstance(entry["address"], str) or not isinstance(chains, list) or not chains:
            return "address must be a string and blockchains a non-empty list"
        if not EVM_ADDRESS.fullmatch(entry["address"]):
            return f"{entry['address']} is not a valid address for {', '.join(chains)}"
    assets = data.get("assets", [])
    if not isinstance(assets, list) or not all(isinstance(a, str) for a in assets):
        return "assets must be a list of strings"
    if "clientIp" in data and not isinstance(data["clientIp"], str):
        return "clientIp must be a string"
    return None
