"""The listener's HTTP/1.1 server over its lifetime: a client leaving mid-request, an Upgrade
handed to a new owner (raw, and to aiohttp's WebSocket server), idle closing and shutdown, and
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
from .http_server_kit import JSON, Serve, echo, exchange, read_response, servers, status_of


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with servers() as start:
        yield start


GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"


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


async def test_an_upgrade_pipelined_behind_a_request_waits_its_turn(serve: Serve) -> None:
    async def both(request: Request) -> None:
        if not request.upgrade:
            await echo(request)
            return
        transport, rest = request.detach()
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n<" + rest + b">")
        transport.close()

    served = await serve(both)
    raw = await exchange(
        served.port,
        GET + b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    )
    first, _, rest = raw.partition(b"HTTP/1.1 101")
    assert status_of(first) == 200 and b"Connection: close" not in first
    assert rest.endswith(b"\r\n\r\n<frames>")


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
