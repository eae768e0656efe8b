"""Fuzzing the proxy listener over raw sockets: whatever the request line, headers and path, the
proxy answers a well-formed HTTP response, never a 500, and never contacts a host that is not
configured (a sentinel listener that fuzzed targets point at must see no connection).

The proxy, the verifying upstream and the sentinel run on their own event loop in a thread for
the whole module, so hypothesis drives plain blocking sockets. Bounded: ~200 examples per
property, a few seconds each at worst.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import posixpath
import re
import socket
import threading
import zlib
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config

from .conftest import (
    EC_KEY_NAME,
    ED_KEY_NAME,
    HMAC_KEY,
    HMAC_SECRET,
    PUBLIC_HOST,
    base_config,
)
from .upstream import VerifyingUpstream

T = TypeVar("T")
STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([1-5][0-9][0-9]) [^\r\n]*\r\n")
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Harness:
    """Upstream + proxy + sentinel on a private event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sentinel_hits = 0
        self.sentinel_port = 0
        self.upstream: VerifyingUpstream | None = None
        self.proxy: ProxyServer | None = None
        self._sentinel: asyncio.AbstractServer | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self, upstream: VerifyingUpstream, config: dict[str, Any], path: Path) -> None:
        async def hit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.sentinel_hits += 1
            writer.close()

        self._sentinel = await asyncio.start_server(hit, "127.0.0.1", 0)
        self.sentinel_port = int(self._sentinel.sockets[0].getsockname()[1])
        await upstream.start()
        self.upstream = upstream
        config = {**config, "header_timeout": 2}
        for name, up in config["upstreams"].items():
            config["upstreams"][name] = {**up, "url": upstream.url, "timeout": 2}
        self.proxy = ProxyServer(parse_config(config, path), registry=CollectorRegistry())
        await self.proxy.start()

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        if self.upstream is not None:
            await self.upstream.close()
        if self._sentinel is not None:
            self._sentinel.close()
            await self._sentinel.wait_closed()

    def close(self) -> None:
        self.run(self.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.port(0)


@pytest.fixture(scope="module")
def harness(
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    ca_file: Path,
    ec_key_file: Path,
    ed_key_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    h = Harness()
    upstream = VerifyingUpstream(
        ca,
        keys={EC_KEY_NAME: ec_key.public_key(), ED_KEY_NAME: ed_key.public_key()},
        hmac_secrets={HMAC_KEY: HMAC_SECRET},
        anonymous_hosts=frozenset({PUBLIC_HOST}),
    )
    config = base_config("https://127.0.0.1:1", ca_file, ec_key_file, ed_key_file)
    config["credentials"]["trading"]["policy"] = {"deny": ["DELETE /api/v3/brokerage/**"]}
    config["routes"][-1]["policy"] = {"deny": [f"POST {FENCED}", f"GET {FENCED}"]}
    try:
        h.run(h.start(upstream, config, tmp_path_factory.mktemp("fuzz") / "config.yaml"))
        yield h
    finally:
        h.close()
    # After every example of the module: nothing reached the sentinel, nothing is in flight,
    # and every request the upstream saw was for a configured host.
    assert h.sentinel_hits == 0
    assert upstream.received, "the fuzzers never produced a forwardable request"
    configured = {
        "api.coinbase.com",
        "api.developer.coinbase.com",
        "api.cdp.coinbase.com",
        PUBLIC_HOST,
    }
    assert {r.host for r in upstream.received} <= configured


def exchange(port: int, request: bytes) -> bytes:
    """Send, then read until the end of the status line (or close, or 10 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The proxy may answer and close before the whole request was written.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        got = b""
        try:
            while b"\r\n" not in got:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            pass
        return got


def check_answer(h: Harness, request: bytes) -> int:
    raw = exchange(h.port, request)
    match = STATUS_LINE.match(raw)
    assert match, (request[:300], raw[:300])
    status = int(match.group(1))
    assert status != 500, (request[:300], raw[:300])  # no unhandled error, ever
    assert h.sentinel_hits == 0, request[:300]
    return status


# --- strategies ---------------------------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
methods = st.one_of(
    st.sampled_from(
        [
            "GET",
            "HEAD",
            "POST",
            "PUT",
            "DELETE",
            "PATCH",
            "OPTIONS",
            "CONNECT",
            "TRACE",
            "PROPFIND",
            "get",
            "G ET",
            "",
        ]
    ),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12),
)
segment = st.one_of(
    st.sampled_from(
        [
            "api",
            "v3",
            "v2",
            "brokerage",
            "orders",
            "accounts",
            "onramp",
            "platform",
            "public",
            "hmac",
            "ed",
            "..",
            ".",
            "%2e%2e",
            "%2E.",
            "",
            "%2F",
            "%00",
            "%0d%0a",
            ";",
            "a;b",
            "~",
            "*",
            "%",
            "%zz",
            "\u00e9",
            "status",
        ]
    ),
    st.text(min_size=0, max_size=12),
)
paths = st.lists(segment, min_size=0, max_size=8).map(lambda segs: "/" + "/".join(segs))
queries = st.one_of(st.just(""), st.text(max_size=20).map(lambda q: "?" + q))


@st.composite
def absolute_targets(draw: st.DrawFn, sentinel_port: int) -> str:
    host = draw(
        st.sampled_from(
            [
                "api.coinbase.com",
                "API.COINBASE.COM",
                "api.coinbase.com.",
                "api.coinbase.com..",
                f"127.0.0.1:{sentinel_port}",
                f"localhost:{sentinel_port}",
                f"[::1]:{sentinel_port}",
                f"api.coinbase.com:{sentinel_port}",
                f"api.coinbase.com@127.0.0.1:{sentinel_port}",
                f"127.0.0.1:{sentinel_port}@api.coinbase.com",
                "169.254.169.254",
                "10.0.0.1",
                f"2130706433:{sentinel_port}",
                PUBLIC_HOST,
                "public.example.com:443",
                "[::ffff:7f00:1]",
            ]
        )
    )
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "ws", "ftp", ""]))
    return f"{scheme}://{host}{draw(paths)}{draw(queries)}"


def targets(sentinel_port: int) -> st.SearchStrategy[str]:
    return st.one_of(
        paths.map(str) | st.builds(lambda p, q: p + q, paths, queries),
        absolute_targets(sentinel_port),
        st.sampled_from(["*", "", f"127.0.0.1:{sentinel_port}", "api.coinbase.com:443"]),
    )


versions = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/0.9", "", "HTTP/1.1x"]
)
header_names = st.one_of(
    st.sampled_from(
        [
            "Host",
            "Connection",
            "Upgrade",
            "Expect",
            "Authorization",
            "Cookie",
            "Proxy-Authorization",
            "CB-ACCESS-KEY",
            "X-Signing-Proxy-Token",
            "Accept",
            "X-Forwarded-For",
            "X-Request-Id",
            "Te",
            "Trailer",
            "Keep-Alive",
        ]
    ),
    st.text(alphabet=TOKEN_CHARS + " :\t", min_size=0, max_size=20),
)
header_values = st.one_of(
    st.sampled_from(
        [
            "close",
            "keep-alive",
            "upgrade",
            "websocket",
            "100-continue",
            "chunked",
            "Bearer x",
            "127.0.0.1:1",
            "\x00",
            "a\rb",
            " leading",
            "trailing ",
        ]
    ),
    st.text(max_size=40),
)


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@st.composite
def requests(draw: st.DrawFn, sentinel_port: int) -> bytes:
    line = f"{draw(methods)} {draw(targets(sentinel_port))} {draw(versions)}"
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["none", "length", "chunked", "length+chunked", "length-twice"]))
    lines = [encode(line), b"Host: fuzz"]
    for name, value in headers:
        if name.strip().lower() in ("content-length", "transfer-encoding"):
            continue  # framing is chosen below, always complete, so no request waits for a body
        lines.append(encode(f"{name}: {value}"))
    chunked = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}".encode())
    elif framing == "length-twice":
        lines += [f"Content-Length: {len(body)}".encode()] * 2
    elif framing in ("chunked", "length+chunked"):
        lines.append(b"Transfer-Encoding: chunked")
        if framing == "length+chunked":
            lines.append(f"Content-Length: {len(chunked)}".encode())
        body = chunked
    elif framing == "none":
        body = b""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- properties ----------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_any_request_gets_a_well_formed_answer_and_no_stray_connection(
    harness: Harness, data: st.DataObject
) -> None:
    request = data.draw(requests(harness.sentinel_port))
    check_answer(harness, request)


@SETTINGS
@given(path=paths, query=queries, method=st.sampled_from(["GET", "POST", "DELETE", "HEAD"]))
def test_any_path_is_refused_or_signed_for_exactly_what_is_sent(
    harness: Harness, path: str, query: str, method: str
) -> None:
    target = encode(path + query)
    request = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: f\r\nContent-Length: 0\r\n\r\n"
    before = len(harness.upstream.received) if harness.upstream else 0
    status = check_answer(harness, request)
    upstream = harness.upstream
    assert upstream is not None
    if status == 401:  # the verifying upstream refused a signature: path signed != path sent
        assert not upstream.rejections, (target, upstream.rejections[-1])
    if len(upstream.received) > before:  # it was forwarded: signed for the path that arrived
        rec = upstream.received[-1]
        if rec.auth == "jwt":
            signed = rec.claims.get("uri") or rec.claims["uris"][0]
            assert signed == f"{method} {rec.host}{rec.path}"
    assert not upstream.rejections, upstream.rejections[-1:]


@SETTINGS
@given(
    raw_line=st.binary(min_size=0, max_size=200),
    raw_headers=st.binary(min_size=0, max_size=300),
)
def test_raw_bytes_never_break_the_proxy(
    harness: Harness, raw_line: bytes, raw_headers: bytes
) -> None:
    request = raw_line + b"\r\n" + raw_headers + b"\r\n\r\n"
    raw = exchange(harness.port, request)
    # Bytes that are not a request at all may get a 400 or a plain close; never a 500 or a hang.
    if raw:
        match = STATUS_LINE.match(raw)
        assert match and match.group(1) != b"500", (request[:200], raw[:200])
    assert harness.sentinel_hits == 0


FENCED = "/api/v3/brokerage/orders"
fenced_spellings = st.sampled_from(
    [
        FENCED, FENCED.upper(), "/api/v3/brokerage/%6frders", "/api/v3/brokerage/%256frders",
        "//api/v3/brokerage/orders", "/api/v3/brokerage//orders/", f"{FENCED};x", f"{FENCED}%3Bx",
        "/api/v3/brokerage/x/../orders", "/api/v3/brokerage/x/%2e%2e/orders",
        "/api/v3/brokerage/x%2f..%2forders", "/api/v3/brokerage/x%5c..%5corders",
        "/api/v3/brokerage/x/..;/orders", "/api/v3/brokerage/x/%252e%252e/orders",
        "/ed/api/v3/brokerage/orders", "/api/v3/brokerage/accounts", "/api/v3/brokerage/orders/x",
    ]
)  # fmt: skip


def _server_reading(path: str) -> str:
    """What a lenient server might execute: decoded (repeatedly), '\\' as '/', no ;params,
    dots resolved, slashes collapsed, case folded. Written independently of paths.py."""
    for _ in range(4):
        path = unquote(path)
    path = re.sub(r";[^/]*", "", path.replace("\\", "/"))
    return posixpath.normpath("/" + path).lower().rstrip("/")


@SETTINGS
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
    path=st.one_of(fenced_spellings, paths),
    forward=st.booleans(),
    encoding=st.sampled_from([None, "gzip", "deflate"]),
    expect=st.booleans(),
    body=st.binary(max_size=300),
)
def test_whatever_the_upstream_executes_was_signed_for_it_and_allowed(
    harness: Harness,
    method: str,
    path: str,
    forward: bool,
    encoding: str | None,
    expect: bool,
    body: bytes,
) -> None:
    target = f"http://api.coinbase.com{path}" if forward else path
    head = [f"{method} {target} HTTP/1.1", "Host: f", "Connection: close"]
    if encoding:
        head.append(f"Content-Encoding: {encoding}")
        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    if expect:
        head.append("Expect: 100-continue")
    head.append(f"Content-Length: {len(body)}")
    upstream = harness.upstream
    assert upstream is not None
    before = len(upstream.received)
    request = encode("\r\n".join(head)) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
    while raw.startswith(b"HTTP/1.1 100 "):
        raw = raw.partition(b"\r\n\r\n")[2]
    match = STATUS_LINE.match(raw)
    assert match and match.group(1) != b"500", (request[:300], raw[:300])
    assert not upstream.rejections, upstream.rejections[-1:]
    for rec in upstream.received[before:]:
        # Signed for exactly what it received: the verifying upstream checked uri = what arrived.
        if rec.auth == "jwt":
            uri = rec.claims.get("uri") or rec.claims["uris"][0]
            assert uri == f"{method} {rec.host}{rec.path}"
        reading = _server_reading(rec.path)
        if (
            rec.host == "api.coinbase.com"
            and rec.auth == "jwt"
            and rec.claims["sub"] == EC_KEY_NAME
        ):
            assert not (method in ("GET", "HEAD", "POST") and reading == FENCED), (target, rec.path)
            assert not (method == "DELETE" and reading.startswith("/api/v3/brokerage")), target


def test_proxy_is_healthy_after_the_fuzzing(harness: Harness) -> None:
    status = check_answer(harness, b"GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: f\r\n\r\n")
    assert status == 200
    proxy = harness.proxy
    assert proxy is not None

    async def settled() -> float | None:  # the last answer may still be finishing its accounting
        for _ in range(100):
            value = proxy.metrics.registry.get_sample_value("signing_proxy_in_flight_requests")
            if value == 0:
                break
            await asyncio.sleep(0.05)
        return value

    assert harness.run(settled()) == 0
