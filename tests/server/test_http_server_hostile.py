"""What the listener's own server refuses before any handler runs, and the limits it holds:
every hostile head of tests/test_hostile.py, smuggling, oversized heads, slowloris, idle
connections, the connection cap, pipelining floods, and raw bytes from a fuzzer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signing_proxy.http_request import Request
from signing_proxy.http_server import HttpServer, ServerLimits

from ..helpers import wait_for
from ..test_fuzz import requests as fuzzed_requests
from ..test_hostile import SMUGGLING
from .http_server_kit import Serve, echo, error_of, exchange, read_response, servers, status_of


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with servers() as start:
        yield start


class Counting:
    """The echo handler, counting the requests that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> None:
        self.calls += 1
        await echo(request)


def _get(target: str, *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: proxy", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


@pytest.mark.parametrize("request_bytes", SMUGGLING)
async def test_ambiguous_framing_is_refused_before_any_handler(
    serve: Serve, request_bytes: bytes
) -> None:
    handler = Counting()
    served = await serve(handler)
    raw = await exchange(served.port, request_bytes)
    assert status_of(raw) == 400 and error_of(raw)["error"] == "bad_request", raw
    assert raw.count(b"HTTP/1.1") == 1 and handler.calls == 0


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (_get("/api/v3/" + "a" * 9000), 400, "bad_request"),  # request line over 8190 bytes
        (_get("/api/v3/x", "X-Big: " + "b" * 9000), 400, "bad_request"),  # one header line
        (_get("/x", *(f"X-H{i}: {'c' * 4000}" for i in range(10))), 431, "headers_too_large"),
        (_get("/api/v3/x", *(f"X-H{i}: 1" for i in range(200))), 400, "bad_request"),  # > 128
        (
            b"GET /api/v3/x\r\nInjected: 1 HTTP/1.1\r\nHost: p\r\n\r\n",
            505,
            "http_version_not_supported",
        ),
        (b"GET /x HTTP/2.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /x HTTP/1.2\r\nHost: p\r\n\r\n", 400, "bad_request"),
        (b"GET /x RTSP/1.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /x  RTSP/1.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported"),
        (b"SOURCE /x ICE/1.0\r\nHost: p\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /api/v3/x\x00 HTTP/1.1\r\nHost: p\r\n\r\n", 400, "bad_request"),
        (b"GET /\xc3\xa9 HTTP/1.1\r\nHost: p\r\n\r\n", 400, "bad_request"),  # raw UTF-8
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "bad_request"),
        (b"CONNECT  \r\nHost: p\r\n\r\n", 400, "bad_request"),  # crashed aiohttp 3.14.5
        (b"CONNECT \r\nHost: p\r\n\r\n", 400, "bad_request"),
        (b"post /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "bad_method"),
        (b"PATCH_ /x HTTP/1.1\r\n\r\n", 400, "bad_method"),
        (
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "bad_request"),
        (
            b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n", 0, ""),
        (
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3"
            b"\r\n\r\nabc",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 100_000, 431, "headers_too_large"),  # never ends
    ],
)
async def test_broken_and_oversized_heads_are_refused_in_json(
    serve: Serve, request_bytes: bytes, status: int, code: str
) -> None:
    handler = Counting()
    served = await serve(handler)
    raw = await exchange(served.port, request_bytes)
    if status == 0:  # the head was fine, the chunk framing was not: the handler saw a reset
        assert status_of(raw) == 500 and handler.calls == 1
        return
    assert status_of(raw) == status, raw[:300]
    error = error_of(raw)
    assert error["error"] == code
    assert handler.calls == 0
    assert b"aaaa" not in raw and b"Injected" not in raw  # the client's bytes never come back


