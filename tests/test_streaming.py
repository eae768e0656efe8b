"""100 MB through the proxy in each direction, streamed: the proxy's memory must stay flat."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from .proc import ProxyProcess, free_port, rss_kib, write_config

SIZE = 100 * 1024 * 1024
MAX_GROWTH_KIB = 8 * 1024  # "a few MB"; a buffering relay would grow by ~100 MB


def _block() -> bytes:
    return bytes(range(256)) * 256  # 64 KiB, the same pattern the upstream sends


async def test_100mb_each_way_without_memory_growth(
    config_dict: dict[str, Any], tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    config_dict.update(
        listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}", log_level="WARNING"
    )
    for upstream in config_dict["upstreams"].values():
        upstream["timeout"] = 120
    proxy = ProxyProcess(write_config(tmp_path / "config.yaml", config_dict))
    try:
        await proxy.wait_ready(f"http://127.0.0.1:{admin}", path="/readyz")
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{base}/api/v3/warm-up") as resp:  # pool, TLS and imports warmed
                assert resp.status == 200
            baseline = rss_kib(proxy.pid)

            # download: the upstream streams 100 MB; count and hash what arrives
            digest, count = hashlib.sha256(), 0
            async with client.get(f"{base}/stream/download?size={SIZE}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 16):
                    digest.update(chunk)
                    count += len(chunk)
            expected = hashlib.sha256()
            for _ in range(SIZE // len(_block())):
                expected.update(_block())
            assert count == SIZE and digest.hexdigest() == expected.hexdigest()

            # upload: 100 MB from a generator, with Content-Length, signed with a JWT (streamed)
            async def body() -> AsyncIterator[bytes]:
                for _ in range(SIZE // len(_block())):
                    yield _block()

            async with client.post(
                f"{base}/stream/upload", data=body(), headers={"Content-Length": str(SIZE)}
            ) as resp:
                assert resp.status == 200
                result = await resp.json()
            assert result == {"received": SIZE, "sha256": expected.hexdigest()}

        peak = rss_kib(proxy.pid, "VmHWM")
        growth = peak - baseline
        print(f"proxy RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB")
        assert growth < MAX_GROWTH_KIB, f"proxy grew {growth} KiB while streaming 2 x 100 MB"
    finally:
        proxy.stop()
