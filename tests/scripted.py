"""A TLS server that writes exact bytes: each accepted connection runs a script (a coroutine
given the connection), for the HTTP edge cases a well-behaved server never produces.

The server records every connection (its client port, what it received, whether it is closed),
so tests count reuse and see the request bytes exactly as they arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trustme


@dataclass(eq=False)
class Peer:
    """One accepted connection, as the server sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int
    received: list[bytes] = field(default_factory=list)  # one entry per request read
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self) -> bytes:
        """One request: head, then a Content-Length or chunked body. b"" at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        body = b""
        lower = head.lower()
        if b"\r\ncontent-length:" in lower:
            size = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            body = await self.reader.readexactly(size)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            parts = []
            while True:
                line = await self.reader.readuntil(b"\r\n")
                size = int(line.split(b";")[0], 16)
                parts.append(line + await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(parts)
        self.received.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Peer], Awaitable[None]]


def answering(response: bytes | Callable[[bytes], bytes]) -> Script:
    """A keep-alive script: answer every request with ``response`` (or ``response(request)``)."""

    async def script(peer: Peer) -> None:
        while request := await peer.read_request():
            await peer.send(response(request) if callable(response) else response)

    return script


class ScriptedServer:
    def __init__(self, ca: trustme.CA, script: Script, *, names: tuple[str, ...] = ()):
        self.ca = ca
        self.script = script
        self.names = names or ("127.0.0.1", "localhost")
        self.peers: list[Peer] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def open_peers(self) -> list[Peer]:
        return [p for p in self.peers if not p.closed.is_set()]

    async def start(self) -> ScriptedServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*self.names).configure_cert(context)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer, writer.get_extra_info("peername")[1])
        self.peers.append(peer)
        try:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self.script(peer)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()
            peer.closed.set()
