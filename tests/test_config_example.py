"""config.example.yaml: it starts as it is, and every setting it shows commented out is valid."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from signing_proxy.app import ProxyServer
from signing_proxy.config import ListenAddress, load_config, parse_config
from signing_proxy.topper import topper_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.yaml"
# "  # key: value" or "  # - {prefix: ...}": a setting shown commented out (prose stays prose).
_COMMENTED = re.compile(r"^(?P<indent>\s*)# (?P<rest>\s*(?:[\w.-]+:(?:\s|$)|- \{).*)$")


def uncommented(text: str) -> str:
    return "\n".join(
        m["indent"] + m["rest"] if (m := _COMMENTED.match(line)) else line
        for line in text.splitlines()
    )


async def test_example_starts_without_keys(tmp_path: Path) -> None:
    # A copy, so a key the user saved in the checkout's secrets/ does not make it ready.
    config = load_config(shutil.copy(EXAMPLE, tmp_path / "config.yaml"))
    assert topper_settings(config) is None
    free = ListenAddress("127.0.0.1", 0)
    server = ProxyServer(
        dataclasses.replace(config, listen=free, admin_listen=free), registry=CollectorRegistry()
    )
    await server.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{server.port(1)}/healthz") as resp:
                assert resp.status == 200
            async with client.get(f"http://127.0.0.1:{server.port(1)}/readyz") as resp:
                assert resp.status == 503  # no key yet, and it says so
                assert "cdp_api_key.json" in str(await resp.json())
    finally:
        await server.stop()


def test_commented_settings_are_valid_when_uncommented() -> None:
    config = parse_config(yaml.safe_load(uncommented(EXAMPLE.read_text())), EXAMPLE)
    assert config.upstreams["api.coinbase.com"].tls_server_name == "api.coinbase.com"
    ws_user = config.upstreams["advanced-trade-ws-user.coinbase.com"]
    assert (ws_user.credential, ws_user.url) == (
        "trading",
        "wss://advanced-trade-ws-user.coinbase.com",
    )
    drb = config.upstreams["drb.coinbase.com"]
    assert (drb.credential, drb.auth, drb.websocket) == ("trading", "token_exchange", True)
    routes = {r.prefix: r for r in config.routes}
    assert routes["/drb"].strip_prefix
    assert routes["/ws/user"].strip_prefix and routes["/ws"].strip_prefix
    prefixes = [r.prefix for r in config.routes]
    assert prefixes.index("/ws/user") < prefixes.index("/ws") < prefixes.index("/")
    settings = topper_settings(config)
    assert settings is not None and settings.environment == "production"
    assert settings.private_key.ref == str(EXAMPLE.parent / "secrets" / "topper.jwk.json")
    assert {"from-env", "legacy"} <= set(config.credentials) and config.inbound_token is not None
    venues = {name: config.credentials[name].type for name in ("exchange", "prime", "intx")}
    assert venues == {"exchange": "exchange", "prime": "prime", "intx": "intx"}
    assert config.upstreams["ws-feed.exchange.coinbase.com"].credential == "exchange"
    assert prefixes.index("/ws/exchange") < prefixes.index("/ws") and "/prime/" in prefixes
    wallet = config.credentials["trading"].wallet_secret
    assert wallet is not None and wallet.ref == str(
        EXAMPLE.parent / "secrets" / "cdp_wallet_secret"
    )
    cdp = config.upstreams["api.cdp.coinbase.com"]
    assert cdp.jwt_uri_claim == "uris" and len(cdp.wallet_rules) == 26 + 14 + 1
