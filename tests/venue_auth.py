"""Coinbase Exchange, Prime and International Exchange as their servers check a request.

Each signature is recomputed here from what actually arrived (the headers, the path as received,
the raw query, the body bytes) with the venue's own rule, written out independently of the
proxy's signers (docs/coinbase-auth.md, "Exchange, Prime and International Exchange"):

| venue    | headers          | HMAC key                 | requestPath      | timestamp window |
|----------|------------------|--------------------------|------------------|------------------|
| exchange | CB-ACCESS-*      | base64-decoded secret    | path + ``?query``| ±30 s            |
| prime    | X-CB-ACCESS-*    | secret string's bytes    | path only        | ±30 s            |
| intx     | CB-ACCESS-*      | base64-decoded secret    | path only        | ±5 s             |

All three send the signature base64-encoded and carry the passphrase issued with the key. The
Exchange WebSocket feed carries the same fields in the subscribe message, signed over
``timestamp + "GET" + "/users/self/verify"``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

WINDOW = {"exchange": 30, "prime": 30, "intx": 5}
PRIME_HEADERS = ("X-CB-ACCESS-KEY", "X-CB-ACCESS-SIGNATURE", "X-CB-ACCESS-TIMESTAMP",
                 "X-CB-ACCESS-PASSPHRASE")  # fmt: skip
CB_HEADERS = ("CB-ACCESS-KEY", "CB-ACCESS-SIGN", "CB-ACCESS-TIMESTAMP", "CB-ACCESS-PASSPHRASE")


class VenueRejected(Exception):
    pass


@dataclass(frozen=True)
class VenueKey:
    venue: str  # "exchange", "prime" or "intx"
    secret: str
    passphrase: str


def claims_venue(headers: Mapping[str, str]) -> bool:
    """Does the request carry one of these venues' auth headers (as opposed to legacy HMAC)?"""
    return "X-CB-ACCESS-KEY" in headers or "CB-ACCESS-PASSPHRASE" in headers


def _mac(entry: VenueKey, message: bytes) -> str:
    key = entry.secret.encode() if entry.venue == "prime" else base64.b64decode(entry.secret)
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def _check_timestamp(venue: str, timestamp: Any) -> None:
    if not isinstance(timestamp, str) or not timestamp.isdigit():
        raise VenueRejected(f"{venue}: timestamp {timestamp!r} is not integer seconds")
    if abs(int(timestamp) - time.time()) > WINDOW[venue]:
        raise VenueRejected(f"{venue}: timestamp outside ±{WINDOW[venue]} s")


def _check_passphrase(venue: str, entry: VenueKey, passphrase: Any) -> None:
    if not isinstance(passphrase, str) or not hmac.compare_digest(passphrase, entry.passphrase):
        raise VenueRejected(f"{venue}: wrong passphrase")


def verify_request(
    keys: Mapping[str, VenueKey],
    method: str,
    headers: Mapping[str, str],
    path: str,
    query: str,
    body: bytes,
) -> str:
    """The venue whose rule the request satisfies; raises VenueRejected otherwise."""
    names = PRIME_HEADERS if "X-CB-ACCESS-KEY" in headers else CB_HEADERS
    key_name, sign_name, stamp_name, phrase_name = names
    entry = keys.get(headers.get(key_name, ""))
    if entry is None:
        raise VenueRejected(f"unknown api key in {key_name}")
    if (entry.venue == "prime") != (names is PRIME_HEADERS):
        raise VenueRejected(f"{entry.venue} key sent with the wrong venue's headers")
    venue = entry.venue
    _check_passphrase(venue, entry, headers.get(phrase_name))
    timestamp = headers.get(stamp_name, "")
    _check_timestamp(venue, timestamp)
    request_path = f"{path}?{query}" if venue == "exchange" and query else path
    expected = _mac(entry, f"{timestamp}{method}{request_path}".encode() + body)
    if not hmac.compare_digest(expected, headers.get(sign_name, "")):
        raise VenueRejected(f"{venue}: signature mismatch for {method} {request_path}")
    return venue


def verify_subscribe(keys: Mapping[str, VenueKey], message: Mapping[str, Any]) -> None:
    """An Exchange feed subscribe message's key, passphrase, timestamp and signature."""
    entry = keys.get(message.get("key", ""))
    if entry is None or entry.venue != "exchange":
        raise VenueRejected("subscribe: unknown exchange api key")
    _check_passphrase("exchange", entry, message.get("passphrase"))
    timestamp = message.get("timestamp")
    _check_timestamp("exchange", timestamp)
    expected = _mac(entry, f"{timestamp}GET/users/self/verify".encode())
    signature = message.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(expected, signature):
        raise VenueRejected("subscribe: signature mismatch")
