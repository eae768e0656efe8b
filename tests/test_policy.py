"""Allow/deny rules per credential or route: compiled at config load, checked before signing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError
from signing_proxy.policy import Policy, PolicyError, Rule

from .conftest import MakeProxy
from .helpers import base, fetch, metric
from .upstream import VerifyingUpstream

READ_ONLY = {"allow": ["GET /api/v3/**", "POST /api/v3/brokerage/orders/preview"]}


@pytest.mark.parametrize(
    ("rule", "method", "path", "matches"),
    [
        ("GET /api/v3/**", "GET", "/api/v3", True),
        ("GET /api/v3/**", "GET", "/api/v3/", True),
        ("GET /api/v3/**", "GET", "/api/v3/brokerage/accounts/abc", True),
        ("GET /api/v3/**", "GET", "/api/v30/x", False),
        ("GET /api/v3/**", "POST", "/api/v3/x", False),
        ("* /api/v3/**", "DELETE", "/api/v3/x", True),
        ("/api/v3/**", "PATCH", "/api/v3/x", True),
        ("GET /api/v3/brokerage/*/accounts", "GET", "/api/v3/brokerage/x/accounts", True),
        ("GET /api/v3/brokerage/*/accounts", "GET", "/api/v3/brokerage/x/y/accounts", False),
        ("GET /api/**/accounts", "GET", "/api/accounts", True),
        ("GET /api/**/accounts", "GET", "/api/v3/brokerage/accounts", True),
        ("GET /api/v3/products/*-USD", "GET", "/api/v3/products/BTC-USD", True),
        ("GET /api/v3/products/*-USD", "GET", "/api/v3/products/BTC-EUR", False),
        ("post /x", "POST", "/x", True),
    ],
)
def test_glob(rule: str, method: str, path: str, matches: bool) -> None:
    assert Rule.parse(rule).matches(method, path) is matches


def test_deny_wins_and_allow_list_closes_everything_else() -> None:
    policy = Policy.compile(
        ["GET /api/v3/**", "POST /api/v3/brokerage/orders/**"],
        ["POST /api/v3/brokerage/orders/batch_cancel"],
    )
    assert policy.denial("GET", "/api/v3/brokerage/accounts") is None
    assert policy.denial("POST", "/api/v3/brokerage/orders/preview") is None
    assert "denied by rule" in (
        policy.denial("POST", "/api/v3/brokerage/orders/batch_cancel") or ""
    )
    assert "not matched" in (policy.denial("DELETE", "/api/v3/brokerage/x") or "")
    assert Policy.compile(None, ["DELETE /**"]).denial("GET", "/anything") is None


@pytest.mark.parametrize(
    "path",
    [
        "/api/v3/brokerage/orders",
        "/api/v3/brokerage/%6Frders",  # percent-encoded unreserved letter
        "/api/v3/brokerage%2Forders",  # encoded slash
        "/api/v3//brokerage/orders",  # repeated slash
        "/api/v3/brokerage/orders/",  # trailing slash
        "/API/V3/Brokerage/ORDERS",  # letter case
    ],
)
def test_deny_cannot_be_dodged_by_spelling_the_path_differently(path: str) -> None:
    deny = Policy.compile(None, ["POST /api/v3/brokerage/orders"])
    assert deny.denial("POST", path) is not None
    allow = Policy.compile(["GET /api/v3/**", "POST /api/v3/brokerage/orders/preview"])
    assert allow.denial("POST", path) is not None


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("GET api/v3", "must start with '/'"),
        ("GET /a /b", "expected 'METHOD /path/glob'"),
        ("G3T /a", "not an HTTP method"),
        ("GET /a?x=1", "drop the query"),
    ],
)
def test_bad_rules_are_refused(rule: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        Rule.parse(rule)


def test_config_names_file_and_field_of_a_bad_policy(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    config_dict["credentials"]["trading"]["policy"] = {"allow": ["GET api/v3/**"]}
    with pytest.raises(ConfigError) as info:
        parse_config(config_dict, tmp_path / "proxy.yaml")
    assert "proxy.yaml: credentials.trading.policy:" in str(info.value)
    config_dict["credentials"]["trading"]["policy"] = {"alow": ["GET /x"]}
    with pytest.raises(ConfigError, match="did you mean 'allow'"):
        parse_config(config_dict, tmp_path / "proxy.yaml")
    config_dict["credentials"]["trading"]["policy"] = {"allow": "GET /x"}
    with pytest.raises(ConfigError, match=r"credentials\.trading\.policy\.allow: expected a list"):
        parse_config(config_dict, tmp_path / "proxy.yaml")


async def test_read_only_credential_refuses_orders_before_signing(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    config_dict["credentials"]["trading"]["policy"] = READ_ONLY
    proxy = await make_proxy(config_dict)
    order = b'{"product_id": "BTC-USD", "side": "BUY"}'
    for url, kwargs in [
        (f"{base(proxy)}/api/v3/brokerage/orders", {}),
        (URL(f"{base(proxy)}/api/v3/brokerage/%6Frders", encoded=True), {}),
        ("http://api.coinbase.com/api/v3/brokerage/orders", {"proxy": base(proxy)}),  # forward mode
    ]:
        status, data, _, _ = await fetch(client, "POST", url, data=order, **kwargs)
        assert status == 403 and data is not None and data["error"] == "policy_denied", data
        assert "trading" in data["message"]
    assert upstream.received == []  # never signed, never sent
    assert metric(proxy, "signing_proxy_policy_denied_total", credential="trading") == 3
    assert (
        metric(proxy, "signing_proxy_tokens_minted_total", credential="trading", algorithm="ES256")
        == 0
    )

    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 200
    status, _, _, _ = await fetch(
        client, "POST", f"{base(proxy)}/api/v3/brokerage/orders/preview", data=order
    )
    assert status == 200
    # Another credential on another route is not bound by this one's policy.
    status, _, _, _ = await fetch(client, "POST", f"{base(proxy)}/ed/api/v3/brokerage/orders")
    assert status == 200


async def test_route_policy_applies_to_that_route_only(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    public = next(r for r in config_dict["routes"] if r["prefix"] == "/public/")
    public["policy"] = {"deny": ["* /public/admin/**"]}
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/public/admin/users")
    assert status == 403 and data is not None and data["error"] == "policy_denied"
    assert metric(proxy, "signing_proxy_policy_denied_total", credential="-") == 1
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/public/ping")
    assert status == 200
    assert [r.path for r in upstream.received] == ["/public/ping"]
