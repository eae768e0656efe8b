"""Process lifecycle as Kubernetes drives it: SIGTERM drain, min-drain, wait, workers, overrides."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from signing_proxy.config import env_overrides, load_config
from signing_proxy.errors import ConfigError
from signing_proxy.metric_batch import FLUSH_SECONDS

from .helpers import wait_for
from .proc import ProxyProcess, free_port, write_config
from .upstream import VerifyingUpstream


def _ports(config: dict[str, Any]) -> tuple[str, str]:
    port, admin = free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}")
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_in_flight_request_then_exits_0(
    sig: signal.Signals, config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    base, admin = _ports(config_dict)
    config_dict["drain_timeout"] = 10
    proxy = ProxyProcess(write_config(tmp_path / "c.yaml", config_dict))
    start_to_ready = await proxy.wait_ready(admin, path="/readyz")
    print(f"start to ready: {start_to_ready:.3f}s")
    async with aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(client.get(f"{base}/slow?seconds=1.5"))
        while not upstream.received:  # the request is in flight at the upstream
            await asyncio.sleep(0.02)
        proxy.proc.send_signal(sig)
        await asyncio.sleep(0.2)
        assert await _status(client, f"{admin}/readyz") == 503  # not ready at once
        resp = await slow
        assert resp.status == 200 and (await resp.json())["path"] == "/slow"  # completed
    for _ in range(100):
        if proxy.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proxy.proc.returncode == 0  # exited by itself
    assert "stopping: draining in-flight requests" in proxy.output()


async def test_min_drain_keeps_accepting_while_not_ready(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    base, admin = _ports(config_dict)
    proxy = ProxyProcess(write_config(tmp_path / "c.yaml", config_dict), "--min-drain", "1.5")
    await proxy.wait_ready(admin, path="/readyz")
    stopped = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as client:
        assert await _status(client, f"{admin}/readyz") == 503
        async with (
            aiohttp.ClientSession() as fresh
        ):  # a new connection, as a lagging endpoint would make
            assert await _status(fresh, f"{base}/api/v3/brokerage/accounts") == 200
    while proxy.proc.poll() is None and time.monotonic() - stopped < 10:
        await asyncio.sleep(0.05)
    assert proxy.proc.returncode == 0
    assert time.monotonic() - stopped >= 1.5


async def test_drain_timeout_bounds_shutdown(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    base, admin = _ports(config_dict)
    config_dict["drain_timeout"] = 0.5
    config_dict["upstreams"]["api.coinbase.com"]["timeout"] = 30
    proxy = ProxyProcess(write_config(tmp_path / "c.yaml", config_dict))
    await proxy.wait_ready(admin, path="/readyz")
    async with aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(client.get(f"{base}/slow?seconds=20"))
        while not upstream.received:
            await asyncio.sleep(0.02)
        stopped = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientError):
            await slow
    while proxy.proc.poll() is None and time.monotonic() - stopped < 10:
        await asyncio.sleep(0.05)
    assert proxy.proc.returncode == 0 and time.monotonic() - stopped < 5


async def _run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signing_proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_wait_command(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    _, admin = _ports(config_dict)
    config_dict["credentials"]["trading"]["key_file"] = str(tmp_path / "later.json")
    config = write_config(tmp_path / "c.yaml", config_dict)
    code, _, err = await _run_cli("wait", "--admin", admin, "--timeout", "0.5")
    assert code == 1 and "no answer" in err
    proxy = ProxyProcess(config)
    try:
        await proxy.wait_ready(admin)  # alive, but the key is missing
        code, _, err = await _run_cli("wait", "-c", str(config), "--timeout", "0.5")
        assert code == 1 and "later.json does not exist" in err
    finally:
        proxy.stop()
    config_dict["credentials"]["trading"]["key_file"] = config_dict["credentials"]["ed"]["key_file"]
    proxy = ProxyProcess(write_config(config, config_dict))
    try:
        code, out, _ = await _run_cli("wait", "-c", str(config), "--timeout", "15")
        assert code == 0 and "ready" in out
    finally:
        proxy.stop()


def _metric(text: str, name: str) -> float:
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


async def test_workers_share_the_port_and_aggregate_metrics(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    base, admin = _ports(config_dict)
    proxy = ProxyProcess(write_config(tmp_path / "c.yaml", config_dict), "--workers", "2")
    try:
        await proxy.wait_ready(admin, path="/readyz")
        pids: set[int] = set()
        deadline = time.monotonic() + 20  # the second worker may still be starting
        while len(pids) < 2 and time.monotonic() < deadline:
            # a new connection each time, so the kernel spreads them over the workers
            async with aiohttp.ClientSession() as client, client.get(f"{admin}/healthz") as resp:
                pids.add((await resp.json())["pid"])
        assert len(pids) == 2 and proxy.pid not in pids  # two workers, not the supervisor
        for _ in range(40):
            async with aiohttp.ClientSession() as client:
                assert await _status(client, f"{base}/api/v3/brokerage/accounts") == 200
        texts: list[str] = []

        async def scrape() -> bool:
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"{admin}/metrics", headers={"Accept-Encoding": "identity"}) as resp,
            ):
                texts.append(await resp.text())
            return _metric(texts[-1], "signing_proxy_requests_total") >= 40

        # The scraped worker's counts are current; the other's reach the shared files within
        # metric_batch.FLUSH_SECONDS.
        await wait_for(scrape, within=2 * FLUSH_SECONDS + 1, what="40 requests counted")
        text = texts[-1]
        assert _metric(text, "signing_proxy_requests_total") == 40  # both workers' counts, summed
        assert _metric(text, "signing_proxy_tokens_minted_total") == 40
        assert _metric(text, "signing_proxy_in_flight_requests") == 0

        # Access lines are buffered up to 0.1 s (logs.AccessLog): a SIGKILL would lose those.
        await wait_for(
            lambda: proxy.output().count('"logger": "signing_proxy.access"') >= 40,
            what="the 40 access lines written",
        )
        victim = next(iter(pids))  # a worker that dies is replaced
        os.kill(victim, signal.SIGKILL)
        # Until the replacement listens: stopping it half-started would make the exit code 1.
        await wait_for(
            lambda: proxy.output().count('"msg": "listening"') == 3, within=20, what="restart"
        )
        async with aiohttp.ClientSession() as client:
            for _ in range(10):
                assert await _status(client, f"{base}/api/v3/brokerage/accounts") == 200
        assert "worker exited unexpectedly; restarting it" in proxy.output()
    finally:
        assert proxy.stop(timeout=30) == 0
    # Every line a worker writes says which worker it is (access log and other lines alike).
    lines = [json.loads(line) for line in proxy.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "signing_proxy.access"]
    assert len(access) >= 10 and {line["pid"] for line in access} >= pids
    assert all(line["worker"] in (0, 1) for line in access)
    listening = [line for line in lines if line["msg"] == "listening"]
    assert {line["worker"] for line in listening} == {0, 1}
    children = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert children == []


def test_overrides_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml", {"listen": "127.0.0.1:1111", "upstreams": {"api.coinbase.com": {}}}
    )
    env = env_overrides(
        {
            "SIGNING_PROXY_LISTEN": "127.0.0.1:2222",
            "SIGNING_PROXY_WORKERS": "3",
            "SIGNING_PROXY_MIN_DRAIN": "2.5",
        }
    )
    config = load_config(path, env)
    assert (
        str(config.listen) == "127.0.0.1:2222" and config.workers == 3 and config.min_drain == 2.5
    )
    config = load_config(path, {**env, "listen": ("127.0.0.1:3333", "--listen")})
    assert str(config.listen) == "127.0.0.1:3333"
    with pytest.raises(
        ConfigError,
        match=r"listen \(set by env var SIGNING_PROXY_LISTEN\): 0\.0\.0\.0:1 is not a loopback",
    ):
        load_config(path, env_overrides({"SIGNING_PROXY_LISTEN": "0.0.0.0:1"}))


async def test_serve_flags_and_env_reach_the_process(
    config_dict: dict[str, Any], upstream: VerifyingUpstream, tmp_path: Path
) -> None:
    base, admin = _ports(config_dict)
    config = write_config(tmp_path / "c.yaml", config_dict)
    other = free_port()
    proxy = ProxyProcess(
        config, "--listen", f"127.0.0.1:{other}", env={"SIGNING_PROXY_LOG_FORMAT": "text"}
    )
    try:
        await proxy.wait_ready(admin, path="/readyz")
        async with aiohttp.ClientSession() as client:
            assert await _status(client, f"http://127.0.0.1:{other}/api/v3/x") == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await _status(client, f"{base}/api/v3/x")
    finally:
        proxy.stop()
    log = proxy.output()
    assert " INFO    signing_proxy.access: request " in log  # text format, from the env var
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"  # uvloop when installed
    assert f"event_loop={loop}" in log
