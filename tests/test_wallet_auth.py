"""CDP v2 wallet auth, unit level: the token decoded with the public key, the body hash, the
Wallet Secret's formats and named errors, the rules and their config."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError, CredentialError, RequestRejected
from signing_proxy.signers import CdpJwtSigner
from signing_proxy.wallet_auth import WalletAuth, WalletSigner, parse_wallet_secret, request_hash
from signing_proxy.wallet_rules import (
    OPTIONAL_OPERATIONS,
    REQUIRED_OPERATIONS,
    WalletRule,
    WalletRuleError,
    WalletRules,
)

from .conftest import ec_pem, ed_base64_64, wallet_secret
from .wallet_upstream import WALLET_REQUIRED, canonical_hash

NOW = 1_764_000_000
HOST = "api.cdp.coinbase.com"


def decode(token: str, key: ec.EllipticCurvePrivateKey) -> tuple[dict[str, Any], dict[str, Any]]:
    claims = jwt.decode(
        token, key.public_key(), algorithms=["ES256"], options={"verify_iat": False}
    )
    return jwt.get_unverified_header(token), claims


def test_wallet_token_header_and_claims(wallet_key: ec.EllipticCurvePrivateKey) -> None:
    signer = WalletSigner(wallet_key, clock=lambda: NOW + 0.7)
    body = b'{"name": "treasury"}'
    token = signer.token("post", HOST, "/platform/v2/evm/accounts", body)
    header, claims = decode(token, wallet_key)
    assert header == {"alg": "ES256", "typ": "JWT"}  # no kid, no nonce
    assert set(claims) == {"uris", "iat", "nbf", "jti", "reqHash"}  # no exp
    assert claims["uris"] == ["POST api.cdp.coinbase.com/platform/v2/evm/accounts"]
    assert claims["iat"] == claims["nbf"] == NOW
    assert claims["reqHash"] == hashlib.sha256(b'{"name":"treasury"}').hexdigest()
    again = decode(signer.token("POST", HOST, "/platform/v2/evm/accounts", body), wallet_key)[1]
    assert again["jti"] != claims["jti"]


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b'{ "b": 1, "a": {"d": [3, {"z": 0, "y": null}], "c": "x"} }',
         b'{"a":{"c":"x","d":[3,{"y":null,"z":0}]},"b":1}'),
        ('{"name": "trésor ✓", "tag": "<&>"}'.encode(),
         b'{"name":"tr\\u00e9sor \\u2713","tag":"<&>"}'),  # python SDK form: \\u escapes
        (b'{"n": 1.50, "big": 12345678901234567890, "t": true}',
         b'{"big":12345678901234567890,"n":1.5,"t":true}'),
    ],
)  # fmt: skip
def test_request_hash_is_the_python_sdk_canonical_form(body: bytes, canonical: bytes) -> None:
    assert request_hash(body) == hashlib.sha256(canonical).hexdigest()
    assert request_hash(body) == canonical_hash(body)  # and what the verifying upstream computes


@pytest.mark.parametrize("body", [b"", b"{}", b"  {  }\n"])
def test_no_request_hash_for_an_empty_body_or_object(body: bytes) -> None:
    assert request_hash(body) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"name=treasury", "is not valid JSON (line 1, column 1)"),
        (b'{"a": 1', "is not valid JSON"),
        (b"[1, 2]", "is a JSON list, not an object"),
        (b'"x"', "is a JSON str, not an object"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b'{"a": 1e999}', "number out of range"),
        (b'{"a": "\xff"}', "is not UTF-8"),
    ],
)
def test_a_body_that_cannot_be_hashed_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(RequestRejected) as info:
        request_hash(body)
    assert info.value.status == 400 and info.value.code == "invalid_wallet_body"
    assert problem in info.value.message


# --- the Wallet Secret ------------------------------------------------------------------------


def test_wallet_secret_formats_and_repairs(wallet_key: ec.EllipticCurvePrivateKey) -> None:
    secret = wallet_secret(wallet_key)
    sec1 = base64.b64encode(
        wallet_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    ).decode()
    wrapped = "\\n".join(secret[i : i + 40] for i in range(0, len(secret), 40))
    for text in (
        secret,
        f'"{secret}"\n',
        f"  {wrapped}  ",
        secret[:30] + "\r\n" + secret[30:],
        sec1,
    ):
        key = parse_wallet_secret(text, "env var CDP_WALLET_SECRET")
        assert key.private_numbers() == wallet_key.private_numbers()


def _der_b64(key: Any) -> str:
    return base64.b64encode(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    ).decode()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda k: "", "the Wallet Secret is empty"),
        (lambda k: ec_pem(k), "this looks like an API key, not a Wallet Secret"),
        (lambda k: json.dumps({"id": "x", "privateKey": "y"}), "looks like a key JSON"),
        (lambda k: ed_base64_64(ed25519.Ed25519PrivateKey.generate()), "looks like an API key (Ed25519"),
        (lambda k: _der_b64(ed25519.Ed25519PrivateKey.generate()), "looks like an API key (Ed25519)"),
        (lambda k: _der_b64(ec.generate_private_key(ec.SECP384R1())), "not P-256 (it is secp384r1)"),
        (lambda k: _der_b64(rsa.generate_private_key(65537, 2048)), "RSAPrivateKey key is not"),
        (lambda k: "not base64 at all!", "is not base64"),
        (lambda k: wallet_secret(k)[:40], "not a DER private key"),
        (lambda k: base64.b64encode(k.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
         "this is a public key"),
        (lambda k: "organizations/abc/apiKeys/def", "API key name"),
    ],
)  # fmt: skip
def test_wallet_secret_errors_are_named_and_never_echo_it(
    wallet_key: ec.EllipticCurvePrivateKey, make: Any, problem: str
) -> None:
    text = make(wallet_key)
    with pytest.raises(CredentialError) as info:
        parse_wallet_secret(text, "file /secrets/ws.txt")
    message = info.value.message
    assert message.startswith("file /secrets/ws.txt: ") and problem in message
    for line in text.splitlines():
        if len(line) > 12:
            assert line not in message and line[8:20] not in message


# --- the rules ------------------------------------------------------------------------------


def concrete(rule: str) -> tuple[str, str]:
    method, path = rule.split(" ")
    return method, path.replace("{address}", "0xAbC").replace("{name}", "treasury").replace(
        "{userId}", "u-1"
    ).replace("{asset}", "usdc")


def test_default_rules_are_the_openapi_set() -> None:
    assert len(REQUIRED_OPERATIONS) == 26 and len(OPTIONAL_OPERATIONS) == 14
    rules = WalletRules({HOST: WalletRules.defaults(HOST)})
    for rule in REQUIRED_OPERATIONS:
        method, path = concrete(rule)
        assert rules.need(method, HOST, path) == "required", rule
        assert any(p.fullmatch(path) for p in WALLET_REQUIRED), rule  # the upstream agrees
    for rule in OPTIONAL_OPERATIONS:
        assert rules.need(*concrete(rule)[:1], HOST, concrete(rule)[1]) == "optional", rule
    assert len(WALLET_REQUIRED) == 26


@pytest.mark.parametrize(
    ("method", "path", "need"),
    [
        ("POST", "/platform/v2/evm/accounts", "required"),
        ("post", "/platform/v2/evm/accounts", "required"),
        ("POST", "/platform/v2/EVM/Accounts", "required"),
        ("POST", "/platform/v2/evm/%61ccounts", "required"),
        ("POST", "/platform//v2/evm/accounts/", "required"),
        ("POST", "/platform/v2/evm/accounts%2F0xabc%2Fsign", "required"),
        ("GET", "/platform/v2/evm/accounts", None),
        ("POST", "/platform/v2/evm/accounts/0xabc/sign/extra", None),
        ("POST", "/platform/v2/onramp/sessions", None),
        ("POST", "/v2/evm/accounts", None),  # not under /platform: not the CDP API
    ],
)
def test_rules_match_every_reading_of_the_path(method: str, path: str, need: str | None) -> None:
    rules = WalletRules({HOST: WalletRules.defaults(HOST)})
    assert rules.need(method, HOST, path) == need
    assert rules.need(method, "api.coinbase.com", path) is None


@pytest.mark.parametrize(
    "bad", ["/no/method", "POST no-slash", "POST /a/{x}y", "POST /a//b", "A B C"]
)
def test_bad_rules_are_refused(bad: str) -> None:
    with pytest.raises(WalletRuleError):
        WalletRule.parse(bad)


def test_no_wallet_secret_refuses_required_and_passes_optional(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    auth = WalletAuth(WalletRules({HOST: WalletRules.defaults(HOST)}), None, "trading")
    signer = CdpJwtSigner("k", ec_key, wallet=auth, uris_hosts=frozenset({HOST}))
    with pytest.raises(RequestRejected) as info:
        signer.sign("POST", HOST, "/platform/v2/evm/accounts", "", None)
    assert (info.value.status, info.value.code) == (403, "wallet_secret_required")
    assert "credential 'trading'" in info.value.message
    method, path = concrete(OPTIONAL_OPERATIONS[0])
    assert set(signer.sign(method, HOST, path, "", None)) == {"Authorization"}
    # Asked before the body (and before any 100 Continue): the same refusal, at once.
    with pytest.raises(RequestRejected) as early:
        signer.needs_body("POST", HOST, "/platform/v2/evm/accounts")
    assert early.value.code == "wallet_secret_required"
    assert not signer.needs_body(method, HOST, path)  # optional: no secret, no body needed


# --- config ---------------------------------------------------------------------------------


def _config(**upstream: Any) -> dict[str, Any]:
    return {
        "credentials": {"w": {"key_file": "/k.json", "wallet_secret_env": "CDP_WALLET_SECRET"}},
        "upstreams": {HOST: {"credential": "w", **upstream}, "api.coinbase.com": {}},
    }


def test_config_defaults_and_extensions() -> None:
    config = parse_config(_config(wallet_auth={"paths": ["post /platform/v2/new/{id}/thing"]}))
    cred = config.credentials["w"]
    assert cred.wallet_secret is not None and cred.wallet_secret.ref == "CDP_WALLET_SECRET"
    assert cred.uris_hosts == {HOST}
    assert config.upstreams[HOST].jwt_uri_claim == "uris"
    assert config.upstreams["api.coinbase.com"].jwt_uri_claim == "uri"
    assert cred.wallet_rules.need("POST", HOST, "/platform/v2/new/7/thing") == "required"
    assert cred.wallet_rules.need("POST", HOST, "/platform/v2/evm/accounts") == "required"
    assert parse_config(_config(jwt_uri_claim="uri")).credentials["w"].uris_hosts == set()


@pytest.mark.parametrize(
    ("upstream", "problem"),
    [
        ({"jwt_uri_claim": "url"}, "jwt_uri_claim: expected uri or uris"),
        ({"wallet_auth": {"paths": "POST /x"}}, "wallet_auth.paths: expected a list"),
        ({"wallet_auth": {"paths": ["/x"]}}, "expected 'METHOD /path'"),
        ({"wallet_auth": {"path": ["POST /x"]}}, "did you mean 'paths'"),
    ],
)
def test_config_errors_name_the_field(upstream: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(**upstream))
    assert f"upstreams.{HOST}" in info.value.message and problem in info.value.message
