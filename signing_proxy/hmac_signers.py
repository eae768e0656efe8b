"""HMAC signers: the legacy Coinbase API key and the Exchange, Prime and INTX venues. No I/O.

All four sign ``timestamp + METHOD + requestPath + body`` with HMAC-SHA256 and differ in small ways:
the header names, whether the secret is base64-decoded before use, whether requestPath keeps the
query, hex or base64 output, and a passphrase. The rules and their sources are in
docs/coinbase-auth.md ("Legacy API keys" and "Exchange, Prime and International Exchange").

Secrets are decoded and checked once, in ``__init__``; a bad one raises ``KeyMaterialError``
naming the field (never quoting the value), which credentials.py turns into a message naming
where the value came from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import ClassVar, Final

from .errors import SigningError

__all__ = [
    "VENUE_SIGNERS",
    "ExchangeSigner",
    "HmacSigner",
    "IntxSigner",
    "KeyMaterialError",
    "PrimeSigner",
    "VenueSigner",
    "hmac_request_path",
]

Clock = Callable[[], float]

# What the Exchange WebSocket feed's subscribe signature covers (docs/coinbase-auth.md).
EXCHANGE_WS_VERIFY: Final = "GET/users/self/verify"


class KeyMaterialError(ValueError):
    """A secret that cannot be used; ``field`` is the config field it came from."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


def hmac_request_path(path: str, query: str) -> str:
    """The requestPath a legacy HMAC key signs.

    Advanced Trade (``/api/v3/...``) signs the path without the query; Sign in with Coinbase v2
    (``/v2/...``) signs it with ``?query`` (docs/coinbase-auth.md). Other paths follow v2, the
    general Coinbase rule.
    """
    if path.startswith("/api/v3/") or not query:
        return path
    return f"{path}?{query}"


class HmacSigner:
    """Legacy API key: CB-ACCESS-KEY / -TIMESTAMP / -SIGN over timestamp+METHOD+requestPath+body."""

    requires_body: ClassVar[bool] = True
    websocket_messages: ClassVar[frozenset[str]] = frozenset()  # no WebSocket form
    scheme = "HMAC"

    def __init__(self, api_key: str, api_secret: str, *, clock: Clock = time.time):
        self.api_key = api_key
        # The secret string's UTF-8 bytes are the HMAC key; it is not base64-decoded.
        self._mac = hmac.new(api_secret.encode(), digestmod=hashlib.sha256)
        self._clock = clock

    def needs_body(self, method: str, host: str, path: str) -> bool:
        return self.requires_body  # every request: the HMAC covers the body

    def sign(
        self, method: str, host: str, path: str, query: str, body: bytes | None
    ) -> dict[str, str]:
        timestamp = str(int(self._clock()))
        mac = self._mac.copy()
        mac.update(f"{timestamp}{method.upper()}{hmac_request_path(path, query)}".encode())
        if body:
            mac.update(body)
        return {
            "CB-ACCESS-KEY": self.api_key,
            "CB-ACCESS-TIMESTAMP": timestamp,
            "CB-ACCESS-SIGN": mac.hexdigest(),
        }

    def describe(self, method: str, host: str, path: str, query: str) -> str:
        return f"{method.upper()} {hmac_request_path(path, query)}"

    def websocket_auth(self) -> dict[str, str]:
        # Unreachable through the relay: an empty websocket_messages refuses the upgrade first.
        raise SigningError("legacy HMAC keys have no WebSocket form")

    def exchange_jwt(self) -> None:
        return None  # the derivatives gateway exchanges CDP key JWTs only


