"""The proxy listener's HTTP/1.1 server (signing_proxy/http_server.py) over real sockets:
keep-alive, pipelining, HTTP/1.0, chunked bodies, flow control, Expect, HEAD, 204/304,
streamed answers, errors in handlers, client disconnects, the Upgrade hand-off, shutdown, and
real clients (aiohttp, curl)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import tracemalloc
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from signing_proxy.http_request import Request

from ..helpers import wait_for
from .http_server_kit import (
    JSON,
    Serve,
    echo,
    error_of,
    exchange,
    read_response,
    servers,
    status_of,
)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with servers() as start:
        yield start


GET = b"GET /a?x=%2F&y={} HTTP/1.1\r\nHost: h\r\n\r\n"


# --- keep-alive, pipelining, HTTP/1.0 ---------------------------------------------------------------


async def test_keep_alive_reuses_the_connection_and_keeps_the_target_raw(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    try:
        for target in (b"/a?x=%2F&y={}", b"http://api.example.com/b/%7e;p?q='x'"):
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n")
            response = await read_response(reader)
            data = response.json()
            assert data["target"] == target.decode()
            assert data["headers"] == [["Host", "h"], ["X-Dup", "1"], ["x-dup", "2"]]
            assert data["remote"] == "127.0.0.1" and data["version"] == [1, 1]
            assert response.header("Connection") is None
        assert served.http.connections == 1
    finally:
        writer.close()


async def test_pipelined_requests_run_one_after_another_in_order(serve: Serve) -> None:
    started: list[str] = []
    release = asyncio.Event()

    async def handler(request: Request) -> None:
        started.append(request.target)
        if request.target == "/1":
            await release.wait()
        await echo(request)

    served = await serve(handler)
    reader, writer = await served.connect()
    try:
        writer.write(
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        connection = next(iter(served.http._connections))
        await wait_for(lambda: len(connection._queue) == 2, what="two requests parsed ahead")
        assert started == ["/1"]  # the others wait for the first answer
        release.set()
        targets = [(await read_response(reader)).json() for _ in range(3)]
        assert [t["target"] for t in targets] == ["/1", "/2", "/3"]
        assert targets[1]["body_len"] == 5
        assert started == ["/1", "/2", "/3"]
    finally:
        writer.close()


async def test_http_10_closes_unless_it_asks_for_keep_alive(serve: Serve) -> None:
    served = await serve()
    raw = await exchange(served.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert status_of(raw) == 200 and b"\r\nConnection: close\r\n" in raw
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["version"] == [1, 0]

    reader, writer = await served.connect()
    try:
        for _ in range(2):
            writer.write(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = await read_response(reader)
            assert response.status == 200 and response.header("Connection") == "keep-alive"
    finally:
        writer.close()


async def test_connection_close_is_honoured_both_ways(serve: Serve) -> None:
    async def closing(request: Request) -> None:
        request.close_after_response()
        await request.respond(200, "OK", [], b"bye")

    served = await serve()
    raw = await exchange(served.port, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n" + GET)
    assert raw.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in raw  # nothing after it
    served = await serve(closing)
    raw = await exchange(served.port, GET + GET)
    assert raw.count(b"HTTP/1.1 200") == 1 and raw.endswith(b"\r\nConnection: close\r\n\r\nbye")


# --- request bodies ----------------------------------------------------------------------------------


async def test_chunked_body_with_extensions_and_trailers(serve: Serve) -> None:
    served = await serve()
    raw = await exchange(
        served.port,
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b'5;name=value;quoted="a b"\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n',
    )
    data = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert data["chunked"] is True and data["content_length"] is None
    assert data["body_len"] == 11 and data["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert ["X-Trailer", "t"] not in data["headers"]  # trailers are not headers


async def test_64_mib_upload_to_a_slow_reader_is_flow_controlled(serve: Serve) -> None:
    size, block = 64 * 1024 * 1024, bytes(range(256)) * 4096  # 1 MiB
    paused_seen = 0

    async def slow(request: Request) -> None:
        nonlocal paused_seen
        digest, got, biggest = hashlib.sha256(), 0, 0
        connection = next(iter(served.http._connections))
        while True:
            paused_seen += connection._paused & 1  # reading paused: the body buffer is full
            if not (chunk := await request.read_chunk()):
                break
            digest.update(chunk)
            got += len(chunk)
            biggest = max(biggest, len(chunk))
            await asyncio.sleep(0.001)  # a consumer slower than the socket
        await request.respond(
            200,
            "OK",
            JSON,
            json.dumps({"n": got, "h": digest.hexdigest(), "max": biggest}).encode(),
        )

    served = await serve(slow, read_high_water=256 * 1024)
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    tracemalloc.start()
    try:
        reader, writer = await served.connect()
        writer.write(b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        response = await read_response(reader, within=120)
        _, peak = tracemalloc.get_traced_memory()
        writer.close()
    finally:
        tracemalloc.stop()
    data = response.json()
    assert "n" in data, data
    assert data["n"] == size and data["h"] == expected.hexdigest()
    assert paused_seen > 0  # the protocol stopped reading while the handler lagged
    assert data["max"] <= 1024 * 1024  # never more than the high-water mark plus a read
    assert peak < 8 * 1024 * 1024, peak  # 64 MiB went through; a few MiB were ever held


async def test_body_timeout_is_the_handlers_to_use(serve: Serve) -> None:
    async def timed(request: Request) -> None:
        request.body_timeout = 0.3
        try:
            await request.read_chunk()
            await request.read_chunk()
        except TimeoutError:
            request.close_after_response()
            await request.respond(408, "Request Timeout", JSON, b'{"error": "body_timeout"}')

    served = await serve(timed)
    raw = await exchange(served.port, b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789")
    assert status_of(raw) == 408 and raw.endswith(b'{"error": "body_timeout"}')


async def test_broken_chunked_framing_reaches_the_handler_as_a_reset(serve: Serve) -> None:
    seen: list[str] = []

    async def reader(request: Request) -> None:
        try:
            while await request.read_chunk():
                pass
        except ConnectionResetError as exc:
            seen.append(str(exc))
            await request.respond(400, "Bad Request", JSON, b'{"error": "bad_request"}')

    served = await serve(reader)
    raw = await exchange(
        served.port,
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n" + GET,
    )
    assert status_of(raw) == 400 and raw.count(b"HTTP/1.1") == 1 and b"Connection: close" in raw
    assert seen and "could not be parsed" in seen[0]


# --- Expect: 100-continue -----------------------------------------------------------------------------

EXPECT = b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"


async def test_100_continue_is_sent_when_the_handler_says_so(serve: Serve) -> None:
    calls: list[str] = []

    async def checked(request: Request) -> None:
        calls.append("checks")
        await request.send_continue()
        await request.send_continue()  # once only
        await echo(request)

    served = await serve(checked)
    reader, writer = await served.connect()
    try:
        writer.write(EXPECT)
        interim = await read_response(reader)
        assert (interim.status, interim.raw_head) == (100, b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"hello")
        final = await read_response(reader)
        assert final.status == 200 and final.json()["body_len"] == 5
        assert final.header("Connection") is None  # the body was read: the connection stays
    finally:
        writer.close()


async def test_refused_expect_request_is_answered_without_its_body_and_closed(
    serve: Serve,
) -> None:
    async def refuse(request: Request) -> None:
        await request.respond(403, "Forbidden", JSON, b'{"error": "policy_denied"}')

    served = await serve(refuse)
    raw = await exchange(served.port, EXPECT)  # the client never sends its body
    assert b"100 Continue" not in raw
    assert status_of(raw) == 403 and b"Connection: close" in raw  # and the server closed


@pytest.mark.parametrize(
    "request_bytes",
    [
        EXPECT.replace(b"HTTP/1.1", b"HTTP/1.0"),  # 1.0 clients do not know 100
        EXPECT + b"hel",  # the body has begun: no 100 any more
        EXPECT.replace(b"100-continue", b"something-else"),
    ],
)
async def test_no_100_continue_when_it_would_be_wrong(serve: Serve, request_bytes: bytes) -> None:
    async def continue_then_answer(request: Request) -> None:
        if request_bytes.endswith(b"hel"):
            await wait_for(lambda: request._body_started, what="body bytes arrived")
        await request.send_continue()
        request.close_after_response()
        await request.respond(200, "OK", [], b"done")

    served = await serve(continue_then_answer)
    raw = await exchange(served.port, request_bytes)
    assert status_of(raw) == 200 and b" 100 " not in raw


async def test_reading_the_body_sends_a_pending_100_continue(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    try:
        writer.write(EXPECT)
        assert (await read_response(reader)).status == 100
        writer.write(b"hello")
        assert (await read_response(reader)).json()["body_len"] == 5
    finally:
        writer.close()


# --- HEAD, 204, 304, streamed answers -------------------------------------------------------------------


async def test_head_gets_the_length_and_no_body(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    try:
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n" + GET)
        head = await read_response(reader, head_request=True)
        assert head.status == 200 and int(head.header("Content-Length") or 0) > 0
        after = await read_response(reader)  # parses cleanly: no body bytes came in between
        assert after.json()["method"] == "GET"
    finally:
        writer.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_carry_no_body_and_no_length(serve: Serve, status: int) -> None:
    async def bodyless(request: Request) -> None:
        await request.respond(status, "", [(b"ETag", b'"x"')], b"ignored")

    served = await serve(bodyless)
    reader, writer = await served.connect()
    try:
        writer.write(GET + GET)
        for _ in range(2):
            response = await read_response(reader)
            assert response.status == status and response.header("Content-Length") is None
            assert response.raw_head.endswith(b'ETag: "x"\r\n\r\n')
    finally:
        writer.close()


async def test_streamed_answers_are_framed_for_each_client(serve: Serve) -> None:
    async def stream(request: Request) -> None:
        length = 6 if request.target == "/known" else None
        request.start(200, "OK", [(b"X-S", b"1")], content_length=length)
        for part in (b"abc", b"", b"def"):
            await request.write(part)
        await request.end()

    served = await serve(stream)
    reader, writer = await served.connect()
    try:
        writer.write(GET.replace(b"/a?x=%2F&y={}", b"/chunked"))
        chunked = await read_response(reader)
        assert chunked.header("Transfer-Encoding") == "chunked" and chunked.body == b"abcdef"
        writer.write(GET.replace(b"/a?x=%2F&y={}", b"/known"))
        known = await read_response(reader)
        assert known.header("Content-Length") == "6" and known.body == b"abcdef"
        writer.write(b"HEAD /known HTTP/1.1\r\n\r\n")
        head = await read_response(reader, head_request=True)
        assert head.header("Content-Length") == "6"
        writer.write(GET)  # still in step: the HEAD answer carried no body
        assert (await read_response(reader)).body == b"abcdef"
    finally:
        writer.close()
    raw = await exchange(served.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert raw.endswith(b"\r\nConnection: close\r\n\r\nabcdef") and b"chunked" not in raw


async def test_a_streamed_head_goes_out_before_the_body(serve: Serve) -> None:
    more = asyncio.Event()

    async def long_poll(request: Request) -> None:
        request.start(200, "OK", [(b"Content-Type", b"text/event-stream")])
        await more.wait()  # e.g. an upstream that sends its head, then waits for an event
        await request.write(b"data: 1\n\n")
        await request.end()

    served = await serve(long_poll)
    reader, writer = await served.connect()
    try:
        writer.write(GET)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Transfer-Encoding: chunked" in head
        more.set()
        assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5) == (
            b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        )
    finally:
        writer.close()


async def test_abort_resets_a_half_sent_answer(serve: Serve) -> None:
    async def failing(request: Request) -> None:
        request.start(200, "OK", [], content_length=100)
        await request.write(b"partial")
        request.abort()

    served = await serve(failing)
    raw = await exchange(served.port, GET)
    assert raw.endswith(b"partial") and b"Content-Length: 100" in raw  # short: visibly broken
    await wait_for(lambda: served.http.in_flight == 0 and served.http.connections == 0)


@pytest.mark.parametrize("bug", ["raise", "silent", "crlf"])
async def test_a_handler_that_fails_gets_a_json_500(serve: Serve, bug: str) -> None:
    async def broken(request: Request) -> None:
        if bug == "raise":
            raise KeyError("a value that must not be logged or echoed")
        if bug == "crlf":
            await request.respond(200, "OK", [(b"X-A", b"a\r\nSet-Cookie: injected")], b"")

    served = await serve(broken)
    raw = await exchange(served.port, GET)
    assert status_of(raw) == 500 and error_of(raw)["error"] == "internal_error"
    assert b"injected" not in raw and b"must not" not in raw


# --- disconnects, the Upgrade hand-off, shutdown ----------------------------------------------------


async def test_client_leaving_mid_request_cancels_the_handler(serve: Serve) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def waiting(request: Request) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    served = await serve(waiting)
    _, writer = await served.connect()
    writer.write(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
    await asyncio.wait_for(entered.wait(), 5)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)
    await wait_for(lambda: served.http.in_flight == 0 and served.http.connections == 0)


class _Echoer(asyncio.Protocol):
    """A new owner for a detached connection: answers every byte it gets, prefixed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"<" + data + b">")


