"""Config validation: fail fast, once, naming file and field, never echoing a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from signing_proxy.config import load_config, parse_config
from signing_proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "credentials": {"trading": {"key_file": "key.json"}},
        "upstreams": {"api.coinbase.com": {"credential": "trading"}},
        "routes": [{"prefix": "/", "upstream": "api.coinbase.com"}],
    }
    raw.update(extra)
    return raw


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.yaml")
    assert str(config.listen) == "127.0.0.1:8080" and str(config.admin_listen) == "127.0.0.1:9090"
    assert config.credentials["trading"].key_file == ROOT / "secrets" / "cdp_api_key.json"
    assert set(config.upstreams) >= {
        "api.coinbase.com",
        "api.developer.coinbase.com",
        "api.cdp.coinbase.com",
    }


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = parse_config(minimal(), tmp_path / "c.yaml")
    up = config.upstreams["api.coinbase.com"]
    assert (up.url, up.timeout, up.ca_file) == ("https://api.coinbase.com", 30.0, None)
    assert config.credentials["trading"].key_file == tmp_path / "key.json"
    assert config.drain_timeout == 20 and config.log_format == "json"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"listn": "x"}, "top level: unknown field 'listn' (did you mean 'listen'?)"),
        ({"listen": "0.0.0.0:8080"}, "listen: 0.0.0.0:8080 is not a loopback address"),
        ({"listen": "localhost"}, "listen: expected HOST:PORT"),
        ({"upstreams": {}}, "upstreams: configure at least one upstream"),
        (
            {"upstreams": {"https://api.coinbase.com": {}}},
            "upstreams.https://api.coinbase.com: an upstream is named by its host name",
        ),
        (
            {"upstreams": {"api.coinbase.com": {"url": "http://127.0.0.1:1"}}},
            "upstreams.api.coinbase.com.url: must be https://",
        ),
        (
            {"upstreams": {"api.coinbase.com": {"url": "https://x/path"}}},
            "give only scheme, host and port",
        ),
        ({"upstreams": {"api.coinbase.com": {"credential": "nope"}}}, "no credential named 'nope'"),
        ({"upstreams": {"api.coinbase.com": {"timeout": -1}}}, "timeout: must be greater than 0"),
        (
            {"routes": [{"prefix": "x", "upstream": "api.coinbase.com"}]},
            "routes[0].prefix: must start with '/'",
        ),
        (
            {"routes": [{"prefix": "/", "upstream": "evil.com"}]},
            "routes[0].upstream: 'evil.com' is not one of upstreams",
        ),
        (
            {"credentials": {"t": {"key_file": "k", "private_key": "x"}}},
            "give key_file, or key_name + private_key, not both",
        ),
        ({"credentials": {"t": {"key_name": "k"}}}, "a CDP credential needs key_file"),
        (
            {"credentials": {"t": {"type": "hmac", "api_key": "k"}}},
            "an hmac credential needs api_key",
        ),
        (
            {"credentials": {"t": {"type": "rsa"}}},
            "credentials.t.type: expected one of cdp, hmac, exchange, prime, intx",
        ),
        (
            {"credentials": {"t": {"key_name": "k", "private_key": "a", "private_key_env": "B"}}},
            "give only one of private_key, private_key_env",
        ),
        ({"log_format": "xml"}, "log_format: expected 'json' or 'text'"),
        ({"inbound_auth": {"token_envv": "X"}}, "did you mean 'token_env'?"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    raw = minimal()
    raw.update(change)
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "c.yaml")
    assert expected in info.value.message
    assert info.value.message.startswith(str(tmp_path / "c.yaml"))


def test_non_loopback_listen_allowed_with_inbound_auth() -> None:
    config = parse_config(minimal(listen="0.0.0.0:8080", inbound_auth={"token_env": "TOKEN"}))
    assert config.listen.host == "0.0.0.0" and config.inbound_token is not None


def test_inline_secret_never_in_errors(tmp_path: Path) -> None:
    raw = minimal(
        credentials={"t": {"type": "hmac", "api_key": "k", "api_secret": "TOPSECRET", "bogus": 1}}
    )
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "TOPSECRET" not in info.value.message


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
