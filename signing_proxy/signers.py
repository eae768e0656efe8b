"""Request signers: one small class per Coinbase auth scheme. No I/O, no aiohttp.

Each signer is built once from parsed key objects (credentials.py does the parsing) and then
called per request. ``needs_body(method, host, path)`` tells the relay whether it must read the
request body before signing this request (HMAC covers every body; a CDP key with a Wallet Secret
covers the body of Server Wallet writes) or may stream it; ``requires_body`` is the per-class
default.

The rules implemented here are pinned down in docs/coinbase-auth.md ("CDP API keys: JWT for REST"). The HMAC family
(legacy keys, Exchange, Prime, INTX) lives in hmac_signers.py; its names are re-exported here.
"""

from __future__ import annotations

import binascii
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .hmac_signers import HmacSigner, hmac_request_path
from .random_hex import RandomHex

if TYPE_CHECKING:
    from .wallet_auth import WalletAuth

__all__ = [
    "JWT_LIFETIME",
    "CdpJwtSigner",
    "Clock",
    "HmacSigner",
    "PrivateKey",
    "Signer",
    "der_to_jws",
    "hmac_request_path",
    "jwt_uri",
]

Clock = Callable[[], float]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

JWT_LIFETIME: Final = 120  # seconds; Coinbase rejects longer-lived tokens
_ISSUER: Final = "cdp"


class Signer(Protocol):
    """What the relay needs from a signer."""

    requires_body: ClassVar[bool]
    # Types of WebSocket messages the signer authenticates (its WebSocket form); empty: none.
    websocket_messages: ClassVar[frozenset[str]]
    # "ES256", "EdDSA", "HMAC", "EXCHANGE", "PRIME" or "INTX": in metrics and `check` output
    scheme: str

    def needs_body(self, method: str, host: str, path: str) -> bool:
        """Must the relay read this request's body (capped) and pass it to ``sign``?"""
        ...

    def sign(
        self, method: str, host: str, path: str, query: str, body: bytes | None
    ) -> dict[str, str]:
        """Return the headers that authenticate this request."""
        ...

    def describe(self, method: str, host: str, path: str, query: str) -> str:
        """What ``sign`` covers for this request, safe to log (a 401 report says it)."""
        ...

    def websocket_auth(self) -> dict[str, str]:
        """Fields to set in one outgoing message of a type in ``websocket_messages``."""
        ...

    def exchange_jwt(self) -> str | None:
        """A fresh JWT without ``uri``, to exchange for an access token (``token_exchange``
        upstreams, docs/coinbase-auth.md); None: this kind of key cannot be exchanged."""
        ...


def jwt_uri(method: str, host: str, path: str) -> str:
    """The JWT ``uri`` claim: method, host and path; no scheme, port or query (docs/coinbase-auth.md)."""
    return f"{method.upper()} {host}{path}"


# json's own C string encoder: escapes quotes, backslashes and non-ASCII exactly as json.dumps.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
# The JWT header nonce: 64 hex digits (32 random bytes), as the SDKs' secrets.token_hex().
_nonce: Final = RandomHex(32)


_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _b64url(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2), straight from binascii."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


def der_to_jws(der: bytes) -> bytes:
    """An ECDSA P-256 signature in DER (``SEQUENCE { INTEGER r, INTEGER s }``) as JWS ``r || s``,
    32 bytes each (RFC 7518 §3.4). Sliced by hand: the DER of a P-256 signature is at most 72
    bytes, so every length is one byte; anything else goes to cryptography's parser."""
    if len(der) <= 72 and der[0] == 0x30 and der[1] == len(der) - 2 and der[2] == 0x02:
        r_end = 4 + der[3]
        if r_end + 2 <= len(der) and der[r_end] == 0x02 and r_end + 2 + der[r_end + 1] == len(der):
            r, s = der[4:r_end], der[r_end + 2 :]
            if len(r) <= 33 and len(s) <= 33:
                return r[-32:].rjust(32, b"\0") + s[-32:].rjust(32, b"\0")
    r_int, s_int = decode_dss_signature(der)
    return r_int.to_bytes(32, "big") + s_int.to_bytes(32, "big")


