"""Topper bootstrap tokens: keygen, the config block, the CLI and the proxy endpoint.

Every token is verified with the *public* JWK that ``keygen`` printed, the way Topper does.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm

from signing_proxy.app import ProxyServer
from signing_proxy.cli import main
from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError, CredentialError
from signing_proxy.topper import (
    BootstrapSigner,
    InvalidFlow,
    parse_topper_key,
    topper_settings,
    validate_flow,
)

from .conftest import MakeProxy, ec_pem
from .upstream import VerifyingUpstream

KEY_ID = "bfbb1e0a-75d6-41eb-af68-6584e167d400"
WIDGET_ID = "29d0ce82-6e7d-498c-a51d-7071de2a48ce"
FLOW: dict[str, Any] = {  # seed 004's crypto on-ramp flow
    "source": {"amount": "100.00", "asset": "USD"},
    "target": {
        "address": "0xb794f5ea0ba39494ce839613fffba74279579268",
        "asset": "ETH",
        "network": "ethereum",
        "label": "My wallet",
    },
}


def keygen(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, str]]:
    assert main(["keygen"]) == 0
    out, err = capsys.readouterr()
    pair: dict[str, dict[str, str]] = json.loads(out)
    assert "publicKey" in err  # the hint goes to stderr, stdout stays pure JSON
    return pair


@pytest.fixture
def keypair(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, str]]:
    return keygen(capsys)


@pytest.fixture
def key_file(tmp_path: Path, keypair: dict[str, dict[str, str]]) -> Path:
    path = tmp_path / "topper.jwk.json"
    path.write_text(json.dumps(keypair))  # keygen's whole output works as the key file
    return path


def topper_block(key_file: Path, **extra: Any) -> dict[str, Any]:
    return {"private_key_file": str(key_file), "key_id": KEY_ID, "widget_id": WIDGET_ID, **extra}


def verify(token: str, public_jwk: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    public = ECAlgorithm.from_jwk(json.dumps(public_jwk))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    claims: dict[str, Any] = jwt.decode(
        token, public, algorithms=["ES256"], options={"require": ["iat", "jti", "sub"]}
    )
    return jwt.get_unverified_header(token), claims


def check_minted(answer: dict[str, Any], public_jwk: dict[str, str], flow: dict[str, Any]) -> None:
    header, claims = verify(answer["token"], public_jwk)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": KEY_ID}
    assert claims == {**flow, "iat": claims["iat"], "jti": answer["jti"], "sub": WIDGET_ID}
    assert abs(claims["iat"] - time.time()) < 5
    assert uuid.UUID(answer["jti"]).version == 4
    parts = urlsplit(answer["url"])
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://app.topperpay.com/"
    assert parse_qs(parts.query) == {"bt": [answer["token"]]}


# --- keys -------------------------------------------------------------------------------------------


def test_keygen_prints_a_p256_pair(keypair: dict[str, dict[str, str]]) -> None:
    private, public = keypair["privateKey"], keypair["publicKey"]
    assert set(private) == {"kty", "crv", "x", "y", "d"} and set(public) == {"kty", "crv", "x", "y"}
    assert private["kty"] == "EC" and private["crv"] == "P-256"
    assert (private["x"], private["y"]) == (public["x"], public["y"])


def test_keygen_makes_a_new_key_each_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert keygen(capsys)["privateKey"]["d"] != keygen(capsys)["privateKey"]["d"]


def test_key_formats(keypair: dict[str, dict[str, str]]) -> None:
    from_jwk = parse_topper_key(json.dumps(keypair["privateKey"]), "k")
    from_pair = parse_topper_key(json.dumps(keypair), "k")
    assert from_jwk.private_numbers() == from_pair.private_numbers()
    pem = ec_pem(from_jwk, "pkcs8")
    assert parse_topper_key(pem.replace("\n", "\\n"), "k").private_numbers() == (
        from_jwk.private_numbers()
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("public", 'this JWK is a public key (no "d")'),
        ("mismatched", "could not be read"),
        ("ed25519", "Topper keys are EC P-256"),
        ('{"kty": "RSA"}', "expected an EC P-256 JWK"),
        ("not a key", "expected a private JWK (JSON) or a PEM key"),
        ("{broken", "not valid JSON"),
    ],
)
def test_bad_keys_are_named_not_echoed(
    keypair: dict[str, dict[str, str]], text: str, problem: str
) -> None:
    other = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    text = {
        "public": json.dumps(keypair["publicKey"]),
        "mismatched": json.dumps({**keypair["privateKey"], "d": other["d"]}),
        "ed25519": ec_pem(ed25519.Ed25519PrivateKey.generate(), "pkcs8"),  # type: ignore[arg-type]
    }.get(text, text)
    with pytest.raises(CredentialError) as info:
        parse_topper_key(text, "topper file /k.json")
    assert info.value.message.startswith("topper file /k.json: ")
    assert problem in info.value.message
    assert (
        keypair["privateKey"]["d"] not in info.value.message
        and other["d"] not in info.value.message
    )


# --- the config block --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"key_id": None}, "topper.key_id", "expected a non-empty string"),
        ({"widget_id": "<flow/widget UUID>"}, "topper.widget_id", "a UUID"),
        ({"environment": "staging"}, "topper.environment", "'production' or 'sandbox'"),
        ({"flow": "swap"}, "topper.flow", "crypto_onramp"),
        ({"kid": KEY_ID}, "topper", "unknown field 'kid'"),
        ({"private_key_file": None}, "topper", "give private_key_file"),
        ({"private_key_env": "TOPPER_KEY"}, "topper", "give only one of"),
    ],
)
def test_config_block_errors_name_file_and_field(
    config_dict: dict[str, Any], key_file: Path, change: dict[str, Any], field: str, problem: str
) -> None:
    config_dict["topper"] = {**topper_block(key_file), **change}
    with pytest.raises(ConfigError) as info:  # config owns the section: checked at load
        parse_config(config_dict, Path("/etc/sp/config.yaml"))
    assert info.value.message.startswith(f"/etc/sp/config.yaml: {field}: ")
    assert problem in info.value.message


def test_config_block_defaults(config_dict: dict[str, Any], key_file: Path) -> None:
    assert topper_settings(parse_config(config_dict)) is None
    config_dict["topper"] = topper_block(key_file, environment="sandbox")
    settings = topper_settings(parse_config(config_dict))
    assert settings is not None
    assert (settings.key_id, settings.widget_id, settings.flow) == (
        KEY_ID,
        WIDGET_ID,
        "crypto_onramp",
    )
    assert settings.start_url == "https://app.sandbox.topperpay.com/"


# --- flows ----------------------------------------------------------------------------------------


def _without(path: str) -> dict[str, Any]:
    flow = json.loads(json.dumps(FLOW))
    part, name = path.split(".")
    del flow[part][name]
    return flow


INVALID_FLOWS = [
    (_without("target.address"), "target.address is required"),
    (_without("target.network"), "target.network is required"),
    (_without("target.asset"), "target.asset is required"),
    (_without("source.asset"), "source.asset is required"),
    (_without("source.amount"), "give exactly one of source.amount and target.amount"),
    ({**FLOW, "target": {**FLOW["target"], "amount": "0.1"}}, "exactly one of source.amount and target.amount, not both"),
    ({**FLOW, "source": {"amount": 100, "asset": "USD"}}, "source.amount must be a positive decimal string"),
    ({**FLOW, "source": {"amount": "-5", "asset": "USD"}}, "source.amount must be a positive decimal string"),
    ({**FLOW, "jti": "mine"}, "jti is set by the proxy"),
    ({**FLOW, "sub": WIDGET_ID}, "sub is set by the proxy"),
    ({**FLOW, "target": "0xb794"}, "target must be an object"),
    ([FLOW], "the flow must be a JSON object"),
]  # fmt: skip


@pytest.mark.parametrize(("flow", "problem"), INVALID_FLOWS)
def test_invalid_flows_name_the_field(flow: Any, problem: str) -> None:
    with pytest.raises(InvalidFlow) as info:
        validate_flow(flow)
    assert problem in info.value.message and info.value.status == 400


def test_offramp_flow_rules() -> None:
    flow = {
        "source": {"asset": "ETH", "amount": "1", "network": "ethereum"},
        "target": {"asset": "USD"},
    }
    assert validate_flow(flow, "crypto_offramp") == flow  # no target address off-ramp
    with pytest.raises(InvalidFlow, match="exactly one"):
        validate_flow({"target": {"asset": "USD"}}, "crypto_offramp")


def test_signer_claims_and_unique_jti(config_dict: dict[str, Any], key_file: Path, keypair: dict[str, dict[str, str]]) -> None:  # fmt: skip
    config_dict["topper"] = topper_block(key_file)
    settings = topper_settings(parse_config(config_dict))
    assert settings is not None
    signer = BootstrapSigner(
        settings, parse_topper_key(key_file.read_text(), "k"), clock=lambda: 1679321246.9
    )
    before = json.dumps(FLOW)
    minted = [signer.mint(FLOW) for _ in range(50)]
    assert len({m.jti for m in minted}) == 50
    _, claims = verify(minted[0].token, keypair["publicKey"])
    assert claims["iat"] == 1679321246 and claims["sub"] == WIDGET_ID
    assert json.dumps(FLOW) == before  # the caller's flow is not modified


# --- the endpoint on the proxy ------------------------------------------------------------------------


@pytest.fixture
async def topper_proxy(
    make_proxy: MakeProxy, config_dict: dict[str, Any], key_file: Path
) -> ProxyServer:
    config_dict["topper"] = topper_block(key_file)
    return await make_proxy(config_dict)


def endpoint(proxy: ProxyServer) -> str:
    return f"http://127.0.0.1:{proxy.port(0)}/topper/bootstrap-token"


async def test_endpoint_mints_a_verifiable_token(
    topper_proxy: ProxyServer, client: aiohttp.ClientSession,
    keypair: dict[str, dict[str, str]], upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    answers = []
    for _ in range(3):
        async with client.post(endpoint(topper_proxy), json=FLOW) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Request-Id"]
            answers.append(await resp.json())
    for answer in answers:
        assert set(answer) == {"token", "url", "jti"}
        check_minted(answer, keypair["publicKey"], FLOW)
    assert len({a["jti"] for a in answers}) == 3
    assert upstream.received == []  # minted here, never routed
    registry = topper_proxy.metrics.registry
    labels = {"credential": "topper", "algorithm": "ES256"}
    assert registry.get_sample_value("signing_proxy_tokens_minted_total", labels) == 3
    requests = {"upstream": "-", "method": "POST", "route": "/topper/bootstrap-token", "status_class": "2xx"}  # fmt: skip
    assert registry.get_sample_value("signing_proxy_requests_total", requests) == 3


@pytest.mark.parametrize(("flow", "problem"), INVALID_FLOWS[:4])
async def test_endpoint_refuses_invalid_flows_naming_the_field(
    topper_proxy: ProxyServer, client: aiohttp.ClientSession, flow: Any, problem: str
) -> None:
    async with client.post(endpoint(topper_proxy), json=flow) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "invalid_flow", "message": problem}


async def test_endpoint_refusals(topper_proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    async with client.post(endpoint(topper_proxy), data=b"{not json") as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_flow"
    big = {**FLOW, "partner": {"displayName": "x" * 70_000}}
    async with client.post(endpoint(topper_proxy), json=big) as resp:
        body = await resp.json()
        assert resp.status == 413 and body["error"] == "body_too_large"
        assert "flow size limit (65536)" in body["message"]
    async with client.get(endpoint(topper_proxy)) as resp:
        assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"
    assert topper_proxy.metrics.registry.get_sample_value(
        "signing_proxy_tokens_minted_total", {"credential": "topper", "algorithm": "ES256"}
    ) in (None, 0.0)


async def test_endpoint_absent_without_topper_config(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    async with client.post(endpoint(proxy), json=FLOW) as resp:
        data = await resp.json()
    assert resp.status == 200 and set(data) != {"token", "url", "jti"}
    # routed like any other path: to the catch-all upstream, signed
    assert (data["host"], data["path"], data["auth"]) == ("api.coinbase.com", "/topper/bootstrap-token", "jwt")  # fmt: skip


async def test_endpoint_needs_the_inbound_token_when_configured(
    make_proxy: MakeProxy, config_dict: dict[str, Any], key_file: Path,
    client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SP_TOKEN", "gateway-token")
    config_dict["inbound_auth"] = {"token_env": "SP_TOKEN"}
    config_dict["topper"] = topper_block(key_file)
    proxy = await make_proxy(config_dict)
    async with client.post(endpoint(proxy), json=FLOW) as resp:
        assert resp.status == 407
    headers = {"Proxy-Authorization": "Bearer gateway-token"}
    async with client.post(endpoint(proxy), json=FLOW, headers=headers) as resp:
        assert resp.status == 200


async def test_missing_key_answers_503_and_the_rest_still_works(
    make_proxy: MakeProxy, config_dict: dict[str, Any], tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    config_dict["topper"] = topper_block(tmp_path / "not-there.jwk.json")
    proxy = await make_proxy(config_dict)
    async with client.post(endpoint(proxy), json=FLOW) as resp:
        body = await resp.json()
    assert resp.status == 503 and body["error"] == "credential_unavailable"
    assert "not-there.jwk.json" in body["message"]
    async with client.get(f"http://127.0.0.1:{proxy.port(0)}/api/v3/brokerage/accounts") as resp:
        assert resp.status == 200


async def test_invalid_block_stops_the_proxy_from_starting(
    make_proxy: MakeProxy, config_dict: dict[str, Any], key_file: Path
) -> None:
    config_dict["topper"] = topper_block(key_file, environment="prod")
    with pytest.raises(ConfigError, match=r"topper\.environment"):
        await make_proxy(config_dict)


# --- the CLI ----------------------------------------------------------------------------------------


def write_config(tmp_path: Path, config_dict: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict))
    return str(path)


@pytest.fixture
def cli_files(tmp_path: Path, config_dict: dict[str, Any], key_file: Path) -> tuple[str, str]:
    config_dict["topper"] = topper_block(key_file, environment="sandbox")
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(FLOW))
    return write_config(tmp_path, config_dict), str(flow)


@pytest.mark.parametrize("shown", ["token", "--url", "--json"])
def test_cli_topper_token(
    cli_files: tuple[str, str], keypair: dict[str, dict[str, str]],
    capsys: pytest.CaptureFixture[str], shown: str,
) -> None:  # fmt: skip
    config, flow = cli_files
    argv = ["topper-token", "--config", config, "--payload", flow]
    assert main(argv if shown == "token" else [*argv, shown]) == 0
    out = capsys.readouterr().out.strip()
    if shown == "--json":
        answer = json.loads(out)
    elif shown == "--url":
        assert out.startswith("https://app.sandbox.topperpay.com/?bt=")
        answer = {"token": out.split("?bt=", 1)[1]}
    else:
        answer = {"token": out}
    header, claims = verify(answer["token"], keypair["publicKey"])
    assert header["kid"] == KEY_ID and claims["sub"] == WIDGET_ID
    assert {k: claims[k] for k in FLOW} == FLOW
    if shown == "--json":
        assert answer["jti"] == claims["jti"]
        assert answer["url"] == f"https://app.sandbox.topperpay.com/?bt={answer['token']}"


def test_cli_topper_token_invalid_flow_and_missing_block(
    cli_files: tuple[str, str], tmp_path: Path, config_dict: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config, _ = cli_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_without("target.address")))
    assert main(["topper-token", "-c", config, "--payload", str(bad)]) == 1
    assert "target.address is required" in capsys.readouterr().err
    bad.write_text("{")
    assert main(["topper-token", "-c", config, "--payload", str(bad)]) == 1
    assert "not valid JSON at line 1" in capsys.readouterr().err
    del config_dict["topper"]
    plain = write_config(tmp_path, config_dict)
    assert main(["topper-token", "-c", plain, "--payload", str(bad)]) == 2
    assert "no topper: block" in capsys.readouterr().err


def test_cli_check_shows_the_topper_key_not_the_secret(
    cli_files: tuple[str, str], keypair: dict[str, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config, _ = cli_files
    assert main(["check", "-c", config]) == 0
    out = capsys.readouterr().out
    assert f"topper: ES256 key {KEY_ID} fingerprint SHA256:" in out
    assert f"widget {WIDGET_ID} (crypto_onramp, sandbox)" in out
    assert keypair["privateKey"]["d"] not in out


def test_cli_check_refuses_a_bad_block(
    tmp_path: Path, config_dict: dict[str, Any], key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_dict["topper"] = topper_block(key_file, key_id="not-a-uuid")
    assert main(["check", "-c", write_config(tmp_path, config_dict)]) == 2
    assert "topper.key_id: expected the key id Topper gave you (a UUID)" in capsys.readouterr().err


async def test_cli_and_endpoint_tokens_verify_with_the_same_public_key(
    topper_proxy: ProxyServer, client: aiohttp.ClientSession, cli_files: tuple[str, str],
    keypair: dict[str, dict[str, str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    config, flow = cli_files
    code = await asyncio.to_thread(main, ["topper-token", "-c", config, "--payload", flow])
    assert code == 0
    async with client.post(endpoint(topper_proxy), json=FLOW) as resp:
        answer = await resp.json()
    for token in (capsys.readouterr().out.strip(), answer["token"]):
        assert verify(token, keypair["publicKey"])[1]["sub"] == WIDGET_ID


async def test_endpoint_follows_key_rotation_like_a_secret_volume(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Kubernetes swaps ..data atomically; a broken new key keeps the last good one."""
    volume = tmp_path / "secret"
    volume.mkdir()
    first, second = keygen(capsys), keygen(capsys)

    def publish(version: str, content: str) -> None:
        (volume / version).mkdir()
        (volume / version / "topper.json").write_text(content)
        (volume / "..data_tmp").symlink_to(version)
        os.replace(volume / "..data_tmp", volume / "..data")

    (volume / "topper.json").symlink_to("..data/topper.json")
    config_dict["topper"] = topper_block(volume / "topper.json")
    proxy = await make_proxy(config_dict)  # no key yet: 503 until it appears

    async def mint() -> tuple[int, dict[str, Any]]:
        async with client.post(endpoint(proxy), json=FLOW) as resp:
            return resp.status, await resp.json()

    status, body = await mint()
    assert status == 503 and body["error"] == "credential_unavailable"
    publish("..v1", json.dumps(first))
    status, body = await mint()
    assert status == 200
    check_minted(body, first["publicKey"], FLOW)
    publish("..v2", json.dumps(second))
    status, body = await mint()
    assert status == 200
    check_minted(body, second["publicKey"], FLOW)
    publish("..v3", '{"kty": "EC", "crv": "P-256", "d": "broken"}')
    status, body = await mint()
    assert status == 200
    check_minted(body, second["publicKey"], FLOW)  # the last good key
