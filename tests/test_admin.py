"""The admin listener: health, readiness and metrics on the proxy's own HTTP server."""

from __future__ import annotations

import gzip

import aiohttp

from signing_proxy.app import ProxyServer

from .helpers import admin, fetch, raw_exchange

IDENTITY = {"Accept-Encoding": "identity"}


async def test_healthz_and_readyz_answer_json(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, data, resp, _ = await fetch(client, "GET", f"{admin(proxy)}/healthz")
    assert status == 200 and data is not None and data["status"] == "ok"
    assert resp.headers["Content-Type"].startswith("application/json")
    status, data, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 200 and data is not None and data["ready"] is True


async def test_head_gets_the_headers_without_a_body(proxy: ProxyServer) -> None:
    answer = await raw_exchange(
        proxy.port(1), b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in head
    assert body == b""


async def test_unknown_paths_and_methods_are_refused_with_json(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, data, _, _ = await fetch(client, "GET", f"{admin(proxy)}/api/v3/brokerage/accounts")
    assert status == 404 and data is not None and data["error"] == "not_found"
    status, data, resp, _ = await fetch(client, "POST", f"{admin(proxy)}/metrics", data=b"x")
    assert status == 405 and data is not None and data["error"] == "method_not_allowed"
    assert resp.headers["Allow"] == "GET, HEAD"


async def test_metrics_text_openmetrics_gzip_and_name_filter(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    url = f"{admin(proxy)}/metrics"
    status, _, resp, raw = await fetch(client, "GET", url, headers=IDENTITY)
    assert status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert b"signing_proxy_requests_total" in raw and b"signing_proxy_in_flight_requests" in raw
    headers = {**IDENTITY, "Accept": "application/openmetrics-text; version=1.0.0"}
    _, _, resp, raw = await fetch(client, "GET", url, headers=headers)
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert raw.rstrip().endswith(b"# EOF")
    _, _, resp, raw = await fetch(client, "GET", url, headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert b"signing_proxy_requests_total" in gzip.decompress(raw)
    _, _, _, raw = await fetch(
        client, "GET", url, params={"name[]": "signing_proxy_in_flight_requests"}, headers=IDENTITY
    )
    families = {line.split()[2] for line in raw.decode().splitlines() if line.startswith("# TYPE")}
    assert families == {"signing_proxy_in_flight_requests"}
