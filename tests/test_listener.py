"""The proxy listener on its own HTTP/1.1 server (http_server.py), end to end through the proxy:
pipelined requests answered in order, HTTP/1.0 clients, refusals that close without reading the
body, the server's own refusals as JSON, and answers framed the way the upstream framed them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

from signing_proxy.app import ProxyServer

from .helpers import metric, raw_exchange
from .upstream import VerifyingUpstream


def _answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a stream of Content-Length framed answers."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split(" ")[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


async def test_pipelined_requests_are_answered_in_order_each_signed(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    sent = b"".join(
        f"GET /api/v3/brokerage/p{i} HTTP/1.1\r\nHost: p\r\nX-Request-Id: req-{i}\r\n"
        f"{'Connection: close' if i == 2 else 'X-N: 1'}\r\n\r\n".encode()
        for i in range(3)
    )
    answers = _answers(await raw_exchange(proxy.port(0), sent))
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert [h["x-request-id"] for _, h, _ in answers] == ["req-0", "req-1", "req-2"]
    assert [json.loads(body)["path"] for _, _, body in answers] == [
        f"/api/v3/brokerage/p{i}" for i in range(3)
    ]
    assert [r.path for r in upstream.received[-3:]] == [f"/api/v3/brokerage/p{i}" for i in range(3)]


async def test_an_http10_client_gets_a_whole_answer_and_the_connection_closes(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    raw = await raw_exchange(
        proxy.port(0), b"GET /api/v3/brokerage/accounts HTTP/1.0\r\nHost: p\r\n\r\n"
    )
    [(status, headers, body)] = _answers(raw)
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["path"] == "/api/v3/brokerage/accounts"


async def test_a_refused_upload_is_answered_before_its_body_and_closed(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    # A host off the list: refused on the head alone; the 10 MB announced are never read.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port(0))
    try:
        writer.write(
            b"POST http://evil.example/x HTTP/1.1\r\nHost: p\r\nContent-Length: 10000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(5):
            raw = await reader.read()  # to EOF: the proxy closes after the answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert not raw.startswith(b"HTTP/1.1 100")
    [(status, headers, body)] = _answers(raw)
    assert status == 403 and json.loads(body)["error"] == "host_not_allowed"
    assert headers["connection"] == "close" and "x-request-id" in headers
    assert upstream.connections == 0


async def test_the_servers_own_refusals_are_json_and_counted(proxy: ProxyServer) -> None:
    raw = await raw_exchange(proxy.port(0), b"GET /api/v3/x HTTP/2.0\r\nHost: p\r\n\r\n")
    [(status, headers, body)] = _answers(raw)
    assert status == 505 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "http_version_not_supported"
    kind = "http_version_not_supported"
    assert metric(proxy, "signing_proxy_malformed_requests_total", kind=kind) == 1


async def test_a_head_answer_announces_the_upstreams_length_and_sends_no_body(
    proxy: ProxyServer, upstream: VerifyingUpstream
) -> None:
    # The test upstream answers HEAD with the length its JSON echo would have (aiohttp's HEAD).
    head = b"HEAD /api/v3/brokerage/accounts HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(proxy.port(0), head)
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK" and raw.endswith(b"\r\n\r\n")  # no body
    lengths = re.findall(rb"(?i)content-length: *(\d+)", rest)
    assert len(lengths) == 1 and int(lengths[0]) > 100  # the upstream's, announced once
