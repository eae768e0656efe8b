"""A stand-in for the derivatives gateway (drb.coinbase.com) over real TLS, REST and WebSocket.

``public/auth`` (``POST /api/v2/public/auth``, or the same call over the socket) verifies the CDP
JWT the way the gateway does: with the *public* key named by ``kid``, in the form without ``uri``,
each nonce once (VerifyingUpstream._verify_token). It issues short-lived random access tokens
(``lifetime`` seconds, so refreshes happen within a test) and counts the exchanges. Private calls
need a known, unexpired token, else JSON-RPC error 13009; public calls need none.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from .upstream import Unauthorized, VerifyingUpstream

DRB = "drb.coinbase.com"
UNAUTHORIZED = {"code": 13009, "message": "unauthorized"}


@dataclass
class DrbCall:
    method: str
    path: str
    rpc_method: str | None
    token: str | None  # the bearer token it carried
    body: bytes
    answer: dict[str, Any]


@dataclass
class DrbSocket:
    auths: int = 0
    until: float = 0.0  # when this socket's authentication expires
    token: str = ""  # the access token it was last given
    sent: list[dict[str, Any]] = field(default_factory=list)  # what the gateway answered
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class DrbUpstream(VerifyingUpstream):
    lifetime: float = 30.0  # seconds an access token lives (tests of refreshes shorten it)
    auth_delay: float = 0.0  # seconds public/auth takes to answer
    auth_error: dict[str, Any] | None = None  # answer every public/auth with this error
    reject_all: bool = False  # answer every private call with 13009

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens: dict[str, float] = {}  # valid token -> expiry (time.monotonic)
        self.issued: list[str] = []  # every access and refresh token ever handed out
        self.exchanges = 0  # REST public/auth calls answered
        self.exchange_times: list[float] = []
        self.calls: list[DrbCall] = []
        self.sockets: list[DrbSocket] = []

    def revoke(self) -> None:
        self.tokens.clear()

    def _auth(self, params: Any) -> dict[str, Any]:
        """A public/auth result, or raise Unauthorized (answered as 13004)."""
        if not isinstance(params, dict) or params.get("grant_type") != "coinbase_cdp":
            raise Unauthorized(f"bad params {params!r}")
        if set(params) != {"grant_type", "token"}:
            raise Unauthorized(f"unexpected params {sorted(params)}")
        self._verify_token(str(params.get("token")), None)  # no uri claim, fresh nonce
        token = "drbtok" + secrets.token_urlsafe(24)
        refresh = "refresh" + secrets.token_urlsafe(16)
        self.tokens[token] = time.monotonic() + self.lifetime
        self.issued += [token, refresh]
        return {
            "access_token": token,
            "expires_in": self.lifetime,
            "refresh_token": refresh,
            "scope": "trade:read_write",
            "token_type": "bearer",
        }

    def _valid(self, token: str | None) -> bool:
        return token is not None and self.tokens.get(token, 0.0) > time.monotonic()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._drb_socket(request)
        body = await request.read()
        try:
            call = json.loads(body) if body else {}
        except ValueError:
            call = {}
        rpc = call.get("method") if isinstance(call, dict) else None
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": call.get("id") if call else None}
        status = 200
        if path == "/api/v2/public/auth":
            if self.auth_delay:
                await asyncio.sleep(self.auth_delay)
            self.exchanges += 1
            self.exchange_times.append(time.monotonic())
            if request.headers.get("Host") != "drb.coinbase.com" or token is not None:
                answer["error"], status = {"code": 13004, "message": "bad request"}, 400
            elif self.auth_error is not None:
                answer["error"], status = self.auth_error, 400
            else:
                try:
                    answer["result"] = self._auth(call.get("params"))
                except Unauthorized as exc:
                    self.rejections.append(str(exc))
                    answer["error"] = {"code": 13004, "message": "invalid_credentials"}
                    status = 400
        elif path.startswith("/api/v2/private/"):
            if self.reject_all or not self._valid(token):
                answer["error"], status = UNAUTHORIZED, 400
            elif path == "/api/v2/private/other_error":
                answer["error"], status = {"code": 10009, "message": "not_enough_funds"}, 400
            else:
                answer["result"] = {"method": path[8:], "sha256_of_body": _digest(body)}
        else:
            answer["result"] = {"method": path[8:], "public": True}
        if path != "/api/v2/public/auth":  # exchanges are counted apart
            self.calls.append(DrbCall(request.method, path, rpc, token, body, answer))
        return web.json_response(answer, status=status)

    async def _drb_socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = DrbSocket()
        self.sockets.append(session)
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                call = json.loads(msg.data)
                answer: dict[str, Any] = {"jsonrpc": "2.0", "id": call.get("id")}
                method = call.get("method", "")
                if method == "public/auth":
                    try:
                        answer["result"] = self._auth(call.get("params"))
                        session.token = answer["result"]["access_token"]
                        session.auths += 1
                        session.until = time.monotonic() + self.lifetime
                    except Unauthorized as exc:
                        self.rejections.append(str(exc))
                        answer["error"] = {"code": 13004, "message": "invalid_credentials"}
                elif method == "private/leak":  # a gateway bug: the token in an answer
                    answer["result"] = {"echo": f"your token is {session.token}"}
                elif method.startswith("private/"):
                    if session.until > time.monotonic():
                        answer["result"] = {"method": method, "auths": session.auths}
                    else:
                        answer["error"] = UNAUTHORIZED
                else:
                    answer["result"] = {"method": method, "public": True}
                session.sent.append(answer)
                await ws.send_str(json.dumps(answer))
        finally:
            session.closed.set()
        return ws


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def drb_config(drb: DrbUpstream, ca_file: Path, key_file: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "drain_timeout": 2,
        "credentials": {"trading": {"key_file": str(key_file)}},
        "upstreams": {
            DRB: {
                "credential": "trading",
                "auth": "token_exchange",  # implies websocket: true
                "url": drb.url,
                "ca_file": str(ca_file),
                "timeout": 5,
            }
        },
        "routes": [{"prefix": "/drb", "upstream": DRB, "strip_prefix": True}],
    }
