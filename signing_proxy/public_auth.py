"""The derivatives gateway's ``public/auth`` exchange as data: the call, its answer, the timing rules.

The call carries a CDP JWT without ``uri``; the answer carries an access token and its lifetime, or
a JSON-RPC error (docs/coinbase-auth.md, "Derivatives gateway"). Both transports use what is here:
the HTTP ``TokenBroker`` (token_broker.py) and the WebSocket's in-band ``auth`` (drb_websocket.py),
so they parse answers, refresh and back off alike. No I/O here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "AUTH_METHOD",
    "AUTH_PATH",
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "GRANT_TYPE",
    "REFRESH_RATIO",
    "TOKEN_REJECTED_CODES",
    "ExchangeFailed",
    "Grant",
    "auth_call",
    "parse_auth_answer",
    "redact",
]

AUTH_METHOD: Final = "public/auth"
AUTH_PATH: Final = "/api/v2/public/auth"
GRANT_TYPE: Final = "coinbase_cdp"
REFRESH_RATIO: Final = 0.8  # refresh at 80 % of expires_in, as the official SDK does
# JSON-RPC codes for "access token rejected; the call did not run" (13004 invalid_credentials,
# 13009 unauthorized): the one answer after which a call is sent again.
TOKEN_REJECTED_CODES: Final = frozenset({13004, 13009})
BACKOFF_FIRST: Final = 1.0
BACKOFF_CAP: Final = 60.0
# JWT-shaped or long opaque strings in a gateway's error text are not repeated anywhere.
_SECRET_LIKE: Final = re.compile(
    r"[A-Za-z0-9_\-+/=]{8,}\.[A-Za-z0-9_\-+/=.]{8,}|[A-Za-z0-9_\-+/=]{40,}"
)


def redact(text: str, limit: int = 160) -> str:
    """Gateway text fit for a log line or an error body: token-like strings removed, shortened."""
    return _SECRET_LIKE.sub("<redacted>", text)[:limit]


def auth_call(jwt: str, request_id: int | None = None) -> str:
    """The JSON-RPC ``public/auth`` call that exchanges a CDP JWT for an access token."""
    call: dict[str, Any] = {"jsonrpc": "2.0"}
    if request_id is not None:
        call["id"] = request_id
    call["method"] = AUTH_METHOD
    call["params"] = {"grant_type": GRANT_TYPE, "token": jwt}
    return json.dumps(call, separators=(",", ":"))


class ExchangeFailed(Exception):
    """An exchange did not give a token; ``reason`` is safe to show, ``outcome`` a metric label."""

    def __init__(self, reason: str, outcome: str):
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Grant:
    token: str = field(repr=False)
    expires_in: float


def parse_auth_answer(data: Any, status: int | None = None) -> Grant:
    """The token in a ``public/auth`` answer (parsed JSON), or ExchangeFailed saying why not."""
    http = f"HTTP {status}, " if status is not None and status != 200 else ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        message = redact(str(error.get("message") or ""))
        shown = f" ({message})" if message else ""
        raise ExchangeFailed(f"{http}JSON-RPC error {code}{shown}", "rejected")
    if http:
        raise ExchangeFailed(f"HTTP {status}", "http_error")
    result = data.get("result") if isinstance(data, dict) else None
    token = result.get("access_token") if isinstance(result, dict) else None
    expires_in = result.get("expires_in") if isinstance(result, dict) else None
    if (
        not isinstance(token, str)
        or not token
        or isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not expires_in > 0
    ):
        raise ExchangeFailed("the answer carries no access_token and expires_in", "bad_answer")
    return Grant(token, float(expires_in))
