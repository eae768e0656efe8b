"""Hostile input refused: never an open proxy, no path games, no smuggling, no slowloris, no
unbounded bodies or headers. Sent over raw sockets so no client library tidies the bytes first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from signing_proxy.app import ProxyServer

from .conftest import MakeProxy
from .helpers import base, fetch, metric, raw_exchange, wait_for
from .upstream import VerifyingUpstream


class Sentinel:
    """A listener where a request would land if the proxy could be steered to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def sentinel() -> AsyncIterator[Sentinel]:
    s = Sentinel()
    await s.start()
    yield s
    await s.close()


def _status(raw: bytes) -> int:
    assert raw.startswith((b"HTTP/1.", b"HTTP/0.9 ")), raw[:200]
    return int(raw.split(b" ", 2)[1])


def _json(raw: bytes) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), head
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def _get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: proxy", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


# --- never an open proxy ---------------------------------------------------------------------------

OPEN_PROXY_TARGETS = [
    "http://127.0.0.1:{port}/",
    "http://localhost:{port}/",
    "http://127.1:{port}/",
    "http://2130706433:{port}/",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:{port}/",
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.0.1/",
    "http://api.coinbase.com:{port}/api/v3/brokerage/accounts",  # configured host, other port
    "https://api.coinbase.com:{port}/api/v3/brokerage/accounts",
    "http://api.coinbase.com@127.0.0.1:{port}/",  # userinfo tricks, both ways round
    "http://127.0.0.1:{port}@api.coinbase.com/",
    "http://api.coinbase.com:443@127.0.0.1:{port}/",
    "http://api.coinbase.com.evil.example/",
    "http://evil.example./",
    "http://EVIL.EXAMPLE/",
    "http://api.coinbase.com../x",
    "http://api%2ecoinbase.com/x",
    "ftp://api.coinbase.com/x",
    "gopher://127.0.0.1:{port}/_x",
    "file:///etc/passwd",  # no host to allow: the router refuses it as a bad target (400)
]


@pytest.mark.parametrize("template", OPEN_PROXY_TARGETS)
async def test_absolute_targets_off_the_list_are_403_and_nothing_is_contacted(
    proxy: ProxyServer, upstream: VerifyingUpstream, sentinel: Sentinel, template: str
) -> None:
    raw = await raw_exchange(proxy.port(0), _get(template.format(port=sentinel.port)))
    if template.startswith("file:"):
        assert _status(raw) == 400, raw[:300]
        assert _json(raw)["error"] == "bad_path"
    else:
        assert _status(raw) == 403, raw[:300]
        assert _json(raw)["error"] == "host_not_allowed"
    await asyncio.sleep(0.05)
    assert sentinel.connections == 0 and upstream.connections == 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n",
        b"CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ],
)
async def test_connect_is_refused_and_nothing_is_contacted(
    proxy: ProxyServer, upstream: VerifyingUpstream, sentinel: Sentinel, request_bytes: bytes
) -> None:
    raw = await raw_exchange(
        proxy.port(0), request_bytes.replace(b"{port}", str(sentinel.port).encode())
    )
    assert _status(raw) == 405 and _json(raw)["error"] == "connect_not_supported"
    assert sentinel.connections == 0 and upstream.connections == 0


async def test_host_header_never_steers_origin_form_requests(
    proxy: ProxyServer, upstream: VerifyingUpstream, sentinel: Sentinel
) -> None:
    request = (
        f"GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: 127.0.0.1:{sentinel.port}\r\n"
        f"X-Forwarded-Host: 127.0.0.1:{sentinel.port}\r\nConnection: close\r\n\r\n"
    ).encode()
    raw = await raw_exchange(proxy.port(0), request)
    assert _status(raw) == 200
    assert sentinel.connections == 0
    assert upstream.received[-1].host == "api.coinbase.com"


@pytest.mark.parametrize("host", ["API.COINBASE.COM", "api.coinbase.com.", "Api.Coinbase.Com:80"])
async def test_spellings_of_a_configured_host_reach_only_that_upstream(
    proxy: ProxyServer, upstream: VerifyingUpstream, host: str
) -> None:
    raw = await raw_exchange(proxy.port(0), _get(f"http://{host}/api/v3/brokerage/accounts"))
    assert _status(raw) == 200, raw[:300]
    claims = _json(raw)["claims"]
    assert claims["uri"] == "GET api.coinbase.com/api/v3/brokerage/accounts"  # canonical name


