"""The command line as users run it: serve (a real process), check, jwt, and curl through it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import EC_KEY_NAME, HMAC_SECRET
from .proc import ProxyProcess, free_port, write_config
from .upstream import VerifyingUpstream

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_jwt_command_prints_a_token_that_verifies(
    ec_key_file: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    result = run_cli(
        "jwt",
        "--key-file",
        str(ec_key_file),
        "get",
        "https://api.coinbase.com/api/v3/brokerage/accounts?limit=1",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, ec_key.public_key(), algorithms=["ES256"])
    assert claims["uri"] == "GET api.coinbase.com/api/v3/brokerage/accounts"
    assert claims["sub"] == EC_KEY_NAME and claims["exp"] - claims["nbf"] == 120
    assert abs(claims["nbf"] - time.time()) < 5


def test_jwt_export_form(ec_key_file: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    result = run_cli(
        "jwt",
        "--export",
        "--key-file",
        str(ec_key_file),
        "POST",
        "api.developer.coinbase.com/onramp/v1/token",
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("export JWT=")
    claims = jwt.decode(line.removeprefix("export JWT="), ec_key.public_key(), algorithms=["ES256"])
    assert claims["uris"] == ["POST api.developer.coinbase.com/onramp/v1/token"]  # cdp-sdk form
    assert "uri" not in claims


def test_jwt_bad_key_file_is_clear(tmp_path: Path) -> None:
    key = tmp_path / "k.json"
    key.write_text(
        json.dumps(
            {
                "name": "k",
                "privateKey": "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----",
            }
        )
    )
    result = run_cli("jwt", "--key-file", str(key), "GET", "api.coinbase.com/x")
    assert (
        result.returncode == 1
        and "looks like a public key" in result.stderr
        and "MFkw" not in result.stderr
    )


def test_check_prints_fingerprints_never_secrets(
    config_dict: dict[str, Any], tmp_path: Path, ec_key_file: Path
) -> None:
    result = run_cli("check", "-c", str(write_config(tmp_path / "c.yaml", config_dict)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"credential trading: ES256 key {EC_KEY_NAME} fingerprint SHA256:" in out
    assert "credential ed: EdDSA key" in out and "credential legacy: HMAC key legacyApiKey42" in out
    pem = json.loads(ec_key_file.read_text())["privateKey"]
    for secret in [HMAC_SECRET, *pem.splitlines()[1:-1]]:
        assert secret not in out + result.stderr


def test_check_shows_policies_rate_limits_and_retries(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["credentials"]["trading"]["policy"] = {
        "allow": ["GET /api/v3/**"],
        "deny": ["POST /api/v3/brokerage/orders"],
    }
    config_dict["credentials"]["trading"]["rate_limit"] = {"rate": 2.5, "burst": 5}
    config_dict["upstreams"]["api.coinbase.com"]["retries"] = 0
    config_dict["routes"][0]["policy"] = {"deny": ["DELETE /**"]}
    result = run_cli("check", "-c", str(write_config(tmp_path / "c.yaml", config_dict)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  policy: allow GET /api/v3/**; deny POST /api/v3/brokerage/orders" in out
    assert "  rate limit: 2.5/s, burst 5" in out
    assert "upstream api.coinbase.com via https://127.0.0.1:" in out and "retries 0" in out
    assert "  policy: allow everything not denied; deny DELETE /**" in out


def test_check_fails_naming_the_problem(tmp_path: Path) -> None:
    # A copy: what the user keeps in the checkout's secrets/ must not change the outcome.
    config = shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    assert (
        "credential 'trading'" in result.stderr
        and "cdp_api_key.json does not exist" in result.stderr
    )


def test_check_passes_once_the_quick_start_key_is_saved(tmp_path: Path, ec_key_file: Path) -> None:
    """Quick start step 1 (a key in secrets/ next to the example) makes `check` pass."""
    config = shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    (tmp_path / "secrets").mkdir()
    shutil.copy(ec_key_file, tmp_path / "secrets" / "cdp_api_key.json")
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "credential trading: ES256 key" in result.stdout


def test_check_config_error_exit_2(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        "-c",
        str(write_config(tmp_path / "c.yaml", {"upstreams": {"x.com": {"bogus": 1}}})),
    )
    assert result.returncode == 2 and "upstreams.x.com: unknown field 'bogus'" in result.stderr


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("serve", "check", "jwt"):
        assert word in result.stdout


async def test_serve_example_config_without_keys(tmp_path: Path) -> None:
    """The README's run command: starts, /healthz 200, /readyz says what is missing, requests get JSON."""
    raw = (ROOT / "config.example.yaml").read_text()
    port, admin = free_port(), free_port()
    raw = raw.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
        "127.0.0.1:9090", f"127.0.0.1:{admin}"
    )
    config = tmp_path / "config.yaml"
    config.write_text(raw)
    proxy = ProxyProcess(config)
    try:
        await proxy.wait_ready(f"http://127.0.0.1:{admin}")
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                assert resp.status == 503
                ready = await resp.json()
            assert "cdp_api_key.json does not exist" in ready["missing"][0]
            async with client.get(f"http://127.0.0.1:{port}/api/v3/brokerage/accounts") as resp:
                assert resp.status == 503
                body = await resp.json()
            assert body["error"] == "credential_unavailable" and "trading" in body["message"]
    finally:
        assert proxy.stop() == 0
    log = proxy.output()
    assert "credential not loaded" in log and '"msg": "request"' in log


