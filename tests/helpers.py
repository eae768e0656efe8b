"""Small helpers shared by the functional tests: URLs of a running proxy, fetching, metric values."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
from yarl import URL

from signing_proxy.app import ProxyServer


def base(proxy: ProxyServer) -> str:
    return f"http://127.0.0.1:{proxy.port(0)}"


def admin(proxy: ProxyServer) -> str:
    return f"http://127.0.0.1:{proxy.port(1)}"


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse, bytes]:
    async with client.request(method, url, allow_redirects=False, **kwargs) as resp:
        raw = await resp.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return resp.status, data, resp, raw


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    """A sample's value from the proxy's registry (0.0 when the series does not exist)."""
    value = proxy.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def raw_exchange(port: int, request: bytes, *, within: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (at most ``within`` s), return what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(within):
            while data := await reader.read(65536):
                chunks.append(data)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def wait_for(predicate: Any, *, within: float = 5.0, what: str = "condition") -> float:
    """Poll ``predicate()`` (a coroutine function too) every 50 ms; return the seconds it took,
    fail after ``within`` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def holds() -> bool:
        result = predicate()
        return bool(await result) if asyncio.iscoroutine(result) else bool(result)

    while not await holds():
        if loop.time() - start > within:
            raise AssertionError(f"{what} not met within {within}s")
        await asyncio.sleep(0.05)
    return loop.time() - start
