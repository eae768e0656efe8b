"""Signers with a pinned clock, verified the way Coinbase verifies: with the public key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from signing_proxy.signers import CdpJwtSigner, HmacSigner, der_to_jws, hmac_request_path, jwt_uri

NOW = 1_700_000_000.7
KEY_NAME = "organizations/org-1/apiKeys/key-1"


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _parts(token: str) -> tuple[dict[str, object], dict[str, object], bytes, bytes]:
    h, p, s = token.split(".")
    return json.loads(_b64d(h)), json.loads(_b64d(p)), f"{h}.{p}".encode(), _b64d(s)


@pytest.fixture(params=["ES256", "EdDSA"])
def keypair(
    request: pytest.FixtureRequest,
) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    if request.param == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def test_jwt_header_and_claims_exact(
    keypair: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> None:
    signer = CdpJwtSigner(KEY_NAME, keypair, clock=lambda: NOW)
    headers = signer.sign("get", "api.coinbase.com", "/api/v3/brokerage/accounts", "limit=5", None)
    assert list(headers) == ["Authorization"]
    token = headers["Authorization"].removeprefix("Bearer ")
    header, claims, _, _ = _parts(token)
    alg = "ES256" if isinstance(keypair, ec.EllipticCurvePrivateKey) else "EdDSA"
    assert set(header) == {"alg", "kid", "nonce", "typ"}
    assert header["alg"] == alg and header["kid"] == KEY_NAME and header["typ"] == "JWT"
    assert isinstance(header["nonce"], str) and len(header["nonce"]) == 64
    int(header["nonce"], 16)  # hex
    assert claims == {
        "sub": KEY_NAME,
        "iss": "cdp",
        "nbf": 1_700_000_000,
        "exp": 1_700_000_120,
        "uri": "GET api.coinbase.com/api/v3/brokerage/accounts",  # no query, method upper-cased
    }
    decoded = jwt.decode(
        token,
        keypair.public_key(),
        algorithms=[alg],
        options={"verify_exp": False, "verify_nbf": False},
    )
    assert decoded == claims


def test_es256_signature_verifies_with_raw_cryptography() -> None:
    """Independent of PyJWT: JWS ES256 is r||s, 32 bytes each, over header.payload with SHA-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    token = CdpJwtSigner(KEY_NAME, key, clock=lambda: NOW).token(
        "POST api.developer.coinbase.com/onramp/v1/token"
    )
    _, _, signing_input, sig = _parts(token)
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA256()))  # raises if wrong


def test_eddsa_signature_verifies_with_raw_cryptography() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = CdpJwtSigner(ED_NAME := "2f1b0c7e-uuid-key", key, clock=lambda: NOW).token(
        "GET api.cdp.coinbase.com/platform/v2/evm/accounts"
    )
    header, _, signing_input, sig = _parts(token)
    assert header["kid"] == ED_NAME
    key.public_key().verify(sig, signing_input)


def test_nonce_fresh_per_token() -> None:
    signer = CdpJwtSigner(KEY_NAME, ec.generate_private_key(ec.SECP256R1()), clock=lambda: NOW)
    nonces = {_parts(signer.token("GET h/p"))[0]["nonce"] for _ in range(200)}
    assert len(nonces) == 200


def test_websocket_token_has_no_uri() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    _, claims, _, _ = _parts(CdpJwtSigner(KEY_NAME, key, clock=lambda: NOW).token(None))
    assert claims == {"sub": KEY_NAME, "iss": "cdp", "nbf": 1_700_000_000, "exp": 1_700_000_120}


def test_exchange_jwt_is_a_fresh_verifiable_token_without_uri(
    keypair: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
) -> None:
    signer = CdpJwtSigner(KEY_NAME, keypair, clock=lambda: NOW)
    token = signer.exchange_jwt()
    header, claims, _, _ = _parts(token)
    assert claims == {"sub": KEY_NAME, "iss": "cdp", "nbf": 1_700_000_000, "exp": 1_700_000_120}
    assert (
        jwt.decode(
            token,
            keypair.public_key(),
            algorithms=[signer.scheme],
            options={"verify_exp": False, "verify_nbf": False},
        )
        == claims
    )
    assert _parts(signer.exchange_jwt())[0]["nonce"] != header["nonce"]  # minted per call