async def run_async(command: list[str]) -> tuple[int, str, str]:
    """Run a command without blocking the loop the in-process upstream answers on."""
    proc = await asyncio.create_subprocess_exec(*command, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is required for these tests (apt-get install curl); .ci/run installs it")
    return path


async def test_curl_through_both_modes(
    curl: str, config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    config_dict.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}")
    proxy = ProxyProcess(write_config(tmp_path / "config.yaml", config_dict))
    try:
        await proxy.wait_ready(f"http://127.0.0.1:{admin}", path="/readyz")
        commands = [
            [curl, "-sS", f"http://127.0.0.1:{port}/api/v3/brokerage/accounts?limit=1"],
            [curl, "-sS", "-x", f"http://127.0.0.1:{port}", "http://api.coinbase.com/api/v3/brokerage/accounts?limit=1"],
            [curl, "-sS", "-x", f"http://127.0.0.1:{port}", "-X", "POST", "-d", '{"a":1}',
             "http://api.developer.coinbase.com/onramp/v1/buy/quote"],
        ]  # fmt: skip
        for command in commands:
            code, out, err = await run_async(command)
            assert code == 0, err
            data = json.loads(out)
            assert data["auth"] == "jwt", data
        assert (
            data["claims"]["uris"] == ["POST api.developer.coinbase.com/onramp/v1/buy/quote"]
            and data["body_len"] == 7
        )
        # https:// through the proxy means CONNECT: refused, and curl says so
        code, _, err = await run_async(
            [curl, "-sS", "-x", f"http://127.0.0.1:{port}", "https://api.coinbase.com/api/v3/x"]
        )
        assert code != 0 and "405" in err
    finally:
        proxy.stop()


def test_check_says_how_route_policies_combine_and_where_they_can_be_dodged(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["routes"] = [
        {"prefix": "/readonly/", "upstream": "api.coinbase.com", "strip_prefix": True,
         "policy": {"allow": ["GET /api/v3/brokerage/accounts/**"]}},
        {"prefix": "/v2/", "upstream": "api.coinbase.com", "credential": "legacy"},
        {"prefix": "/", "upstream": "api.coinbase.com", "policy": {"deny": ["DELETE /**"]}},
    ]  # fmt: skip
    config_dict["forward_proxy"] = False
    result = run_cli("check", "-c", str(write_config(tmp_path / "c.yaml", config_dict)))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # The strip_prefix route fences its credential on every way in, and says what it cannot fence.
    assert (
        "enforced on every request signed with credential trading to api.coinbase.com "
        "(strip_prefix reaches any path), whichever way it comes (route /readonly/, route /)"
    ) in out
    assert "warning: api.coinbase.com is also reachable with credential legacy" in out
    # A route that keeps its prefix fences those upstream paths for everyone.
    assert "whose path is under / (in any spelling), whichever route, mode or credential" in out
    assert "forward-proxy mode (absolute URLs, curl -x): off (forward_proxy: false)" in out