class CdpJwtSigner:
    """CDP API key → a fresh 120 s JWT per request, ES256 for P-256 keys, EdDSA for Ed25519 keys.

    The header and claims are compact JSON written around pre-escaped constant parts, so a token
    costs little more than the signature itself (bench/ measures it against a raw sign). The
    signature is cryptography's, with the algorithm object built once; ECDSA's DER output becomes
    the JWS ``r || s`` form (RFC 7518 §3.4), as PyJWT's ECAlgorithm does.
    """

    requires_body: ClassVar[bool] = False
    # Advanced Trade WebSocket: a fresh jwt in every (un)subscribe message (docs/coinbase-auth.md, "Advanced Trade WebSocket").
    websocket_messages: ClassVar[frozenset[str]] = frozenset({"subscribe", "unsubscribe"})

    def __init__(
        self,
        key_name: str,
        private_key: PrivateKey,
        *,
        clock: Clock = time.time,
        uris_hosts: frozenset[str] = frozenset(),
        wallet: WalletAuth | None = None,
    ):
        """``uris_hosts``: hosts signed with ``uris: [uri]`` instead of ``uri``; ``wallet``: the
        X-Wallet-Auth side of a CDP v2 credential (wallet_auth.py)."""
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ValueError("ES256 needs a P-256 key")
            self.scheme = "ES256"
            ecdsa = ec.ECDSA(hashes.SHA256())

            def sign(msg: bytes) -> bytes:
                return der_to_jws(private_key.sign(msg, ecdsa))

            self._sign: Callable[[bytes], bytes] = sign
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.scheme = "EdDSA"
            self._sign = private_key.sign
        else:
            raise TypeError(f"unsupported key type {type(private_key).__name__}")
        self.key_name = key_name
        self._clock = clock
        self._uris_hosts = uris_hosts
        self.wallet = wallet
        kid = _json_string(key_name)
        # Everything but the nonce is constant: header = prefix + nonce + suffix.
        self._header_prefix = f'{{"alg":"{self.scheme}","kid":{kid},"nonce":"'
        self._header_suffix = '","typ":"JWT"}'
        self._claims_prefix = f'{{"sub":{kid},"iss":"{_ISSUER}","nbf":'

    def token(self, uri: str | None, *, as_list: bool = False) -> str:
        """A signed JWT; ``uri=None`` gives the WebSocket form, which has no ``uri`` claim.
        ``as_list``: the cdp-sdk form, ``"uris": [uri]``."""
        now = int(self._clock())
        header = f"{self._header_prefix}{_nonce()}{self._header_suffix}"
        claims = f'{self._claims_prefix}{now},"exp":{now + JWT_LIFETIME}'
        if uri is None:
            claims += "}"
        elif as_list:
            claims += f',"uris":[{_json_string(uri)}]}}'
        else:
            claims += f',"uri":{_json_string(uri)}}}'
        signing_input = _b64url(header.encode()) + b"." + _b64url(claims.encode())
        return (signing_input + b"." + _b64url(self._sign(signing_input))).decode()

    def sign(
        self, method: str, host: str, path: str, query: str, body: bytes | None
    ) -> dict[str, str]:
        # The wallet side first: a refusal (no Wallet Secret, a body that cannot be hashed)
        # happens before any token is minted.
        wallet = self.wallet.headers(method, host, path, body) if self.wallet else None
        # The query never enters the uri: a query in `uri` is a classic 401 cause.
        token = self.token(jwt_uri(method, host, path), as_list=host in self._uris_hosts)
        signed = {"Authorization": f"Bearer {token}"}
        if wallet:
            signed.update(wallet)
        return signed

    def needs_body(self, method: str, host: str, path: str) -> bool:
        return self.wallet is not None and self.wallet.needs_body(method, host, path)

    def describe(self, method: str, host: str, path: str, query: str) -> str:
        return jwt_uri(method, host, path)

    def websocket_auth(self) -> dict[str, str]:
        return {"jwt": self.token(None)}

    def exchange_jwt(self) -> str:
        return self.token(None)
