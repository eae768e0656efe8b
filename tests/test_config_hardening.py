"""Config-level safety: non-loopback listeners need inbound auth, the admin listener is loopback by
default, the inbound token is compared in constant time, and the new limits validate."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signing_proxy.config import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    parse_config,
)
from signing_proxy.errors import ConfigError

from .conftest import MakeProxy
from .helpers import base, fetch
from .upstream import VerifyingUpstream

TOKEN = "gateway-token-0123456789abcdef"


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "proxy:8080"])
def test_non_loopback_listen_refused_without_inbound_auth(
    config_dict: dict[str, Any], tmp_path: Path, listen: str
) -> None:
    config_dict["listen"] = listen
    with pytest.raises(ConfigError) as info:
        parse_config(config_dict, tmp_path / "c.yaml")
    message = str(info.value)
    assert "c.yaml: listen:" in message and "inbound_auth" in message


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080", "127.8.9.1:1"]
)
def test_loopback_listen_needs_no_inbound_auth(
    config_dict: dict[str, Any], tmp_path: Path, listen: str
) -> None:
    config_dict["listen"] = listen
    assert parse_config(config_dict, tmp_path / "c.yaml").listen.is_loopback


def test_non_loopback_listen_accepted_with_inbound_auth(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["listen"] = "0.0.0.0:8080"
    config_dict["inbound_auth"] = {"token_env": "SP_TOKEN"}
    config = parse_config(config_dict, tmp_path / "c.yaml")
    assert not config.listen.is_loopback and config.inbound_token is not None
    config_dict["inbound_auth"] = {"token": TOKEN}  # inline: accepted, never shown
    config = parse_config(config_dict, tmp_path / "c.yaml")
    assert TOKEN not in repr(config)


def test_admin_listener_is_loopback_by_default(config_dict: dict[str, Any], tmp_path: Path) -> None:
    del config_dict["admin_listen"]
    config = parse_config(config_dict, tmp_path / "c.yaml")
    assert config.admin_listen.is_loopback and config.admin_listen.port == 9090


def test_hardening_defaults_and_validation(config_dict: dict[str, Any], tmp_path: Path) -> None:
    config = parse_config(config_dict, tmp_path / "c.yaml")
    assert config.header_timeout == DEFAULT_HEADER_TIMEOUT
    assert config.max_header_bytes == DEFAULT_MAX_HEADER_BYTES
    assert config.max_stream_body_bytes is None  # streamed uploads: no cap unless configured
    assert all(up.retries == 1 for up in config.upstreams.values())
    for field, value, problem in [
        ("header_timeout", 0, "header_timeout: must be greater than 0"),
        ("max_header_bytes", 100, "max_header_bytes: expected a whole number >= 1024"),
        ("max_stream_body_bytes", -1, "max_stream_body_bytes: expected a whole number >= 1"),
    ]:
        bad = {**config_dict, field: value}
        with pytest.raises(ConfigError, match=problem):
            parse_config(bad, tmp_path / "c.yaml")
    config_dict["upstreams"]["api.coinbase.com"]["retries"] = -1
    with pytest.raises(ConfigError, match=r"upstreams\.api\.coinbase\.com\.retries"):
        parse_config(config_dict, tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "offered",
    [
        "",
        TOKEN[:-1],  # a prefix
        TOKEN + "x",  # longer
        TOKEN.upper(),
        "gateway-token-0123456789abcdeX",  # same length, last byte differs
        "gätewäy-tøken",  # not ASCII: must be a 407, not a 500
    ],
)
async def test_wrong_inbound_tokens_are_refused_in_constant_time(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, monkeypatch: pytest.MonkeyPatch, offered: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("SP_TOKEN", TOKEN)
    config_dict["inbound_auth"] = {"token_env": "SP_TOKEN"}
    proxy = await make_proxy(config_dict)
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    url = f"{base(proxy)}/api/v3/brokerage/accounts"
    headers = {"Proxy-Authorization": f"Bearer {offered}".encode().decode("latin-1")}
    status, data, _, _ = await fetch(client, "GET", url, headers=headers)
    assert status == 407 and data is not None and data["error"] == "proxy_auth_required"
    assert compared and compared[-1][1] == TOKEN.encode()  # the constant-time path decided
    assert TOKEN not in str(data)
    status, _, _, _ = await fetch(client, "GET", url, headers={"X-Signing-Proxy-Token": TOKEN})
    assert status == 200
    assert upstream.received and len(upstream.received) == 1