def test_uri_is_json_escaped_and_percent_encoding_kept() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = '/api/v3/x%2Fy/"q"\\z'
    token = CdpJwtSigner(KEY_NAME, key, clock=lambda: NOW).token(
        jwt_uri("get", "api.coinbase.com", path)
    )
    decoded = jwt.decode(
        token,
        key.public_key(),
        algorithms=["ES256"],
        options={"verify_exp": False, "verify_nbf": False},
    )
    assert decoded["uri"] == f"GET api.coinbase.com{path}"


def test_kid_with_quotes_is_escaped() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = CdpJwtSigner('weird"name\\', key, clock=lambda: NOW).token("GET h/p")
    assert jwt.get_unverified_header(token)["kid"] == 'weird"name\\'


def test_rejects_non_p256_ec_key() -> None:
    with pytest.raises(ValueError, match="P-256"):
        CdpJwtSigner(KEY_NAME, ec.generate_private_key(ec.SECP384R1()))


def _expected_hmac(secret: str, message: str, body: bytes = b"") -> str:
    return hmac.new(secret.encode(), message.encode() + body, hashlib.sha256).hexdigest()


def test_hmac_v3_signs_path_without_query_and_body() -> None:
    signer = HmacSigner("key", "secret-1", clock=lambda: NOW)
    body = b'{"product_id":"BTC-USD"}'
    headers = signer.sign("POST", "api.coinbase.com", "/api/v3/brokerage/orders", "a=1", body)
    assert headers["CB-ACCESS-KEY"] == "key"
    assert headers["CB-ACCESS-TIMESTAMP"] == "1700000000"
    assert headers["CB-ACCESS-SIGN"] == _expected_hmac(
        "secret-1", "1700000000POST/api/v3/brokerage/orders", body
    )


def test_hmac_v2_signs_path_with_query() -> None:
    signer = HmacSigner("key", "secret-1", clock=lambda: NOW)
    headers = signer.sign("get", "api.coinbase.com", "/v2/accounts", "limit=2&order=asc", None)
    assert headers["CB-ACCESS-SIGN"] == _expected_hmac(
        "secret-1", "1700000000GET/v2/accounts?limit=2&order=asc"
    )


def test_hmac_secret_used_as_text_not_base64() -> None:
    secret = base64.b64encode(
        b"0123456789abcdef"
    ).decode()  # looks like base64; must not be decoded
    headers = HmacSigner("k", secret, clock=lambda: NOW).sign("GET", "h", "/v2/user", "", b"")
    assert headers["CB-ACCESS-SIGN"] == _expected_hmac(secret, "1700000000GET/v2/user")


def test_hmac_request_path_rules() -> None:
    assert hmac_request_path("/api/v3/brokerage/orders", "x=1") == "/api/v3/brokerage/orders"
    assert hmac_request_path("/v2/accounts", "x=1") == "/v2/accounts?x=1"
    assert hmac_request_path("/v2/accounts", "") == "/v2/accounts"


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@settings(max_examples=500)
@given(
    r=st.integers(1, P256_ORDER - 1) | st.integers(1, 2**64),  # short ones need left padding
    s=st.integers(1, P256_ORDER - 1) | st.sampled_from([1, 127, 128, 255, 256, 2**255]),
)
def test_der_to_jws_is_r_then_s_32_bytes_each(r: int, s: int) -> None:
    der = encode_dss_signature(r, s)
    assert der_to_jws(der) == r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_der_to_jws_of_real_signatures_verifies_with_the_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(200):
        msg = b"message %d" % i
        raw = der_to_jws(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        key.public_key().verify(encode_dss_signature(r, s), msg, ec.ECDSA(hashes.SHA256()))
