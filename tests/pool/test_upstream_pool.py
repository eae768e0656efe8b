"""The upstream pool against real TLS servers: an aiohttp server for well-formed traffic, and
scripted servers (tests/scripted.py) that write exact bytes for the edge cases."""

from __future__ import annotations

import asyncio
import select
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from aiohttp import web

from signing_proxy.upstream_pool import StaleConnection, UpstreamFailure, UpstreamPool

from ..faults import FaultServer, closed_port
from ..helpers import wait_for
from ..scripted import Peer, Script, ScriptedServer, answering

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HOST = [(b"Host", b"api.example.com")]

MakeServer = Callable[..., Awaitable[ScriptedServer]]
MakePool = Callable[..., UpstreamPool]


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def scripted(ca: trustme.CA) -> AsyncIterator[MakeServer]:
    servers: list[ScriptedServer] = []

    async def make(script: Script, names: tuple[str, ...] = ()) -> ScriptedServer:
        servers.append(await ScriptedServer(ca, script, names=names).start())
        return servers[-1]

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool(client_tls: ssl.SSLContext) -> AsyncIterator[MakePool]:
    pools: list[UpstreamPool] = []

    def make(port: int, **kwargs: object) -> UpstreamPool:
        pools.append(UpstreamPool("127.0.0.1", port, client_tls, "127.0.0.1", **kwargs))  # type: ignore[arg-type]
        return pools[-1]

    yield make
    for pool in pools:
        await pool.close()


async def get(pool: UpstreamPool, target: bytes = b"/", **kwargs: object) -> tuple[int, bytes]:
    resp = await pool.request("GET", target, HOST, None, timeout=5.0, **kwargs)  # type: ignore[arg-type]
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


# ---------------------------------------------------------------- a well-formed aiohttp upstream
class AiohttpUpstream:
    def __init__(self) -> None:
        self.ports: list[int] = []  # client port of each request: which connection served it
        self.uploaded = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/small", self.small)
        app.router.add_get("/stream", self.stream)
        app.router.add_route("*", "/upload", self.upload)
        return app

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.ports.append(request.transport.get_extra_info("peername")[1])

    async def small(self, request: web.Request) -> web.Response:
        self._seen(request)
        resp = web.Response(body=b'{"ok":true}', content_type="application/json")
        resp.headers.add("X-Dup", "1")
        resp.headers.add("X-Dup", "2")
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse()  # no length: chunked
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        self._seen(request)
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
        self.uploaded = size
        return web.Response(text=str(size))