# --- path tricks: refused, or signed for exactly what is sent ---------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/v3/../v2/accounts",
        "/api/v3/%2e%2e/v2/accounts",
        "/api/v3/%2E%2e/v2/accounts",
        "/api/v3/.%2e/v2/accounts",
        "/api/v3/./brokerage",
        "/api/v3/brokerage/..",
        "/api/v3/brokerage/%0d%0aInjected:%201",  # encoded CR/LF: a decoding hop could inject
        "/api/v3/%09/x",  # an encoded control character: no API path has one
        "/api/v3/brokerage/..%3B/x",  # '..;' is '..' to servlet containers (path parameters)
    ],
)
async def test_dot_segments_and_controls_refused(
    proxy: ProxyServer, upstream: VerifyingUpstream, target: str
) -> None:
    raw = await raw_exchange(proxy.port(0), _get(target))
    assert _status(raw) == 400 and _json(raw)["error"] == "bad_path"
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "path",
    [
        "/api/v3/brokerage/products/BTC%2FUSD",  # encoded slash: kept encoded, signed encoded
        "/api/v3//brokerage/accounts",  # double slash: kept
        "/api/v3/brokerage/a..b/x",  # dots inside a segment are no dot-segment
        "/api/v3/brokerage/;x=1/y",  # a ';' is sent as written (and policies read without it)
        "/api/v3/" + "a" * 5000,  # long (its JWT must stay under the upstream's header limit)
    ],
)
async def test_odd_but_valid_paths_are_signed_for_exactly_what_is_sent(
    proxy: ProxyServer, upstream: VerifyingUpstream, path: str
) -> None:
    raw = await raw_exchange(proxy.port(0), _get(path + "?q=%2F"))
    assert _status(raw) == 200, (raw[:300], upstream.rejections)
    data = _json(raw)
    assert data["path"] == path and data["query"] == "q=%2F"
    assert data["claims"]["uri"] == f"GET api.coinbase.com{path}"  # the verifying upstream agreed


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_get("/api/v3/" + "a" * 9000), 400),  # request line over aiohttp's 8190 bytes
        (_get("/api/v3/x", "X-Big: " + "b" * 9000), 400),  # one header line over 8190 bytes
        (_get("/api/v3/x", *(f"X-H{i}: {'c' * 4000}" for i in range(10))), 431),  # 40 KB total
        (_get("/api/v3/x", *(f"X-H{i}: 1" for i in range(200))), 400),  # over 128 headers
        (b"GET /api/v3/x\r\nInjected: 1 HTTP/1.1\r\nHost: p\r\n\r\n", 505),  # read as HTTP/0.9
        (b"GET /api/v3/x\x00 HTTP/1.1\r\nHost: p\r\n\r\n", 400),
    ],
)
async def test_oversized_and_broken_request_heads_are_refused(
    proxy: ProxyServer, upstream: VerifyingUpstream, request_bytes: bytes, status: int
) -> None:
    raw = await raw_exchange(proxy.port(0), request_bytes)
    assert _status(raw) == status, raw[:300]
    if status == 431:
        assert _json(raw)["error"] == "headers_too_large"
    if status == 505:
        assert _json(raw)["error"] == "http_version_not_supported"
    assert upstream.connections == 0


# --- request smuggling: what aiohttp refuses, and what the proxy adds ------------------------------

SMUGGLING = [
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length: 4, 4\r\n\r\nabcd",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length: +4\r\n\r\nabcd",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nContent-Length : 4\r\n\r\nabcd",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
    b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    b"GET /api/v3/x HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n b\r\n\r\n",  # obs-fold
    b"GET /api/v3/x HTTP/1.1\nHost: p\n\n",  # bare LF
    b"GET /api/v3/x HTTP/1.1\r\nHost: p\r\nX-A: a\rb\r\n\r\n",  # bare CR in a value
]


@pytest.mark.parametrize("request_bytes", SMUGGLING)
async def test_ambiguous_framing_is_refused_before_the_upstream(
    proxy: ProxyServer, upstream: VerifyingUpstream, request_bytes: bytes
) -> None:
    raw = await raw_exchange(proxy.port(0), request_bytes)
    assert _status(raw) == 400, raw[:300]
    await asyncio.sleep(0.05)
    assert upstream.connections == 0 and upstream.received == []


