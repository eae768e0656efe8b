"""A misbehaving upstream at the TCP level, for fault tests: each accepted connection gets the next
behaviour from a script (then the default one), and every connection is counted.

Behaviours:
- ``pipe``: relay bytes both ways to ``pipe_to`` (the verifying upstream): a healthy connection;
- ``reset``: RST as soon as the connection is accepted;
- ``close``: FIN as soon as it is accepted;
- ``stall``: accept and never say anything;
- ``garbage``: send bytes that are neither TLS nor HTTP, then close;
- ``tls-garbage``: complete a real TLS handshake (trusted certificate), then send non-HTTP bytes;
- ``wrong-name``: offer a certificate from the trusted CA, but for another host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections import deque
from collections.abc import Iterable

import trustme

GARBAGE = b"\x00\x01SSH-2.0-definitely not http\r\n\xff\xfe" * 8


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultServer:
    def __init__(
        self,
        *,
        default: str = "pipe",
        script: Iterable[str] = (),
        pipe_to: int | None = None,
        ca: trustme.CA | None = None,
    ):
        self.default = default
        self.script: deque[str] = deque(script)
        self.pipe_to = pipe_to
        self.accepted: list[str] = []  # the behaviour each accepted connection got
        self._ca = ca
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> FaultServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        mode = self.script.popleft() if self.script else self.default
        self.accepted.append(mode)
        try:
            await self._behave(mode, reader, writer)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()

    async def _behave(
        self, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if mode == "reset":
            _rst(writer)
        elif mode == "close":
            writer.close()
        elif mode == "stall":
            await asyncio.sleep(60)
        elif mode == "garbage":
            writer.write(GARBAGE)
            await writer.drain()
            await asyncio.sleep(0.2)
        elif mode in ("tls-garbage", "wrong-name"):
            assert self._ca is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            names = ("127.0.0.1", "localhost") if mode == "tls-garbage" else ("wrong.example",)
            self._ca.issue_cert(*names).configure_cert(context)
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.start_tls(context)
                await reader.read(65536)  # the request
                writer.write(GARBAGE)
                await writer.drain()
                await asyncio.sleep(0.2)
        elif mode == "pipe":
            assert self.pipe_to is not None
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.pipe_to)

            async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                with contextlib.suppress(ConnectionError, OSError):
                    dst.write_eof()

            try:
                await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
            finally:
                up_writer.close()
        else:
            raise ValueError(mode)