@pytest.fixture
async def aio(ca: trustme.CA) -> AsyncIterator[tuple[AiohttpUpstream, int]]:
    upstream = AiohttpUpstream()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    runner = web.AppRunner(upstream.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield upstream, int(runner.addresses[0][1])
    await runner.cleanup()


async def test_keep_alive_reuses_one_connection(
    aio: tuple[AiohttpUpstream, int], make_pool: MakePool
) -> None:
    upstream, port = aio
    pool = make_pool(port)
    for _ in range(5):
        resp = await pool.request("GET", b"/small", HOST, None, timeout=5.0)
        assert (resp.status, resp.reason, resp.http_version) == (200, "OK", "1.1")
        assert resp.content_length == 11
        assert [v for n, v in resp.headers if n.lower() == b"x-dup"] == [b"1", b"2"]
        assert await resp.read() == b'{"ok":true}'
        resp.release()
    assert len(upstream.ports) == 5 and len(set(upstream.ports)) == 1
    assert pool.opened == 1 and pool.idle == 1


async def test_chunked_response_streams_and_reuses(
    aio: tuple[AiohttpUpstream, int], make_pool: MakePool
) -> None:
    upstream, port = aio
    pool = make_pool(port)
    for _ in range(2):
        resp = await pool.request("GET", b"/stream", HOST, None, timeout=5.0)
        assert resp.content_length is None
        assert b"".join([c async for c in resp.body()]) == b"part0;part1;part2;"
        resp.release()
    assert len(set(upstream.ports)) == 1


async def test_upload_streamed_chunked_and_with_length(
    aio: tuple[AiohttpUpstream, int], make_pool: MakePool
) -> None:
    upstream, port = aio
    pool = make_pool(port)

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    for length in (None, 10_000):
        resp = await pool.request(
            "POST", b"/upload", HOST, parts(), content_length=length, timeout=5.0
        )
        assert await resp.read() == b"10000"
        resp.release()
    resp = await pool.request("POST", b"/upload", HOST, b"abc", timeout=5.0)
    assert await resp.read() == b"3"
    resp.release()
    assert len(set(upstream.ports)) == 1


# ---------------------------------------------------------------- exact bytes on the wire
async def test_request_bytes_exactly_as_given(scripted: MakeServer, make_pool: MakePool) -> None:
    server = await scripted(answering(OK))
    pool = make_pool(server.port)
    target = b"/api/v3/{id}/'q'/a%2Fb;v=1?x={1}&y=%2F;z"
    headers = [
        (b"Host", b"api.example.com"),
        (b"x-dup", b"one"),
        (b"X-DUP", b"two"),
        (b"Accept-Encoding", b"gzip"),
        (b"x-odd", b"a,  b ; c"),
    ]
    resp = await pool.request("POST", target, headers, b'{"a":1}', timeout=5.0)
    assert await resp.read() == b"ok"
    resp.release()
    resp = await pool.request("GET", target, headers, None, timeout=5.0)
    resp.release()
    assert server.peers[0].received == [
        b"POST /api/v3/{id}/'q'/a%2Fb;v=1?x={1}&y=%2F;z HTTP/1.1\r\n"
        b"Host: api.example.com\r\nx-dup: one\r\nX-DUP: two\r\nAccept-Encoding: gzip\r\n"
        b'x-odd: a,  b ; c\r\nContent-Length: 7\r\n\r\n{"a":1}',
        b"GET /api/v3/{id}/'q'/a%2Fb;v=1?x={1}&y=%2F;z HTTP/1.1\r\n"
        b"Host: api.example.com\r\nx-dup: one\r\nX-DUP: two\r\nAccept-Encoding: gzip\r\n"
        b"x-odd: a,  b ; c\r\n\r\n",
    ]


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/a\r\nX-Injected: 1", HOST),
        (b"/a b", HOST),
        (b"/a\tb", HOST),
        (b"", HOST),
        (b"/a", [(b"X-A", b"v\r\nX-Injected: 1")]),
        (b"/a", [(b"X-A", b"v\nX-Injected: 1")]),
        (b"/a", [(b"X A", b"v")]),
        (b"/a", [(b"X-A:", b"v")]),
        (b"/a", [(b"X-A", b"v\x00")]),
    ],
)
async def test_request_that_would_split_is_refused_before_any_connection(
    target: bytes, headers: list[tuple[bytes, bytes]], make_pool: MakePool
) -> None:
    pool = make_pool(1)  # never connected to: refused before
    with pytest.raises(ValueError, match="not fit to send"):
        await pool.request("GET", target, headers, None, timeout=1.0)
    assert pool.opened == 0


# ---------------------------------------------------------------- framing edge cases
async def test_interim_1xx_responses_are_not_the_answer(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    )
    server = await scripted(
        answering(interim + b"HTTP/1.1 201 Created\r\nX-Final: 1\r\n" + OK[17:])
    )
    pool = make_pool(server.port)
    for _ in range(2):  # the second exchange on the same connection reads no leftovers
        resp = await pool.request("POST", b"/", HOST, b"{}", timeout=5.0)
        assert (resp.status, resp.reason) == (201, "Created")
        assert resp.headers == [(b"X-Final", b"1"), (b"Content-Length", b"2")]
        assert await resp.read() == b"ok"
        resp.release()
    assert len(server.peers) == 1


