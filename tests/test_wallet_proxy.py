"""CDP v2 through the proxy: X-Wallet-Auth on Server Wallet writes, verified by the upstream the way
CDP verifies it (wallet_upstream.py), in both modes, with rotation; the uri/uris claim form."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

from signing_proxy.app import ProxyServer
from signing_proxy.credentials import public_fingerprint
from signing_proxy.wallet_rules import OPTIONAL_OPERATIONS, REQUIRED_OPERATIONS

from .conftest import EC_KEY_NAME, MakeProxy, wallet_secret
from .helpers import base, fetch, metric, wait_for
from .test_cli import run_async
from .test_wallet_auth import concrete
from .upstream import VerifyingUpstream

HOST = "api.cdp.coinbase.com"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def wallet_file(tmp_path: Path, wallet_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "cdp_wallet_secret"
    path.write_text(wallet_secret(wallet_key) + "\n")
    return path


@pytest.fixture
def wallet_config(
    config_dict: dict[str, Any], ec_key_file: Path, wallet_file: Path
) -> dict[str, Any]:
    """The CDP upstream signs with credential `wallet` (API key + Wallet Secret); the route
    /nowallet/ reaches the same upstream with `trading`, which has no Wallet Secret."""
    config_dict["credentials"]["wallet"] = {
        "key_file": str(ec_key_file),
        "wallet_secret_file": str(wallet_file),
    }
    config_dict["upstreams"][HOST]["credential"] = "wallet"
    config_dict["routes"].insert(
        0, {"prefix": "/nowallet", "upstream": HOST, "credential": "trading", "strip_prefix": True}
    )
    return config_dict


@pytest.fixture
async def wproxy(make_proxy: MakeProxy, wallet_config: dict[str, Any]) -> ProxyServer:
    return await make_proxy(wallet_config)


def wallet_claims(upstream: VerifyingUpstream, path: str) -> dict[str, Any]:
    assert upstream.wallet is not None
    seen_path, header, claims = upstream.wallet.verified[-1]
    assert seen_path == path and header == {"alg": "ES256", "typ": "JWT"}
    return claims


@pytest.mark.parametrize("rule", REQUIRED_OPERATIONS)
async def test_every_wallet_required_operation_gets_both_tokens(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream, rule: str
) -> None:
    method, path = concrete(rule)
    body = b'{"name": "treasury", "network": "base-sepolia"}'
    status, data, _, _ = await fetch(client, method, base(wproxy) + path, data=body, headers=JSON)
    assert status == 200, data
    assert data is not None and data["auth"] == "jwt" and "x-wallet-auth" in data["headers"]
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()  # the client's own bytes
    assert data["claims"]["uris"] == [f"{method} {HOST}{path}"]
    claims = wallet_claims(upstream, path)
    assert (
        claims["reqHash"]
        == hashlib.sha256(b'{"name":"treasury","network":"base-sepolia"}').hexdigest()
    )
    assert metric(wproxy, "signing_proxy_wallet_tokens_minted_total", credential="wallet") == 1


async def test_an_optional_operation_gets_the_wallet_token_when_there_is_a_secret(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    method, path = concrete(OPTIONAL_OPERATIONS[3])  # POST .../evm/sign/message
    status, data, _, _ = await fetch(client, method, base(wproxy) + path, json={"message": "hi"})
    assert status == 200 and data is not None and "x-wallet-auth" in data["headers"]
    assert wallet_claims(upstream, path)["uris"] == [f"{method} {HOST}{path}"]
    # ... and without a Wallet Secret it goes with the API-key JWT alone
    method, path = concrete(OPTIONAL_OPERATIONS[-1])  # DELETE .../address/{address}/delegation
    status, data, _, _ = await fetch(client, method, f"{base(wproxy)}/nowallet{path}")
    assert status == 200 and data is not None and "x-wallet-auth" not in data["headers"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/platform/v2/evm/faucet"), ("GET", "/platform/v2/evm/accounts"),
     ("POST", "/platform/v2/evm/accounts/0xAbC/sign/other")],
)  # fmt: skip
async def test_other_requests_on_the_same_host_get_no_wallet_token(
    wproxy: ProxyServer, client: aiohttp.ClientSession, method: str, path: str
) -> None:
    status, data, _, _ = await fetch(
        client, method, base(wproxy) + path, data=b"not json either",
        headers={"X-Wallet-Auth": "from-the-client"},  # a client's own token never goes through
    )  # fmt: skip
    assert status == 200, data
    assert data is not None and "x-wallet-auth" not in data["headers"]
    assert data["body_len"] == 15  # streamed through, not parsed
    assert metric(wproxy, "signing_proxy_wallet_tokens_minted_total", credential="wallet") == 0


async def test_nested_non_ascii_body_is_hashed_canonically_and_forwarded_as_sent(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    body = (
        '{\n  "name": "trésor ✓ <&>",\n  "policies": [{"z": 1, "a": [true, null]}, "x"],\n'
        '  "meta": {"b": {"d": 2.50, "c": "ü"}, "a": []}\n}'
    ).encode()
    path = "/platform/v2/evm/accounts"
    status, data, _, _ = await fetch(client, "POST", base(wproxy) + path, data=body, headers=JSON)
    assert status == 200, data
    assert data is not None and data["body_sha256"] == hashlib.sha256(body).hexdigest()
    canonical = (
        '{"meta":{"a":[],"b":{"c":"\\u00fc","d":2.5}},"name":"tr\\u00e9sor \\u2713 <&>",'
        '"policies":[{"a":[true,null],"z":1},"x"]}'
    )
    assert (
        wallet_claims(upstream, path)["reqHash"] == hashlib.sha256(canonical.encode()).hexdigest()
    )


@pytest.mark.parametrize("body", [b"", b"{}"])
async def test_empty_body_has_no_request_hash(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream, body: bytes
) -> None:
    path = "/platform/v2/solana/accounts"
    status, data, _, _ = await fetch(client, "POST", base(wproxy) + path, data=body)
    assert status == 200, data
    assert "reqHash" not in wallet_claims(upstream, path)


async def test_non_json_body_is_refused_before_anything_is_sent(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    path = "/platform/v2/evm/accounts/0xAbC/sign/message"
    status, data, _, _ = await fetch(client, "POST", base(wproxy) + path, data=b"message=hi")
    assert status == 400 and data is not None and data["error"] == "invalid_wallet_body"
    assert "is not valid JSON (line 1, column 1)" in data["message"]
    # a compressed body is never inflated, so it cannot be hashed either
    gz = gzip.compress(b'{"message": "hi"}')
    status, data, _, _ = await fetch(
        client, "POST", base(wproxy) + path, data=gz, headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and data is not None and data["error"] == "invalid_wallet_body"
    assert upstream.received == [] and upstream.rejections == []
    assert metric(wproxy, "signing_proxy_errors_total", kind="invalid_wallet_body") == 2


async def test_body_over_the_cap_is_413(
    make_proxy: MakeProxy, wallet_config: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    proxy = await make_proxy({**wallet_config, "max_body_bytes": 1024})
    body = json.dumps({"name": "x" * 2000}).encode()
    for chunked in (False, True):  # declared length, and a chunked body that grows past the cap
        data_arg: Any = body
        if chunked:

            async def gen() -> Any:
                for i in range(0, len(body), 100):
                    yield body[i : i + 100]

            data_arg = gen()
        status, data, _, _ = await fetch(
            client, "POST", f"{base(proxy)}/platform/v2/evm/accounts", data=data_arg
        )
        assert status == 413 and data is not None and data["error"] == "body_too_large"
    assert upstream.received == []


async def test_no_wallet_secret_is_a_local_403(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    for path in ("/platform/v2/evm/accounts", "/platform/v2/EVM//%61ccounts/"):  # any spelling
        url = URL(f"{base(wproxy)}/nowallet{path}", encoded=True)
        status, data, _, _ = await fetch(client, "POST", url, json={"name": "x"})
        assert status == 403 and data is not None, data
        assert data["error"] == "wallet_secret_required"
        assert "credential 'trading' has no Wallet Secret" in data["message"]
    assert upstream.received == []
    assert metric(wproxy, "signing_proxy_errors_total", kind="wallet_secret_required") == 2


async def test_spelling_variants_get_the_token_for_the_path_as_sent(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    path = "/platform/v2/evm/%61ccounts/0xAbC/Sign"
    url = URL(base(wproxy) + path, encoded=True)  # sent exactly as written
    status, data, _, _ = await fetch(client, "POST", url, json={"message": "m"})
    assert status == 200, data
    assert wallet_claims(upstream, path)["uris"] == [f"POST {HOST}{path}"]


async def test_forward_proxy_mode(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    path = "/platform/v2/evm/smart-accounts/0xAbC/spend-permissions"
    status, data, _, _ = await fetch(
        client, "POST", f"http://{HOST}{path}", proxy=base(wproxy), json={"spender": "0x1"}
    )
    assert status == 200, data
    claims = wallet_claims(upstream, path)
    assert claims["uris"] == [f"POST {HOST}{path}"] and "reqHash" in claims


async def test_wallet_secret_rotation_and_a_broken_file(
    wproxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    wallet_file: Path, wallet_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    assert upstream.wallet is not None
    url, path = base(wproxy) + "/platform/v2/evm/accounts", "/platform/v2/evm/accounts"
    assert (await fetch(client, "POST", url, json={"name": "a"}))[0] == 200
    new_key = ec.generate_private_key(ec.SECP256R1())
    upstream.wallet.keys.append(new_key.public_key())
    reloads = "signing_proxy_credential_last_reload_timestamp_seconds"
    before = metric(wproxy, reloads, credential="wallet")
    wallet_file.write_text(wallet_secret(new_key))
    os.utime(wallet_file, ns=(1, 1))  # mtime changes whatever the clock's granularity
    await wait_for(lambda: metric(wproxy, reloads, credential="wallet") > before, what="reload")
    reloaded = [r for r in caplog.records if r.getMessage().startswith("credential reloaded")]
    fields = reloaded[-1].fields  # type: ignore[attr-defined]
    assert fields["wallet_fingerprint"] == public_fingerprint(new_key)  # public, never the secret
    assert wallet_secret(new_key) not in caplog.text
    token = {}

    status, data, _, _ = await fetch(client, "POST", url, json={"name": "b"})
    assert status == 200 and data is not None
    token["new"] = data["headers"]["x-wallet-auth"]
    jwt.decode(token["new"], new_key.public_key(), algorithms=["ES256"])  # signed by the new key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token["new"], wallet_key.public_key(), algorithms=["ES256"])

    errors = "signing_proxy_credential_reload_errors_total"
    wallet_file.write_text("-----BEGIN EC PRIVATE KEY-----\nbroken\n")
    await wait_for(lambda: metric(wproxy, errors, credential="wallet") == 1, what="reload error")
    status, data, _, _ = await fetch(client, "POST", url, json={"name": "c"})
    assert status == 200 and data is not None  # the last good key stays in use
    jwt.decode(data["headers"]["x-wallet-auth"], new_key.public_key(), algorithms=["ES256"])
    assert wallet_claims(upstream, path)["reqHash"]


@pytest.mark.parametrize(
    ("host", "setting", "form"),
    [
        ("api.cdp.coinbase.com", None, "uris"),
        ("api.cdp.coinbase.com", "uri", "uri"),
        ("api.developer.coinbase.com", None, "uris"),
        ("api.coinbase.com", None, "uri"),
        ("api.coinbase.com", "uris", "uris"),
    ],
)
async def test_uri_claim_form_per_upstream(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, ec_key: ec.EllipticCurvePrivateKey, host: str,
    setting: str | None, form: str,
) -> None:  # fmt: skip
    config_dict["upstreams"][host]["credential"] = "trading"
    if setting is not None:
        config_dict["upstreams"][host]["jwt_uri_claim"] = setting
    proxy = await make_proxy(config_dict)
    path = "/v9/some/thing"
    status, data, _, _ = await fetch(client, "GET", f"http://{host}{path}?q=1", proxy=base(proxy))
    assert status == 200, data
    token = upstream.received[-1].token
    assert token is not None
    claims = jwt.decode(token, ec_key.public_key(), algorithms=["ES256"])
    assert jwt.get_unverified_header(token)["kid"] == EC_KEY_NAME
    signed = f"GET {host}{path}"
    assert claims[form] == (signed if form == "uri" else [signed])
    assert ({"uri", "uris"} - {form}).isdisjoint(claims)


async def test_the_readme_curl_examples(wproxy: ProxyServer, upstream: VerifyingUpstream) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is required (.ci/run installs it)"
    path = "/platform/v2/evm/accounts"
    code, out, err = await run_async(
        [curl, "-sS", "-X", "POST", base(wproxy) + path, "-H", "Content-Type: application/json",
         "-d", '{"name":"treasury"}']
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["auth"] == "jwt"
    claims = wallet_claims(upstream, path)
    assert claims["reqHash"] == hashlib.sha256(b'{"name":"treasury"}').hexdigest()
    code, out, err = await run_async(
        [curl, "-sS", "-x", base(wproxy), "-X", "POST", f"http://{HOST}/platform/v2/solana/accounts",
         "-d", "{}"]
    )  # fmt: skip
    assert code == 0 and json.loads(out)["auth"] == "jwt", err
    assert "reqHash" not in wallet_claims(upstream, "/platform/v2/solana/accounts")