async def test_http_10_is_still_http_after_a_body_and_in_a_dribbled_line(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    try:
        writer.write(b"POST /a HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
        writer.write(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # pipelined
        assert (await read_response(reader)).json()["body_len"] == 2
        assert (await read_response(reader)).json()["target"] == "/b"
        for part in (b"GET /c", b" HTT", b"P/1.0\r\nConnection: keep-alive\r\n", b"\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)  # in separate reads, as a slow client sends it
        assert (await read_response(reader)).json()["version"] == [1, 0]
    finally:
        writer.close()


async def test_refusals_are_reported_for_metrics(serve: Serve) -> None:
    seen: list[tuple[int, str]] = []
    served = await serve()
    served.http.on_refusal = lambda status, code: seen.append((status, code))
    await exchange(served.port, b"GET /x HTTP/2.0\r\n\r\n")
    await exchange(served.port, b"get /x HTTP/1.1\r\n\r\n")
    assert seen == [(505, "http_version_not_supported"), (400, "bad_method")]


async def test_refusal_of_a_pipelined_request_waits_for_the_answers_before_it(
    serve: Serve,
) -> None:
    served = await serve()
    raw = await exchange(
        served.port,
        b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\nX : y\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200") == 2
    last = raw[raw.rindex(b"HTTP/1.1 ") :]
    assert status_of(last) == 400 and error_of(last)["error"] == "bad_request"


async def test_a_flood_of_pipelined_requests_is_bounded(serve: Serve) -> None:
    served = await serve(max_pipelined=4)
    raw = await exchange(served.port, b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n" * 40)
    assert raw.count(b"HTTP/1.1 200") == 5  # one running, four parsed ahead
    last = raw[raw.rindex(b"HTTP/1.1 ") :]
    assert status_of(last) == 400 and "pipelined" in error_of(last)["message"]


@pytest.mark.parametrize(
    "tail",
    [
        b"5;" + b"e" * 100_000 + b"\r\nhello\r\n0\r\n\r\n",  # a chunk extension that never ends
        b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 100_000 + b"\r\n\r\n",  # a huge trailer
    ],
)
async def test_chunk_metadata_is_bounded_like_a_head(serve: Serve, tail: bytes) -> None:
    errors: list[BaseException] = []

    async def reader(request: Request) -> None:
        try:
            while await request.read_chunk():
                pass
        except ConnectionResetError as exc:
            errors.append(exc)
        await request.respond(200, "OK", [], b"")

    served = await serve(reader)
    reader_, writer = await served.connect()
    try:
        writer.write(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(tail), 8192):  # in many reads, as a slow client would
                writer.write(tail[start : start + 8192])
                await writer.drain()
                await asyncio.sleep(0.005)
        response = await read_response(reader_)
        assert await asyncio.wait_for(reader_.read(), 5) == b""  # and closed
    finally:
        writer.close()
    assert response.status == 200 and response.header("Connection") == "close"
    assert errors and "over max_header_bytes" in str(errors[0])


# --- slow and idle clients --------------------------------------------------------------------------


async def test_slowloris_head_is_cut_off_at_header_timeout(serve: Serve) -> None:
    served = await serve(header_timeout=1.0)
    reader, writer = await served.connect()
    started = time.monotonic()

    async def drip() -> None:  # one byte every 50 ms: 10 s for the whole head
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /x HTTP/1.1\r\nHost: p\r\nX-Slow: " + b"s" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        raw = await exchange(served.port, _get("/other"))
        assert status_of(raw) == 200  # meanwhile, everyone else is served
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed without an answer
        assert time.monotonic() - started < 2.5
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping
        writer.close()


async def test_slowloris_after_a_keep_alive_request_is_cut_off_too(serve: Serve) -> None:
    served = await serve(header_timeout=1.0)
    reader, writer = await served.connect()
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await read_response(reader)).status == 200
        started = time.monotonic()
        writer.write(b"GET /y HTTP/1.1\r\nHo")  # and never finishes
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert 0.9 < time.monotonic() - started < 2.5
    finally:
        writer.close()


async def test_idle_connections_close_after_idle_timeout(serve: Serve) -> None:
    served = await serve(idle_timeout=0.3, header_timeout=30)
    writers = []
    try:
        reader, writer = await served.connect()
        writers.append(writer)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # never sent a byte
        assert time.monotonic() - started < 2

        reader, writer = await served.connect()
        writers.append(writer)
        writer.write(b"GET /x HTTP/1.1\r\n\r\n")
        assert (await read_response(reader)).status == 200
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # idle after an answer
        assert time.monotonic() - started < 2

        reader, writer = await served.connect()
        writers.append(writer)
        writer.write(b"GET /x HTTP/1.1\r\n")  # a head has begun: the header deadline applies
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(), 1.0)
    finally:
        for writer in writers:
            writer.close()


async def test_connections_over_the_cap_are_answered_503_and_closed(serve: Serve) -> None:
    served = await serve(max_connections=2)
    held = [await served.connect() for _ in range(2)]
    await wait_for(lambda: served.http.connections == 2, what="two connections held")
    raw = await exchange(served.port, _get("/x"))
    assert status_of(raw) == 503 and error_of(raw)["error"] == "too_many_connections"
    held[0][1].close()
    await wait_for(lambda: served.http.connections == 1, what="one released")
    assert status_of(await exchange(served.port, _get("/x"))) == 200
    held[1][1].close()


# --- raw bytes from a fuzzer -------------------------------------------------------------------------


class _Thread:
    """The server on its own loop in a thread, so hypothesis drives blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.http = HttpServer(_answer_at_once, ServerLimits(header_timeout=2.0))
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _start(self) -> asyncio.AbstractServer:
        return await self.loop.create_server(self.http, "127.0.0.1", 0)

    async def _stop(self) -> None:
        self.server.close()
        await self.http.shutdown(1.0)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def threaded() -> Iterator[_Thread]:
    t = _Thread()
    try:
        yield t
    finally:
        t.close()


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(line=st.binary(max_size=200), headers=st.binary(max_size=300), body=st.binary(max_size=50))
def test_raw_bytes_get_a_well_formed_answer_or_a_close(
    threaded: _Thread, line: bytes, headers: bytes, body: bytes
) -> None:
    request = line + b"\r\n" + headers + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", threaded.port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(request)
        raw = b""
        with contextlib.suppress(ConnectionResetError):  # until the first answer is whole
            while (chunk := sock.recv(65536)) and not _whole(raw := raw + chunk):
                pass
    if raw:  # not a request at all may just be closed; an answer is always well formed
        assert raw[9:12] in (b"200", b"400", b"431", b"501", b"505"), (request, raw)
        if not raw.startswith(b"HTTP/1.1 200"):
            error_of(raw)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_fuzzed_requests_get_a_well_formed_answer(threaded: _Thread, data: st.DataObject) -> None:
    """test_fuzz.py's request generator (methods, targets, versions, headers, every framing)."""
    request = data.draw(fuzzed_requests(1))
    with socket.create_connection(("127.0.0.1", threaded.port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(request)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while (chunk := sock.recv(65536)) and not _whole(raw := raw + chunk):
                pass
    assert raw[9:12] in (b"200", b"400", b"431", b"501", b"505"), (request, raw)
    if not raw.startswith(b"HTTP/1.1 200"):
        error_of(raw)


def _whole(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    assert head.startswith(b"HTTP/1.1 "), raw
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return len(body) >= length


async def _answer_at_once(request: Request) -> None:
    await request.respond(200, "OK", [], b"{}")