async def test_chunked_with_extensions_and_trailers(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6;a=b;c\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
    )
    server = await scripted(answering(body))
    pool = make_pool(server.port)
    for _ in range(2):
        assert await get(pool) == (200, b"hello world")
    assert len(server.peers) == 1 and pool.idle == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\n\r\n",  # HTTP/1.0, no length
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: the body ends at the close
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    ],
)
async def test_close_delimited_body_read_to_eof_and_not_reused(
    head: bytes, scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head + b"a" * 100_000)
        peer.writer.close()

    server = await scripted(script)
    pool = make_pool(server.port)
    for _ in range(2):
        resp = await pool.request("GET", b"/", HOST, None, timeout=5.0)
        assert resp.content_length is None
        assert await resp.read() == b"a" * 100_000
        resp.release()
    assert len(server.peers) == 2 and pool.idle == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_upstream_asking_to_close_is_not_reused(
    answer: bytes, scripted: MakeServer, make_pool: MakePool
) -> None:
    server = await scripted(answering(answer))  # it would answer again, but was told otherwise
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert len(server.peers) == 2 and pool.idle == 0


async def test_head_204_304_have_no_body_and_keep_the_connection(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    def answer(request: bytes) -> bytes:
        if request.startswith(b"HEAD"):  # announces a body it does not send
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: x/y\r\n\r\n"
        if b" /204 " in request:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if b" /304 " in request:
            return b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'
        return OK

    server = await scripted(answering(answer))
    pool = make_pool(server.port)
    for method, target, status in [
        ("HEAD", b"/", 200),
        ("GET", b"/204", 204),
        ("GET", b"/304", 304),
        ("HEAD", b"/", 200),
        ("GET", b"/", 200),
    ]:
        resp = await pool.request(method, target, HOST, None, timeout=5.0)
        assert resp.status == status and resp.complete
        assert resp.content_length == (2 if target == b"/" and method == "GET" else 0)
        assert await resp.read() == (b"ok" if resp.content_length else b"")
        if method == "HEAD":
            assert (b"Content-Length", b"1000") in resp.headers  # passed on as received
        resp.release()
    assert len(server.peers) == 1


async def test_head_without_length_keeps_the_connection(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    server = await scripted(answering(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"))
    pool = make_pool(server.port)
    for _ in range(3):
        resp = await pool.request("HEAD", b"/", HOST, None, timeout=5.0)
        assert resp.status == 200 and await resp.read() == b""
        resp.release()
    assert len(server.peers) == 1


async def test_lying_content_length_short_then_close(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 50)
        peer.writer.close()

    server = await scripted(script)
    pool = make_pool(server.port)
    resp = await pool.request("GET", b"/", HOST, None, timeout=5.0)
    got: list[bytes] = []

    async def consume() -> None:
        async for chunk in resp.body():
            got.append(chunk)

    with pytest.raises(UpstreamFailure) as caught:
        await consume()
    resp.close()
    assert b"".join(got) == b"a" * 50
    assert caught.value.code == "upstream_connection_reset" and caught.value.reached
    assert "before the body was complete" in caught.value.message


async def test_bytes_beyond_content_length_drop_the_connection(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    server = await scripted(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")  # a new connection: the extra bytes were no response
    assert len(server.peers) == 2


async def test_reset_mid_response(scripted: MakeServer, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        peer.reset()

    server = await scripted(script)
    pool = make_pool(server.port)
    resp = await pool.request("GET", b"/", HOST, None, timeout=5.0)
    with pytest.raises(UpstreamFailure) as caught:
        await resp.read()
    resp.release()  # not reusable: dropped
    assert caught.value.code == "upstream_connection_reset" and caught.value.status == 502
    assert pool.idle == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-not http\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
)
async def test_garbage_is_a_bad_response(
    answer: bytes, scripted: MakeServer, make_pool: MakePool
) -> None:
    server = await scripted(answering(answer))
    pool = make_pool(server.port)
    with pytest.raises(UpstreamFailure) as caught:
        await get(pool)
    assert caught.value.code == "upstream_bad_response" and caught.value.reached
    assert pool.idle == 0


# ---------------------------------------------------------------- time limits
async def test_slow_head_times_out_504(scripted: MakeServer, make_pool: MakePool) -> None:
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await release.wait()

    server = await scripted(script)
    pool = make_pool(server.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(UpstreamFailure) as caught:
        await pool.request("GET", b"/", HOST, None, timeout=0.3)
    assert loop.time() - start < 2.0
    assert (caught.value.code, caught.value.status) == ("upstream_timeout", 504)
    assert caught.value.reached and "0.3s" in caught.value.message
    await wait_for(lambda: server.peers[0].reader.at_eof(), what="connection dropped")
    release.set()


async def test_each_exchange_on_a_kept_connection_has_its_own_deadline(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    # One timer a connection (http1.Connection.begin): a short deadline of an earlier exchange
    # must not cut a later, longer one short, and a later, shorter one must still fire on time.
    answer_second = asyncio.Event()
    second_read = asyncio.Event()
    third_read = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()
        second_read.set()
        await answer_second.wait()  # past the first exchange's deadline
        await peer.send(OK)
        await peer.read_request()
        third_read.set()
        await asyncio.Event().wait()  # never answers the third

    server = await scripted(script)
    pool = make_pool(server.port)
    loop = asyncio.get_running_loop()
    first = await pool.request("GET", b"/", HOST, None, timeout=0.3)
    assert (first.status, await first.read()) == (200, b"ok")
    first.release()
    started = loop.time()
    second = asyncio.ensure_future(pool.request("GET", b"/", HOST, None, timeout=5.0))
    await wait_for(second_read.is_set, what="the second request at the upstream")
    # The condition is time itself: the first exchange's 0.3 s deadline must pass.
    await wait_for(lambda: loop.time() - started > 0.5, what="the first deadline to pass")
    answer_second.set()
    resp = await second
    assert (resp.status, await resp.read()) == (200, b"ok")
    resp.release()
    assert len(server.peers) == 1  # the same connection throughout
    start = loop.time()
    with pytest.raises(UpstreamFailure) as caught:
        await pool.request("GET", b"/", HOST, None, timeout=0.2)
    assert third_read.is_set() and loop.time() - start < 1.5
    assert caught.value.code == "upstream_timeout"


async def test_stalled_body_times_out_within_the_same_budget(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await release.wait()

    server = await scripted(script)
    pool = make_pool(server.port)
    resp = await pool.request("GET", b"/", HOST, None, timeout=0.3)
    with pytest.raises(UpstreamFailure) as caught:
        await resp.read()
    resp.close()
    assert (caught.value.code, caught.value.status) == ("upstream_timeout", 504)
    release.set()
    assert len(server.peers) == 1


# ---------------------------------------------------------------- connecting
async def test_connection_refused(make_pool: MakePool) -> None:
    pool = make_pool(closed_port())
    with pytest.raises(UpstreamFailure) as caught:
        await get(pool)
    assert caught.value.code == "upstream_unreachable" and not caught.value.reached
    assert "refused" in caught.value.message.lower()


@pytest.mark.parametrize(
    ("mode", "code", "reason"),
    [
        ("reset", "upstream_connection_reset", "reset"),
        ("close", "upstream_connection_reset", ""),
        ("garbage", "upstream_tls_error", "WRONG_VERSION_NUMBER"),  # not TLS at all
    ],
)
async def test_connection_faults(
    mode: str, code: str, reason: str, ca: trustme.CA, make_pool: MakePool
) -> None:
    server = await FaultServer(default=mode, ca=ca).start()
    try:
        pool = make_pool(server.port)
        with pytest.raises(UpstreamFailure) as caught:
            await get(pool)
    finally:
        await server.close()
    assert caught.value.code == code and reason in caught.value.message
    assert not caught.value.reached


async def test_certificate_for_another_address(scripted: MakeServer, make_pool: MakePool) -> None:
    server = await scripted(answering(OK), names=("wrong.example",))
    pool = make_pool(server.port)
    with pytest.raises(UpstreamFailure) as caught:
        await get(pool)
    assert caught.value.code == "upstream_tls_error" and not caught.value.reached
    assert "IP address mismatch" in caught.value.message


async def test_unknown_ca_names_the_reason(scripted: MakeServer) -> None:
    server = await scripted(answering(OK))
    other = trustme.CA()
    context = ssl.create_default_context()
    other.configure_trust(context)
    pool = UpstreamPool("127.0.0.1", server.port, context, "127.0.0.1")
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await get(pool)
    finally:
        await pool.close()
    assert caught.value.code == "upstream_tls_error" and not caught.value.reached
    assert "unable to get local issuer certificate" in caught.value.message
    assert "ca_file" in caught.value.message


async def test_hostname_mismatch_names_the_reason(
    scripted: MakeServer, client_tls: ssl.SSLContext
) -> None:
    server = await scripted(answering(OK))  # a certificate for 127.0.0.1 and localhost only
    pool = UpstreamPool("127.0.0.1", server.port, client_tls, "api.example.com")
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await get(pool)
    finally:
        await pool.close()
    assert caught.value.code == "upstream_tls_error" and not caught.value.reached
    assert "Hostname mismatch" in caught.value.message and "api.example.com" in caught.value.message


async def test_connect_timeout_is_504_and_unreached(make_pool: MakePool) -> None:
    server = await FaultServer(default="stall").start()  # accepts, never does TLS
    try:
        pool = make_pool(server.port)
        with pytest.raises(UpstreamFailure) as caught:
            await pool.request("GET", b"/", HOST, None, timeout=0.3)
    finally:
        await server.close()
    assert (caught.value.code, caught.value.status, caught.value.reached) == (
        "upstream_timeout",
        504,
        False,
    )


# ---------------------------------------------------------------- stale pooled connections
async def test_idle_connection_closed_by_upstream_is_not_used(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:  # one answer, then the keep-alive timeout: close
        await peer.read_request()
        await peer.send(OK)
        peer.writer.close()

    server = await scripted(script)
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    await server.peers[0].closed.wait()
    assert await get(pool) == (200, b"ok")  # checked at checkout: a new connection, no error
    assert len(server.peers) == 2 and pool.opened == 2


async def test_close_seen_only_by_the_kernel_is_caught_at_checkout(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    server = await scripted(answering(OK))
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    server.peers[0].writer.close()  # the TLS close alert is written at once
    sock = pool._idle[-1].transport.get_extra_info("socket")  # type: ignore[union-attr]
    # Block the event loop until the alert is in the socket: the loop has not seen it, only the
    # readiness check at checkout can.
    readable, _, _ = select.select([sock.fileno()], [], [], 5.0)
    assert readable
    assert await get(pool) == (200, b"ok")  # no StaleConnection: a new connection, nothing sent
    assert len(server.peers) == 2 and server.peers[0].received == [server.peers[1].received[0]]


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_stale_connection_is_reported_distinctly(
    how: str, scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:  # closes as the second request arrives
        await peer.read_request()
        await peer.send(OK)
        await peer.read_request()
        if how == "reset":
            peer.reset()
        else:
            peer.writer.close()

    server = await scripted(script)
    pool = make_pool(server.port)
    assert await get(pool) == (200, b"ok")
    with pytest.raises(StaleConnection) as caught:
        await get(pool)
    assert caught.value.code == "upstream_connection_reset" and caught.value.reached
    assert await get(pool) == (200, b"ok")  # the retry the caller makes, on a fresh connection
    assert len(server.peers) == 2


async def test_fresh_connection_closed_before_answering_is_not_stale(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.read_request()
        peer.writer.close()

    server = await scripted(script)
    pool = make_pool(server.port)
    with pytest.raises(UpstreamFailure) as caught:
        await get(pool)
    assert not isinstance(caught.value, StaleConnection)
    assert caught.value.code == "upstream_connection_reset" and caught.value.reached


# ---------------------------------------------------------------- the pool
async def test_idle_connections_expire(scripted: MakeServer, make_pool: MakePool) -> None:
    server = await scripted(answering(OK))
    pool = make_pool(server.port, idle_timeout=0.2)
    assert await get(pool) == (200, b"ok")
    assert pool.idle == 1
    await server.peers[0].closed.wait()  # the pool closed it, no request needed
    assert pool.idle == 0
    assert await get(pool) == (200, b"ok")
    assert len(server.peers) == 2


async def test_reuse_is_last_in_first_out(scripted: MakeServer, make_pool: MakePool) -> None:
    gate = asyncio.Event()

    async def script(peer: Peer) -> None:
        while await peer.read_request():
            await gate.wait()
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n%5d" % peer.port)

    server = await scripted(script)
    pool = make_pool(server.port)
    pending = [
        asyncio.create_task(pool.request("GET", b"/", HOST, None, timeout=5.0)) for _ in range(3)
    ]
    await wait_for(lambda: sum(len(p.received) for p in server.peers) == 3, what="3 requests")
    gate.set()
    responses = [await task for task in pending]
    ports = [int(await r.read()) for r in responses]
    for resp in responses:
        resp.release()  # idle, oldest first: ports[0], ports[1], ports[2]
    for _ in range(2):
        _, body = await get(pool)
        assert int(body) == ports[2]  # the most recently released
    assert pool.opened == 3 and pool.idle == 3


async def test_max_connections_makes_requests_wait(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    gate = asyncio.Event()
    busy = 0
    most = 0

    async def script(peer: Peer) -> None:
        nonlocal busy, most
        while await peer.read_request():
            busy += 1
            most = max(most, busy)
            await gate.wait()
            busy -= 1
            await peer.send(OK)

    server = await scripted(script)
    pool = make_pool(server.port, max_connections=2)
    tasks = [asyncio.create_task(get(pool)) for _ in range(6)]
    await wait_for(lambda: busy == 2, what="two requests at the upstream")
    assert len(server.peers) == 2
    gate.set()
    assert [await t for t in tasks] == [(200, b"ok")] * 6
    assert most == 2 and pool.opened == 2 and len(server.peers) == 2


async def test_waiting_for_a_connection_times_out_unreached(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    gate = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await gate.wait()
        await peer.send(OK)

    server = await scripted(script)
    pool = make_pool(server.port, max_connections=1)
    first = asyncio.create_task(get(pool))
    await wait_for(lambda: bool(server.peers) and bool(server.peers[0].received))
    with pytest.raises(UpstreamFailure) as caught:
        await pool.request("GET", b"/", HOST, None, timeout=0.2)
    assert (caught.value.code, caught.value.reached) == ("upstream_timeout", False)
    assert "max_connections 1" in caught.value.message
    gate.set()
    assert await first == (200, b"ok")


async def test_cancelled_requests_give_their_slot_back(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    gate = asyncio.Event()

    async def script(peer: Peer) -> None:
        while await peer.read_request():
            await gate.wait()
            await peer.send(OK)

    server = await scripted(script)
    pool = make_pool(server.port, max_connections=1)
    in_flight = asyncio.create_task(get(pool))
    waiting = asyncio.create_task(get(pool))
    await wait_for(lambda: bool(server.peers) and bool(server.peers[0].received))
    waiting.cancel()
    in_flight.cancel()  # mid-exchange: the connection is dropped, never pooled half-read
    for task in (waiting, in_flight):
        with pytest.raises(asyncio.CancelledError):
            await task
    gate.set()
    assert await get(pool) == (200, b"ok")
    assert pool.opened == 2 and pool.idle == 1


async def test_early_answer_during_upload(scripted: MakeServer, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:  # refuses at once, then discards what still comes
        await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        while await peer.reader.read(65536):
            pass

    server = await scripted(script)
    pool = make_pool(server.port)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 65536
            yield b"x" * 65536

    resp = await pool.request("POST", b"/", HOST, endless(), timeout=5.0)
    assert resp.status == 413 and await resp.read() == b"big"
    resp.release()  # the request was cut short: dropped, not pooled
    await server.peers[0].closed.wait()
    assert pool.idle == 0 and sent < 64 * 1024 * 1024


# ---------------------------------------------------------------- streaming, flat memory
STREAM = 64 * 1024 * 1024
BLOCK = b"s" * 256 * 1024
FLAT = 12 * 1024 * 1024  # peak Python allocations allowed while 64 MiB go through (both ends)


async def test_64mib_download_streams_with_flat_memory(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    sent = 0

    async def script(peer: Peer) -> None:
        nonlocal sent
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % STREAM)
        for _ in range(STREAM // len(BLOCK)):
            await peer.send(BLOCK)  # paced by drain: it stops when the client stops reading
            sent += len(BLOCK)
        await peer.read_request()

    server = await scripted(script)
    pool = make_pool(server.port)
    tracemalloc.start()
    try:
        resp = await pool.request("GET", b"/big", HOST, None, timeout=60.0)
        body = resp.body()
        received = len(await anext(body))
        # The consumer stops: the pool stops reading, so the server blocks (its count settles).
        last = -1

        def settled() -> bool:
            nonlocal last
            done, last = sent == last, sent
            return done

        await wait_for(settled, what="the upstream blocked")
        assert sent < 16 * 1024 * 1024, f"{sent / 2**20:.1f} MiB sent ahead of a stopped reader"
        async for chunk in body:
            received += len(chunk)
        resp.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == STREAM and pool.idle == 1
    assert peak < FLAT, f"peak {peak / 2**20:.1f} MiB"
    assert len(server.peers) == 1


@pytest.mark.parametrize("declared", [True, False])
async def test_64mib_upload_streams_with_flat_memory(
    declared: bool, aio: tuple[AiohttpUpstream, int], make_pool: MakePool
) -> None:
    upstream, port = aio
    pool = make_pool(port)

    async def blocks() -> AsyncIterator[bytes]:
        for _ in range(STREAM // len(BLOCK)):
            yield b"u" * len(BLOCK)  # a new object each time, as a client's body would be

    tracemalloc.start()
    try:
        resp = await pool.request(
            "PUT" if declared else "POST",
            b"/upload",
            HOST,
            blocks(),
            content_length=STREAM if declared else None,
            timeout=60.0,
        )
        body = await resp.read()
        resp.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body == str(STREAM).encode() and upstream.uploaded == STREAM
    assert len(set(upstream.ports)) == 1
    assert peak < FLAT, f"peak {peak / 2**20:.1f} MiB"


async def test_early_success_answer_still_gets_the_whole_body(
    scripted: MakeServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:  # answers at once, then reads the body (an echo)
        head = await peer.reader.readuntil(b"\r\n\r\n")
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await peer.reader.readexactly(size)
        count = str(size).encode()
        await peer.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(count), count))
        await peer.read_request()

    server = await scripted(script)
    pool = make_pool(server.port)

    async def blocks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"b" * 65536

    resp = await pool.request("PUT", b"/", HOST, blocks(), content_length=64 * 65536, timeout=5.0)
    assert resp.status == 200 and await resp.read() == b"4194304"
    resp.release()
    assert pool.idle == 1  # the whole request went out: the connection is reusable
