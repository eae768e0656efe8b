"""The derivatives gateway's WebSocket through the proxy: authenticated in-band, kept so.

The same upstream entry serves REST and WebSocket (``websocket: true``); DrbUpstream answers
``public/auth`` over the socket only for a JWT its public key verifies, and private calls only
while the socket's authentication lasts.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from signing_proxy.config_credentials import CredentialConfig
from signing_proxy.credentials import CredentialStore
from signing_proxy.drb_websocket import RESERVED_ID_BASE, SocketAuth
from signing_proxy.errors import UpstreamError
from signing_proxy.metrics import ProxyMetrics

from .conftest import MakeProxy, ec_pem
from .drb_upstream import DRB, DrbUpstream, drb_config
from .helpers import base, fetch, metric, wait_for

WS_PATH = "/drb/ws/api/v2"


def rpc(call_id: Any, method: str, **params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": call_id, "method": method, "params": params})


async def ask(ws: aiohttp.ClientWebSocketResponse, text: str) -> dict[str, Any]:
    await ws.send_str(text)
    async with asyncio.timeout(5):
        answer = await ws.receive_str()
    assert "access_token" not in answer and "drbtok" not in answer
    data: dict[str, Any] = json.loads(answer)
    return data


async def test_socket_stays_authenticated_across_refreshes(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    drb.lifetime = 2.0
    proxy = await make_proxy(drb_config(drb, ca_file, ec_key_file))
    async with client.ws_connect(base(proxy) + WS_PATH) as ws:
        # The very first message is already a private call: the proxy authenticated first.
        first = await ask(ws, rpc(1, "private/get_positions", currency="BTC"))
        assert first["id"] == 1 and first["result"]["auths"] == 1
        (session,) = drb.sockets
        call_id = 1
        while session.auths < 4:  # three re-authentications, calls going on all the time
            call_id += 1
            answer = await ask(ws, rpc(call_id, "private/get_positions"))
            assert answer["id"] == call_id and "result" in answer, answer
            await asyncio.sleep(0.1)
        # Public calls pass as they are.
        answer = await ask(ws, rpc("p", "public/get_time"))
        assert answer == {
            "jsonrpc": "2.0",
            "id": "p",
            "result": {"method": "public/get_time", "public": True},
        }
    await wait_for(session.closed.is_set)
    proxy_ids = [
        a["id"] for a in session.sent if isinstance(a["id"], int) and a["id"] >= RESERVED_ID_BASE
    ]
    assert len(proxy_ids) == session.auths == 4  # each auth answered once, and consumed
    assert not drb.rejections
    assert metric(
        proxy, "signing_proxy_token_exchanges_total",
        credential="trading", transport="websocket", outcome="ok",
    ) == 4  # fmt: skip


async def test_client_auth_and_reserved_ids_are_refused(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await make_proxy(drb_config(drb, ca_file, ec_key_file))
    async with client.ws_connect(base(proxy) + WS_PATH) as ws:
        refused = await ask(
            ws, rpc(5, "public/auth", grant_type="client_credentials", client_id="x")
        )
        assert refused["id"] == 5 and refused["error"]["code"] == -32600
        assert "authenticates this connection itself" in refused["error"]["message"]
        refused = await ask(ws, rpc(RESERVED_ID_BASE + 1, "private/get_positions"))
        assert "reserved by the signing proxy" in refused["error"]["message"]
        # Other spellings of the same call: a JSON escape, a key given twice, a batch, not JSON.
        for sneaky in (
            '{"jsonrpc":"2.0","id":8,"method":"public\\/auth","params":{}}',
            '{"jsonrpc":"2.0","id":9,"method":"public/auth","method":"public/test"}',
            "[" + rpc(10, "public/auth") + "]",
            "{'id': 11, 'method': 'public/auth'}",
        ):
            refused = await ask(ws, sneaky)
            assert refused["error"]["code"] in (-32600, -32700), sneaky
        # Should the gateway ever echo the socket's token, the client still does not see it.
        leaked = await ask(ws, rpc(12, "private/leak"))
        assert leaked["result"] == {"echo": "your token is <redacted>"}
        answer = await ask(ws, rpc(6, "private/get_positions"))
        assert "result" in answer
    (session,) = drb.sockets
    await wait_for(session.closed.is_set)
    # Only the proxy's own auth and the one allowed call reached the gateway.
    assert [a["id"] for a in session.sent] == [RESERVED_ID_BASE, 12, 6]


async def test_rest_and_websocket_share_one_upstream_entry(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, ec_key_file: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    proxy = await make_proxy(drb_config(drb, ca_file, ec_key_file))
    status, data, _, _ = await fetch(
        client, "POST", base(proxy) + "/drb/api/v2/private/get_positions",
        data=rpc(1, "private/get_positions"),
    )  # fmt: skip
    assert status == 200 and data is not None and "result" in data
    async with client.ws_connect(base(proxy) + WS_PATH) as ws:
        assert "result" in await ask(ws, rpc(2, "private/get_positions"))


async def test_failed_socket_auth_refuses_the_upgrade(
    make_proxy: MakeProxy, drb: DrbUpstream, ca_file: Path, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    stranger = tmp_path / "stranger.json"
    key = ec_pem(ec.generate_private_key(ec.SECP256R1()))
    stranger.write_text(json.dumps({"name": "organizations/x/apiKeys/unknown", "privateKey": key}))
    proxy = await make_proxy(drb_config(drb, ca_file, stranger))
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(base(proxy) + WS_PATH)
    assert caught.value.status == 502
    status, data, _, _ = await fetch(client, "GET", base(proxy) + WS_PATH, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    })  # fmt: skip
    assert status == 502 and data is not None and data["error"] == "token_exchange_failed"
    assert "public/auth failed (JSON-RPC error 13004 (invalid_credentials))" in data["message"]
    assert metric(
        proxy, "signing_proxy_token_exchanges_total",
        credential="trading", transport="websocket", outcome="rejected",
    ) == 2  # fmt: skip


class _TlsFailsOnSend:
    """The gateway's real socket, whose TLS layer fails as the proxy writes public/auth.

    aiohttp 3.14 wraps most transport failures in ConnectionError/ClientError, but an OSError
    such as ssl.SSLError can still come out of a send unwrapped (another aiohttp, another event
    loop); SocketAuth.open used to let one escape the upgrade unreported.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws

    async def send_str(self, data: str) -> None:
        raise ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")

    async def receive(self) -> aiohttp.WSMessage:
        return await self.ws.receive()


async def test_a_socket_failing_during_auth_is_reported(
    drb: DrbUpstream, ca_file: Path, ec_key_file: Path
) -> None:
    store = CredentialStore({"trading": CredentialConfig("trading", "cdp", key_file=ec_key_file)})
    assert store.load_all() == []
    registry = CollectorRegistry()
    auth = SocketAuth(store, "trading", ProxyMetrics(registry), timeout=5)
    context = ssl.create_default_context(cafile=ca_file)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(drb.url + "/ws/api/v2", ssl=context) as ws,
    ):
        with pytest.raises(UpstreamError) as caught:
            await auth.open(_TlsFailsOnSend(ws), DRB)  # type: ignore[arg-type]
    assert caught.value.code == "token_exchange_failed"
    assert caught.value.message == (
        f"{DRB} did not authenticate the WebSocket for credential 'trading': "
        "public/auth failed (the connection failed (SSLError))"
    )
    outcome = {"credential": "trading", "transport": "websocket", "outcome": "unreachable"}
    assert registry.get_sample_value("signing_proxy_token_exchanges_total", outcome) == 1
