"""What the http_server tests share: a running server with an echoing handler, and a raw
HTTP/1.1 response reader (so no client library tidies what the server sent)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from signing_proxy.http_request import Request
from signing_proxy.http_server import Handler, HttpServer, ServerLimits

JSON: list[tuple[bytes, bytes]] = [(b"Content-Type", b"application/json")]


async def echo(request: Request) -> None:
    """Answers what it received: method, target, version, headers, body length and hash."""
    digest = hashlib.sha256()
    size = 0
    while chunk := await request.read_chunk():
        digest.update(chunk)
        size += len(chunk)
    data = {
        "method": request.method,
        "target": request.target,
        "version": list(request.version),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.raw_headers],
        "content_length": request.content_length,
        "chunked": request.chunked,
        "body_len": size,
        "sha256": digest.hexdigest(),
        "remote": request.remote,
    }
    await request.respond(200, "OK", JSON, json.dumps(data).encode())


@dataclass
class Served:
    http: HttpServer
    server: asyncio.AbstractServer
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


Serve = Callable[..., Awaitable[Served]]


@contextlib.asynccontextmanager
async def servers() -> AsyncIterator[Serve]:
    """``start(handler, **limits)`` runs a server on a free port; all are stopped on exit."""
    started: list[Served] = []

    async def start(handler: Handler = echo, **limits: Any) -> Served:
        http = HttpServer(handler, ServerLimits(**limits))
        server = await asyncio.get_running_loop().create_server(http, "127.0.0.1", 0)
        served = Served(http, server, int(server.sockets[0].getsockname()[1]))
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.server.close()
            await served.http.shutdown(1.0)
            await served.server.wait_closed()


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def read_response(
    reader: asyncio.StreamReader, *, head_request: bool = False, within: float = 10.0
) -> Response:
    """One response, framed as RFC 9112 §6.3 says (1xx answers are returned as they are)."""
    async with asyncio.timeout(within):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        response = Response(int(status), reason, headers, b"", raw_head)
        if head_request or response.status < 200 or response.status in (204, 304):
            return response
        length = response.header("Content-Length")
        if (response.header("Transfer-Encoding") or "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    assert await reader.readuntil(b"\r\n") == b"\r\n"  # no trailers from us
                    break
                parts.append(await reader.readexactly(size))
                assert await reader.readexactly(2) == b"\r\n"
            response.body = b"".join(parts)
        elif length is not None:
            response.body = await reader.readexactly(int(length))
        else:
            response.body = await reader.read()  # close-delimited
        return response


async def exchange(port: int, request: bytes, *, within: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes, return everything that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(within):
            with contextlib.suppress(ConnectionResetError):
                while data := await reader.read(65536):
                    chunks.append(data)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def error_of(raw: bytes) -> dict[str, Any]:
    """The JSON error body of a whole refusal; it must be one line and close the connection."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lowered = head.lower()
    assert b"content-type: application/json" in lowered and b"connection: close" in lowered, head
    assert b"\n" not in body, body
    data = json.loads(body)
    assert isinstance(data, dict) and set(data) == {"error", "message"}, data
    return data
