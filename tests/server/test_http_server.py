"""The proxy listener's HTTP/1.1 server (signing_proxy/http_server.py) over real sockets:
keep-alive, pipelining, HTTP/1.0, chunked bodies, flow control, Expect, HEAD, 204/304,
streamed answers, errors in handlers. Disconnects, the Upgrade hand-off, shutdown and real
clients are in test_http_server_lifecycle.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tracemalloc
from collections.abc import AsyncIterator

import pytest

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
