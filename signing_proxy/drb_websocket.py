"""WebSocket to a ``token_exchange`` upstream (wss://drb.coinbase.com/ws/api/v2): in-band auth.

The gateway authenticates a socket with the same ``public/auth`` call as REST, sent over the
socket (docs/coinbase-auth.md, "Derivatives gateway"). The proxy does it itself, per connection:

- on connect it sends ``public/auth`` with a fresh CDP JWT and waits for the answer before the
  client's upgrade is accepted (a failure answers the upgrade with a 502 saying why); anything
  the upstream sent meanwhile is kept and relayed first;
- it re-sends ``public/auth`` at 80 % of the token's lifetime, in line with the other messages,
  retrying with backoff until the token expires (then the relay ends with 1011 and the reason);
- its own calls use JSON-RPC ids from a reserved band; their answers (which hold the access
  token) are consumed, never relayed; a client message using such an id is refused;
- a client's own ``public/auth`` is refused with a JSON-RPC error: the socket is authenticated.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp import WSMessage, WSMsgType

from . import strict_json
from .aiohttp_client import CLIENT_FAILURES
from .credentials import CredentialStore
from .errors import ProxyError, SigningError, UpstreamError
from .metrics import ProxyMetrics
from .signers import Clock
from .token_exchange import (
    AUTH_METHOD,
    BACKOFF_CAP,
    BACKOFF_FIRST,
    REFRESH_RATIO,
    ExchangeFailed,
    auth_call,
    parse_auth_answer,
)

__all__ = ["RESERVED_IDS", "RESERVED_ID_BASE", "SocketAuth"]

log = logging.getLogger(__name__)

# JSON-RPC ids the proxy's own calls use: integers (what Deribit takes), below 2**53 (exact in
# JavaScript clients too), far above any counter a client starts at 1.
RESERVED_ID_BASE: Final = 9_007_199_254_000_000
RESERVED_IDS: Final = range(RESERVED_ID_BASE, RESERVED_ID_BASE + 700_000)
_MARK: Final = str(RESERVED_ID_BASE)[:10]  # every reserved id starts with these digits
_REFUSED_CODE: Final = -32600  # JSON-RPC "Invalid Request"


def _error(call_id: Any, code: int, message: str) -> str:
    error = {"code": code, "message": message}
    return json.dumps({"jsonrpc": "2.0", "id": call_id, "error": error})


def _calls(text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return []
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict)]


class SocketAuth:
    """The in-band authentication of one relayed connection."""

    def __init__(
        self,
        credentials: CredentialStore,
        credential: str,
        metrics: ProxyMetrics,
        timeout: float,
        *,
        clock: Clock = time.monotonic,
    ):
        self.credentials = credentials
        self.credential = credential
        self.metrics = metrics
        self.timeout = timeout
        self.clock = clock
        self.early: list[WSMessage] = []  # what the upstream sent before its auth answer
        self.expires_at = 0.0
        self.refresh_at = 0.0
        self.auths = 0  # successful public/auth calls on this socket
        self._ids = itertools.count(RESERVED_IDS.start)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._secrets: tuple[str, ...] = ()  # this socket's tokens (current and previous)

    def _call(self) -> tuple[int, str]:
        jwt = self.credentials.signer(self.credential).exchange_jwt()  # fresh for every auth
        if jwt is None:
            raise SigningError(f"credential '{self.credential}' is not a CDP key")
        call_id = next(self._ids)
        return call_id, auth_call(jwt, call_id)

    def _accept(self, answer: dict[str, Any], started: float) -> None:
        try:
            grant = parse_auth_answer(answer)
        except ExchangeFailed as exc:
            self.metrics.token_exchanges.labels(self.credential, "websocket", exc.outcome).inc()
            raise
        result = answer["result"]
        fresh = tuple(v for v in (grant.token, result.get("refresh_token")) if isinstance(v, str))
        self._secrets = (*fresh, *self._secrets)[:4]
        self.expires_at = started + grant.expires_in
        self.refresh_at = started + grant.expires_in * REFRESH_RATIO
        self.auths += 1
        self.metrics.token_exchanges.labels(self.credential, "websocket", "ok").inc()

    async def open(self, upstream: aiohttp.ClientWebSocketResponse, host: str) -> None:
        """Authenticate a fresh upstream socket before anything of the client's is relayed."""
        started = self.clock()
        call_id, text = self._call()
        try:
            async with asyncio.timeout(self.timeout):
                await upstream.send_str(text)
                while True:
                    msg = await upstream.receive()
                    if msg.type is WSMsgType.TEXT:
                        answer = next((c for c in _calls(msg.data) if c.get("id") == call_id), None)
                        if answer is not None:
                            self._accept(answer, started)
                            return
                        self.early.append(msg)
                    elif msg.type in (WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG):
                        self.early.append(msg)
                    else:
                        self.metrics.token_exchanges.labels(
                            self.credential, "websocket", "unreachable"
                        ).inc()
                        raise ExchangeFailed("the upstream closed the socket", "unreachable")
        except ExchangeFailed as exc:
            reason = exc.reason
        except TimeoutError:  # before CLIENT_FAILURES, which holds it: a timeout is told apart
            self.metrics.token_exchanges.labels(self.credential, "websocket", "timeout").inc()
            reason = f"no answer within {self.timeout:g}s"
        except CLIENT_FAILURES as exc:
            self.metrics.token_exchanges.labels(self.credential, "websocket", "unreachable").inc()
            reason = f"the connection failed ({type(exc).__name__})"
        raise UpstreamError(
            f"{host} did not authenticate the WebSocket for credential '{self.credential}': "
            f"public/auth failed ({reason})",
            code="token_exchange_failed",
        )

    def from_client(self, text: str) -> str | None:
        """None: relay the message. Otherwise the JSON-RPC error to answer the client with.

        Every message is parsed (strictly: a key twice is refused, since parsers disagree on
        which one counts), so no spelling of ``public/auth`` (escapes, duplicate keys, a batch)
        reaches the gateway from the client.
        """
        try:
            data = strict_json.loads(text)
        except (ValueError, RecursionError):
            return _error(
                None, -32700, "not relayed: not one JSON-RPC message (plain JSON, each key once)"
            )
        for call in data if isinstance(data, list) else [data]:
            if not isinstance(call, dict):
                continue
            call_id = call.get("id")
            if call.get("method") == AUTH_METHOD:
                message = (
                    "public/auth is refused: the signing proxy authenticates this connection "
                    "itself; send your calls without authenticating"
                )
            elif isinstance(call_id, int) and call_id in RESERVED_IDS:
                message = (
                    f"ids from {RESERVED_IDS.start} to {RESERVED_IDS.stop - 1} are reserved by "
                    "the signing proxy"
                )
            else:
                continue
            return _error(call_id, _REFUSED_CODE, message)
        return None

    def from_upstream(self, text: str) -> str | None:
        """The message to relay to the client; None when it answers the proxy's own call.

        A token of this socket that shows up anywhere else is blanked out: the client never
        sees one, whatever the gateway sends.
        """
        if self._waiting and _MARK in text:
            for call in _calls(text):
                future = self._waiting.pop(call.get("id"), None)  # type: ignore[arg-type]
                if future is not None:
                    if not future.done():
                        future.set_result(call)
                    return None
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "<redacted>")
        return text

    async def run(self, send: Callable[[str], bool]) -> str:
        """Re-authenticate before expiry until cancelled; returns why it could not, if so."""
        failures = 0
        while True:
            await asyncio.sleep(max(self.refresh_at - self.clock(), 0))
            started = self.clock()
            try:
                call_id, text = self._call()
                future = asyncio.get_running_loop().create_future()
                self._waiting[call_id] = future
                if not send(text):
                    return "the upstream is too slow to take the re-authentication"
                async with asyncio.timeout(self.timeout):
                    self._accept(await future, started)
                failures = 0
                log.debug(
                    "websocket re-authenticated",
                    extra={"fields": {"credential": self.credential,
                                      "expires_in": round(self.expires_at - started, 1)}},
                )  # fmt: skip
                continue
            except ExchangeFailed as exc:
                reason = exc.reason
            except TimeoutError:
                self.metrics.token_exchanges.labels(self.credential, "websocket", "timeout").inc()
                reason = f"no answer within {self.timeout:g}s"
            except ProxyError as exc:  # e.g. CredentialError: the key is gone
                reason = exc.message
            finally:
                self._waiting.clear()
            failures += 1
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (failures - 1)) * random.uniform(0.5, 1)  # noqa: S311
            log.warning(
                "websocket re-authentication failed",
                extra={"fields": {"credential": self.credential, "reason": reason,
                                  "failures": failures}},
            )  # fmt: skip
            if self.clock() + delay >= self.expires_at:
                return f"re-authentication failed ({reason})"
            self.refresh_at = self.clock() + delay
