"""Onramp/Offramp: session tokens through the verifying upstream, URLs parsed back, the CLI in-process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from signing_proxy.aiohttp_client import create_session
from signing_proxy.cli import main
from signing_proxy.config import parse_config
from signing_proxy.credentials import CredentialStore
from signing_proxy.errors import ProxyError, UpstreamError
from signing_proxy.onramp import (
    ONRAMP_HOST,
    build_offramp_url,
    build_onramp_url,
    request_session_token,
    session_token_for_config,
    token_request_body,
)
from signing_proxy.upstream_endpoint import UpstreamEndpoint

from .conftest import ED_KEY_NAME, ec_pem
from .upstream import VerifyingUpstream

ADDRESS = "0x4315d134aCd3221a02dD380ADE3aF39Ce219037c"


def query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    params = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in params.values()), params
    return f"{parts.scheme}://{parts.netloc}{parts.path}", {k: v[0] for k, v in params.items()}


# --- URL building --------------------------------------------------------------------------------


def test_onramp_url_carries_the_token_and_the_options() -> None:
    url = build_onramp_url(
        "ZWJl+NDgw/YmI=",
        default_network="base",
        default_asset="USDC",
        preset_fiat_amount=100,
        fiat_currency="USD",
        default_payment_method="CARD",
        partner_user_id="user 1&2",
        redirect_url="https://app.example/done?x=1&y=2",
    )
    base, params = query(url)
    assert base == "https://pay.coinbase.com/buy/select-asset"
    assert params == {
        "sessionToken": "ZWJl+NDgw/YmI=",
        "defaultNetwork": "base",
        "defaultAsset": "USDC",
        "presetFiatAmount": "100",
        "fiatCurrency": "USD",
        "defaultPaymentMethod": "CARD",
        "partnerUserId": "user 1&2",
        "partnerUserRef": "user 1&2",
        "redirectUrl": "https://app.example/done?x=1&y=2",
    }
    assert "+" not in url.split("?", 1)[1]  # every reserved character is percent-encoded


def test_onramp_url_without_options_is_just_the_token() -> None:
    assert build_onramp_url("tok") == "https://pay.coinbase.com/buy/select-asset?sessionToken=tok"


def test_offramp_url() -> None:
    url = build_offramp_url(
        "tok",
        partner_user_id="user123",
        redirect_url="https://yourapp.com/success",
        preset_fiat_amount="25.50",
        default_cashout_method="FIAT_WALLET",
    )
    base, params = query(url)
    assert base == "https://pay.coinbase.com/v3/sell/input"
    assert params == {
        "sessionToken": "tok",
        "partnerUserId": "user123",
        "partnerUserRef": "user123",
        "redirectUrl": "https://yourapp.com/success",
        "presetFiatAmount": "25.50",
        "defaultCashoutMethod": "FIAT_WALLET",
    }


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"partner_user_id": "", "redirect_url": "https://x"}, "partner_user_id"),
        ({"partner_user_id": "u", "redirect_url": " "}, "redirect_url"),
        ({"partner_user_id": "u", "redirect_url": "https://x", "preset_fiat_amount": "-1"}, "positive"),
        ({"partner_user_id": "u", "redirect_url": "https://x", "preset_fiat_amount": "ten"}, "number"),
    ],
)  # fmt: skip
def test_offramp_url_refuses_what_coinbase_would(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_offramp_url("tok", **kwargs)


def test_token_request_body() -> None:
    body = token_request_body({ADDRESS: ["ethereum", "base"]}, ["ETH", "USDC"], "8.8.8.8")
    assert body == {
        "addresses": [{"address": ADDRESS, "blockchains": ["ethereum", "base"]}],
        "assets": ["ETH", "USDC"],
        "clientIp": "8.8.8.8",
    }
    with pytest.raises(ValueError, match="public"):
        token_request_body({ADDRESS: ["base"]}, ["ETH"], "10.0.0.1")
    with pytest.raises(ValueError, match="blockchain"):
        token_request_body({ADDRESS: []}, ["ETH"])


# --- the session token, through the verifying upstream ----------------------------------------


async def test_request_session_token_is_signed_and_sent_as_coinbase_expects(
    config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    config = parse_config(config_dict)
    store = CredentialStore(config.credentials)
    assert store.load_all() == []
    endpoint = UpstreamEndpoint.build(config.upstreams[ONRAMP_HOST])
    async with create_session() as session:
        token = await request_session_token(
            session,
            endpoint,
            store.signer("ed"),
            addresses={ADDRESS: ["ethereum", "base"]},
            assets=["ETH", "USDC"],
            client_ip="8.8.8.8",
        )
    assert token == upstream.onramp_tokens[-1]
    assert upstream.onramp_requests == [
        {
            "addresses": [{"address": ADDRESS, "blockchains": ["ethereum", "base"]}],
            "assets": ["ETH", "USDC"],
            "clientIp": "8.8.8.8",
        }
    ]
    seen = upstream.received[-1]
    assert seen.claims["uris"] == [
        "POST api.developer.coinbase.com/onramp/v1/token"
    ]  # cdp-sdk form
    assert seen.host == ONRAMP_HOST and seen.jwt_header["kid"] == ED_KEY_NAME
    assert seen.headers["content-type"] == "application/json"


async def test_upstream_refusal_shows_coinbases_message(
    config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    config = parse_config(config_dict)
    with pytest.raises(UpstreamError) as info:
        await session_token_for_config(config, addresses={"0xnope": ["base"]}, assets=["ETH"])
    assert info.value.status == 400 and info.value.code == "upstream_rejected"
    assert info.value.message == (
        "api.developer.coinbase.com answered 400 Bad Request: "
        "0xnope is not a valid address for base"
    )
    assert upstream.onramp_tokens == []


@pytest.mark.parametrize("change", ["no_upstream", "no_credential"])
async def test_onramp_upstream_and_credential_must_be_configured(
    config_dict: dict[str, Any], change: str
) -> None:
    if change == "no_upstream":
        del config_dict["upstreams"][ONRAMP_HOST]
        config_dict["routes"] = [r for r in config_dict["routes"] if r["upstream"] != ONRAMP_HOST]
    else:
        del config_dict["upstreams"][ONRAMP_HOST]["credential"]
    config = parse_config(config_dict, Path("/etc/sp/config.yaml"))
    with pytest.raises(ProxyError) as info:
        await session_token_for_config(config, addresses={ADDRESS: ["base"]}, assets=["ETH"])
    assert info.value.code == "onramp_not_configured"
    assert info.value.message.startswith("/etc/sp/config.yaml: ")
    assert ONRAMP_HOST in info.value.message


# --- the CLI, in-process ---------------------------------------------------------------------------


def write_config(tmp_path: Path, config_dict: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict))
    return str(path)


async def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main() runs its own event loop, so it gets a thread while the upstream serves on ours."""
    code = await asyncio.to_thread(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_onramp_url(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = await run_cli(
        ["onramp-url", "--config", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "ethereum,base", "--assets", "ETH,USDC", "--default-network", "base",
         "--preset-fiat-amount", "100", "--client-ip", "8.8.4.4"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.count("\n") == 1
    base, params = query(out.strip())
    assert base == "https://pay.coinbase.com/buy/select-asset"
    assert params == {
        "sessionToken": upstream.onramp_tokens[-1],
        "defaultNetwork": "base",
        "presetFiatAmount": "100",
    }
    assert upstream.onramp_requests[-1] == {
        "addresses": [{"address": ADDRESS, "blockchains": ["ethereum", "base"]}],
        "assets": ["ETH", "USDC"],
        "clientIp": "8.8.4.4",
    }


async def test_cli_offramp_url(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code, out, err = await run_cli(
        ["onramp-url", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "base", "--assets", "USDC", "--offramp", "--partner-user-id", "user123",
         "--redirect-url", "https://yourapp.com/success?order=1", "--default-cashout-method",
         "ACH_BANK_ACCOUNT"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    base, params = query(out.strip())
    assert base == "https://pay.coinbase.com/v3/sell/input"
    assert params == {
        "sessionToken": upstream.onramp_tokens[-1],
        "partnerUserId": "user123",
        "partnerUserRef": "user123",
        "redirectUrl": "https://yourapp.com/success?order=1",
        "defaultCashoutMethod": "ACH_BANK_ACCOUNT",
    }


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--offramp", "--redirect-url", "https://x"], "--offramp needs --partner-user-id"),
        (["--default-cashout-method", "PAYPAL"], "--default-cashout-method is for --offramp"),
    ],
)
async def test_cli_offramp_options_are_checked_before_any_request(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], extra: list[str], problem: str,
) -> None:  # fmt: skip
    code, out, err = await run_cli(
        ["onramp-url", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "base", "--assets", "USDC", *extra],
        capsys,
    )  # fmt: skip
    assert code == 2 and out == "" and problem in err
    assert upstream.received == []


async def test_cli_onramp_401_shows_the_upstream_answer(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    stranger = tmp_path / "unknown_key.json"  # a key the upstream does not know
    pem = ec_pem(ec.generate_private_key(ec.SECP256R1()))
    stranger.write_text(json.dumps({"name": "organizations/x/apiKeys/unknown", "privateKey": pem}))
    config_dict["credentials"]["ed"] = {"key_file": str(stranger)}
    code, out, err = await run_cli(
        ["onramp-url", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "base", "--assets", "USDC"],
        capsys,
    )  # fmt: skip
    assert code == 1 and out == ""
    assert "api.developer.coinbase.com answered 401 Unauthorized" in err
    assert "unknown kid 'organizations/x/apiKeys/unknown'" in err
    assert "BEGIN" not in err and pem.splitlines()[1] not in err


async def test_cli_onramp_missing_key_names_the_credential(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config_dict["credentials"]["ed"] = {"key_file": str(tmp_path / "gone.json")}
    code, out, err = await run_cli(
        ["onramp-url", "-c", write_config(tmp_path, config_dict), "--address", ADDRESS,
         "--blockchains", "base", "--assets", "USDC"],
        capsys,
    )  # fmt: skip
    assert code == 1 and out == ""
    assert "credential 'ed'" in err and "gone.json" in err
    assert upstream.received == []
