"""Upstream faults survived: each gives one stable JSON error within its timeout, leaves nothing
in flight, and the next request works. Failed attempts that never reached the upstream are
retried once, signed afresh; client disconnects cancel the upstream request."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import aiohttp
import pytest
import trustme

from signing_proxy.aiohttp_client import create_session

from .conftest import MakeProxy
from .faults import FaultServer, closed_port
from .helpers import base, fetch, metric, wait_for
from .upstream import VerifyingUpstream

HOST = "api.coinbase.com"
TIMEOUT = 1.0


@pytest.fixture
async def faulty(upstream: VerifyingUpstream, ca: trustme.CA) -> Any:
    servers: list[FaultServer] = []

    async def make(**kwargs: Any) -> FaultServer:
        server = await FaultServer(pipe_to=upstream.port, ca=ca, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("refused", 502, "upstream_unreachable"),
        ("reset", 502, "upstream_connection_reset"),
        ("close", 502, "upstream_connection_reset"),
        ("stall", 504, "upstream_timeout"),
        ("garbage", 502, "upstream_tls_error"),  # not TLS at all: the handshake fails
        ("wrong-name", 502, "upstream_tls_error"),  # trusted CA, certificate for another host
        ("tls-garbage", 502, "upstream_bad_response"),  # TLS fine, then not HTTP
    ],
)
async def test_upstream_fault_gives_stable_code_and_proxy_recovers(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    faulty: Any, mode: str, status: int, code: str,
) -> None:  # fmt: skip
    server = await faulty(default=mode)
    up = config_dict["upstreams"][HOST]
    up["url"] = f"https://127.0.0.1:{closed_port()}" if mode == "refused" else server.url
    up["timeout"] = TIMEOUT
    proxy = await make_proxy(config_dict)

    started = time.monotonic()
    got, data, resp, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    took = time.monotonic() - started
    assert (got, data and data["error"]) == (status, code), data
    assert resp.headers["Content-Type"].startswith("application/json")
    assert HOST in data["message"]
    assert took < TIMEOUT + 0.5, took  # within the upstream's timeout, retries included
    if mode == "stall":
        assert took >= TIMEOUT * 0.9
    assert metric(proxy, "signing_proxy_in_flight_requests") == 0
    assert metric(proxy, "signing_proxy_errors_total", kind=code) == 1

    # The proxy is not stuck: another upstream answers, and so does this one once it heals.
    got, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/onramp/v1/token")
    assert got == 200
    if mode != "refused":
        server.default = "pipe"
        got, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
        assert got == 200 and data is not None and data["auth"] == "jwt"


async def test_reset_mid_response_breaks_client_connection_and_is_counted(
    proxy: Any, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(client, "GET", f"{base(proxy)}/reset-mid")
    assert metric(proxy, "signing_proxy_errors_total", kind="upstream_connection_reset") == 1
    assert metric(proxy, "signing_proxy_in_flight_requests") == 0
    got, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert got == 200


# --- retries: fresh signature, only when nothing reached the upstream ---------------------------


async def test_idempotent_request_broken_before_answer_is_retried_with_a_fresh_token(
    proxy: Any, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    got, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/flaky-once/accounts")
    assert got == 200, (data, upstream.rejections)
    assert upstream.rejections == []  # the upstream refuses a reused nonce: none was reused
    tokens = [r.token for r in upstream.received]
    nonces = [r.jwt_header["nonce"] for r in upstream.received]
    assert len(tokens) == 2 and tokens[0] != tokens[1] and nonces[0] != nonces[1]
    assert metric(proxy, "signing_proxy_retries_total", upstream=HOST) == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_non_safe_request_that_reached_the_upstream_is_not_retried(
    proxy: Any, client: aiohttp.ClientSession, upstream: VerifyingUpstream, method: str
) -> None:
    # PUT and DELETE also prove aiohttp's own silent retry (same headers: a replayed token) is off.
    got, data, _, _ = await fetch(client, method, f"{base(proxy)}/flaky-once/orders")
    assert got == 502 and data is not None and data["error"] == "upstream_connection_reset"
    assert len(upstream.received) == 1 and upstream.rejections == []
    assert metric(proxy, "signing_proxy_retries_total", upstream=HOST) == 0


def test_aiohttp_internal_retry_is_disabled() -> None:
    async def check() -> bool:
        session = create_session()
        try:
            return bool(session._retry_connection)
        finally:
            await session.close()

    assert asyncio.run(check()) is False


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/api/v3/brokerage/orders", b'{"product_id": "BTC-USD"}' * 1000),  # JWT: streamed body
        ("/v2/orders", b'{"product_id": "BTC-USD"}'),  # HMAC: buffered body
    ],
)
async def test_connect_failure_is_retried_for_any_method_with_body_intact(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, faulty: Any, route: str, body: bytes,
) -> None:  # fmt: skip
    server = await faulty(script=["reset"])
    config_dict["upstreams"][HOST]["url"] = server.url
    proxy = await make_proxy(config_dict)
    got, data, _, _ = await fetch(client, "POST", f"{base(proxy)}{route}", data=body)
    assert got == 200, (data, upstream.rejections)
    assert data is not None and data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert server.accepted == ["reset", "pipe"] and len(upstream.received) == 1
    assert metric(proxy, "signing_proxy_retries_total", upstream=HOST) == 1


async def test_retries_zero_disables_retrying(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    faulty: Any,
) -> None:  # fmt: skip
    server = await faulty(script=["reset"])
    config_dict["upstreams"][HOST].update(url=server.url, retries=0)
    proxy = await make_proxy(config_dict)
    got, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert got == 502 and data is not None and data["error"] == "upstream_connection_reset"
    assert server.accepted == ["reset"]
    assert metric(proxy, "signing_proxy_retries_total", upstream=HOST) == 0


async def test_streamed_body_already_sent_is_not_retried(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    async def body() -> Any:
        yield b"first part,"
        await asyncio.sleep(0.05)
        yield b"second part"

    proxy = await make_proxy(config_dict)
    got, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/flaky-once/upload", data=body())
    # GET would be retried, but the body was consumed by the first attempt: it cannot be resent.
    assert got == 502 and data is not None and data["error"] == "upstream_connection_reset"
    assert len(upstream.received) == 1
    assert metric(proxy, "signing_proxy_retries_total", upstream=HOST) == 0


# --- the client leaves: the upstream request is cancelled ----------------------------------------


async def test_client_disconnect_while_waiting_cancels_upstream_request(
    proxy: Any, upstream: VerifyingUpstream
) -> None:
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.get(f"{base(proxy)}/hold"))
        await wait_for(lambda: len(upstream.received) == 1, what="request reached upstream")
        task.cancel()  # the client gives up and its connection closes
        with pytest.raises(asyncio.CancelledError):
            await task
    took = await wait_for(lambda: upstream.client_gone == ["/hold"], what="upstream saw close")
    assert took < 2
    await wait_for(lambda: metric(proxy, "signing_proxy_in_flight_requests") == 0)
    assert metric(proxy, "signing_proxy_errors_total", kind="cancelled") == 1


async def test_client_disconnect_mid_stream_closes_upstream_connection(
    proxy: Any, upstream: VerifyingUpstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
    writer.write(b"GET /stream/endless HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while len(got) < 4096:
        got += await asyncio.wait_for(reader.read(4096), 5)
    assert got.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    took = await wait_for(
        lambda: upstream.client_gone == ["/stream/endless"], what="upstream saw close"
    )
    assert took < 3
    await wait_for(lambda: metric(proxy, "signing_proxy_in_flight_requests") == 0)
