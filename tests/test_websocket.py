"""The WebSocket relay against the verifying TLS upstream's Advanced Trade stand-in, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signing_proxy.app import ProxyServer
from signing_proxy.websocket import MAX_MESSAGE_BYTES, QueueLimits, inject_jwt

from .conftest import EC_KEY_NAME, ED_KEY_NAME, MakeProxy
from .upstream import WS_PROTOCOL, VerifyingUpstream, WsSession

WS_USER = "advanced-trade-ws-user.coinbase.com"
WS_MARKET = "advanced-trade-ws.coinbase.com"


@pytest.fixture
def ws_config(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, ca_file: Path
) -> dict[str, Any]:
    wss = upstream.url.replace("https://", "wss://")
    config_dict["upstreams"][WS_USER] = {
        "url": wss,
        "ca_file": str(ca_file),
        "credential": "trading",
        "timeout": 5,
    }
    config_dict["upstreams"][WS_MARKET] = {"url": wss, "ca_file": str(ca_file), "timeout": 5}
    config_dict["routes"] = [
        {"prefix": "/ws/user", "upstream": WS_USER, "strip_prefix": True},
        {"prefix": "/ws/ed", "upstream": WS_USER, "credential": "ed", "strip_prefix": True},
        {"prefix": "/ws/legacy", "upstream": WS_USER, "credential": "legacy", "strip_prefix": True},
        {"prefix": "/ws", "upstream": WS_MARKET, "strip_prefix": True},
        *config_dict["routes"],
    ]
    return config_dict


@pytest.fixture
async def ws_proxy(make_proxy: MakeProxy, ws_config: dict[str, Any]) -> ProxyServer:
    return await make_proxy(ws_config)


def ws_url(proxy: ProxyServer, path: str) -> str:
    return f"ws://127.0.0.1:{proxy.port(0)}{path}"


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], bool]) -> None:
    """Metrics are counted as the handler returns, a moment after the client saw the close."""
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.TEXT, msg
    data: dict[str, Any] = json.loads(msg.data)
    return data


def session(upstream: VerifyingUpstream) -> WsSession:
    assert len(upstream.ws_sessions) == 1
    return upstream.ws_sessions[0]


# --- JWTs in subscribe/unsubscribe --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kid", "alg", "credential"),
    [("/ws/user", EC_KEY_NAME, "ES256", "trading"), ("/ws/ed", ED_KEY_NAME, "EdDSA", "ed")],
)
async def test_subscribe_and_unsubscribe_get_a_fresh_jwt_each(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    ec_key: ec.EllipticCurvePrivateKey, ed_key: ed25519.Ed25519PrivateKey,
    path: str, kid: str, alg: str, credential: str,
) -> None:  # fmt: skip
    messages = [
        {"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "user"},
        {"type": "subscribe", "channel": "futures_balance_summary", "jwt": "client-sent-token"},
        {"type": "unsubscribe", "product_ids": ["BTC-USD"], "channel": "user", "note": "ü €"},
    ]
    async with client.ws_connect(
        ws_url(ws_proxy, f"{path}?client=1"),
        protocols=("not-spoken", WS_PROTOCOL),
        headers={"Authorization": "Bearer client", "CB-ACCESS-KEY": "k", "X-Client": "kept"},
    ) as ws:
        assert ws.protocol == WS_PROTOCOL  # the upstream's choice, passed back
        assert metric(ws_proxy, "signing_proxy_websocket_connections") == 1
        for sent in messages:
            await ws.send_str(json.dumps(sent))
            reply = await receive_json(ws)
            assert reply["type"] == "subscriptions", (reply, upstream.rejections)
            assert reply["authenticated"] is True
            received = reply["received"]
            assert received["jwt"] != "client-sent-token"
            assert received == {**sent, "jwt": received["jwt"]}  # nothing else touched

    seen = session(upstream)
    assert seen.host == WS_USER and seen.path == "/" and seen.protocol == WS_PROTOCOL
    assert seen.headers["x-client"] == "kept"
    assert "authorization" not in seen.headers and "cb-access-key" not in seen.headers
    tokens = [json.loads(data)["jwt"] for kind, data in seen.events if kind == "text"]
    assert len(tokens) == 3 and len(seen.verified) == 3
    public = (ec_key if alg == "ES256" else ed_key).public_key()
    nonces = set()
    for token in tokens:
        claims = jwt.decode(token, public, algorithms=[alg], options={"require": ["exp", "nbf"]})
        header = jwt.get_unverified_header(token)
        assert set(claims) == {"sub", "iss", "nbf", "exp"}  # the WebSocket form: no uri
        assert claims["sub"] == kid and claims["iss"] == "cdp"
        assert claims["exp"] == claims["nbf"] + 120 and abs(claims["nbf"] - time.time()) < 5
        assert header["kid"] == kid and header["alg"] == alg and header["typ"] == "JWT"
        nonces.add(header["nonce"])
    assert len(nonces) == 3
    await eventually(lambda: metric(ws_proxy, "signing_proxy_websocket_connections") == 0)
    assert (
        metric(ws_proxy, "signing_proxy_websocket_jwts_injected_total", credential=credential) == 3
    )
    assert metric(
        ws_proxy, "signing_proxy_tokens_minted_total", credential=credential, algorithm=alg
    ) == 3  # fmt: skip
    for direction in ("to_upstream", "to_client"):
        assert metric(ws_proxy, "signing_proxy_websocket_messages_total", direction=direction) == 3


async def test_market_channel_without_credential_passes_unchanged(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    text = '{ "type": "subscribe",  "product_ids": ["ETH-USD"], "channel": "heartbeats" }'
    async with client.ws_connect(ws_url(ws_proxy, "/ws")) as ws:
        await ws.send_str(text)
        reply = await receive_json(ws)
        assert reply["type"] == "subscriptions" and reply["authenticated"] is False
        assert "jwt" not in reply["received"]
        # no credential, no jwt: the user channel is refused by the upstream, as Coinbase does
        await ws.send_str('{"type": "subscribe", "channel": "user"}')
        assert (await receive_json(ws))["type"] == "error"
    seen = session(upstream)
    assert seen.host == WS_MARKET
    assert seen.events[0] == ("text", text)  # byte for byte
    # one request per relayed connection, labelled by the path sent (the root, not an id)
    labels = {"upstream": WS_MARKET, "method": "GET", "route": "/", "status_class": "1xx"}
    await eventually(lambda: metric(ws_proxy, "signing_proxy_requests_total", **labels) == 1)
    assert (
        metric(ws_proxy, "signing_proxy_websocket_jwts_injected_total", credential="trading") == 0
    )


async def test_other_frames_pass_unchanged_both_ways(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    texts = [
        "hello",
        "[1, 2, 3]",
        '{"type": "ping", "jwt": "kept"}',
        '{"type": "subscribe", "channel": "user"',  # not JSON: not signed, not touched
        '"subscribe"',
    ]
    binary = bytes(range(256)) * 3
    async with client.ws_connect(ws_url(ws_proxy, "/ws/user"), autoping=False) as ws:
        for text in texts:
            await ws.send_str(text)
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        await ws.send_bytes(binary)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, binary)
        # client ping → upstream, upstream's pong → client
        await ws.ping(b"client-ping")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"client-ping")
        # upstream ping → client, client's pong → upstream
        await ws.send_str("ping:upstream-ping")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"upstream-ping")
        await ws.pong(b"upstream-ping")
        seen = session(upstream)
        await eventually(lambda: ("pong", b"upstream-ping") in seen.events)
    assert seen.events[: len(texts) + 2] == [
        *(("text", t) for t in texts),
        ("binary", binary),
        ("ping", b"client-ping"),
    ]
    assert seen.verified == []


# --- closing ----------------------------------------------------------------------------------


async def test_client_close_code_reaches_upstream(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    ws = await client.ws_connect(ws_url(ws_proxy, "/ws"))
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "hello"
    await ws.close(code=4001, message=b"client done")
    seen = session(upstream)
    await asyncio.wait_for(seen.closed.wait(), 5)
    assert seen.close_code == 4001
    await eventually(
        lambda: metric(ws_proxy, "signing_proxy_websocket_closes_total", code="other") == 1
    )
    assert metric(ws_proxy, "signing_proxy_websocket_connections") == 0


async def test_upstream_close_code_reaches_client(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(ws_url(ws_proxy, "/ws/user")) as ws:
        await ws.send_str("close:1008:policy says no")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (1008, "policy says no")
    assert ws.close_code == 1008
    await eventually(
        lambda: metric(ws_proxy, "signing_proxy_websocket_closes_total", code="1008") == 1
    )


async def test_stop_closes_open_relays_with_going_away(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    ws = await client.ws_connect(ws_url(ws_proxy, "/ws"))
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "hello"
    started = time.monotonic()
    await ws_proxy.stop()
    assert time.monotonic() - started < ws_proxy.config.drain_timeout  # not held to the drain
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    await ws.close()
    assert session(upstream).close_code == 1001


async def test_slow_client_is_closed_and_the_queue_stays_bounded(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    assert ws_proxy.state.handler is not None
    relay = ws_proxy.state.handler.websockets
    relay.limits = limits = QueueLimits(messages=8, bytes=256 * 1024)
    ws = await client.ws_connect(ws_url(ws_proxy, "/ws"), max_msg_size=0)
    await ws.send_str("flood:65536")  # the upstream sends 64 KiB messages as fast as it can
    seen = session(upstream)
    await asyncio.wait_for(seen.closed.wait(), 20)  # ... while this client reads nothing
    assert seen.close_code == 1013
    # Now read: what was already on its way, then the close with the code and the reason.
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is not WSMsgType.BINARY:
            break
    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1013, "client too slow")
    await ws.close()
    await eventually(
        lambda: metric(ws_proxy, "signing_proxy_websocket_closes_total", code="1013") == 1
    )
    await eventually(
        lambda: (
            metric(ws_proxy, "signing_proxy_errors_total", kind="websocket_client_too_slow") == 1
        )
    )
    # The upstream got far more out than the proxy ever held for the client.
    assert seen.flood_sent > 4 * limits.bytes
    assert 0 < relay.peak_queued_messages <= limits.messages
    assert 0 < relay.peak_queued_bytes <= limits.bytes


async def test_oversized_message_ends_the_relay_without_relaying_it(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    ws = await client.ws_connect(ws_url(ws_proxy, "/ws"))
    with contextlib.suppress(ConnectionError):  # the proxy may close while this is still sent
        await ws.send_bytes(b"x" * (MAX_MESSAGE_BYTES + 1))
    msg = await ws.receive(timeout=5)
    # aiohttp answers 1009; a reset may overtake that frame, since the rest goes unread.
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    if msg.type is WSMsgType.CLOSE:
        assert msg.data == 1009
    await ws.close()
    seen = session(upstream)
    await asyncio.wait_for(seen.closed.wait(), 5)
    assert seen.close_code == 1001 and seen.events == []  # nothing of it was relayed
    await eventually(
        lambda: metric(ws_proxy, "signing_proxy_websocket_closes_total", code="1006") == 1
    )


# --- refusals ------------------------------------------------------------------------------------


async def _upgrade_status(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with client.get(url.replace("ws://", "http://"), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_hmac_credential_on_a_websocket_route_is_refused(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    status, body = await _upgrade_status(client, ws_url(ws_proxy, "/ws/legacy"))
    assert status == 400 and body["error"] == "websocket_needs_cdp_key"
    assert "legacy" in body["message"]
    assert upstream.ws_sessions == []


async def test_unreachable_websocket_upstream_is_502_before_the_upgrade(
    make_proxy: MakeProxy, ws_config: dict[str, Any], client: aiohttp.ClientSession
) -> None:
    ws_config["upstreams"][WS_MARKET]["url"] = "wss://127.0.0.1:9"
    proxy = await make_proxy(ws_config)
    status, body = await _upgrade_status(client, ws_url(proxy, "/ws"))
    assert status == 502 and body["error"] == "upstream_unreachable"
    assert WS_MARKET in body["message"]


# --- the message rule itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '"subscribe"', '{"type": "heartbeat"}', '{"channel": "user"}',
     "[" * 100_000],
)  # fmt: skip
def test_inject_jwt_leaves_other_text_alone(text: str) -> None:
    assert inject_jwt(text, lambda: "minted") is None


def test_inject_jwt_replaces_the_client_jwt_and_keeps_the_rest() -> None:
    out = inject_jwt('{"type":"unsubscribe","jwt":"old","channel":"user","x":"€"}', lambda: "new")
    assert out is not None
    assert json.loads(out) == {"type": "unsubscribe", "jwt": "new", "channel": "user", "x": "€"}


async def test_forward_proxy_mode_relays_websockets_too(
    ws_proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    """`ws://advanced-trade-ws-user.coinbase.com/` through the proxy, as `curl -x` users would."""
    proxy_url = f"http://127.0.0.1:{ws_proxy.port(0)}"
    async with client.ws_connect(f"ws://{WS_USER}/", proxy=proxy_url) as ws:
        await ws.send_str(json.dumps({"type": "subscribe", "channel": "user"}))
        reply = await receive_json(ws)
        assert reply["type"] == "subscriptions" and reply["authenticated"] is True, reply
    seen = session(upstream)
    assert seen.host == WS_USER and seen.path == "/"
    token = json.loads(next(data for kind, data in seen.events if kind == "text"))["jwt"]
    claims = jwt.decode(token, ec_key.public_key(), algorithms=["ES256"])
    assert claims["sub"] == EC_KEY_NAME and "uri" not in claims


# --- rate limit: every jwt minted into a message takes a token ---------------------------------


async def test_subscribe_messages_count_against_the_credential_rate_limit(
    make_proxy: MakeProxy,
    ws_config: dict[str, Any],
    client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:
    ws_config["credentials"]["trading"]["rate_limit"] = {"rate": 0.2, "burst": 3}
    proxy = await make_proxy(ws_config)
    sent = {"type": "subscribe", "product_ids": ["BTC-USD"], "channel": "user"}
    replies: list[dict[str, Any]] = []
    # The upgrade itself takes one token; then two subscribes fit and the rest are refused.
    async with client.ws_connect(ws_url(proxy, "/ws/user")) as ws:
        for _ in range(20):
            await ws.send_str(json.dumps(sent))
        for _ in range(20):
            replies.append(await receive_json(ws))
    errors = [r for r in replies if r.get("type") == "error"]
    accepted = [r for r in replies if r.get("type") == "subscriptions"]
    assert len(accepted) == 2 and len(errors) == 18
    assert errors[0]["error"] == "rate_limited" and "not forwarded" in errors[0]["message"]
    seen = session(upstream)
    assert len([kind for kind, _ in seen.events if kind == "text"]) == 2  # only those reached it
    assert len(seen.verified) == 2
    assert metric(proxy, "signing_proxy_rate_limited_total", credential="trading") == 18
