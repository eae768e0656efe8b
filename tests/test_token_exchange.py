"""The derivatives gateway (drb.coinbase.com) over REST: token exchange, refresh, one retry.

Runs the proxy against DrbUpstream (tests/drb_upstream.py), which verifies the exchange JWT with
the public key and issues access tokens that live a few seconds.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import generate_latest

from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError
from signing_proxy.token_exchange import TokenBroker, redact

from .conftest import MakeProxy, ec_pem
from .drb_upstream import DRB, DrbUpstream, drb_config
from .helpers import admin, base, fetch, metric, wait_for

POSITIONS = "/drb/api/v2/private/get_positions"


def call(method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode()


def broker(proxy: ProxyServer) -> TokenBroker:
    assert proxy.state.token_brokers is not None
    (only,) = list(proxy.state.token_brokers)
    return only


async def start(make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, key: Path) -> ProxyServer:
    proxy = await make_proxy(drb_config(drb, ca_file, key))
    await wait_for(lambda: drb.exchanges >= 1, what="the exchange at start")
    return proxy


async def test_private_calls_carry_the_token_public_calls_none(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    body = call("private/get_positions", currency="BTC")
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-junk"},
    )  # fmt: skip
    assert status == 200, data
    assert data == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "method": "private/get_positions",
            "sha256_of_body": hashlib.sha256(body).hexdigest(),  # the client's exact bytes
        },
    }
    sent = drb.calls[-1]
    assert sent.token in drb.tokens and sent.body == body
    status, data, _, _ = await fetch(client, "GET", base(proxy) + "/drb/api/v2/public/get_time")
    assert status == 200 and data is not None and data["result"]["public"]
    assert drb.calls[-1].token is None  # public methods go without a token
    # GET with the private method in the path carries the token too.
    status, data, _, _ = await fetch(client, "GET", base(proxy) + POSITIONS + "?currency=BTC")
    assert status == 200, data
    assert drb.exchanges == 1 and not drb.rejections
    assert metric(
        proxy, "signing_proxy_token_exchanges_total",
        credential="trading", transport="http", outcome="ok",
    ) == 1  # fmt: skip


async def test_concurrent_requests_cause_one_exchange(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    drb.auth_delay = 0.5  # requests pile up behind the exchange
    proxy = await make_proxy(drb_config(drb, ca_file, ec_key_file))
    url = base(proxy) + POSITIONS
    results = await asyncio.gather(
        *(fetch(client, "POST", url, data=call("private/get_positions")) for _ in range(20))
    )
    assert [r[0] for r in results] == [200] * 20
    assert drb.exchanges == 1
    # The token is revoked: twenty calls are rejected at once, and one exchange serves them all.
    broker(proxy).min_rejected_age = 0
    drb.revoke()
    results = await asyncio.gather(
        *(fetch(client, "POST", url, data=call("private/get_positions")) for _ in range(20))
    )
    assert [r[0] for r in results] == [200] * 20
    assert drb.exchanges == 2
    assert metric(proxy, "signing_proxy_token_rejected_retries_total", credential="trading") == 20


async def test_token_refreshed_before_it_expires(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    drb.lifetime = 2.0
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    url = base(proxy) + POSITIONS
    statuses = []
    while drb.exchanges < 4:  # three refreshes, with calls going on all the time
        status, _, _, _ = await fetch(client, "POST", url, data=call("private/get_positions"))
        statuses.append(status)
        await asyncio.sleep(0.05)
    assert set(statuses) == {200}
    gaps = [b - a for a, b in zip(drb.exchange_times, drb.exchange_times[1:], strict=False)]
    assert all(0.8 * 2.0 * 0.9 < gap < 2.0 for gap in gaps), gaps  # at 80 %, before expiry
    assert metric(proxy, "signing_proxy_token_rejected_retries_total", credential="trading") == 0
    left = metric(proxy, "signing_proxy_token_expiry_seconds", credential="trading")
    assert 0 < left <= 2.0  # seconds left of a 2 s token


async def test_rejected_token_is_refreshed_and_the_call_sent_once_more(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    broker(proxy).min_rejected_age = 0
    body = call("private/buy", instrument_name="BTC-PERPETUAL", amount=10)
    drb.revoke()
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + "/drb/api/v2/private/buy", data=body
    )
    assert status == 200 and data is not None and "result" in data
    first, second = drb.calls[-2:]
    assert first.answer["error"]["code"] == 13009 and "result" in second.answer
    assert first.body == second.body == body  # the same bytes, sent twice
    assert first.token != second.token and second.token in drb.tokens
    assert drb.exchanges == 2
    assert metric(proxy, "signing_proxy_token_rejected_retries_total", credential="trading") == 1


async def test_second_rejection_and_other_errors_pass_through(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    broker(proxy).min_rejected_age = 0
    drb.reject_all = True
    before = len(drb.calls)
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 400
    assert data == {"jsonrpc": "2.0", "id": 7, "error": {"code": 13009, "message": "unauthorized"}}
    assert len(drb.calls) == before + 2  # sent, rejected, sent once more, rejected: passed on
    assert drb.exchanges == 2
    drb.reject_all = False
    before = len(drb.calls)
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + "/drb/api/v2/private/other_error",
        data=call("private/other_error"),
    )  # fmt: skip
    assert status == 400 and data is not None and data["error"]["code"] == 10009
    assert len(drb.calls) == before + 1  # any other error: never sent again


async def test_exchange_failure_is_a_clear_error_and_recovers(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    drb.auth_error = {"code": 13004, "message": "invalid_credentials"}
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    await wait_for(lambda: broker(proxy).last_error is not None)
    status, data, resp, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 503 and data is not None
    assert data["error"] == "token_exchange_failed"
    assert "HTTP 400, JSON-RPC error 13004 (invalid_credentials)" in data["message"]
    assert "trading" in data["message"] and int(resp.headers["Retry-After"]) >= 1
    status, ready, _, _ = await fetch(client, "GET", admin(proxy) + "/readyz")
    assert status == 503 and ready is not None
    (state,) = ready["token_exchange"]
    assert state["token"] == "none" and "13004" in state["last_error"]
    # Public calls need no token and still work.
    status, _, _, _ = await fetch(client, "GET", base(proxy) + "/drb/api/v2/public/get_time")
    assert status == 200
    # The gateway recovers: the next attempt (after a short backoff) succeeds.
    drb.auth_error = None
    await wait_for(lambda: broker(proxy).usable(), within=5, what="a token after the backoff")
    status, _, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 200
    status, ready, _, _ = await fetch(client, "GET", admin(proxy) + "/readyz")
    assert status == 200 and ready is not None and ready["token_exchange"][0]["token"] == "valid"
    assert metric(
        proxy, "signing_proxy_token_exchanges_total",
        credential="trading", transport="http", outcome="rejected",
    ) >= 1  # fmt: skip


async def test_a_slow_exchange_fails_within_the_timeout(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    drb.auth_delay = 3.0
    raw = drb_config(drb, ca_file, ec_key_file)
    raw["upstreams"][DRB]["timeout"] = 1
    proxy = await make_proxy(raw)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert loop.time() - started < 1.9  # the 1 s timeout (and some scheduling), not the 3 s
    assert status in (503, 504) and data is not None, data
    assert data["error"] in ("token_exchange_failed", "token_exchange_timeout")
    assert "within 1" in data["message"]  # the exchange timed out, or the wait for it did


async def test_unknown_key_fails_with_the_gateway_code(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    stranger = tmp_path / "stranger.json"
    key = ec_pem(ec.generate_private_key(ec.SECP256R1()))
    stranger.write_text(json.dumps({"name": "organizations/x/apiKeys/unknown", "privateKey": key}))
    proxy = await start(make_proxy, drb, ca_file, stranger)
    await wait_for(lambda: broker(proxy).last_error is not None)
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 503 and data is not None and "13004" in data["message"]
    assert "unknown kid" in drb.rejections[0]  # the stand-in checked the JWT and refused it


async def test_key_rotation_exchanges_with_the_new_key(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, tmp_path: Path,
    ec_key_file: Path, ed_key_file: Path, client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    key_file = tmp_path / "rotating.json"
    key_file.write_bytes(ec_key_file.read_bytes())
    proxy = await start(make_proxy, drb, ca_file, key_file)
    key_file.write_text("{ broken")  # a broken file keeps the last good key and token
    await asyncio.sleep(1.5)  # the watcher polls once a second; nothing may happen
    assert drb.exchanges == 1
    status, _, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 200
    key_file.write_bytes(ed_key_file.read_bytes())
    await wait_for(lambda: drb.exchanges == 2, within=5, what="an exchange with the new key")
    status, _, _, _ = await fetch(
        client, "POST", base(proxy) + POSITIONS, data=call("private/get_positions")
    )
    assert status == 200 and not drb.rejections


async def test_ambiguous_calls_are_refused(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    before = len(drb.calls)
    for path, body in [
        ("/drb/api/v2/public/get_time", call("private/buy")),  # path and body disagree
        ("/drb/api/v2", call("private/buy")),  # a private method not named in the path
        ("/drb/api/v2/private/buy", b"[" + call("private/buy") + b"]"),  # a batch
        # A key twice: parsers disagree on which one counts.
        ("/drb/api/v2/private/get_positions",
         b'{"method":"private/buy","method":"private/get_positions"}'),
        ("/drb/api/v2/private/buy", gzip.compress(call("private/buy"))),  # not plain JSON
        ("/drb/api/v2/private/buy", b'{"method":["private/buy"]}'),
    ]:  # fmt: skip
        status, data, _, _ = await fetch(client, "POST", base(proxy) + path, data=body)
        assert status == 400 and data is not None, (path, data)
        assert data["error"].startswith("jsonrpc_"), data
    assert len(drb.calls) == before


async def test_the_token_is_never_shown(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    seen: list[bytes] = []
    access_log = io.StringIO()
    proxy = await make_proxy(drb_config(drb, ca_file, ec_key_file), access_log_stream=access_log)
    await wait_for(lambda: drb.exchanges >= 1)
    broker(proxy).min_rejected_age = 0
    url = base(proxy) + POSITIONS
    for revoke in (False, True, False):
        if revoke:
            drb.revoke()
        _, _, resp, raw = await fetch(client, "POST", url, data=call("private/get_positions"))
        seen += [raw, str(resp.headers).encode()]
    drb.reject_all = True
    _, _, resp, raw = await fetch(client, "POST", url, data=call("private/get_positions"))
    seen += [raw, str(resp.headers).encode()]
    async with client.ws_connect(base(proxy) + "/drb/ws/api/v2") as ws:
        await ws.send_str(call("private/get_positions").decode())
        seen.append((await ws.receive_str()).encode())
        await ws.send_str(call("public/auth", grant_type="client_credentials").decode())
        seen.append((await ws.receive_str()).encode())
    for path in ("/metrics", "/readyz"):
        _, _, _, raw = await fetch(client, "GET", admin(proxy) + path)
        seen.append(raw)
    seen.append(generate_latest(proxy.metrics.registry))
    seen += [record.getMessage().encode() for record in caplog.records]
    seen += [repr(record.__dict__).encode() for record in caplog.records]
    assert proxy.state.handler is not None and proxy.state.handler.access_log is not None
    proxy.state.handler.access_log.flush()
    seen.append(access_log.getvalue().encode())
    assert b"/api/v2/private/get_positions" in seen[-1]  # the access log was captured
    assert len(drb.issued) >= 8  # access and refresh tokens of 3 REST exchanges and 1 socket
    everything = b"\n".join(seen)
    for token in drb.issued:
        assert token.encode() not in everything
    assert b'"access_token"' not in everything and b"drbtok" not in everything


async def test_failed_exchanges_back_off_bounded_and_jittered(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    drb.auth_error = {"code": 13004, "message": "invalid_credentials"}
    proxy = await start(make_proxy, drb, ca_file, ec_key_file)
    first, cap = 0.05, 0.4
    broker(proxy).backoff_first, broker(proxy).backoff_cap = first, cap
    await wait_for(lambda: drb.exchanges >= 8, within=15, what="eight attempts")
    # The first retry was planned with the default backoff; the rest with the small one.
    gaps = [b - a for a, b in zip(drb.exchange_times[1:], drb.exchange_times[2:], strict=False)]
    for n, gap in enumerate(gaps, start=2):
        assert gap >= 0.5 * min(cap, first * 2 ** (n - 1)) * 0.95, gaps  # jitter: half at least
        assert gap <= cap + 1.0, gaps  # bounded (+ scheduling slack)
    assert len({round(gap, 3) for gap in gaps[-3:]}) > 1, gaps  # jittered, not in lockstep
    assert broker(proxy).describe()["failures"] >= drb.exchanges - 1  # one may be in flight


def test_config_requires_a_cdp_credential(ec_key_file: Path) -> None:
    raw: dict[str, Any] = {
        "credentials": {"legacy": {"type": "hmac", "api_key": "k", "api_secret": "s"}},
        "upstreams": {DRB: {"credential": "legacy", "auth": "token_exchange"}},
    }
    with pytest.raises(ConfigError, match="token_exchange needs a CDP credential"):
        parse_config(raw)
    raw["upstreams"][DRB] = {"auth": "token_exchange"}
    with pytest.raises(ConfigError, match="token_exchange needs a CDP credential"):
        parse_config(raw)
    raw["upstreams"][DRB] = {"credential": "legacy", "auth": "tokens"}
    with pytest.raises(ConfigError, match="expected token_exchange"):
        parse_config(raw)
    raw["credentials"]["cdp"] = {"key_file": str(ec_key_file)}
    raw["upstreams"][DRB] = {"credential": "cdp", "auth": "token_exchange"}
    assert parse_config(raw).upstreams[DRB].websocket  # the gateway's socket, same host
    raw["routes"] = [{"prefix": "/drb", "upstream": DRB, "credential": "legacy"}]
    with pytest.raises(ConfigError, match="uses token_exchange, which needs a CDP credential"):
        parse_config(raw)


def test_check_shows_the_scheme(tmp_path: Path, ec_key_file: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "credentials": {"trading": {"key_file": str(ec_key_file)}},
                "upstreams": {DRB: {"credential": "trading", "auth": "token_exchange"}},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "signing_proxy", "check", "--config", str(config)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"upstream {DRB}: credential trading (ES256 → token_exchange)" in out.stdout


def test_gateway_text_is_redacted() -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
    assert redact(f"bad token {jwt} here") == "bad token <redacted> here"
