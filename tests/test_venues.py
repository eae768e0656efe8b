"""Coinbase Exchange, Prime and International Exchange through the whole proxy.

The upstream recomputes each venue's signature from what it received (tests/venue_auth.py): a
test passes only if the proxy signed exactly the path, query and body bytes it sent, with the
right headers, key handling, passphrase and a current timestamp.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from yarl import URL

from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError

from .conftest import MakeProxy
from .helpers import base, fetch, metric, wait_for
from .proc import write_config
from .upstream import VerifyingUpstream
from .venue_auth import VenueKey


@dataclass(frozen=True)
class Venue:
    name: str  # the credential `type`, and the credential's name here
    scheme: str
    host: str
    path: str  # a typical path on that API
    key: str
    secret: str
    passphrase: str


VENUES = {
    v.name: v
    for v in (
        Venue("exchange", "EXCHANGE", "api.exchange.coinbase.com", "/orders", "ex-key-7f3a",
              base64.b64encode(b"exchange-secret-bytes:" + bytes(range(42))).decode(),
              "ex-pass-9q2w"),
        Venue("prime", "PRIME", "api.prime.coinbase.com", "/v1/portfolios", "prime-key-5d1c",
              "cHJpbWUtc2lnbmluZy1rZXktdXNlZC1hcy1pcw==", "prime-pass-x8v7"),
        Venue("intx", "INTX", "api.international.coinbase.com", "/api/v1/portfolios",
              "intx-key-2b9e", base64.b64encode(bytes(range(100, 132))).decode(),
              "intx-pass-c4r5"),
    )
}  # fmt: skip
NAMES = list(VENUES)
WS_FEED = "ws-feed.exchange.coinbase.com"
FORGED = {
    "CB-ACCESS-SIGN": "forged",
    "CB-ACCESS-PASSPHRASE": "guess",
    "X-CB-ACCESS-SIGNATURE": "forged",
    "X-CB-ACCESS-PASSPHRASE": "guess",
}


def secret_files(root: Path, venue: Venue) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    files = {f: root / f"{venue.name}_{f}" for f in ("api_key", "api_secret", "passphrase")}
    files["api_key"].write_text(venue.key + "\n")
    files["api_secret"].write_text(venue.secret + "\n")
    files["passphrase"].write_text(venue.passphrase + "\n")
    return files


@pytest.fixture
def venue_config(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, ca_file: Path, tmp_path: Path
) -> dict[str, Any]:
    routes = []
    for v in VENUES.values():
        upstream.venue_keys[v.key] = VenueKey(v.name, v.secret, v.passphrase)
        files = secret_files(tmp_path / "secrets", v)
        config_dict["credentials"][v.name] = {
            "type": v.name,
            "api_key_file": str(files["api_key"]),
            "api_secret_file": str(files["api_secret"]),
            "passphrase_file": str(files["passphrase"]),
        }
        config_dict["upstreams"][v.host] = {
            "url": upstream.url, "ca_file": str(ca_file), "credential": v.name, "timeout": 5,
        }  # fmt: skip
        routes.append({"prefix": f"/{v.name}/", "upstream": v.host, "strip_prefix": True})
    config_dict["upstreams"][WS_FEED] = {
        "url": upstream.url.replace("https://", "wss://"), "ca_file": str(ca_file),
        "credential": "exchange", "timeout": 5,
    }  # fmt: skip
    routes += [
        {"prefix": "/ws/exchange", "upstream": WS_FEED, "strip_prefix": True},
        {"prefix": "/ws/prime", "upstream": WS_FEED, "credential": "prime", "strip_prefix": True},
    ]
    config_dict["routes"] = routes + config_dict["routes"]
    return config_dict


@pytest.fixture
async def venue_proxy(make_proxy: MakeProxy, venue_config: dict[str, Any]) -> ProxyServer:
    return await make_proxy(venue_config)


def url(proxy: ProxyServer, venue: Venue, rest: str) -> URL:
    # strip_prefix: /exchange/orders reaches api.exchange.coinbase.com as /orders
    return URL(f"{base(proxy)}/{venue.name}{rest}", encoded=True)


def assert_signed_by(data: dict[str, Any] | None, venue: Venue) -> dict[str, str]:
    assert data is not None and data["auth"] == venue.name, data
    headers: dict[str, str] = data["headers"]
    other = "cb-access-sign" if venue.name == "prime" else "x-cb-access-signature"
    assert other not in headers  # the client's forged header of the other kind is gone too
    return headers


@pytest.mark.parametrize("name", NAMES)
async def test_get_with_query_replaces_client_auth_headers(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    name: str,
) -> None:  # fmt: skip
    v = VENUES[name]
    target = url(venue_proxy, v, f"{v.path}?status=open&limit=2")
    status, data, _, _ = await fetch(client, "GET", target, headers=FORGED)
    assert status == 200, (data, upstream.rejections)
    headers = assert_signed_by(data, v)
    assert data is not None and data["path"] == v.path and data["query"] == "status=open&limit=2"
    assert "forged" not in headers.values() and "guess" not in headers.values()
    labels = {"credential": name, "algorithm": v.scheme}
    assert metric(venue_proxy, "signing_proxy_tokens_minted_total", **labels) == 1


@pytest.mark.parametrize("name", NAMES)
async def test_post_body_and_delete(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    name: str,
) -> None:  # fmt: skip
    v = VENUES[name]
    body = b'{"product_id": "BTC-USD", "side": "buy", "size": "0.01", "note": "caf\xc3\xa9"}'
    status, data, _, _ = await fetch(
        client, "POST", url(venue_proxy, v, v.path), data=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, (data, upstream.rejections)
    assert_signed_by(data, v)
    assert data is not None and data["body_sha256"] == hashlib.sha256(body).hexdigest()

    status, data, _, _ = await fetch(
        client, "DELETE", url(venue_proxy, v, f"{v.path}/ord-1?product_id=BTC-USD")
    )
    assert status == 200, (data, upstream.rejections)
    assert_signed_by(data, v)
    assert data is not None and data["method"] == "DELETE" and data["body_len"] == 0


@pytest.mark.parametrize("name", NAMES)
async def test_a_query_that_needs_care_arrives_and_verifies_as_sent(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    name: str,
) -> None:  # fmt: skip
    v = VENUES[name]
    query = "cursor=a%2Fb%3D&q=x+y&q=z&sym=%2BBTC&empty="
    status, data, _, _ = await fetch(client, "GET", url(venue_proxy, v, f"{v.path}%2Fx?{query}"))
    assert status == 200, (data, upstream.rejections)
    assert_signed_by(data, v)
    assert data is not None and data["path"] == f"{v.path}%2Fx" and data["query"] == query


@pytest.mark.parametrize("name", NAMES)
async def test_forward_mode_with_curl(
    venue_proxy: ProxyServer, upstream: VerifyingUpstream, name: str
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is required for these tests; .ci/run installs it"
    v = VENUES[name]
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", "-x", base(venue_proxy), "-X", "POST", "-d", '{"a":1}',
        f"http://{v.host}{v.path}?limit=5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    data = json.loads(out)
    assert_signed_by(data, v)
    assert data["host"] == v.host and data["query"] == "limit=5" and data["body_len"] == 7


@pytest.mark.parametrize("name", NAMES)
async def test_a_body_over_the_hmac_cap_is_413_and_never_sent(
    make_proxy: MakeProxy, venue_config: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, name: str,
) -> None:  # fmt: skip
    venue_config["max_body_bytes"] = 1000
    proxy = await make_proxy(venue_config)
    v = VENUES[name]
    status, data, _, _ = await fetch(client, "POST", url(proxy, v, v.path), data=b"x" * 5000)
    assert status == 413 and data is not None and "max_body_bytes" in data["message"], data
    assert upstream.received == []


async def request_ok(client: aiohttp.ClientSession, target: URL) -> bool:
    status, _, _, _ = await fetch(client, "GET", target)
    return status == 200


@pytest.mark.parametrize("name", NAMES)
async def test_each_secret_file_rotates_and_a_broken_one_keeps_the_last_good_key(
    make_proxy: MakeProxy, venue_config: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    v = VENUES[name]
    files = {f: Path(venue_config["credentials"][name][f"{f}_file"]) for f in
             ("api_key", "api_secret", "passphrase")}  # fmt: skip
    proxy = await make_proxy(venue_config)
    target = url(proxy, v, v.path)
    assert await request_ok(client, target)

    new_secret = base64.b64encode(f"rotated {name} secret".encode()).decode()
    steps = [
        ("api_secret", VenueKey(name, new_secret, v.passphrase), v.key, new_secret),
        ("passphrase", VenueKey(name, new_secret, "new-pass-1"), v.key, "new-pass-1"),
        ("api_key", VenueKey(name, new_secret, "new-pass-1"), "rotated-key", "rotated-key"),
    ]
    for field, known, key, content in steps:
        upstream.venue_keys = {key: known}  # Coinbase knows only the new value from now on
        files[field].write_text(content + "\n")
        loop = asyncio.get_running_loop()
        start = loop.time()
        ok = await request_ok(client, target)
        while not ok and loop.time() - start < 5:
            await asyncio.sleep(0.1)
            ok = await request_ok(client, target)
        assert ok, f"{field} rotation not picked up: {upstream.rejections[-1:]}"

    # A broken new secret (for every venue: a CDP key JSON pasted by mistake) keeps the last one.
    files["api_secret"].write_text('{"name": "organizations/o/apiKeys/k", "privateKey": "x"}')
    await wait_for(
        lambda: metric(proxy, "signing_proxy_credential_reload_errors_total", credential=name) >= 1,
        what="reload error",
    )
    assert await request_ok(client, target)  # still the last good key
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "looks like a CDP key JSON" in logged
    for secret in (new_secret, "new-pass-1", v.secret, v.passphrase):
        assert secret not in logged


async def test_exchange_websocket_subscribe_gets_its_auth_fields(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    v = VENUES["exchange"]
    ws_url = f"ws://127.0.0.1:{venue_proxy.port(0)}/ws/exchange"
    subscribe = {
        "type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["full", "user"],
        "key": "client-key", "passphrase": "guess", "signature": "forged", "timestamp": "1",
    }  # fmt: skip
    async with client.ws_connect(ws_url) as ws:
        await ws.send_str(json.dumps(subscribe))
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.TEXT, msg
        answer = json.loads(msg.data)
        assert answer["type"] == "subscriptions" and answer["authenticated"], (
            answer, upstream.rejections,
        )  # fmt: skip
        received = answer["received"]
        assert received["key"] == v.key and received["passphrase"] == v.passphrase
        assert received["signature"] != "forged" and received["channels"] == ["full", "user"]
        # unsubscribe needs no auth on the Exchange feed: it passes as the client wrote it
        unsubscribe = '{"type":"unsubscribe","channels":["full"]}'
        await ws.send_str(unsubscribe)
        answer = json.loads((await ws.receive(timeout=5)).data)
        assert answer["received"] == json.loads(unsubscribe) and not answer["authenticated"]
    session = upstream.ws_sessions[-1]
    assert len(session.verified) == 1 and session.host == WS_FEED
    assert not any("forged" in str(data) for _, data in session.events)
    labels = {"credential": "exchange", "algorithm": "EXCHANGE"}
    assert metric(venue_proxy, "signing_proxy_tokens_minted_total", **labels) == 1


async def test_a_venue_key_without_a_websocket_form_is_refused_at_the_upgrade(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    headers = {
        "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
    }  # fmt: skip
    status, data, _, _ = await fetch(
        client, "GET", f"{base(venue_proxy)}/ws/prime", headers=headers
    )
    assert status == 400 and data is not None and data["error"] == "websocket_needs_cdp_key"
    assert "PRIME" in data["message"] and upstream.ws_sessions == []


# --- configuration and `check` ------------------------------------------------------------------


def test_a_missing_passphrase_is_named_in_the_config_error(tmp_path: Path) -> None:
    raw = {"credentials": {"ex": {"type": "exchange", "api_key": "k", "api_secret_env": "S"}}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path / "c.yaml")
    assert "credentials.ex" in str(info.value)
    assert "needs passphrase (or passphrase_env / passphrase_file)" in str(info.value)


async def _check(config: dict[str, Any], path: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signing_proxy", "check", "-c", str(write_config(path, config)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_prints_venue_key_and_secret_fingerprint_never_secrets(
    venue_config: dict[str, Any], tmp_path: Path
) -> None:
    code, out, err = await _check(venue_config, tmp_path / "c.yaml")
    assert code == 0, err
    for v in VENUES.values():
        fingerprint = hashlib.sha256(v.secret.encode()).hexdigest()[:16]
        line = (
            f"credential {v.name}: {v.scheme} key {v.key} fingerprint secret-SHA256:{fingerprint}"
        )
        assert line in out, out
        assert v.secret not in out + err and v.passphrase not in out + err


async def test_check_names_wrong_kind_keys_and_missing_passphrases(
    venue_config: dict[str, Any], tmp_path: Path, ec_key_file: Path
) -> None:
    creds = venue_config["credentials"]
    creds["exchange"]["api_secret_file"] = str(ec_key_file)  # a CDP key JSON
    not_base64 = tmp_path / "intx_secret"
    not_base64.write_text("this-is-not base64!")
    creds["intx"]["api_secret_file"] = str(not_base64)
    del creds["prime"]["passphrase_file"]
    creds["prime"]["passphrase_env"] = "SIGNING_PROXY_TEST_UNSET_PASSPHRASE"
    code, out, err = await _check(venue_config, tmp_path / "c.yaml")
    assert code == 1
    assert f"credential 'exchange': file {ec_key_file}: api_secret looks like a CDP key JSON" in err
    assert f"credential 'intx': file {not_base64}: api_secret is not base64" in err
    assert (
        "credential 'prime': env var SIGNING_PROXY_TEST_UNSET_PASSPHRASE (from passphrase_env) "
        "is not set or empty" in err
    )
    private = json.loads(ec_key_file.read_text())["privateKey"]
    for secret in ["this-is-not", *private.splitlines()[1:-1]]:
        assert secret not in out + err


async def test_an_unusable_venue_key_fails_closed_with_a_clear_error(
    make_proxy: MakeProxy, venue_config: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path,
) -> None:  # fmt: skip
    bad = tmp_path / "exchange_bad_secret"
    bad.write_text("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBad\n-----END EC PRIVATE KEY-----\n")
    venue_config["credentials"]["exchange"]["api_secret_file"] = str(bad)
    proxy = await make_proxy(venue_config)
    v = VENUES["exchange"]
    status, data, _, _ = await fetch(client, "GET", url(proxy, v, v.path))
    assert status == 503 and data is not None and data["error"] == "credential_unavailable"
    assert "PEM private key" in data["message"] and "MHcCAQEEIBad" not in data["message"]
    assert upstream.received == []


async def test_a_401_report_says_what_each_venue_signed(
    venue_proxy: ProxyServer, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for v in VENUES.values():
        status, _, _, _ = await fetch(client, "GET", url(venue_proxy, v, "/status/401?x=1"))
        assert status == 401
    reports = {
        r.fields["credential"]: r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("upstream answered 401")
    }
    assert {name: (f["algorithm"], f["kid"], f["signed"]) for name, f in reports.items()} == {
        "exchange": ("EXCHANGE", VENUES["exchange"].key, "GET /status/401?x=1"),
        "prime": ("PRIME", VENUES["prime"].key, "GET /status/401"),
        "intx": ("INTX", VENUES["intx"].key, "GET /status/401"),
    }


async def test_exchange_feed_subscriptions_count_against_the_rate_limit(
    make_proxy: MakeProxy, venue_config: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    # burst 2: one for the upgrade (a request like any other), one for the first subscribe
    venue_config["credentials"]["exchange"]["rate_limit"] = {"rate": 0.01, "burst": 2}
    proxy = await make_proxy(venue_config)
    subscribe = '{"type":"subscribe","product_ids":["BTC-USD"],"channels":["user"]}'
    async with client.ws_connect(f"ws://127.0.0.1:{proxy.port(0)}/ws/exchange") as ws:
        await ws.send_str(subscribe)
        assert json.loads((await ws.receive(timeout=5)).data)["authenticated"]
        await ws.send_str(subscribe)
        refused = json.loads((await ws.receive(timeout=5)).data)
        assert refused["type"] == "error" and refused["error"] == "rate_limited", refused
    assert len(upstream.ws_sessions[-1].verified) == 1  # the second never reached the upstream
    assert metric(proxy, "signing_proxy_rate_limited_total", credential="exchange") == 1
