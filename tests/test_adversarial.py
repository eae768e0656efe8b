"""The trust boundary, tried from the attacker's side: raw sockets in, raw bytes recorded upstream.

Every test asserts on what the upstream *received* (tests/raw_upstream.py records each request's
exact head and body bytes and verifies its JWT against the path it saw), not only on the status the
client got: a policy holds only if no forbidden request was ever signed and sent.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import io
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from signing_proxy.app import ProxyServer
from signing_proxy.topper import generate_keypair

from .conftest import HMAC_KEY, HMAC_SECRET, MakeProxy
from .helpers import raw_exchange
from .raw_upstream import RawUpstream, as_json

ORDERS = "/api/v3/brokerage/orders"
DENY_ORDERS = {"deny": [f"POST {ORDERS}", "GET /api/v3/brokerage/secret"]}
TOKEN = "inbound-token-for-adversarial-tests"


@pytest.fixture
async def raw_upstream(
    ca: trustme.CA, ec_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[RawUpstream]:
    server = RawUpstream(ca, ec_key.public_key())
    await server.start()
    yield server
    await server.close()


def _config(up: RawUpstream, ca_file: Path, key_file: Path, **top: Any) -> dict[str, Any]:
    entry = {"url": up.url, "ca_file": str(ca_file), "timeout": 5}
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "drain_timeout": 2,
        "credentials": {
            "trading": {"key_file": str(key_file)},
            "legacy": {"type": "hmac", "api_key": HMAC_KEY, "api_secret": HMAC_SECRET},
        },
        "upstreams": {"api.coinbase.com": {**entry, "credential": "trading"}},
        "routes": [
            {"prefix": "/v2/", "upstream": "api.coinbase.com", "credential": "legacy"},
            {"prefix": "/hmac", "upstream": "api.coinbase.com", "credential": "legacy",
             "strip_prefix": True},
            {"prefix": "/x", "upstream": "api.coinbase.com", "strip_prefix": True},
            {"prefix": "/", "upstream": "api.coinbase.com", "policy": DENY_ORDERS},
        ],
    }  # fmt: skip
    config.update(top)
    return config


@pytest.fixture
async def guarded(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> ProxyServer:
    return await make_proxy(_config(raw_upstream, ca_file, ec_key_file))


def _request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", "Connection: close", *headers]
    if body and not any(
        h.lower().startswith(("content-length", "transfer-encoding")) for h in headers
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def _final(raw: bytes) -> bytes:
    """The final response of a raw exchange, after any 1xx interim ones."""
    while raw.startswith(b"HTTP/1.1 1"):
        raw = raw.partition(b"\r\n\r\n")[2]
    return raw


# --- 1. bodies reach the upstream as the client sent them: no decompression, exact framing ------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "gzip, deflate", "br"])
async def test_encoded_body_is_forwarded_byte_for_byte_with_framing_that_describes_it(
    guarded: ProxyServer, raw_upstream: RawUpstream, encoding: str
) -> None:
    plain = json.dumps({"client_order_id": "a" * 4000}).encode()
    body = gzip.compress(plain) if "gzip" in encoding else zlib.compress(plain)
    # The attack's shape: the decoded body is longer than the Content-Length sent for it, and a
    # second request follows on the same pooled upstream connection.
    sent = _request("POST", "/api/v3/brokerage/orders/preview", f"Content-Encoding: {encoding}",
                    body=body)  # fmt: skip
    assert _status(await raw_exchange(guarded.port(0), sent)) == 200
    assert _status(await raw_exchange(guarded.port(0), _request("GET", "/api/v3/next"))) == 200
    first, second = raw_upstream.requests
    assert first.body == body and first.header("Content-Length") == str(len(body))
    assert first.header("Content-Encoding") == encoding
    assert second.target == "/api/v3/next" and second.connection == first.connection
    assert not raw_upstream.garbage and all(r.jwt_error is None for r in raw_upstream.requests)


async def test_chunked_encoded_body_is_forwarded_as_sent(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    body = gzip.compress(bytes(range(256)) * 40)
    assert len(body) > 100
    chunked = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for part in (body[:100], body[100:])
    ) + b"0\r\n\r\n"  # fmt: skip
    sent = _request("POST", "/api/v3/upload", "Content-Encoding: gzip",
                    "Transfer-Encoding: chunked", body=chunked)  # fmt: skip
    assert _status(await raw_exchange(guarded.port(0), sent)) == 200
    (received,) = raw_upstream.requests
    assert received.body == body and received.header("Content-Encoding") == "gzip"


async def test_hmac_signs_exactly_the_encoded_bytes_it_forwards(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    body = gzip.compress(b'{"amount":"1"}')
    sent = _request("POST", "/v2/accounts", "Content-Encoding: gzip", body=body)
    assert _status(await raw_exchange(guarded.port(0), sent)) == 200
    (received,) = raw_upstream.requests
    assert received.body == body and received.header("Content-Encoding") == "gzip"
    timestamp = received.header("CB-ACCESS-TIMESTAMP") or ""
    message = f"{timestamp}POST/v2/accounts".encode() + received.body
    expected = hmac.new(HMAC_SECRET.encode(), message, hashlib.sha256).hexdigest()
    assert received.header("CB-ACCESS-SIGN") == expected


@pytest.mark.parametrize(
    "named", ["content-encoding", "Content-Length", "content-type", "host", "keep-alive, expect"]
)
async def test_connection_cannot_strip_headers_that_describe_the_request(
    guarded: ProxyServer, raw_upstream: RawUpstream, named: str
) -> None:
    body = gzip.compress(b"{}")
    sent = _request("POST", "/api/v3/x", "Content-Encoding: gzip", f"Connection: {named}",
                    body=body)  # fmt: skip
    raw = await raw_exchange(guarded.port(0), sent)
    assert _status(raw) == 400 and as_json(raw)["error"] == "bad_connection_header"
    assert raw_upstream.requests == []


# --- 2. nothing is expanded before authentication: a refused request costs only its head --------


async def test_refused_request_is_answered_before_its_body_is_sent(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    proxy = await make_proxy(
        _config(raw_upstream, ca_file, ec_key_file, inbound_auth={"token": TOKEN})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
    try:  # the head promises a 2 MB gzip body that never comes: the answer must not wait for it
        writer.write(
            b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: 2000000\r\n\r\n"
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()  # and the connection is closed, the body unread
    finally:
        writer.close()
    assert _status(head) == 407 and b"proxy_auth_required" in rest
    assert raw_upstream.requests == []


async def test_a_compression_bomb_is_forwarded_compressed_not_inflated(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(64)) + packer.flush()  # 64 MiB inflated
    raw = await raw_exchange(
        guarded.port(0), _request("POST", "/api/v3/x", "Content-Encoding: gzip", body=bomb)
    )
    assert _status(raw) == 200
    (received,) = raw_upstream.requests
    assert received.body == bomb and len(received.body) < 1 << 20


# --- 3. a policy is a fence around a credential, whatever the route, mode or spelling -----------

FORBIDDEN = [
    ("POST", ORDERS),  # the route's own policy
    ("POST", f"http://api.coinbase.com{ORDERS}"),  # forward-proxy mode
    ("POST", f"http://API.COINBASE.COM{ORDERS}"),
    ("POST", f"http://api.coinbase.com.:80{ORDERS}"),
    ("POST", f"/x{ORDERS}"),  # another route to the same upstream and credential
    ("POST", f"//{ORDERS[1:]}"),  # falls through spelling variants
    ("POST", ORDERS.upper()),
    ("POST", "/api/v3/brokerage/%6frders"),
    ("POST", "/api/v3/brokerage/%256frders"),  # double-encoded
    ("POST", "/api/v3/brokerage//orders"),
    ("POST", f"{ORDERS}/"),
    ("POST", f"{ORDERS};jsessionid=1"),
    ("POST", f"{ORDERS}%3Bx"),
    ("POST", f"{ORDERS}%3Fx=1"),
    ("POST", f"/x/{ORDERS.upper()}"),
    ("POST", "http://api.coinbase.com/api/v3/brokerage/%4Frders"),
    ("GET", "/api/v3/brokerage/secret"),
    ("HEAD", "/api/v3/brokerage/secret"),  # a GET rule covers HEAD
    ("HEAD", "http://api.coinbase.com/api/v3/brokerage/secret"),
]


@pytest.mark.parametrize(("method", "target"), FORBIDDEN)
async def test_route_policy_holds_however_the_request_is_spelled_or_routed(
    guarded: ProxyServer, raw_upstream: RawUpstream, method: str, target: str
) -> None:
    raw = await raw_exchange(guarded.port(0), _request(method, target, body=b"{}"))
    assert _status(raw) in (400, 403), raw[:300]
    if _status(raw) == 403 and method != "HEAD":
        assert b"policy_denied" in raw
    assert raw_upstream.requests == []  # nothing was signed or sent


async def test_allowed_requests_still_pass_in_both_modes(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    for target in ("/api/v3/brokerage/orders/preview", "http://api.coinbase.com/api/v3/x"):
        raw = await raw_exchange(guarded.port(0), _request("POST", target, body=b"{}"))
        assert _status(raw) == 200, raw[:300]
    assert [r.target for r in raw_upstream.requests] == [
        "/api/v3/brokerage/orders/preview",
        "/api/v3/x",
    ]
    assert all(r.jwt_error is None and r.jwt_uri for r in raw_upstream.requests)


async def test_read_only_route_fences_its_credential_everywhere(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    config = _config(raw_upstream, ca_file, ec_key_file)
    config["routes"] = [
        {"prefix": "/readonly/", "upstream": "api.coinbase.com", "strip_prefix": True,
         "policy": {"allow": ["GET /api/v3/brokerage/accounts/**"]}},
        {"prefix": "/", "upstream": "api.coinbase.com"},
    ]  # fmt: skip
    proxy = await make_proxy(config)
    for target in (
        "/readonly/api/v3/brokerage/accounts/..%2f..%2fpayment_methods",
        "/readonly/api/v3/brokerage/accounts/x%2F..%2F..%2Fpayment_methods",
        "/readonly/api/v3/brokerage/accounts/%2e%2e/%2e%2e/payment_methods",
        "/readonly/api/v3/brokerage/accounts/..%5c..%5cpayment_methods",
        "/api/v3/brokerage/payment_methods",  # the same credential by another route
        "http://api.coinbase.com/api/v3/brokerage/payment_methods",  # or by curl -x
    ):
        raw = await raw_exchange(proxy.port(0), _request("GET", target))
        assert _status(raw) in (400, 403), (target, raw[:300])
    raw = await raw_exchange(
        proxy.port(0), _request("GET", "/readonly/api/v3/brokerage/accounts/1")
    )
    assert _status(raw) == 200
    assert [r.target for r in raw_upstream.requests] == ["/api/v3/brokerage/accounts/1"]


async def test_forward_proxy_mode_can_be_turned_off(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    proxy = await make_proxy(_config(raw_upstream, ca_file, ec_key_file, forward_proxy=False))
    raw = await raw_exchange(proxy.port(0), _request("GET", "http://api.coinbase.com/api/v3/x"))
    assert _status(raw) == 403 and as_json(raw)["error"] == "forward_proxy_disabled"
    assert _status(await raw_exchange(proxy.port(0), _request("GET", "/api/v3/x"))) == 200
    assert [r.target for r in raw_upstream.requests] == ["/api/v3/x"]


# --- 4. dot-segments in every spelling a server might decode: refused, in both modes ------------

DOTS = [
    "/api/v3/brokerage/x/%2e%2e/orders",
    "/api/v3/brokerage/x/%2E%2E/orders",
    "/api/v3/brokerage/x/.%2E/orders",
    "/api/v3/brokerage/x%2f..%2forders",
    "/api/v3/brokerage/x%2F..%2Forders",
    "/api/v3/brokerage/x%5c..%5corders",
    "/api/v3/brokerage/x/..;/orders",
    "/api/v3/brokerage/x/..%3b/orders",
    "/api/v3/brokerage/x/%252e%252e/orders",
    "/api/v3/brokerage/x/%c0%ae%c0%ae/orders",
    "/api/v3/brokerage/x/%u002e%u002e/orders",
    "/api/v3/brokerage/x/%2e./orders",
    "/api/v3/brokerage/x/.%20/orders",
    "/api/v3/brokerage/x/..",
    "/api/v3/brokerage/x/%2e",
    "/api/v3/brokerage/x/%00/orders",
]


@pytest.mark.parametrize("mode", ["base", "forward"])
@pytest.mark.parametrize("path", DOTS)
async def test_dot_segments_are_refused_in_every_spelling(
    guarded: ProxyServer, raw_upstream: RawUpstream, path: str, mode: str
) -> None:
    target = path if mode == "base" else f"http://api.coinbase.com{path}"
    raw = await raw_exchange(guarded.port(0), _request("POST", target, body=b"{}"))
    assert _status(raw) == 400 and as_json(raw)["error"] == "bad_path", raw[:300]
    assert raw_upstream.requests == []


# --- 5. one request, one log line, whatever the client wrote -------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_client_input_cannot_forge_log_lines(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path, fmt: str
) -> None:
    stream = io.StringIO()
    proxy = await make_proxy(
        _config(raw_upstream, ca_file, ec_key_file, log_format=fmt), access_log_stream=stream
    )
    targets = [
        "/api/v3/x%0aforged=1%0d%0astatus=200",
        "/api/v3/%E2%80%A8x",  # U+2028, a line break to some log viewers
        "http://nowhere.example/%0a",
    ]
    for target in targets:
        sent = ("GET " + target + " HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n").encode(
            "latin-1", "replace"
        )
        await raw_exchange(proxy.port(0), sent)
    assert proxy.state.handler is not None and proxy.state.handler.access_log is not None
    proxy.state.handler.access_log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(targets), lines
    for line in lines:
        assert not any(ch in line for ch in "\r\x0b\x0c\x85\u2028\u2029")
        if fmt == "json":
            assert json.loads(line)["request_id"]
        else:
            assert line.startswith("20") and line.count(" request_id=") == 1


# --- 6. smaller holes ----------------------------------------------------------------------------


async def test_client_auth_headers_in_any_spelling_never_reach_the_upstream(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    forged = [
        "CB_ACCESS_SIGN: forged", "Cb_Access_Key: forged", "CB-ACCESS-TIMESTAMP: 1",
        "X-CB-ACCESS-SIGNATURE: forged", "X_CB_ACCESS_KEY: forged", "X-Wallet-Auth: forged",
        "X_Wallet_Auth: forged", "Authorization: Bearer forged", "Proxy-Authorization: x",
        "X-Signing-Proxy-Token: x", "X_Signing_Proxy_Token: x",
    ]  # fmt: skip
    assert (
        _status(await raw_exchange(guarded.port(0), _request("GET", "/api/v3/x", *forged))) == 200
    )
    (received,) = raw_upstream.requests
    assert not any("forged" in value for _, value in received.headers), received.headers
    names = {name.lower().replace("_", "-") for name, _ in received.headers}
    assert not names & {"proxy-authorization", "x-wallet-auth", "x-signing-proxy-token"}
    assert [v for n, v in received.headers if n.lower() == "authorization"] == [
        received.header("Authorization")
    ]
    assert received.jwt_error is None


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (_request("GET", "/api/v3/x", "X-HTTP-Method-Override: POST"), "method_override_refused"),
        (_request("GET", "/api/v3/x", "X-Method-Override: DELETE"), "method_override_refused"),
        (_request("post", ORDERS, body=b"{}"), "bad_method"),  # aiohttp's parser refuses these
        (_request("Post", "/api/v3/x", body=b"{}"), "bad_method"),
        (_request("PATCH_", "/api/v3/x", body=b"{}"), "bad_method"),
    ],
)
async def test_method_tricks_are_refused(
    guarded: ProxyServer, raw_upstream: RawUpstream, request_bytes: bytes, code: str
) -> None:
    raw = await raw_exchange(guarded.port(0), request_bytes)
    assert raw.split(b" ", 2)[1] == b"400", raw[:300]
    if raw.startswith(b"HTTP/1.1"):  # the proxy's own answer (not the parser's)
        assert as_json(raw)["error"] == code
    assert raw_upstream.requests == []


async def test_websocket_upgrade_to_a_rest_upstream_is_refused(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    upgrade = _request(
        "GET", "/api/v3/brokerage/accounts", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port(0))
    try:
        writer.write(upgrade.replace(b"Connection: close\r\n", b""))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            raw = head + await reader.readexactly(length)
    finally:
        writer.close()
    assert _status(raw) == 403 and as_json(raw)["error"] == "websocket_not_allowed"
    assert raw_upstream.requests == [] and raw_upstream.connections == 0


async def test_expect_100_continue_is_answered_after_the_checks(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    body = b"{" + b'"a":' + b'"' + b"x" * 2040 + b'"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port(0))
    try:
        writer.write(
            f"POST /api/v3/brokerage/orders/preview HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):  # a proxy that never answers 100 fails here
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            final = await reader.read()
    finally:
        writer.close()
    assert _status(final) == 200
    (received,) = raw_upstream.requests
    assert received.body == body and received.header("Expect") is None


@pytest.mark.parametrize(
    ("target", "status"), [(ORDERS, 403), ("/api/v3/%2e%2e/x", 400), ("http://evil.example/", 403)]
)
async def test_refused_expect_request_gets_its_error_and_no_100(
    guarded: ProxyServer, raw_upstream: RawUpstream, target: str, status: int
) -> None:
    sent = _request("POST", target, "Expect: 100-continue", "Content-Length: 2048")
    raw = await raw_exchange(guarded.port(0), sent)  # the body is never sent
    assert _status(raw) == status and b"100 Continue" not in raw
    assert raw_upstream.requests == []


async def test_other_expectations_get_417(guarded: ProxyServer, raw_upstream: RawUpstream) -> None:
    raw = await raw_exchange(guarded.port(0), _request("GET", "/api/v3/x", "Expect: teapot"))
    assert _status(raw) == 417 and raw_upstream.requests == []


async def test_curl_post_with_expect_does_not_wait_for_its_timeout(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    body = json.dumps({"note": "y" * 2048})
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--expect100-timeout", "30",
        "-H", "Expect: 100-continue", "-H", "Content-Type: application/json", "--data-binary",
        body, "-x", f"http://127.0.0.1:{guarded.port(0)}", "http://api.coinbase.com/api/v3/x",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(10):  # curl would wait 30 s for a 100 that never came
        out, _ = await proc.communicate()
    assert out == b"200"
    (received,) = raw_upstream.requests
    assert received.body == body.encode()


def _topper_config(raw: RawUpstream, ca_file: Path, key_file: Path, tmp: Path) -> dict[str, Any]:
    jwk = tmp / "topper.jwk.json"
    jwk.write_text(json.dumps(generate_keypair()["privateKey"]))
    topper = {
        "private_key_file": str(jwk),
        "key_id": "6a3e9a7c-1f43-4c8e-9a0b-0a1b2c3d4e5f",
        "widget_id": "0f0e0d0c-0b0a-4909-8807-060504030201",
        "rate_limit": {"rate": 0.001, "burst": 2},
    }
    return _config(raw, ca_file, key_file, topper=topper)


FLOW = {
    "source": {"amount": "100.00", "asset": "USD"},
    "target": {"address": "0x" + "ab" * 20, "asset": "ETH", "network": "ethereum"},
}


@pytest.mark.parametrize("field", ["iss", "exp", "aud", "nbf", "iat", "jti", "sub", "kid", "alg"])
async def test_topper_claims_and_header_stay_under_the_proxys_control(
    make_proxy: MakeProxy,
    raw_upstream: RawUpstream,
    ca_file: Path,
    ec_key_file: Path,
    tmp_path: Path,
    field: str,
) -> None:
    proxy = await make_proxy(_topper_config(raw_upstream, ca_file, ec_key_file, tmp_path))
    body = json.dumps({**FLOW, field: "attacker"}).encode()
    raw = await raw_exchange(proxy.port(0), _request("POST", "/topper/bootstrap-token", body=body))
    assert _status(raw) == 400 and field in as_json(raw)["message"]


async def test_topper_endpoint_has_a_rate_limit(
    make_proxy: MakeProxy,
    raw_upstream: RawUpstream,
    ca_file: Path,
    ec_key_file: Path,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy(_topper_config(raw_upstream, ca_file, ec_key_file, tmp_path))
    body = json.dumps(FLOW).encode()
    statuses = []
    for _ in range(3):
        raw = await raw_exchange(
            proxy.port(0), _request("POST", "/topper/bootstrap-token", body=body)
        )
        statuses.append(_status(raw))
    assert statuses == [200, 200, 429]


async def test_pooled_connection_carries_many_requests_without_desync(
    guarded: ProxyServer, raw_upstream: RawUpstream
) -> None:
    """Mixed bodies (encoded, chunked, empty) on keep-alive client and upstream connections."""
    url = f"http://127.0.0.1:{guarded.port(0)}"
    bodies = [gzip.compress(b"a" * n) for n in (1, 500, 20_000)] + [b"", b"{}", b"z" * 70_000]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for i, body in enumerate(bodies):
            headers = {"Content-Encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
            async with session.post(f"{url}/api/v3/p{i}", data=body, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
    assert [r.body for r in raw_upstream.requests] == bodies
    assert [r.target for r in raw_upstream.requests] == [
        f"/api/v3/p{i}" for i in range(len(bodies))
    ]
    assert not raw_upstream.garbage and raw_upstream.connections == 1


async def test_a_prefix_route_policy_holds_for_every_credential_and_spelling(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    """/v2/ signs with the HMAC key; /V2/ and //v2/ fall through to / (the CDP key): still fenced."""
    config = _config(raw_upstream, ca_file, ec_key_file)
    config["routes"] = [
        {"prefix": "/v2/", "upstream": "api.coinbase.com", "credential": "legacy",
         "policy": {"deny": ["* /v2/user/**"]}},
        {"prefix": "/", "upstream": "api.coinbase.com"},
    ]  # fmt: skip
    proxy = await make_proxy(config)
    for target in (
        "/v2/user",
        "/V2/user",
        "//v2/user",
        "/v2//user/",
        "/%76%32/user",
        "http://api.coinbase.com/v2/user",
        "http://api.coinbase.com/V2/USER",
    ):
        raw = await raw_exchange(proxy.port(0), _request("GET", target))
        assert _status(raw) == 403 and as_json(raw)["error"] == "policy_denied", (target, raw)
    assert raw_upstream.requests == []
    assert _status(await raw_exchange(proxy.port(0), _request("GET", "/v2/accounts"))) == 200


async def test_a_wallet_write_without_a_wallet_secret_is_refused_before_100_continue(
    make_proxy: MakeProxy, raw_upstream: RawUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    config = _config(raw_upstream, ca_file, ec_key_file)
    config["upstreams"]["api.cdp.coinbase.com"] = {
        "url": raw_upstream.url, "ca_file": str(ca_file), "timeout": 5, "credential": "trading",
    }  # fmt: skip
    config["routes"].insert(0, {"prefix": "/platform/", "upstream": "api.cdp.coinbase.com"})
    proxy = await make_proxy(config)
    sent = _request(
        "POST", "/platform/v2/evm/accounts", "Expect: 100-continue", "Content-Length: 20"
    )
    raw = await raw_exchange(proxy.port(0), sent)  # the body is never sent
    assert _status(raw) == 403 and as_json(raw)["error"] == "wallet_secret_required"
    assert b"100 Continue" not in raw and raw_upstream.requests == []
