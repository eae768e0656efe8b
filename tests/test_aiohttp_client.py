"""translate_client_error and CLIENT_FAILURES against a real server that breaks its answers.

The upstream is a plain asyncio server writing exact bytes, so each failure is what aiohttp's
client really raises for it, not a constructed exception.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from signing_proxy.aiohttp_client import CLIENT_FAILURES, create_session, translate_client_error
from signing_proxy.errors import UpstreamError

HEAD_200 = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
AnswersWith = Callable[[bytes], Awaitable[str]]


@pytest.fixture
async def answers_with() -> AsyncIterator[AnswersWith]:
    """Start a server that answers any request with these bytes, then closes: its URL."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _failure(url: str) -> UpstreamError:
    """GET ``url`` and read the whole body, the way the call sites catch a failure."""
    async with create_session() as session:
        try:
            async with session.get(url) as response:
                await response.read()
        except CLIENT_FAILURES as exc:
            return translate_client_error(exc, "upstream.test", 5)
    raise AssertionError("the request did not fail")


@pytest.mark.parametrize(
    "answer",
    [
        HEAD_200 + b"Content-Length: 100\r\n\r\nonly ten b",
        HEAD_200 + b"Transfer-Encoding: chunked\r\n\r\n20\r\nthe chunk stops sh",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_ended_short_is_a_reset_connection(
    answers_with: AnswersWith, answer: bytes
) -> None:
    # aiohttp says so with a ClientPayloadError whose cause is the parser's "not enough data".
    error = await _failure(await answers_with(answer))
    assert error.code == "upstream_connection_reset"
    assert error.message == "upstream.test closed or reset the connection before answering"


async def test_a_broken_status_line_is_a_bad_response(
    answers_with: AnswersWith,
) -> None:
    error = await _failure(await answers_with(b"HTTP/1.1 2x0 OK\r\n\r\n"))
    assert error.code == "upstream_bad_response"


def test_client_failures_hold_what_aiohttp_and_the_transport_raise() -> None:
    # ssl.SSLError and the builtin ConnectionErrors are OSErrors; aiohttp's TLS and timeout
    # errors are its own and OSErrors or TimeoutErrors at once.
    for exc in (
        ssl.SSLError(1, "bad record mac"),
        ConnectionResetError(),
        BrokenPipeError(),
        OSError(113, "No route to host"),
        TimeoutError(),
        aiohttp.ServerTimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError(),
    ):
        assert isinstance(exc, CLIENT_FAILURES), exc
    assert not isinstance(ValueError(), CLIENT_FAILURES)
