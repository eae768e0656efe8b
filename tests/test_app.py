"""ProxyServer's lifecycle in one process: a start that fails half-way releases every part it had
acquired, and stop() drains in order (readiness 503 while in-flight requests finish, then the
listeners close)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from signing_proxy import aiohttp_client, app
from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config
from signing_proxy.errors import ConfigError
from signing_proxy.malformed import SERVER_LOGGER, MalformedRequestFilter

from .conftest import MakeProxy
from .drb_upstream import DrbUpstream, drb_config
from .helpers import admin, base, fetch, wait_for
from .proc import free_port
from .upstream import VerifyingUpstream


def _listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True


def _own_tasks() -> list[str]:
    """The running tasks whose coroutine is the proxy's (not the test upstreams')."""
    package = str(Path(app.__file__).parent)
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "cr_code", None) is not None
        and task.get_coro().cr_code.co_filename.startswith(package)  # type: ignore[union-attr]
    ]


@pytest.mark.parametrize("busy", ["listen", "admin_listen"])
async def test_a_start_that_fails_half_way_releases_what_it_acquired(
    busy: str,
    drb: DrbUpstream,
    ca_file: Path,
    ec_key_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions: list[aiohttp.ClientSession] = []
    create_session = aiohttp_client.create_session

    def recorded() -> aiohttp.ClientSession:
        sessions.append(session := create_session())
        return session

    monkeypatch.setattr(aiohttp_client, "create_session", recorded)
    raw: dict[str, Any] = drb_config(drb, ca_file, ec_key_file)  # token brokers start too
    ports = {"listen": free_port(), "admin_listen": free_port()}
    raw.update({field: f"127.0.0.1:{port}" for field, port in ports.items()})
    server = ProxyServer(parse_config(raw, tmp_path / "c.yaml"), registry=CollectorRegistry())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[busy]))
        taken.listen()
        with pytest.raises(ConfigError, match=f"{busy}: cannot listen on 127.0.0.1:{ports[busy]}"):
            await server.start()
    # Nothing left listening, running, filtering or open.
    assert not _listening(ports["listen"]) and not _listening(ports["admin_listen"])
    assert _own_tasks() == []  # the key watcher, the orphan reaper, the token brokers
    filters = logging.getLogger(SERVER_LOGGER).filters
    assert not any(isinstance(f, MalformedRequestFilter) for f in filters)
    assert len(sessions) == 1 and sessions[0].closed
    assert server.state.handler is None and server.http is None
    await server.stop()  # what run() does after a failed start: nothing left to do


async def test_stop_answers_503_while_in_flight_requests_finish_then_closes_both_listeners(
    make_proxy: MakeProxy, config_dict: dict[str, Any], upstream: VerifyingUpstream
) -> None:
    proxy = await make_proxy(config_dict)
    ports = proxy.port(0), proxy.port(1)
    async with aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(fetch(client, "GET", f"{base(proxy)}/slow?seconds=1"))
        await wait_for(lambda: upstream.received, what="the request at the upstream")
        admin_url = admin(proxy)
        stopping = asyncio.ensure_future(proxy.stop())
        await wait_for(lambda: proxy.state.draining, what="draining")
        # The admin listener outlives the proxy listener's drain: readiness says 503 meanwhile.
        async with aiohttp.ClientSession() as fresh:
            status, data, _, _ = await fetch(fresh, "GET", f"{admin_url}/readyz")
        assert status == 503 and data is not None and data["draining"] is True
        assert not stopping.done()
        status, data, _, _ = await slow
        assert status == 200 and data is not None and data["path"] == "/slow"  # completed
        await stopping
    assert not _listening(ports[0]) and not _listening(ports[1])
    assert proxy.state.handler is None


def test_a_proxy_that_relays_rest_only_never_loads_aiohttp(
    ca_file: Path, ec_key_file: Path, tmp_path: Path
) -> None:
    # aiohttp (its client and server) is ~11 MiB of idle RSS and ~0.2 s of start-up: only
    # WebSockets, token exchange and Onramp calls load it (outbound_session.py).
    script = f"""
import asyncio, sys
from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config
raw = {{
    "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
    "credentials": {{"c": {{"key_file": {str(ec_key_file)!r}}}}},
    "upstreams": {{"api.coinbase.com": {{
        "credential": "c", "ca_file": {str(ca_file)!r}, "url": "https://127.0.0.1:{free_port()}",
    }}}},
    "routes": [{{"prefix": "/", "upstream": "api.coinbase.com"}}],
}}
async def main():
    server = ProxyServer(parse_config(raw))
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port(1))
    writer.write(b"GET /metrics HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    # A signed request walks the whole REST path; nothing listens upstream: a 502.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port(0))
    writer.write(b"GET /api/v3/x HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 502"), answer[:80]
    await server.stop()
asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] == "aiohttp"))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
