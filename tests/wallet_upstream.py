"""The CDP v2 part of the verifying upstream: X-Wallet-Auth checked the way CDP checks it.

Written from Coinbase's published rules (cdp-sdk ``openapi.yaml`` and ``generate_wallet_jwt``),
independently of the proxy's own code: its own list of wallet-required operations, its own
canonical JSON. A request on a wallet-required operation without a valid token gets a 401.
``POST /platform/v2/onramp/sessions`` answers a session with a ready URL, as CDP does.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

# The 26 operations openapi.yaml marks X-Wallet-Auth `required: true` (all POST), as regexes.
_ID = "[^/]+"
WALLET_REQUIRED = tuple(
    re.compile("/platform/v2" + p.replace("{}", _ID))
    for p in (
        "/evm/accounts", "/evm/accounts/import", "/evm/accounts/{}/sign",
        "/evm/accounts/{}/sign/transaction", "/evm/accounts/{}/sign/message",
        "/evm/accounts/{}/sign/typed-data", "/evm/accounts/{}/send/transaction",
        "/evm/accounts/{}/eip7702/delegation", "/evm/accounts/{}/export",
        "/evm/accounts/export/by-name/{}", "/evm/smart-accounts/{}/user-operations/prepare-and-send",
        "/evm/smart-accounts/{}/spend-permissions", "/evm/smart-accounts/{}/spend-permissions/revoke",
        "/solana/accounts", "/solana/accounts/import", "/solana/accounts/{}/export",
        "/solana/accounts/export/by-name/{}", "/solana/accounts/{}/sign/transaction",
        "/solana/accounts/{}/sign/message", "/solana/accounts/send/transaction", "/end-users",
        "/end-users/import", "/end-users/{}/evm", "/end-users/{}/evm-smart-account",
        "/end-users/{}/solana", "/embedded-wallet-api/end-users/{}/address/{}/delegation",
    )
)  # fmt: skip
ONRAMP_SESSIONS = "/platform/v2/onramp/sessions"
SESSION_FIELDS = frozenset(
    {"destinationAddress", "purchaseCurrency", "destinationNetwork", "paymentAmount",
     "purchaseAmount", "paymentCurrency", "paymentMethod", "country", "subdivision",
     "redirectUrl", "clientIp", "partnerUserRef"}
)  # fmt: skip


class WalletRejected(Exception):
    pass


def canonical_hash(body: bytes) -> str | None:
    """CDP's reqHash of a body: sorted keys, no whitespace, ASCII escapes; None when absent."""
    if not body:
        return None
    data = json.loads(body)
    if not data:
        return None

    def ordered(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ordered(value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [ordered(v) for v in value]
        return value

    text = json.dumps(ordered(data), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass
class WalletVerifier:
    keys: list[ec.EllipticCurvePublicKey]  # accepted Wallet Secret public keys
    seen_jti: set[str] = field(default_factory=set)
    verified: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # onramp v2 request bodies

    def required(self, method: str, path: str) -> bool:
        return method == "POST" and any(p.fullmatch(path) for p in WALLET_REQUIRED)

    def check(self, request: web.Request, path: str, body: bytes) -> None:
        """Raise WalletRejected unless the request carries what CDP demands."""
        token = request.headers.get("X-Wallet-Auth")
        if token is None:
            if self.required(request.method, path):
                raise WalletRejected("X-Wallet-Auth missing on a wallet-required operation")
            return
        header = jwt.get_unverified_header(token)
        if header != {"alg": "ES256", "typ": "JWT"}:
            raise WalletRejected(f"bad wallet token header {header}")
        claims = None
        for key in self.keys:
            try:
                claims = jwt.decode(
                    token, key, algorithms=["ES256"],
                    options={"require": ["uris", "iat", "nbf", "jti"], "verify_iat": False},
                )  # fmt: skip
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise WalletRejected(f"wallet token rejected: {exc}") from None
        if claims is None:
            raise WalletRejected("wallet token signature does not verify with any wallet key")
        uri = f"{request.method} {request.headers.get('Host', '')}{path}"
        if claims["uris"] != [uri]:
            raise WalletRejected(f"uris {claims['uris']!r} != [{uri!r}]")
        if (
            "exp" in claims
            or claims["iat"] != claims["nbf"]
            or abs(claims["iat"] - time.time()) > 5
        ):
            raise WalletRejected(f"bad wallet token times: {claims}")
        uuid.UUID(claims["jti"])
        if claims["jti"] in self.seen_jti:
            raise WalletRejected(f"jti reused: {claims['jti']}")
        self.seen_jti.add(claims["jti"])
        try:
            expected = canonical_hash(body)
        except ValueError:
            raise WalletRejected("body is not JSON") from None
        if claims.get("reqHash") != expected:
            raise WalletRejected(f"reqHash {claims.get('reqHash')!r} != {expected!r}")
        self.verified.append((path, header, claims))

    def onramp_session(self, body: bytes) -> web.Response:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            problem = "body must be a JSON object"
        elif unknown := set(data) - SESSION_FIELDS:
            problem = f"unknown fields {sorted(unknown)}"
        elif missing := {"destinationAddress", "purchaseCurrency", "destinationNetwork"} - set(
            data
        ):
            problem = f"Missing required parameters: {sorted(missing)}"
        elif not re.fullmatch(r"0x[0-9a-fA-F]{40}", str(data["destinationAddress"])):
            problem = "The destination address is not valid for the specified network."
        else:
            problem = ""
        if problem:
            return web.json_response(
                {"errorType": "invalid_request", "errorMessage": problem}, status=400
            )
        self.sessions.append(data)
        url = f"https://pay.coinbase.com/buy?sessionToken=v2-{uuid.uuid4().hex}"
        return web.json_response({"session": {"onrampUrl": url}}, status=201)