async def test_transfer_codings_other_than_chunked_are_501(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    request = (
        b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    raw = await raw_exchange(proxy.port(0), request)
    assert _status(raw) == 501 and _json(raw)["error"] == "unsupported_transfer_encoding"
    assert upstream.connections == 0


async def test_plain_chunked_upload_is_forwarded(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    request = (
        b"POST /api/v3/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    raw = await raw_exchange(proxy.port(0), request)
    assert _status(raw) == 200 and _json(raw)["body_len"] == 5


# --- slow clients ----------------------------------------------------------------------------------


async def test_slowloris_head_is_cut_off_at_header_timeout(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    config_dict["header_timeout"] = 1
    proxy = await make_proxy(config_dict)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
    started = time.monotonic()

    async def drip() -> None:  # one byte every 50 ms: 10 s for the whole head
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /api/v3/x HTTP/1.1\r\nHost: p\r\nX-Slow: " + b"s" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        status, _, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/x")
        assert status == 200  # meanwhile, everyone else is served
        data = await asyncio.wait_for(reader.read(), 3)
        closed_after = time.monotonic() - started
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()
    assert data == b""  # closed without an answer
    assert closed_after < 2.5


async def test_slowloris_after_a_keep_alive_request_is_cut_off_too(
    make_proxy: MakeProxy, config_dict: dict[str, Any]
) -> None:
    config_dict["header_timeout"] = 1
    proxy = await make_proxy(config_dict)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
    try:
        writer.write(b"GET /api/v3/x HTTP/1.1\r\nHost: p\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(v for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n"))
                          if k.lower() == b"content-length"))  # fmt: skip
        await reader.readexactly(length)
        started = time.monotonic()
        writer.write(b"GET /api/v3/y HTTP/1.1\r\nHo")  # and never finishes
        rest = await asyncio.wait_for(reader.read(), 3)
        assert rest == b"" and time.monotonic() - started < 2.5
    finally:
        writer.close()


async def test_slow_body_for_hmac_is_408_and_for_streamed_body_504(
    make_proxy: MakeProxy, config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    for up in config_dict["upstreams"].values():
        up["timeout"] = 1
    proxy = await make_proxy(config_dict)
    for path, status, code in [
        ("/v2/accounts", 408, "body_timeout"),  # HMAC: the proxy reads the body itself
        ("/api/v3/brokerage/orders", 504, "upstream_timeout"),  # JWT: streamed, upstream waits
    ]:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\n0123456789"
        ).encode()
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert time.monotonic() - started < 2
            body = await asyncio.wait_for(reader.read(4096), 5)
        finally:
            writer.close()
        assert _status(head) == status and json.loads(body)["error"] == code
        assert b"connection: close" in head.lower()  # the unread body is not parsed as a request
    assert metric(proxy, "signing_proxy_in_flight_requests") == 0


# --- oversized bodies ------------------------------------------------------------------------------


async def test_streamed_body_cap(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream,
) -> None:  # fmt: skip
    config_dict["max_stream_body_bytes"] = 1000
    proxy = await make_proxy(config_dict)
    url = f"{base(proxy)}/api/v3/brokerage/orders"
    status, data, _, _ = await fetch(client, "POST", url, data=b"x" * 1001)
    assert status == 413 and data is not None and data["error"] == "body_too_large"
    assert upstream.connections == 0  # refused on Content-Length, before connecting

    async def chunks() -> Any:
        for _ in range(3):
            yield b"y" * 600

    status, data, _, _ = await fetch(client, "POST", url, data=chunks())
    assert status == 413 and data is not None and data["error"] == "body_too_large"
    assert "max_stream_body_bytes" in data["message"]
    status, data, _, _ = await fetch(client, "POST", url, data=b"z" * 1000)  # at the cap: fine
    assert status == 200 and data is not None and data["body_len"] == 1000


# --- a request line that crashed aiohttp's server: the connection is still answered and closed ----


@pytest.mark.parametrize("listener", [0, 1])  # the proxy's and the admin's
@pytest.mark.parametrize("line", [b"CONNECT  ", b"CONNECT "])
async def test_request_line_that_crashes_aiohttp_does_not_leak_the_connection(
    proxy: ProxyServer, upstream: VerifyingUpstream, line: bytes, listener: int
) -> None:
    # aiohttp 3.14.5: "CONNECT" with no target leaves the URL unset and web.Request() raises in
    # aiohttp's connection task, before any handler (guard.py closed those). The listener's own
    # server refuses the empty target itself.
    started = time.monotonic()
    raw = await raw_exchange(proxy.port(listener), line + b"\r\nHost: p\r\n\r\n", within=5)
    assert time.monotonic() - started < 2.5
    assert _status(raw) == 400 and _json(raw)["error"] == "bad_request"
    assert upstream.connections == 0
    server = proxy.http
    assert server is not None
    # The answer ended because the server closed the connection (raw_exchange reads to EOF).
    await wait_for(lambda: server.connections == 0, what="the connection to be closed")
