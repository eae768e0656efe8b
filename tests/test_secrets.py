"""No secret ever leaves: every error path driven with DEBUG logging on, through the production
log formatters, checking logs, error bodies and the metrics exposition for key material and
tokens. And metrics stay bounded whatever paths clients send."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_proxy.app import ProxyServer
from signing_proxy.logs import JsonFormatter, TextFormatter
from signing_proxy.routing import MAX_ROUTE_LABELS

from .conftest import HMAC_SECRET, MakeProxy, ec_pem
from .faults import FaultServer, closed_port
from .helpers import admin, base, fetch, metric, raw_exchange, wait_for
from .upstream import VerifyingUpstream

INBOUND_TOKEN = "inbound-Tok3n-that-must-never-be-logged"
IDENTITY = {"Accept-Encoding": "identity"}


@pytest.fixture
def production_logs() -> Iterator[list[io.StringIO]]:
    """Everything logged at DEBUG, formatted as in production (JSON and text)."""
    streams = [io.StringIO(), io.StringIO()]
    handlers = []
    for stream, formatter in zip(streams, (JsonFormatter(), TextFormatter()), strict=True):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield streams
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(old_level)


def _pem_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


async def test_no_secret_in_logs_error_bodies_or_metrics_on_any_path(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, ca: Any, tmp_path: Path, ec_key_file: Path,
    ed_key_file: Path, monkeypatch: pytest.MonkeyPatch, production_logs: list[io.StringIO],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SP_TOKEN", INBOUND_TOKEN)
    rotating = tmp_path / "rotating.json"
    rotating.write_text(ec_key_file.read_text())
    resetting = await FaultServer(default="reset").start()
    garbage = await FaultServer(default="tls-garbage", ca=ca).start()
    config_dict.update(
        inbound_auth={"token_env": "SP_TOKEN"}, max_body_bytes=2000, max_stream_body_bytes=4000
    )
    creds = config_dict["credentials"]
    creds["trading"].update(
        key_file=str(rotating),
        policy={"deny": ["POST /api/v3/brokerage/orders"]},
        rate_limit={"rate": 1000, "burst": 1000},
    )
    creds["ed"]["rate_limit"] = {"rate": 0.01, "burst": 1}
    creds["missing"] = {"key_file": str(tmp_path / "absent.json")}
    ups = config_dict["upstreams"]
    for up in ups.values():
        up["timeout"] = 1
    ups["refused.example"] = {
        **ups["api.coinbase.com"],
        "url": f"https://127.0.0.1:{closed_port()}",
    }
    ups["resetting.example"] = {**ups["api.coinbase.com"], "url": resetting.url}
    ups["garbage.example"] = {**ups["api.coinbase.com"], "url": garbage.url}
    ups["needs-missing.example"] = {**ups["public.example.com"], "credential": "missing"}
    proxy = await make_proxy(config_dict)
    auth = {"X-Signing-Proxy-Token": INBOUND_TOKEN}
    p = base(proxy)

    bodies: list[bytes] = []

    async def call(method: str, url: str, **kwargs: Any) -> int:
        headers = {**auth, **kwargs.pop("headers", {})}
        status, _, _, raw = await fetch(client, method, url, headers=headers, **kwargs)
        if status >= 400:  # error bodies (the test upstream echoes request headers on success)
            bodies.append(raw)
        return status

    # successes of every scheme, so there are tokens and signatures to look for
    assert await call("GET", f"{p}/api/v3/brokerage/accounts") == 200
    assert await call("POST", f"{p}/v2/accounts?x=1", data=b"{}") == 200
    assert await call("GET", f"{p}/onramp/v1/token") == 200
    # the proxy's own refusals
    assert await call("GET", f"{p}/api/v3/x", headers={"X-Signing-Proxy-Token": "wrong"}) == 407
    assert await call("GET", "http://169.254.169.254/", proxy=p) == 403
    assert await call("POST", f"{p}/api/v3/brokerage/orders", data=b"{}") == 403
    assert await call("GET", f"{p}/onramp/v1/b") == 429  # its one-token burst went above
    assert await call("GET", "http://needs-missing.example/x", proxy=p) == 503
    assert await call("POST", f"{p}/v2/big", data=b"x" * 3000) == 413
    assert await call("POST", f"{p}/api/v3/big", data=b"x" * 5000) == 413
    # upstream failures, 401 diagnosis, a reset mid-response
    assert await call("GET", "http://refused.example/x", proxy=p) == 502
    assert await call("GET", f"{p}/slow?seconds=3") == 504
    assert await call("GET", f"{p}/status/401") == 401
    assert await call("GET", f"{p}/hmac/status/401") == 401
    assert await call("GET", "http://resetting.example/api/v3/y", proxy=p) == 502
    assert await call("GET", "http://garbage.example/api/v3/z", proxy=p) == 502
    with pytest.raises(aiohttp.ClientPayloadError):
        await call("GET", f"{p}/reset-mid")
    # bad framing, straight from aiohttp's parser and from the proxy
    token_line = f"X-Signing-Proxy-Token: {INBOUND_TOKEN}\r\n"
    for request in [
        f"GET /api/v3/x HTTP/1.1\r\n{token_line}Bad Header Line\r\n\r\n",
        f"GET /api/v3/x HTTP/1.1\r\n{token_line}Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        f"POST /api/v3/x HTTP/1.1\r\n{token_line}Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        f"CONNECT api.coinbase.com:443 HTTP/1.1\r\n{token_line}Connection: close\r\n\r\n",
    ]:
        raw = await raw_exchange(proxy.port(0), request.encode())
        assert raw.startswith(b"HTTP/1."), raw[:100]
        bodies.append(raw.partition(b"\r\n\r\n")[2])
    # a client that leaves mid-request
    task = asyncio.create_task(client.get(f"{p}/hold", headers=auth))
    await wait_for(lambda: any(r.path == "/hold" for r in upstream.received))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: upstream.client_gone == ["/hold"])
    # a rotation to a broken key file holding a real (other) key's PEM, cut short
    other = ec.generate_private_key(ec.SECP256R1())
    other_pem = ec_pem(other)
    rotating.write_text(json.dumps({"name": "n", "privateKey": other_pem[:-60]}))
    await wait_for(
        lambda: (
            metric(proxy, "signing_proxy_credential_reload_errors_total", credential="trading") == 1
        )
    )

    _, _, _, exposition = await fetch(client, "GET", f"{admin(proxy)}/metrics", headers=IDENTITY)
    await resetting.close()
    await garbage.close()

    # What must never appear anywhere
    secrets = [HMAC_SECRET, INBOUND_TOKEN]
    secrets += _pem_lines(json.loads(ec_key_file.read_text())["privateKey"])
    secrets += _pem_lines(other_pem)[:-1]  # the lines that made it into the broken file
    secrets.append(json.loads(ed_key_file.read_text())["privateKey"])
    tokens = [r.token for r in upstream.received if r.token]
    assert len(tokens) >= 5
    secrets += tokens + [t.split(".")[2] for t in tokens]
    secrets += [r.headers["cb-access-sign"] for r in upstream.received if r.auth == "hmac"]
    logged = "\n".join(stream.getvalue() for stream in production_logs)
    assert "upstream answered 401" in logged and "credential file changed" in logged
    assert logging.getLogger("signing_proxy").isEnabledFor(logging.DEBUG)
    exposition_text = exposition.decode()
    for secret in secrets:
        assert secret not in logged, secret[:12]
        assert secret not in exposition_text, secret[:12]
        for body in bodies:
            assert secret.encode() not in body, (secret[:12], body[:200])
    # pytest's own capture saw the same records: check the raw messages and fields too
    raw_records = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for secret in secrets:
        assert secret not in raw_records, secret[:12]


# --- metrics stay bounded ------------------------------------------------------------------------


def _series(exposition: str) -> int:
    return sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))


async def test_metric_series_stay_bounded_under_thousands_of_random_paths(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    rng = random.Random(4)
    letters = string.ascii_lowercase

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))

    def target() -> tuple[str, str, dict[str, Any]]:
        kind = rng.random()
        path = "/" + "/".join(word() for _ in range(rng.randint(1, 10)))
        if kind < 0.4:  # routed to an upstream: each is a new route template shape
            method = rng.choice(["GET", "POST", "PROPFIND", "LOCK"])
            return method, f"{base(proxy)}/public{path}", {}
        if kind < 0.7:  # forward-proxy mode to random hosts: refused
            return "GET", f"http://{word()}.example{path}", {"proxy": base(proxy)}
        return "GET", f"{base(proxy)}/public{path}/..", {}  # refused path

    async def worker(n: int) -> None:
        for _ in range(n):
            method, url, kwargs = target()
            async with client.request(method, url, **kwargs) as resp:
                await resp.read()

    counts = []
    for _ in range(2):
        # 1,000 requests per round, ~400 of them routed: each a new path shape, so the first
        # round alone is twice over the route-template cap (MAX_ROUTE_LABELS = 200).
        await asyncio.gather(*(worker(50) for _ in range(20)))
        _, _, _, raw = await fetch(client, "GET", f"{admin(proxy)}/metrics", headers=IDENTITY)
        counts.append(_series(raw.decode()))
    # The second round's random paths added no series: labels are capped, not per path.
    assert counts[0] == counts[1], counts
    assert counts[1] < 6_000
    routes = set()
    for line in raw.decode().splitlines():
        if line.startswith("signing_proxy_requests_total{"):
            routes.add(line.split('route="', 1)[1].split('"', 1)[0])
    assert len(routes) <= MAX_ROUTE_LABELS + 2 and "/public/{other}" in routes
