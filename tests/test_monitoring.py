"""deploy/monitoring against a real Prometheus: the alert rules (promtool check + unit tests for
every alert) and the Grafana dashboard (every panel's query returns data from a scraped proxy).

Needs Debian's `prometheus` package (`prometheus` and `promtool`); `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from signing_proxy.app import ProxyServer

from .conftest import MakeProxy
from .drb_upstream import DrbUpstream
from .faults import closed_port
from .helpers import base, metric, raw_exchange, wait_for
from .proc import free_port
from .upstream import VerifyingUpstream

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Panels on metrics another change adds; they are shown on the dashboard already. Remove a
# name here once the proxy emits it.
NOT_YET_EMITTED: frozenset[str] = frozenset()
RATE_WINDOW = "1m"  # what Grafana's $__rate_interval becomes here (scrapes every 0.5 s)
WS_HOST = "advanced-trade-ws-user.coinbase.com"
DEAD_HOST = "dead.example.com"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (.ci/run does)"
    return path


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_alert_rules_pass_promtool_and_every_alert_has_a_unit_test(tmp_path: Path) -> None:
    rule = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert rule["kind"] == "PrometheusRule"
    # The PrometheusRule's spec is a Prometheus rules file: promtool checks that file.
    (tmp_path / "signing-proxy.rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yaml")
    promtool = _tool("promtool")
    for args in (
        ["check", "rules", "signing-proxy.rules.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    alerts = {
        r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r
    }
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert firing == alerts  # each alert is shown firing at least once
    assert len(alerts) >= 6


def test_dashboard_panels_use_the_datasource_variable_and_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            names.update(
                word.removesuffix("_bucket")
                for word in _words(target["expr"])
                if word.startswith("signing_proxy_")
            )
    exposed = {family.name for family in _exposed()}
    assert names - exposed == NOT_YET_EMITTED, names - exposed


def _words(expr: str) -> list[str]:
    return "".join(c if c.isalnum() or c == "_" else " " for c in expr).split()


def _exposed() -> list[Any]:
    from prometheus_client import CollectorRegistry

    from signing_proxy.metrics import ProxyMetrics

    registry = CollectorRegistry()
    ProxyMetrics(registry)
    families = list(registry.collect())
    for family in families:  # counters are exposed with _total
        if family.type == "counter":
            family.name += "_total"
    return families


class Prometheus:
    """A real Prometheus on loopback, in a temp dir, scraping one admin listener every 0.5 s."""

    def __init__(self, tmp_path: Path, target: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
            "scrape_configs": [{"job_name": "signing-proxy", "static_configs": [{"targets": [target]}]}],
        }  # fmt: skip
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp_path / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        async with session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
        try:
            async with session.get(f"{self.url}/-/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def _until(check: Any, *, within: float, what: str) -> None:
    """Await ``check()`` (a coroutine function returning bool) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"{what} not within {within}s"
        await asyncio.sleep(0.1)


@pytest.fixture
async def monitored(
    make_proxy: MakeProxy, config_dict: dict[str, Any], upstream: VerifyingUpstream,
    ca_file: Path, ec_key_file: Path, tmp_path: Path, drb: DrbUpstream,
) -> tuple[ProxyServer, Path]:  # fmt: skip
    """A proxy with everything the dashboard shows configured: a rate limit, a policy, a
    WebSocket route, an upstream that refuses connections (retries), a key file that will break."""
    key = tmp_path / "rotating.json"
    shutil.copy(ec_key_file, key)
    config_dict["credentials"]["trading"]["key_file"] = str(key)
    config_dict["credentials"]["ed"]["rate_limit"] = {"rate": 0.001, "burst": 1}
    config_dict["credentials"]["legacy"]["policy"] = {"deny": ["DELETE /**"]}
    wss = upstream.url.replace("https://", "wss://")
    config_dict["upstreams"][WS_HOST] = {
        "url": wss,
        "ca_file": str(ca_file),
        "credential": "trading",
    }
    config_dict["upstreams"][DEAD_HOST] = {
        "url": f"https://127.0.0.1:{closed_port()}",
        "retries": 1,
    }
    config_dict["upstreams"]["drb.coinbase.com"] = {
        "url": drb.url,
        "ca_file": str(ca_file),
        "credential": "trading",
        "auth": "token_exchange",
    }
    config_dict["routes"] = [
        {"prefix": "/drb", "upstream": "drb.coinbase.com", "strip_prefix": True},
        {"prefix": "/ws/user", "upstream": WS_HOST, "strip_prefix": True},
        {"prefix": "/dead", "upstream": DEAD_HOST, "strip_prefix": True},
        *config_dict["routes"],
    ]
    return await make_proxy(config_dict), key


