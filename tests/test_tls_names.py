"""TLS to an upstream reached by IP or through a gateway: tls_server_name, and errors that say why."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from .conftest import MakeProxy
from .helpers import base, fetch

NAME = "api.coinbase.com"
WS_NAME = "advanced-trade-ws.coinbase.com"


class NamedUpstream:
    """A TLS server on 127.0.0.1 whose certificate names only ``names`` (not the IP)."""

    def __init__(self, ca: trustme.CA, *names: str, expired: bool = False):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        when = datetime.datetime.now(datetime.UTC)
        validity: dict[str, Any] = {}
        if expired:
            validity = {
                "not_before": when - datetime.timedelta(days=30),
                "not_after": when - datetime.timedelta(days=1),
            }
        ca.issue_cert(*names, **validity).configure_cert(self.context)
        self.server_names: list[str | None] = []
        self.context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context).start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response({"host": request.host, "path": request.path})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"echo {msg.data}")
        return ws


@pytest.fixture
async def named(ca: trustme.CA) -> AsyncIterator[NamedUpstream]:
    server = NamedUpstream(ca, NAME, WS_NAME)
    await server.start()
    yield server
    await server.close()


def _config(port: int, ca_file: Any, **upstream: Any) -> dict[str, Any]:
    entry = {"url": f"https://127.0.0.1:{port}", "timeout": 5, "retries": 0, **upstream}
    if ca_file is not None:
        entry["ca_file"] = str(ca_file)
    ws_entry = {**entry, "url": f"wss://127.0.0.1:{port}"}
    if upstream.get("tls_server_name") == NAME:
        ws_entry["tls_server_name"] = WS_NAME
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstreams": {NAME: entry, WS_NAME: ws_entry},
        "routes": [
            {"prefix": "/ws", "upstream": WS_NAME},
            {"prefix": "/", "upstream": NAME},
        ],
    }


async def test_tls_server_name_verifies_the_name_while_connecting_to_an_ip(
    named: NamedUpstream, ca_file: Any, make_proxy: MakeProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(_config(named.port, ca_file, tls_server_name=NAME))
    status, data, _, _ = await fetch(client, "GET", base(proxy) + "/api/v3/brokerage/accounts")
    assert status == 200 and data == {"host": NAME, "path": "/api/v3/brokerage/accounts"}
    assert named.server_names == [NAME]  # SNI: the name, not the IP

    async with client.ws_connect(base(proxy) + "/ws") as ws:  # the WebSocket upstream too
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo hello"
    assert named.server_names == [NAME, WS_NAME]


def test_check_shows_the_tls_name(
    tmp_path: Any, ca_file: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from signing_proxy.cli import main

    from .proc import write_config

    config = write_config(tmp_path / "c.yaml", _config(8443, ca_file, tls_server_name=NAME))
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"upstream {NAME} via https://127.0.0.1:8443 (TLS name {NAME})" in out


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [
        ({}, "IP address mismatch"),  # url: is an IP; the certificate names api.coinbase.com
        ({"tls_server_name": "gateway.example.com"}, "Hostname mismatch"),
    ],
)
async def test_tls_error_says_why_and_where(
    named: NamedUpstream,
    ca_file: Any,
    make_proxy: MakeProxy,
    client: aiohttp.ClientSession,
    upstream: dict[str, Any],
    reason: str,
) -> None:
    proxy = await make_proxy(_config(named.port, ca_file, **upstream))
    status, data, _, _ = await fetch(client, "GET", base(proxy) + "/api/v3/brokerage/accounts")
    assert status == 502 and data is not None and data["error"] == "upstream_tls_error"
    assert reason in data["message"] and f"127.0.0.1:{named.port}" in data["message"]
    assert "tls_server_name" in data["message"]  # what to check
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # the WebSocket upstream too
        await client.ws_connect(base(proxy) + "/ws")
    assert refused.value.status == 502


async def test_unknown_ca_and_expired_certificate_are_named(
    ca: trustme.CA, ca_file: Any, make_proxy: MakeProxy, client: aiohttp.ClientSession
) -> None:
    trusted = NamedUpstream(ca, NAME)
    expired = NamedUpstream(ca, NAME, expired=True)
    await trusted.start()
    await expired.start()
    try:
        # No ca_file: the system store does not know the test CA.
        proxy = await make_proxy(_config(trusted.port, None, tls_server_name=NAME))
        _, data, _, _ = await fetch(client, "GET", base(proxy) + "/api/v3/x")
        assert data is not None and data["error"] == "upstream_tls_error"
        assert "unable to get local issuer certificate" in data["message"]
        proxy = await make_proxy(_config(expired.port, ca_file, tls_server_name=NAME))
        _, data, _, _ = await fetch(client, "GET", base(proxy) + "/api/v3/x")
        assert data is not None and data["error"] == "upstream_tls_error"
        assert "certificate has expired" in data["message"]
        assert f"127.0.0.1:{expired.port}" in data["message"]
    finally:
        await trusted.close()
        await expired.close()
