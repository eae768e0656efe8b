"""CDP v2 Server Wallets: the ``X-Wallet-Auth`` token, its body hash, and the Wallet Secret.

A Server Wallet write is authorised twice: the API-key JWT in ``Authorization`` (signers.py) and a
second ES256 JWT in ``X-Wallet-Auth`` signed with the **Wallet Secret**, a separate P-256 key the
CDP portal hands out as base64 DER (PKCS#8). The wallet token's rules (docs/coinbase-auth.md,
from coinbase/cdp-sdk ``python/cdp/auth/utils/jwt.py`` ``generate_wallet_jwt``):

- header ``{"alg":"ES256","typ":"JWT"}``: no ``kid``, no ``nonce``;
- claims ``uris`` = ``["METHOD host/path"]`` (no query), ``iat`` = ``nbf`` = now, ``jti`` a fresh
  uuid4 per token, no ``exp``; and ``reqHash`` only when the body is a non-empty JSON object: the
  lowercase hex SHA-256 of the body re-serialised the python SDK's way: keys sorted at every
  level, no whitespace, non-ASCII escaped as ``\\uXXXX`` (``json.dumps`` defaults).

The body forwarded is always the client's own bytes; the re-serialised form exists only to be
hashed. A body the hash cannot be computed for (not JSON, not an object, duplicate keys, NaN) is
refused with 400 before anything is sent. Which requests get the token is wallet_rules.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .errors import CredentialError, RequestRejected
from .wallet_rules import WalletRules

__all__ = [
    "WALLET_HEADER",
    "WalletAuth",
    "WalletSigner",
    "parse_wallet_secret",
    "request_hash",
]

WALLET_HEADER: Final = "X-Wallet-Auth"
_HEADER_B64: Final = (
    base64.urlsafe_b64encode(b'{"alg":"ES256","typ":"JWT"}').rstrip(b"=").decode() + "."
)
_ECDSA: Final = ec.ECDSA(hashes.SHA256())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        # Parsers disagree on which duplicate wins: the hash would cover a body the upstream
        # may read differently.
        raise ValueError("duplicate key")
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def request_hash(body: bytes) -> str | None:
    """The ``reqHash`` claim for a request body, or None when the claim is left out.

    Empty body or ``{}``: None (the SDK hashes only a non-empty object). Anything that is not a
    JSON object is refused with a 400 RequestRejected naming the problem.
    """
    if not body:
        return None
    try:
        data = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except UnicodeDecodeError:
        raise _bad_body("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _bad_body(f"is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # from the hooks: a fixed message, no value quoted
        raise _bad_body(f"cannot be hashed: {exc}") from None
    except RecursionError:
        raise _bad_body("is nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad_body(f"is a JSON {type(data).__name__}, not an object")
    if not data:
        return None
    canonical = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _bad_body(problem: str) -> RequestRejected:
    return RequestRejected(
        f"the body of a Server Wallet request {problem}; X-Wallet-Auth signs a hash of the JSON "
        "object body, so it must be one. Nothing was sent upstream",
        code="invalid_wallet_body",
        status=400,
    )


class WalletSigner:
    """Wallet Secret → one ``X-Wallet-Auth`` JWT per request. Pure: no I/O, injectable clock."""

    scheme: Final = "ES256"

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, *, clock: Callable[[], float] = time.time
    ):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("a Wallet Secret is a P-256 key")
        self._key = private_key
        self._clock = clock

    def token(self, method: str, host: str, path: str, body: bytes | None) -> str:
        now = int(self._clock())
        uri = json.dumps(f"{method.upper()} {host}{path}")
        claims = f'{{"uris":[{uri}],"iat":{now},"nbf":{now},"jti":"{uuid.uuid4()}"'
        digest = request_hash(body or b"")
        claims += "}" if digest is None else f',"reqHash":"{digest}"}}'
        signing_input = (_HEADER_B64 + _b64url(claims.encode())).encode()
        r, s = decode_dss_signature(self._key.sign(signing_input, _ECDSA))
        return f"{signing_input.decode()}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class WalletAuth:
    """One CDP credential's wallet side: the rules, and its WalletSigner (None: no Wallet Secret)."""

    def __init__(self, rules: WalletRules, signer: WalletSigner | None, credential: str):
        self.rules = rules
        self.signer = signer
        self._credential = credential

    def needs_body(self, method: str, host: str, path: str) -> bool:
        return self.signer is not None and self.rules.need(method, host, path) is not None

    def headers(self, method: str, host: str, path: str, body: bytes | None) -> dict[str, str]:
        need = self.rules.need(method, host, path)
        if need is None:
            return {}
        if self.signer is None:
            if need == "optional":
                return {}
            raise RequestRejected(
                f"{method.upper()} {path[:200]} is a Server Wallet operation: it needs an "
                f"X-Wallet-Auth token, and credential '{self._credential}' has no Wallet Secret. "
                "Add wallet_secret_file (or wallet_secret_env) to it; nothing was sent upstream",
                code="wallet_secret_required",
                status=403,
            )
        return {WALLET_HEADER: self.signer.token(method, host, path, body)}


def parse_wallet_secret(text: str, source: str) -> ec.EllipticCurvePrivateKey:
    """The Wallet Secret (base64 DER PKCS#8 P-256); errors name ``source``, never the secret."""
    text = text.strip().strip('"').strip("'").replace("\\n", "").replace("\\r", "")
    compact = "".join(text.split())
    if not compact:
        raise CredentialError(f"{source}: the Wallet Secret is empty")
    if compact.startswith("{"):
        raise CredentialError(
            f"{source}: this looks like a key JSON, not a Wallet Secret; the Wallet Secret is the "
            "base64 string the CDP portal shows once when you create it"
        )
    if "-----BEGIN" in text:
        raise CredentialError(
            f"{source}: a PEM key was given; this looks like an API key, not a Wallet Secret "
            "(the Wallet Secret is one base64 string without BEGIN/END lines)"
        )
    if compact.startswith("organizations/"):
        raise CredentialError(f"{source}: this is an API key name, not a Wallet Secret")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CredentialError(
            f"{source}: the Wallet Secret is not base64 (expected the base64 string from the "
            "CDP portal)"
        ) from None
    if len(der) in (32, 64):
        raise CredentialError(
            f"{source}: this looks like an API key (Ed25519, {len(der)} bytes), not a Wallet Secret"
        )
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CredentialError(f"{source}: {_not_private(der)}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise CredentialError(
            f"{source}: this looks like an API key (Ed25519), not a Wallet Secret"
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(
            f"{source}: a {type(key).__name__.removeprefix('_')} key is not a Wallet Secret "
            "(an EC P-256 key)"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise CredentialError(
            f"{source}: the Wallet Secret's EC key is not P-256 (it is {key.curve.name})"
        )
    return key


def _not_private(der: bytes) -> str:
    try:
        serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "base64, but not a DER private key (truncated, or not a Wallet Secret?)"
    return "this is a public key; the proxy needs the Wallet Secret (the private key)"
