"""A TLS upstream that records the exact bytes it receives, for the adversarial tests.

It parses HTTP/1.1 itself (Content-Length or chunked framing, keep-alive), the way a strict origin
would, so a proxy that forwards a Content-Length that does not describe the body it writes shows
up as a wrong request count, a wrong body or garbage parsed as the next request. Every request is
recorded with its raw head and raw body bytes, and its JWT (if any) is checked with the public key
against the method + Host + path it actually received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass
class RawRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # which TCP connection it came on
    jwt_uri: str | None = None  # the verified token's uri claim
    jwt_error: str | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


@dataclass
class RawUpstream:
    ca: trustme.CA
    public_key: ec.EllipticCurvePublicKey
    requests: list[RawRequest] = field(default_factory=list)
    garbage: list[bytes] = field(default_factory=list)  # what did not parse as a request
    connections: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    def _verify(self, request: RawRequest) -> None:
        auth = request.header("Authorization") or ""
        if not auth.startswith("Bearer "):
            return
        try:
            claims = jwt.decode(
                auth[7:], self.public_key, algorithms=["ES256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as exc:
            request.jwt_error = type(exc).__name__
            return
        request.jwt_uri = claims.get("uri")
        expected = f"{request.method} {request.header('Host')}{request.path}"
        if request.jwt_uri != expected:
            request.jwt_error = f"uri {request.jwt_uri!r} != received {expected!r}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                request = await self._read(reader, number)
                if request is None:
                    return
                self._verify(request)
                self.requests.append(request)
                body = json.dumps({"n": len(self.requests), "path": request.target}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, number: int) -> RawRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                self.garbage.append(exc.partial)
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self.garbage.append(head)
            return None
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        request = RawRequest(parts[0], parts[1], headers, b"", number)
        length = request.header("Content-Length")
        if (request.header("Transfer-Encoding") or "").lower() == "chunked":
            request.body = await _read_chunked(reader)
        elif length is not None:
            request.body = await reader.readexactly(int(length))
        return request


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from the proxy
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def as_json(raw: bytes) -> Any:
    """The JSON body of a raw HTTP/1.1 response."""
    return json.loads(raw.partition(b"\r\n\r\n")[2] or b"null")