async def test_an_upgrade_hands_the_connection_over_with_the_bytes_after_the_head(
    serve: Serve,
) -> None:
    async def upgrade(request: Request) -> None:
        assert request.upgrade and request.header("upgrade") == "websocket"
        transport, rest = request.detach()
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        owner = _Echoer()
        transport.set_protocol(owner)
        owner.connection_made(transport)
        owner.data_received(rest)
        transport.resume_reading()

    served = await serve(upgrade)
    reader, writer = await served.connect()
    try:
        frames = bytes(range(256)) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"  # not HTTP any more
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            + frames[:100]
        )
        assert (await read_response(reader)).status == 101
        assert await reader.readexactly(102) == b"<" + frames[:100] + b">"
        writer.write(frames[100:])
        got = await reader.readexactly(len(frames) - 100 + 2)
        assert got == b"<" + frames[100:] + b">"
        assert served.http.connections == 0  # no longer the server's
    finally:
        writer.close()


async def test_a_websocket_upgrade_can_be_handed_to_aiohttp(serve: Serve) -> None:
    """How the proxy keeps aiohttp for WebSockets: the detached connection, its head and the
    bytes after it go to an aiohttp RequestHandler, which runs an ordinary aiohttp handler."""

    async def ws_echo(request: web.BaseRequest) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo {message.data} via {request.raw_path}")
        return ws

    aiohttp_server = web.Server(ws_echo, handler_cancellation=True)

    async def upgrade(request: Request) -> None:
        head = request.head_bytes()
        transport, rest = request.detach()
        protocol = aiohttp_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head + rest)
        transport.resume_reading()

    served = await serve(upgrade)
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{served.port}/ws/x?y=%2F"
            async with client.ws_connect(URL(url, encoded=True)) as ws:
                for text in ("one", "two"):
                    await ws.send_str(text)
                    assert await ws.receive_str(timeout=5) == f"echo {text} via /ws/x?y=%2F"
    finally:
        await aiohttp_server.shutdown(1.0)


