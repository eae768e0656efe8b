"""Exchange, Prime and INTX signers with a pinned clock, against values computed here from the rule.

Every expected signature is written out with ``hmac``/``base64`` directly from the venue's rule
(docs/coinbase-auth.md), never taken from the signer's own code path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from signing_proxy import signers
from signing_proxy.errors import SigningError
from signing_proxy.hmac_signers import (
    ExchangeSigner,
    HmacSigner,
    IntxSigner,
    KeyMaterialError,
    PrimeSigner,
)

NOW = 1_767_225_600.75  # the signers truncate: the timestamp is "1767225600"
TS = "1767225600"
RAW_KEY = bytes(range(64))
B64_SECRET = base64.b64encode(RAW_KEY).decode()
PRIME_SECRET = "cHJpbWUtc2VjcmV0LXVzZWQtYXMtaXM="  # base64-looking, but Prime uses it as is
BODY = b'{"product_id":"BTC-USD","side":"buy","size":"0.01"}'


def b64_hmac(key: bytes, message: bytes) -> str:
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def test_exchange_signs_the_path_with_its_query_using_the_decoded_secret() -> None:
    signer = ExchangeSigner("ex-key", B64_SECRET, "ex-pass", clock=lambda: NOW)
    headers = signer.sign("get", "api.exchange.coinbase.com", "/orders", "status=open&a=%2F", None)
    assert headers == {
        "CB-ACCESS-KEY": "ex-key",
        "CB-ACCESS-SIGN": b64_hmac(RAW_KEY, b"1767225600GET/orders?status=open&a=%2F"),
        "CB-ACCESS-TIMESTAMP": TS,
        "CB-ACCESS-PASSPHRASE": "ex-pass",
    }
    post = signer.sign("POST", "api.exchange.coinbase.com", "/orders", "", BODY)
    assert post["CB-ACCESS-SIGN"] == b64_hmac(RAW_KEY, b"1767225600POST/orders" + BODY)


def test_prime_signs_the_path_without_query_using_the_secret_string() -> None:
    signer = PrimeSigner("pr-key", PRIME_SECRET, "pr-pass", clock=lambda: NOW)
    headers = signer.sign("POST", "api.prime.coinbase.com", "/v1/portfolios/p/order", "x=1", BODY)
    message = b"1767225600POST/v1/portfolios/p/order" + BODY
    assert headers == {
        "X-CB-ACCESS-KEY": "pr-key",
        "X-CB-ACCESS-SIGNATURE": b64_hmac(PRIME_SECRET.encode(), message),
        "X-CB-ACCESS-TIMESTAMP": TS,
        "X-CB-ACCESS-PASSPHRASE": "pr-pass",
    }


def test_intx_signs_the_path_without_query_using_the_decoded_secret() -> None:
    signer = IntxSigner("ix-key", B64_SECRET, "ix-pass", clock=lambda: NOW)
    headers = signer.sign(
        "DELETE", "api.international.coinbase.com", "/api/v1/orders/1", "p=2", b""
    )
    assert headers == {
        "CB-ACCESS-KEY": "ix-key",
        "CB-ACCESS-SIGN": b64_hmac(RAW_KEY, b"1767225600DELETE/api/v1/orders/1"),
        "CB-ACCESS-TIMESTAMP": TS,
        "CB-ACCESS-PASSPHRASE": "ix-pass",
    }


def test_exchange_websocket_form_signs_users_self_verify() -> None:
    signer = ExchangeSigner("ex-key", B64_SECRET, "ex-pass", clock=lambda: NOW)
    assert signer.websocket_messages == frozenset({"subscribe"})
    assert signer.websocket_auth() == {
        "key": "ex-key",
        "passphrase": "ex-pass",
        "timestamp": TS,
        "signature": b64_hmac(RAW_KEY, b"1767225600GET/users/self/verify"),
    }


@pytest.mark.parametrize(
    "signer",
    [
        PrimeSigner("k", PRIME_SECRET, "p"),
        IntxSigner("k", B64_SECRET, "p"),
        HmacSigner("k", "s"),
    ],
)
def test_other_hmac_signers_have_no_websocket_form(signer: signers.Signer) -> None:
    assert signer.websocket_messages == frozenset()
    with pytest.raises(SigningError, match="no WebSocket form"):
        signer.websocket_auth()


@pytest.mark.parametrize(
    "signer",
    [
        ExchangeSigner("k", B64_SECRET, "p"),
        PrimeSigner("k", PRIME_SECRET, "p"),
        IntxSigner("k", B64_SECRET, "p"),
        HmacSigner("k", "s"),
    ],
)
def test_hmac_signers_have_no_jwt_to_exchange(signer: signers.Signer) -> None:
    assert signer.exchange_jwt() is None  # token_exchange upstreams refuse them by this


def test_schemes_and_what_a_401_report_says_was_signed() -> None:
    made = [
        ExchangeSigner("k", B64_SECRET, "p"),
        PrimeSigner("k", PRIME_SECRET, "p"),
        IntxSigner("k", B64_SECRET, "p"),
    ]
    assert [s.scheme for s in made] == ["EXCHANGE", "PRIME", "INTX"]
    assert all(s.requires_body for s in made)
    described = [s.describe("GET", "h", "/v1/x", "a=1") for s in made]
    assert described == ["GET /v1/x?a=1", "GET /v1/x", "GET /v1/x"]
    assert HmacSigner("k", "s").describe("GET", "h", "/v2/user", "a=1") == "GET /v2/user?a=1"


def test_a_fresh_timestamp_for_every_request() -> None:
    now = [NOW]
    signer = IntxSigner("k", B64_SECRET, "p", clock=lambda: now[0])
    first = signer.sign("GET", "h", "/api/v1/x", "", None)
    now[0] += 7
    second = signer.sign("GET", "h", "/api/v1/x", "", None)
    assert int(second["CB-ACCESS-TIMESTAMP"]) - int(first["CB-ACCESS-TIMESTAMP"]) == 7
    assert second["CB-ACCESS-SIGN"] == b64_hmac(RAW_KEY, f"{int(NOW) + 7}GET/api/v1/x".encode())


def test_a_base64_secret_split_over_lines_is_accepted() -> None:
    wrapped = B64_SECRET[:40] + "\n" + B64_SECRET[40:]
    signer = ExchangeSigner("k", wrapped, "p", clock=lambda: NOW)
    sign = signer.sign("GET", "h", "/accounts", "", None)["CB-ACCESS-SIGN"]
    assert sign == b64_hmac(RAW_KEY, b"1767225600GET/accounts")


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda: ExchangeSigner("k", "not base64 at all!", "p"), "api_secret", "is not base64"),
        (lambda: IntxSigner("k", "%%%%", "p"), "api_secret", "is not base64"),
        (
            lambda: ExchangeSigner("k", '{"name": "organizations/x", "privateKey": "-"}', "p"),
            "api_secret",
            "looks like a CDP key JSON",
        ),
        (
            lambda: PrimeSigner("k", '{"id": "x", "privateKey": "abc"}', "p"),
            "api_secret",
            "looks like a CDP key JSON",
        ),
        (
            lambda: PrimeSigner("k", "-----BEGIN EC PRIVATE KEY-----\nMHc\n", "p"),
            "api_secret",
            "PEM private key",
        ),
        (lambda: PrimeSigner("k", "s3cr3t", ""), "passphrase", "passphrase is empty"),
        (lambda: IntxSigner("", B64_SECRET, "p"), "api_key", "api_key is empty"),
        (lambda: PrimeSigner("k", "s", "pa\nss"), "passphrase", "control characters"),
        (lambda: ExchangeSigner("k", "", "p"), "api_secret", "api_secret is empty"),
    ],
)
def test_bad_key_material_is_named_and_never_quoted(make: object, field: str, words: str) -> None:
    assert callable(make)
    with pytest.raises(KeyMaterialError) as info:
        make()
    assert info.value.field == field and words in info.value.problem
    for secret in ("not base64 at all", "organizations/x", "MHc", "pa\nss", "s3cr3t"):
        assert secret not in str(info.value)


def test_the_old_import_paths_still_work() -> None:
    assert signers.HmacSigner is HmacSigner
    assert signers.hmac_request_path("/api/v3/x", "a=1") == "/api/v3/x"
