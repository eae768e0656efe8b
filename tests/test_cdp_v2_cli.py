"""CDP v2 from the command line and the library: `jwt` with a Wallet Secret, `check`, and Onramp v2
sessions (plus the v1 token's clientIp) through the verifying upstream."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_proxy.aiohttp_client import create_session
from signing_proxy.config import parse_config
from signing_proxy.credentials import CredentialStore, public_fingerprint
from signing_proxy.errors import ProxyError, UpstreamError
from signing_proxy.onramp_v2 import (
    create_onramp_session,
    onramp_session_for_config,
    session_request_body,
)
from signing_proxy.upstream_endpoint import UpstreamEndpoint

from .conftest import EC_KEY_NAME, wallet_secret
from .test_cli import run_cli
from .test_onramp import ADDRESS, write_config
from .test_onramp import run_cli as run_cli_inproc
from .upstream import VerifyingUpstream

URL = "https://api.cdp.coinbase.com/platform/v2/evm/accounts?x=1"
URI = "POST api.cdp.coinbase.com/platform/v2/evm/accounts"


@pytest.fixture
def ws_file(tmp_path: Path, wallet_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "ws.txt"
    path.write_text(wallet_secret(wallet_key))
    return path


def test_jwt_prints_both_tokens_labelled(
    ec_key_file: Path, ec_key: ec.EllipticCurvePrivateKey, ws_file: Path,
    wallet_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    body = '{"name": "treasury"}'
    result = run_cli(
        "jwt", "--key-file", str(ec_key_file), "--wallet-secret-file", str(ws_file),
        "--body", body, "POST", URL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    auth, wallet = result.stdout.splitlines()
    assert auth.startswith("Authorization: Bearer ") and wallet.startswith("X-Wallet-Auth: ")
    claims = jwt.decode(auth.split(" ", 2)[2], ec_key.public_key(), algorithms=["ES256"])
    assert claims["uris"] == [URI] and claims["sub"] == EC_KEY_NAME  # cdp-sdk's form for this host
    token = wallet.removeprefix("X-Wallet-Auth: ")
    wclaims = jwt.decode(token, wallet_key.public_key(), algorithms=["ES256"])
    assert wclaims["uris"] == [URI]
    assert wclaims["reqHash"] == hashlib.sha256(b'{"name":"treasury"}').hexdigest()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "JWT"}


def test_jwt_export_exports_both_and_wallet_alone_works(
    ec_key_file: Path, ws_file: Path, wallet_key: ec.EllipticCurvePrivateKey
) -> None:
    result = run_cli(
        "jwt", "--export", "--key-file", str(ec_key_file), "--wallet-secret-file", str(ws_file),
        "POST", URL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    exported = dict(shlex.split(line)[1].split("=", 1) for line in result.stdout.splitlines())
    assert set(exported) == {"JWT", "WALLET_JWT"}
    claims = jwt.decode(exported["WALLET_JWT"], wallet_key.public_key(), algorithms=["ES256"])
    assert "reqHash" not in claims  # no --body: an empty body
    alone = run_cli("jwt", "--wallet-secret-file", str(ws_file), "POST", URL)
    assert alone.returncode == 0 and alone.stdout.startswith("X-Wallet-Auth: ")
    assert alone.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--body", "{}"], "give --wallet-secret-file"),
        (["--wallet-secret-file", "WS", "--body", "name=x"], "is not valid JSON"),
        (["--wallet-secret-file", "KEY"], "looks like a key JSON, not a Wallet Secret"),
    ],
)
def test_jwt_wallet_errors(ec_key_file: Path, ws_file: Path, args: list[str], problem: str) -> None:
    args = [str(ws_file) if a == "WS" else str(ec_key_file) if a == "KEY" else a for a in args]
    result = run_cli("jwt", "--key-file", str(ec_key_file), *args, "POST", URL)
    assert result.returncode != 0 and problem in result.stderr and result.stdout == ""


def test_check_prints_the_wallet_fingerprint_and_where_it_is_used(
    tmp_path: Path, config_dict: dict[str, Any], ec_key_file: Path, ws_file: Path,
    wallet_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    before = run_cli("check", "-c", write_config(tmp_path, config_dict))
    assert before.returncode == 0, before.stderr
    trading = before.stdout.split("credential trading:")[1].split("\ncredential ")[0]
    assert "no wallet secret: Server Wallet writes through it answer 403" in trading
    config_dict["credentials"]["wallet"] = {
        "key_file": str(ec_key_file),
        "wallet_secret_file": str(ws_file),
    }
    config_dict["upstreams"]["api.cdp.coinbase.com"]["credential"] = "wallet"
    result = run_cli("check", "-c", write_config(tmp_path, config_dict))
    assert "no wallet secret" not in result.stdout
    assert result.returncode == 0, result.stderr
    assert (
        f"  wallet secret: ES256 fingerprint {public_fingerprint(wallet_key)} (file {ws_file})"
        in result.stdout
    )
    assert (
        "  X-Wallet-Auth on: upstream api.cdp.coinbase.com (40 operations), "
        "route /platform/ -> api.cdp.coinbase.com" in result.stdout
    )
    assert wallet_secret(wallet_key) not in result.stdout + result.stderr
    ws_file.write_text(wallet_secret(wallet_key)[:40])
    broken = run_cli("check", "-c", write_config(tmp_path, config_dict))
    assert broken.returncode == 1
    assert (
        f"credential 'wallet': file {ws_file}: base64, but not a DER private key" in broken.stderr
    )


# --- Onramp v2 sessions -----------------------------------------------------------------------


def test_session_request_body() -> None:
    assert session_request_body(
        destination_address=ADDRESS, destination_network="base", purchase_currency="USDC",
        payment_amount=100, payment_currency="USD", client_ip="8.8.8.8",
        partner_user_ref="user-1", redirect_url="https://app.example/done",
    ) == {
        "destinationAddress": ADDRESS, "destinationNetwork": "base", "purchaseCurrency": "USDC",
        "paymentAmount": "100", "paymentCurrency": "USD", "clientIp": "8.8.8.8",
        "partnerUserRef": "user-1", "redirectUrl": "https://app.example/done",
    }  # fmt: skip
    basic = {"destination_address": ADDRESS, "destination_network": "base"}
    for extra, problem in (
        ({"purchase_currency": ""}, "purchase_currency is required"),
        ({"purchase_currency": "USDC", "client_ip": "192.168.1.2"}, "not a public IP"),
        ({"purchase_currency": "USDC", "payment_amount": "5"}, "needs payment_currency"),
    ):
        with pytest.raises(ValueError, match=problem):
            session_request_body(**basic, **extra)


async def test_onramp_v2_session_through_the_verifying_upstream(
    config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    config = parse_config(config_dict)
    store = CredentialStore(config.credentials)
    assert store.load_all() == []
    endpoint = UpstreamEndpoint.build(config.upstreams["api.cdp.coinbase.com"])
    async with create_session() as session:
        url = await create_onramp_session(
            session, endpoint, store.signer("trading"), destination_address=ADDRESS,
            destination_network="base", purchase_currency="USDC", client_ip="8.8.8.8",
        )  # fmt: skip
    assert url.startswith("https://pay.coinbase.com/buy?sessionToken=v2-")
    assert upstream.wallet is not None
    assert upstream.wallet.sessions == [
        {"destinationAddress": ADDRESS, "destinationNetwork": "base",
         "purchaseCurrency": "USDC", "clientIp": "8.8.8.8"}
    ]  # fmt: skip
    seen = upstream.received[-1]
    assert seen.claims["uris"] == ["POST api.cdp.coinbase.com/platform/v2/onramp/sessions"]
    assert "x-wallet-auth" not in seen.headers  # Bearer JWT only


async def test_onramp_v2_refusal_and_configuration_errors(
    config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    fields = {"destination_network": "base", "purchase_currency": "USDC"}
    with pytest.raises(UpstreamError) as refused:
        await onramp_session_for_config(
            parse_config(config_dict), destination_address="0xnope", **fields
        )
    assert (refused.value.status, refused.value.code) == (400, "upstream_rejected")
    assert refused.value.message == (
        "api.cdp.coinbase.com answered 400 Bad Request: "
        "The destination address is not valid for the specified network."
    )
    del config_dict["upstreams"]["api.cdp.coinbase.com"]["credential"]
    with pytest.raises(ProxyError) as info:
        await onramp_session_for_config(
            parse_config(config_dict), destination_address=ADDRESS, **fields
        )
    assert info.value.code == "onramp_not_configured"
    assert "upstreams.api.cdp.coinbase.com.credential" in info.value.message
    assert upstream.wallet is not None and upstream.wallet.sessions == []


async def test_cli_onramp_v2(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = await run_cli_inproc(
        ["onramp-url", "--v2", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "base", "--assets", "USDC", "--preset-fiat-amount", "100",
         "--fiat-currency", "USD", "--client-ip", "8.8.4.4", "--partner-user-id", "user-1"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert upstream.wallet is not None
    assert out.startswith("https://pay.coinbase.com/buy?sessionToken=v2-")
    assert upstream.wallet.sessions[-1] == {
        "destinationAddress": ADDRESS, "destinationNetwork": "base", "purchaseCurrency": "USDC",
        "paymentAmount": "100", "paymentCurrency": "USD", "clientIp": "8.8.4.4",
        "partnerUserRef": "user-1",
    }  # fmt: skip


async def test_cli_onramp_v2_options_are_checked_before_any_request(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    argv = ["onramp-url", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
            "--assets", "USDC"]  # fmt: skip
    for extra, problem in (
        (["--v2", "--blockchains", "base", "--offramp"], "--offramp is not an Onramp v2 session"),
        (["--v2", "--blockchains", "base,ethereum"], "--v2 takes one network"),
    ):
        code, out, err = await run_cli_inproc([*argv, *extra], capsys)
        assert code == 2 and out == "" and problem in err
    for extra in (["--client-ip", "10.0.0.1"], ["--v2", "--client-ip", "127.0.0.1"]):  # v1, v2
        with pytest.raises(SystemExit) as exited:  # argparse refuses it
            await run_cli_inproc([*argv, "--blockchains", "base", *extra], capsys)
        assert exited.value.code == 2
        assert "is not a public IP address" in capsys.readouterr().err
    assert upstream.received == []