async def test_a_slow_reader_holds_a_streamed_answer_back(serve: Serve) -> None:
    size, block = 64 * 1024 * 1024, b"z" * (1024 * 1024)
    written = 0

    async def download(request: Request) -> None:
        nonlocal written
        request.start(200, "OK", [], content_length=size)
        for _ in range(size // len(block)):
            await request.write(block)
            written += len(block)
        await request.end()

    served = await serve(download)
    tracemalloc.start()
    try:
        reader, writer = await served.connect()
        writer.write(GET)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1024 * 1024)
        await wait_for(lambda: not next(iter(served.http._connections))._writable, what="paused")
        assert written < 16 * 1024 * 1024  # the handler waits for the client
        got = 1024 * 1024
        while got < size:
            got += len(await reader.read(1024 * 1024))
            await asyncio.sleep(0)
        _, peak = tracemalloc.get_traced_memory()
        writer.close()
    finally:
        tracemalloc.stop()
    assert b"Content-Length: 67108864" in head and got == size and written == size
    assert peak < 12 * 1024 * 1024, peak


async def test_an_upgrade_the_handler_refuses_is_answered_and_closed(serve: Serve) -> None:
    async def refuse(request: Request) -> None:
        await request.respond(
            405, "Method Not Allowed", JSON, b'{"error": "connect_not_supported"}'
        )

    served = await serve(refuse)
    raw = await exchange(served.port, b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
    assert status_of(raw) == 405 and raw.count(b"HTTP/1.1") == 1 and b"Connection: close" in raw


async def test_shutdown_closes_idle_connections_finishes_in_flight_and_refuses_new(
    serve: Serve,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> None:
        if request.target == "/slow":
            entered.set()
            await release.wait()
        await request.respond(200, "OK", [], b"done")

    served = await serve(slow)
    idle_reader, idle_writer = await served.connect()
    idle_writer.write(GET)
    await read_response(idle_reader)
    busy_reader, busy_writer = await served.connect()
    busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    stopping = asyncio.create_task(served.http.shutdown(5.0))
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed at once
    late_reader, late_writer = await served.connect()  # still listening, but stopping
    assert await asyncio.wait_for(late_reader.read(), 5) == b""
    assert served.http.in_flight == 1
    release.set()
    answer = await read_response(busy_reader)
    assert answer.body == b"done" and answer.header("Connection") == "close"
    assert await stopping is True
    for w in (idle_writer, busy_writer, late_writer):
        w.close()


async def test_close_idle_closes_only_connections_between_requests(serve: Serve) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> None:
        if request.target == "/slow":
            entered.set()
            await release.wait()
        await request.respond(200, "OK", [], b"done")

    served = await serve(slow)
    idle_reader, idle_writer = await served.connect()
    busy_reader, busy_writer = await served.connect()
    try:
        idle_writer.write(GET)
        await read_response(idle_reader)
        busy_writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(entered.wait(), 5)
        assert served.http.close_idle() == 1
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        release.set()
        answer = await read_response(busy_reader)  # not stopping: the busy one stays open
        assert answer.body == b"done" and answer.header("Connection") is None
        busy_writer.write(GET)
        assert (await read_response(busy_reader)).status == 200
    finally:
        idle_writer.close()
        busy_writer.close()


async def test_shutdown_cancels_handlers_that_outlive_the_grace(serve: Serve) -> None:
    entered = asyncio.Event()

    async def stuck(request: Request) -> None:
        entered.set()
        await asyncio.Event().wait()

    served = await serve(stuck)
    reader, writer = await served.connect()
    writer.write(GET)
    await asyncio.wait_for(entered.wait(), 5)
    assert await served.http.shutdown(0.2) is False
    assert served.http.in_flight == 0
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


# --- real clients ---------------------------------------------------------------------------------


async def test_aiohttp_client_get_and_post(serve: Serve) -> None:
    served = await serve()
    url = f"http://127.0.0.1:{served.port}/p?q=1"
    async with aiohttp.ClientSession() as client:
        async with client.get(url) as resp:
            assert resp.status == 200 and (await resp.json())["target"] == "/p?q=1"
        payload = b"x" * 300_000
        async with client.post(url, data=payload) as resp:
            data = await resp.json()
            assert data["body_len"] == len(payload)
            assert data["sha256"] == hashlib.sha256(payload).hexdigest()

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(3):
                yield b"y" * 1000

        async with client.post(url, data=chunks()) as resp:
            assert (await resp.json())["chunked"] is True
    assert served.http.in_flight == 0


async def test_curl_get_and_post(serve: Serve) -> None:
    served = await serve()
    url = f"http://127.0.0.1:{served.port}/c"
    for args in (["-s", url], ["-s", "-X", "POST", "--data-binary", "x" * 2000, url]):
        proc = await asyncio.create_subprocess_exec(
            "curl", "--max-time", "10", *args, stdout=subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        data = json.loads(out)
        assert data["target"] == "/c" and data["body_len"] == (2000 if "POST" in args else 0)