async def _traffic(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    """One round of every kind of traffic the dashboard has a panel for."""
    url = base(proxy)
    for path in ("/api/v3/brokerage/accounts", "/ed/api/v3/x", "/v2/user", "/status/500"):
        async with client.get(url + path) as resp:
            await resp.read()
    for path in ("/status/401", "/hmac/status/401"):  # 401s from the upstream
        async with client.get(url + path) as resp:
            assert resp.status == 401
    async with client.get(url + "/ed/api/v3/y") as resp:  # the bucket is empty by now
        assert resp.status == 429
    async with client.delete(url + "/v2/accounts/1") as resp:
        assert resp.status == 403
    async with client.get(url + "/dead/x") as resp:  # refused twice: one retry, then 502
        assert resp.status == 502
    await raw_exchange(proxy.port(0), b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n")
    call = b'{"jsonrpc":"2.0","id":1,"method":"private/get_positions","params":{}}'
    async with client.post(url + "/drb/api/v2/private/get_positions", data=call) as resp:
        assert resp.status == 200  # the derivatives gateway: a token exchange
    async with client.ws_connect(f"ws://127.0.0.1:{proxy.port(0)}/ws/user") as ws:
        await ws.send_str(json.dumps({"type": "subscribe", "channel": "user"}))
        await ws.receive_str()


async def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    monitored: tuple[ProxyServer, Path], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, key = monitored
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{proxy.port(1)}")  # starts while traffic runs
    try:
        await _traffic(proxy, client)
        key.write_text("{not json")  # a changed key file that does not load: a reload error
        await wait_for(
            lambda: (
                metric(proxy, "signing_proxy_credential_reload_errors_total", credential="trading")
                > 0
            ),
            within=10,
            what="reload error",
        )
        async with aiohttp.ClientSession() as session:
            await _until(lambda: prometheus.ready(session), within=30, what="prometheus ready")

            async def scraped(count: float) -> bool:
                found = await prometheus.query(session, "sum(signing_proxy_requests_total)")
                return bool(found) and float(found[0]["value"][1]) == count

            def requests() -> float:
                return sum(
                    s.value
                    for m in proxy.metrics.registry.collect()
                    if m.name == "signing_proxy_requests"
                    for s in m.samples
                    if s.name == "signing_proxy_requests_total"
                )

            await _until(lambda: scraped(requests()), within=30, what="first scrape")
            await _traffic(proxy, client)  # again: every counter moves between two scrapes
            await _until(lambda: scraped(requests()), within=30, what="second scrape")

            empty = []
            for title, expr in _queries():
                if any(name in expr for name in NOT_YET_EMITTED):
                    continue
                result = await prometheus.query(
                    session, expr.replace("$__rate_interval", RATE_WINDOW)
                )
                values = [float(sample["value"][1]) for sample in result]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{title}: {expr} -> {values}")
            assert not empty, "\n".join(empty)
            up = await prometheus.query(session, 'up{job=~"(.+/)?signing-proxy"}')
            assert [float(s["value"][1]) for s in up] == [1.0]  # what SigningProxyDown watches
    finally:
        prometheus.stop()
