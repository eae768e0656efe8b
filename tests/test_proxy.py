"""The whole proxy, in both modes, against the verifying TLS upstream, with real aiohttp clients."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from signing_proxy.app import ProxyServer

from .conftest import EC_KEY_NAME, ED_KEY_NAME, HMAC_SECRET, PUBLIC_HOST, MakeProxy, ec_pem
from .helpers import admin, base, fetch, metric
from .upstream import VerifyingUpstream

IDENTITY = {"Accept-Encoding": "identity"}


def signed_uri(host: str, claims: dict[str, Any]) -> str:
    """The signed uri, in the claim form the official SDK uses for ``host`` (and only that form)."""
    if host == "api.coinbase.com":
        assert "uris" not in claims
        return str(claims["uri"])
    assert "uri" not in claims and len(claims["uris"]) == 1
    return str(claims["uris"][0])


# --- signing, both modes, every host ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "host", "kid", "alg"),
    [
        ("/api/v3/brokerage/accounts", "api.coinbase.com", EC_KEY_NAME, "ES256"),
        ("/onramp/v1/token", "api.developer.coinbase.com", ED_KEY_NAME, "EdDSA"),
        ("/platform/v2/evm/accounts", "api.cdp.coinbase.com", EC_KEY_NAME, "ES256"),
    ],
)
async def test_base_url_mode_signs_for_each_host(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream,
    path: str, host: str, kid: str, alg: str,
) -> None:  # fmt: skip
    status, data, resp, _ = await fetch(client, "GET", f"{base(proxy)}{path}?limit=5&cursor=a%20b")
    assert status == 200, data
    assert data is not None
    assert data["auth"] == "jwt" and data["host"] == host
    assert data["query"] == "limit=5&cursor=a%20b"  # the query reaches the upstream untouched ...
    # ... and stays out of the signed uri (cdp-sdk's `uris` list form on the CDP hosts)
    assert signed_uri(host, data["claims"]) == f"GET {host}{path}"
    assert upstream.received[-1].jwt_header["kid"] == kid
    assert upstream.received[-1].jwt_header["alg"] == alg
    assert resp.headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("api.coinbase.com", "/api/v3/brokerage/accounts"),
        ("api.developer.coinbase.com", "/onramp/v1/token"),
        ("api.cdp.coinbase.com", "/platform/v2/evm/accounts"),
    ],
)
async def test_forward_proxy_mode_signs_for_each_host(
    proxy: ProxyServer, client: aiohttp.ClientSession, host: str, path: str
) -> None:
    status, data, _, _ = await fetch(client, "GET", f"http://{host}{path}?x=1", proxy=base(proxy))
    assert status == 200, data
    assert data is not None and data["auth"] == "jwt"
    assert signed_uri(host, data["claims"]) == f"GET {host}{path}"
    assert data["query"] == "x=1"


async def test_post_body_streams_through_and_is_signed(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    body = json.dumps({"client_order_id": "abc", "product_id": "BTC-USD", "side": "BUY"}).encode()
    status, data, _, _ = await fetch(
        client, "POST", f"{base(proxy)}/api/v3/brokerage/orders", data=body,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 200, data
    assert data is not None
    assert data["claims"]["uri"] == "POST api.coinbase.com/api/v3/brokerage/orders"
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert data["headers"]["content-type"] == "application/json"
    assert data["headers"]["content-length"] == str(len(body))


async def test_get_carrying_empty_json_body_is_forwarded(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, data, _, _ = await fetch(
        client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts", data=b"{}"
    )
    assert status == 200, data
    assert data is not None and data["body_len"] == 2


async def test_hmac_v3_excludes_query_and_covers_body(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    body = b'{"order_ids":["1"]}'
    status, data, _, _ = await fetch(
        client, "POST", f"{base(proxy)}/hmac/api/v3/brokerage/orders/batch_cancel?dry=1", data=body
    )
    assert status == 200, (data, upstream.rejections)
    assert data is not None and data["auth"] == "hmac"
    assert data["path"] == "/api/v3/brokerage/orders/batch_cancel" and data["query"] == "dry=1"
    assert "authorization" not in data["headers"]


async def test_hmac_v2_includes_query(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    status, data, _, _ = await fetch(
        client,
        "GET",
        f"{base(proxy)}/v2/accounts?limit=2&order=asc",
        headers={"CB-VERSION": "2024-01-01"},
    )
    assert status == 200, (data, upstream.rejections)
    assert data is not None and data["auth"] == "hmac" and data["query"] == "limit=2&order=asc"
    assert data["headers"]["cb-version"] == "2024-01-01"  # customary header passes through


async def test_hmac_body_over_cap_is_413(
    make_proxy: MakeProxy,
    config_dict: dict[str, Any],
    client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:
    config_dict["max_body_bytes"] = 1000
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "POST", f"{base(proxy)}/v2/x", data=b"a" * 1001)
    assert status == 413 and data is not None and data["error"] == "body_too_large"
    assert upstream.received == []

    # chunked upload (no Content-Length) is cut off the same way
    async def gen() -> Any:
        for _ in range(3):
            yield b"b" * 600

    status, data, _, _ = await fetch(client, "POST", f"{base(proxy)}/v2/x", data=gen())
    assert status == 413 and data is not None and data["error"] == "body_too_large"


async def test_ed25519_route_override_and_strip_prefix(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/ed/api/v3/brokerage/products")
    assert status == 200, data
    assert data is not None and data["path"] == "/api/v3/brokerage/products"
    assert upstream.received[-1].jwt_header == {
        **upstream.received[-1].jwt_header,
        "alg": "EdDSA",
        "kid": ED_KEY_NAME,
    }


async def test_percent_encoding_is_sent_and_signed_as_written(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    path = "/api/v3/brokerage/products/BTC%2DUSD/ticker%20x%2Fy"
    status, data, _, _ = await fetch(client, "GET", URL(f"{base(proxy)}{path}", encoded=True))
    assert status == 200, data
    assert (
        data is not None
        and data["path"] == path
        and data["claims"]["uri"] == f"GET api.coinbase.com{path}"
    )


async def test_client_auth_and_hop_headers_never_reach_upstream(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer client-token",
        "CB-ACCESS-KEY": "client",
        "CB-ACCESS-SIGN": "client",
        "CB-ACCESS-TIMESTAMP": "1",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop-me",
        "X-Keep": "keep-me",
    }
    status, data, _, _ = await fetch(
        client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts", headers=headers
    )
    assert status == 200, data
    assert data is not None
    seen = data["headers"]
    assert not any(k.startswith("cb-access-") for k in seen)
    assert "proxy-authorization" not in seen and "x-hop" not in seen
    assert (
        seen["authorization"].startswith("Bearer ey")
        and "client-token" not in seen["authorization"]
    )
    assert seen["x-keep"] == "keep-me"
    assert seen["host"] == "api.coinbase.com"
    assert "user-agent" in seen  # the client's own


async def test_unsigned_upstream_forwards_without_auth(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, data, _, _ = await fetch(
        client, "GET", f"{base(proxy)}/public/ping", headers={"Authorization": "Bearer x"}
    )
    assert status == 200, data
    assert data is not None and data["auth"] == "none" and "authorization" not in data["headers"]


# --- responses pass through unchanged -------------------------------------------------------------


async def test_upstream_status_and_body_pass_through(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, data, _, _ = await fetch(client, "DELETE", f"{base(proxy)}/status/418")
    assert status == 418 and data == {"status": 418, "message": "from upstream"}
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/status/500")
    assert status == 500 and data == {"status": 500, "message": "from upstream"}


async def test_redirect_is_passed_back_not_followed(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream
) -> None:
    status, _, resp, _ = await fetch(client, "GET", f"{base(proxy)}/redirect")
    assert status == 302 and resp.headers["Location"] == "https://elsewhere.example/next"
    assert len(upstream.received) == 1


async def test_compressed_body_passes_untouched(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    status, _, resp, raw = await fetch(
        client, "GET", f"{base(proxy)}/gzip", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b'{"compressed": true}'


async def test_chunked_response_relayed(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    status, _, resp, raw = await fetch(client, "GET", f"{base(proxy)}/chunked")
    assert status == 200 and raw == b"part0;part1;part2;part3;part4;"
    assert resp.headers["X-Upstream"] == "yes"


async def test_head_request(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    status, _, resp, raw = await fetch(client, "HEAD", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 200 and raw == b"" and int(resp.headers["Content-Length"]) > 0


async def test_upstream_cookies_are_not_shared_between_clients(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    await fetch(client, "GET", f"{base(proxy)}/api/v3/a")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other:
        _, data, _, _ = await fetch(other, "GET", f"{base(proxy)}/api/v3/b")
    assert data is not None and "cookie" not in data["headers"]


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example.com/steal",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9090/metrics",
        "http://api.coinbase.com:8443/api/v3/brokerage/accounts",
        "http://api.coinbase.com.evil.com/api/v3/x",
    ],
)
async def test_unconfigured_targets_are_403(
    proxy: ProxyServer, client: aiohttp.ClientSession, upstream: VerifyingUpstream, url: str
) -> None:
    status, data, _, _ = await fetch(client, "GET", url, proxy=base(proxy))
    assert status == 403 and data is not None and data["error"] == "host_not_allowed"
    assert upstream.received == []


async def _raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_connect_is_refused_with_explanation(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    raw = await _raw_exchange(
        proxy.port(0),
        b"CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")
    data = json.loads(body)
    assert data["error"] == "connect_not_supported" and "http://" in data["message"]
    assert upstream.received == []


async def test_connect_via_aiohttp_client_fails_cleanly(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientHttpProxyError) as info:
        await fetch(client, "GET", "https://api.coinbase.com/api/v3/x", proxy=base(proxy))
    assert info.value.status == 405


async def test_dot_segments_are_refused(proxy: ProxyServer, upstream: VerifyingUpstream) -> None:
    for target in (b"/api/v3/../v2/accounts", b"/api/v3/%2e%2e/v2/x", b"/./x"):
        raw = await _raw_exchange(
            proxy.port(0), b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 400"), raw
        assert b'"bad_path"' in raw
    assert upstream.received == []


# --- upstream failures -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _resetting_server() -> tuple[asyncio.AbstractServer, int]:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_upstream_refused_is_502(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession
) -> None:
    config_dict["upstreams"]["api.coinbase.com"]["url"] = f"https://127.0.0.1:{_closed_port()}"
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 502 and data is not None and data["error"] == "upstream_unreachable"
    assert "api.coinbase.com" in data["message"]


async def test_upstream_reset_is_502(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession
) -> None:
    server, port = await _resetting_server()
    config_dict["upstreams"]["api.coinbase.com"]["url"] = f"https://127.0.0.1:{port}"
    proxy = await make_proxy(config_dict)
    try:
        status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    finally:
        server.close()
    assert status == 502 and data is not None
    assert data["error"] in {"upstream_connection_reset", "upstream_tls_error"}


async def test_upstream_timeout_is_504(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession
) -> None:
    config_dict["upstreams"]["api.coinbase.com"]["timeout"] = 0.3
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/slow?seconds=3")
    assert status == 504 and data is not None and data["error"] == "upstream_timeout"
    assert metric(proxy, "signing_proxy_in_flight_requests") == 0


async def test_upstream_untrusted_certificate_is_502(
    make_proxy: MakeProxy,
    config_dict: dict[str, Any],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    config_dict["upstreams"]["api.coinbase.com"]["ca_file"] = str(other_ca)
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 502 and data is not None and data["error"] == "upstream_tls_error"


async def test_upstream_breaking_small_response_is_a_clean_502(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    """Small declared bodies are read before answering, so a short body is still a JSON error."""
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/reset-small")
    assert status == 502 and data is not None
    assert data["error"] in {"upstream_bad_response", "upstream_connection_reset"}
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 200


async def test_upstream_breaking_mid_response_closes_client_connection(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(client, "GET", f"{base(proxy)}/reset-mid")
    # and the proxy is fine afterwards
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
    assert status == 200


# --- missing keys, health, metrics, logs -----------------------------------------------------------


async def test_missing_key_answers_503_naming_the_credential(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path,
) -> None:  # fmt: skip
    config_dict["credentials"]["trading"]["key_file"] = str(tmp_path / "not-there.json")
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 503 and data is not None and data["error"] == "credential_unavailable"
    assert "trading" in data["message"] and "not-there.json" in data["message"]
    assert upstream.received == []  # fail closed: never forwarded unsigned
    status, health, _, _ = await fetch(client, "GET", f"{admin(proxy)}/healthz")
    assert status == 200 and health is not None and health["status"] == "ok"
    status, ready, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 503 and ready is not None and not ready["ready"]
    assert any("not-there.json" in m for m in ready["missing"])
    # other credentials still work
    status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/onramp/v1/x")
    assert status == 200


async def test_readyz_ok_when_all_loaded(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    status, ready, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 200 and ready == {"ready": True, "draining": False, "missing": []}


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def test_metrics_exposition(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    for i in range(3):
        await fetch(
            client,
            "GET",
            f"{base(proxy)}/api/v3/brokerage/accounts/{i}f603f97c-37d7-4e58-b264-c27e9e393dd9",
        )
    await fetch(client, "GET", f"{base(proxy)}/onramp/v1/token")
    await fetch(client, "GET", f"{base(proxy)}/v2/user")
    await fetch(client, "GET", "http://nope.example/", proxy=base(proxy))
    status, _, resp, raw = await fetch(client, "GET", f"{admin(proxy)}/metrics", headers=IDENTITY)
    assert status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    s = _samples(raw.decode())
    requests = {tuple(sorted(lbl.items())): v for lbl, v in s["signing_proxy_requests_total"]}
    key = (
        ("method", "GET"),
        ("route", "/api/v3/brokerage/accounts/{id}"),
        ("status_class", "2xx"),
        ("upstream", "api.coinbase.com"),
    )
    assert requests[key] == 3
    tokens = {
        (lbl["credential"], lbl["algorithm"]): v
        for lbl, v in s["signing_proxy_tokens_minted_total"]
    }
    assert (
        tokens[("trading", "ES256")] == 3
        and tokens[("ed", "EdDSA")] == 1
        and tokens[("legacy", "HMAC")] == 1
    )
    errors = {lbl["kind"]: v for lbl, v in s["signing_proxy_errors_total"]}
    assert errors["host_not_allowed"] == 1
    assert s["signing_proxy_in_flight_requests"][0][1] == 0
    for name in (
        "signing_proxy_request_duration_seconds_count",
        "signing_proxy_upstream_duration_seconds_count",
        "signing_proxy_signing_duration_seconds_count",
    ):
        assert sum(v for _, v in s[name]) >= 1
    assert {lbl["credential"]: v for lbl, v in s["signing_proxy_credential_loaded"]} == {
        "trading": 1,
        "ed": 1,
        "legacy": 1,
    }


async def test_access_log_line_per_request_and_no_secrets_anywhere(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, caplog: pytest.LogCaptureFixture, ec_key_file: Path,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    config_dict["credentials"]["broken"] = {"key_name": "k", "private_key": "not a key"}
    config_dict["upstreams"][PUBLIC_HOST]["credential"] = "broken"
    proxy = await make_proxy(config_dict, access_log_stream=stream)
    bodies: list[bytes] = []
    for method, url, kw in [
        ("GET", f"{base(proxy)}/api/v3/brokerage/accounts", {}),
        ("POST", f"{base(proxy)}/v2/accounts?x=1", {"data": b"{}"}),
        ("GET", f"{base(proxy)}/onramp/v1/token", {}),
        ("GET", f"{base(proxy)}/status/401", {}),
        ("GET", "http://evil.example/", {"proxy": base(proxy)}),
        ("GET", f"{base(proxy)}/public/x", {}),  # credential that failed to load
        ("GET", f"{base(proxy)}/slow?seconds=0", {}),
    ]:
        _, _, _, raw = await fetch(client, method, url, **kw)
        bodies.append(raw)
    _, _, _, metrics = await fetch(client, "GET", f"{admin(proxy)}/metrics", headers=IDENTITY)
    await asyncio.sleep(0.3)  # lines are buffered, written within AccessLog.FLUSH_SECONDS
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 7
    first = lines[0]
    assert {
        "ts",
        "level",
        "logger",
        "msg",
        "request_id",
        "upstream",
        "route",
        "status",
        "duration_ms",
        "upstream_ms",
        "sign_ms",
    } <= set(first)
    assert first["logger"] == "signing_proxy.access" and first["msg"] == "request"
    assert first["status"] == 200 and first["upstream"] == "api.coinbase.com"
    assert [line["status"] for line in lines] == [200, 200, 200, 401, 403, 503, 200]
    # nothing secret anywhere: access log, other logs (messages and fields), error bodies, metrics
    logged = stream.getvalue() + "\n".join(
        f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records
    )
    pem_body = json.loads(ec_key_file.read_text())["privateKey"].splitlines()[1]
    tokens = [r.token for r in upstream.received if r.token]
    assert tokens
    for secret in [pem_body, HMAC_SECRET, "not a key", *tokens, *(t.split(".")[2] for t in tokens)]:
        assert secret not in logged
        assert secret.encode() not in metrics
        for body in bodies[3:6]:  # the upstream's 401 and the proxy's own 403 and 503
            assert secret.encode() not in body


async def test_metrics_route_labels_collapse_ids(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    for i in range(20):
        await fetch(
            client,
            "GET",
            f"{base(proxy)}/api/v3/brokerage/orders/historical/{i * 7919:08x}-aaaa-4bbb-8ccc-{i:012d}",
        )
    _, _, _, raw = await fetch(client, "GET", f"{admin(proxy)}/metrics", headers=IDENTITY)
    routes = {lbl["route"] for lbl, _ in _samples(raw.decode())["signing_proxy_requests_total"]}
    assert routes == {"/api/v3/brokerage/orders/historical/{id}"}


async def test_env_var_key_with_literal_newlines_end_to_end(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, ec_key_file: Path,
) -> None:  # fmt: skip
    pem = json.loads(ec_key_file.read_text())["privateKey"]
    monkeypatch.setenv("CDP_KEY_NAME", EC_KEY_NAME)
    monkeypatch.setenv("CDP_PRIVATE_KEY", pem.replace("\n", "\\n"))
    config_dict["credentials"]["trading"] = {
        "key_name_env": "CDP_KEY_NAME",
        "private_key_env": "CDP_PRIVATE_KEY",
    }
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 200 and data is not None and data["auth"] == "jwt"
    assert ec_pem  # the helper the key file was made with


async def test_inbound_token_required_when_configured(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SP_TOKEN", "t0ken-for-the-gateway")
    config_dict["inbound_auth"] = {"token_env": "SP_TOKEN"}
    proxy = await make_proxy(config_dict)
    url = f"{base(proxy)}/api/v3/brokerage/accounts"
    status, data, resp, _ = await fetch(client, "GET", url)
    assert status == 407 and data is not None and data["error"] == "proxy_auth_required"
    assert resp.headers["Proxy-Authenticate"].startswith("Bearer")
    status, _, _, _ = await fetch(client, "GET", url, headers={"X-Signing-Proxy-Token": "wrong"})
    assert status == 407
    assert upstream.received == []
    status, data, _, _ = await fetch(
        client, "GET", url, headers={"Proxy-Authorization": "Bearer t0ken-for-the-gateway"}
    )
    assert status == 200 and data is not None and "proxy-authorization" not in data["headers"]
    status, data, _, _ = await fetch(
        client, "GET", url, headers={"X-Signing-Proxy-Token": "t0ken-for-the-gateway"}
    )
    assert status == 200 and data is not None and "x-signing-proxy-token" not in data["headers"]