def _header_safe(field: str, value: str) -> str:
    if not value:
        raise KeyMaterialError(field, f"{field} is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise KeyMaterialError(field, f"{field} contains control characters (a pasting error?)")
    return value


def _check_secret(secret: str) -> None:
    """Refuse the wrong kind of key before it turns into a 401 at the upstream."""
    if not secret:
        raise KeyMaterialError("api_secret", "api_secret is empty")
    if secret.lstrip().startswith("{"):
        raise KeyMaterialError(
            "api_secret",
            "api_secret looks like a CDP key JSON (a Coinbase Developer Platform key), not this "
            "venue's API secret; use a CDP credential (key_file) for it, or give the secret "
            "issued with this venue's API key",
        )
    if "-----BEGIN" in secret or "PRIVATE KEY" in secret:
        raise KeyMaterialError(
            "api_secret",
            "api_secret is a PEM private key (a CDP key), not this venue's API secret; use a CDP "
            "credential for it",
        )


class VenueSigner:
    """The shape Exchange, Prime and INTX share: base64 HMAC-SHA256 plus key and passphrase.

    A subclass names its scheme and headers and says whether the secret is base64-decoded and
    whether requestPath keeps the query.
    """

    requires_body: ClassVar[bool] = True
    websocket_messages: ClassVar[frozenset[str]] = frozenset()
    scheme: str
    # (key, signature, timestamp, passphrase) header names
    headers: ClassVar[tuple[str, str, str, str]] = (
        "CB-ACCESS-KEY",
        "CB-ACCESS-SIGN",
        "CB-ACCESS-TIMESTAMP",
        "CB-ACCESS-PASSPHRASE",
    )
    decode_secret: ClassVar[bool] = True
    signs_query: ClassVar[bool] = False

    def __init__(self, api_key: str, api_secret: str, passphrase: str, *, clock: Clock = time.time):
        self.api_key = _header_safe("api_key", api_key)
        self._passphrase = _header_safe("passphrase", passphrase)
        _check_secret(api_secret)
        if self.decode_secret:
            try:
                key = base64.b64decode("".join(api_secret.split()), validate=True)
            except (binascii.Error, ValueError):
                raise KeyMaterialError(
                    "api_secret",
                    f"api_secret is not base64; {self.scheme} API secrets are base64 strings "
                    "(copy the whole secret shown when the key was created)",
                ) from None
            if not key:
                raise KeyMaterialError("api_secret", "api_secret decodes to nothing")
        else:
            key = api_secret.encode()  # used as is, not decoded
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._clock = clock

    def request_path(self, path: str, query: str) -> str:
        return f"{path}?{query}" if self.signs_query and query else path

    def needs_body(self, method: str, host: str, path: str) -> bool:
        return self.requires_body  # every request: the HMAC covers the body

    def signature(self, timestamp: str, method: str, request_path: str, body: bytes | None) -> str:
        mac = self._mac.copy()
        mac.update(f"{timestamp}{method.upper()}{request_path}".encode())
        if body:
            mac.update(body)
        return base64.b64encode(mac.digest()).decode()

    def sign(
        self, method: str, host: str, path: str, query: str, body: bytes | None
    ) -> dict[str, str]:
        timestamp = str(int(self._clock()))
        key, sign, stamp, phrase = self.headers
        return {
            key: self.api_key,
            sign: self.signature(timestamp, method, self.request_path(path, query), body),
            stamp: timestamp,
            phrase: self._passphrase,
        }

    def describe(self, method: str, host: str, path: str, query: str) -> str:
        return f"{method.upper()} {self.request_path(path, query)}"

    def websocket_auth(self) -> dict[str, str]:
        # Unreachable through the relay: an empty websocket_messages refuses the upgrade first.
        raise SigningError(f"{self.scheme} keys have no WebSocket form here")

    def exchange_jwt(self) -> None:
        return None  # the derivatives gateway exchanges CDP key JWTs only


class ExchangeSigner(VenueSigner):
    """Coinbase Exchange (api.exchange.coinbase.com): decoded secret, requestPath with ``?query``.

    Its WebSocket feed authenticates in the subscribe message itself.
    """

    scheme = "EXCHANGE"
    signs_query = True
    websocket_messages = frozenset({"subscribe"})

    def websocket_auth(self) -> dict[str, str]:
        timestamp = str(int(self._clock()))
        mac = self._mac.copy()
        mac.update(f"{timestamp}{EXCHANGE_WS_VERIFY}".encode())
        return {
            "key": self.api_key,
            "passphrase": self._passphrase,
            "timestamp": timestamp,
            "signature": base64.b64encode(mac.digest()).decode(),
        }


class PrimeSigner(VenueSigner):
    """Coinbase Prime (api.prime.coinbase.com): raw secret, path without query, X-CB-* headers."""

    scheme = "PRIME"
    decode_secret = False
    headers = (
        "X-CB-ACCESS-KEY",
        "X-CB-ACCESS-SIGNATURE",
        "X-CB-ACCESS-TIMESTAMP",
        "X-CB-ACCESS-PASSPHRASE",
    )


class IntxSigner(VenueSigner):
    """Coinbase International Exchange (api.international.coinbase.com): decoded secret, no query."""

    scheme = "INTX"


# Credential ``type`` → signer class.
VENUE_SIGNERS: Final[dict[str, type[VenueSigner]]] = {
    "exchange": ExchangeSigner,
    "prime": PrimeSigner,
    "intx": IntxSigner,
}
