"""The two listeners and their lifecycle.

- proxy listener (``listen``): every request goes to ProxyHandler through one middleware, so
  CONNECT and absolute-form targets reach it too (aiohttp's router only knows origin-form paths);
- admin listener (``admin_listen``): /healthz, /readyz, /metrics.

``ProxyServer`` starts both and stops them gracefully: readiness turns 503 at once, the listener
stops accepting, in-flight requests get up to ``drain_timeout`` to finish, then everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .config import Config
from .credentials import Credential, CredentialStore, CredentialWatcher, read_secret
from .errors import JSON_CONTENT_TYPE, CredentialError
from .guard import reap_orphans
from .metrics import ProxyMetrics
from .proxy import ProxyHandler
from .relay import Relay, UpstreamEndpoint, create_session
from .routing import Router
from .signers import Clock

__all__ = ["ProxyServer", "ProxyState", "run"]

log = logging.getLogger(__name__)


@dataclass
class ProxyState:
    config: Config
    credentials: CredentialStore
    metrics: ProxyMetrics
    router: Router
    draining: bool = False
    handler: ProxyHandler | None = None
    endpoints: dict[str, UpstreamEndpoint] = field(default_factory=dict)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        missing = self.credentials.missing()
        ready = not missing and not self.draining and self.handler is not None
        return ready, {"ready": ready, "draining": self.draining, "missing": missing}


STATE = web.AppKey("state", ProxyState)


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type=JSON_CONTENT_TYPE)


async def _relay_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    session = create_session()
    config = state.config
    relay = Relay(session, state.endpoints, config.max_body_bytes, config.max_stream_body_bytes)
    token = read_secret(config.inbound_token) if config.inbound_token else None
    state.handler = ProxyHandler(
        state.router, state.credentials, relay, state.metrics, token,
        max_header_bytes=config.max_header_bytes,
    )  # fmt: skip
    try:
        yield
    finally:
        state.handler = None
        await session.close()


def _on_reload(state: ProxyState, cred: Credential, error: CredentialError | None) -> None:
    metrics = state.metrics
    metrics.credential_loaded.labels(cred.name).set(1 if cred.signer else 0)
    if error is None and cred.info is not None:
        metrics.credential_last_reload.labels(cred.name).set(time.time())
        info = cred.info
        log.info(
            "credential reloaded: its key file changed",
            extra={"fields": {"credential": info.name, "scheme": info.scheme,
                              "key_id": info.key_id, "fingerprint": info.fingerprint}},
        )  # fmt: skip
    elif error is not None:
        metrics.credential_reload_errors.labels(cred.name).inc()
        keeping = "keeping the last good key" if cred.signer else "the credential stays unloaded"
        log.error(
            f"credential file changed but could not be loaded; {keeping}",
            extra={"fields": {"credential": cred.name, "problem": error.message}},
        )


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Key rotation without restart: poll the key files, reload what changed."""
    state = app[STATE]
    watcher = CredentialWatcher(state.credentials, lambda c, e: _on_reload(state, c, e))
    task = asyncio.create_task(watcher.run(), name="credential-watcher")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_proxy_app(state: ProxyState) -> web.Application:
    @web.middleware
    async def entry(request: web.Request, handler: Handler) -> web.StreamResponse:
        del handler  # every request is the proxy's, whatever aiohttp's router thought of it
        proxy = state.handler
        assert proxy is not None  # set in cleanup_ctx before the listener starts
        return await proxy(request)

    app = web.Application(middlewares=[entry], client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    app.cleanup_ctx.append(_relay_ctx)
    app.cleanup_ctx.append(_watch_ctx)
    return app


def build_admin_app(state: ProxyState) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, body = state.readiness()
        return _json(body, 200 if ready else 503)

    app = web.Application()
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(state.metrics.registry))
    return app


class ProxyServer:
    """Both listeners of one process. ``start()`` binds; ``stop()`` drains and closes."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ):
        self.config = config
        credentials = CredentialStore(config.credentials, clock=clock)
        metrics = ProxyMetrics(registry or CollectorRegistry())
        self.state = ProxyState(config, credentials, metrics, Router(config))
        self._runners: list[web.AppRunner] = []
        self._guards: list[asyncio.Task[None]] = []

    @property
    def metrics(self) -> ProxyMetrics:
        return self.state.metrics

    def load_credentials(self) -> list[str]:
        problems = self.state.credentials.load_all()
        for cred in self.state.credentials:
            self.metrics.credential_loaded.labels(cred.name).set(1 if cred.signer else 0)
            self.metrics.credential_reload_errors.labels(cred.name)  # exported from 0
            if cred.info is not None:
                self.metrics.credential_last_reload.labels(cred.name).set(time.time())
                info = cred.info
                log.info(
                    "credential loaded",
                    extra={"fields": {"credential": info.name, "scheme": info.scheme,
                                      "key_id": info.key_id, "fingerprint": info.fingerprint}},
                )  # fmt: skip
        for problem in problems:
            log.warning(
                "credential not loaded; requests that need it answer 503 until it is fixed",
                extra={"fields": {"problem": problem}},
            )
        return problems

    async def start(self) -> None:
        self.load_credentials()
        self.state.endpoints.update(
            {name: UpstreamEndpoint.build(cfg) for name, cfg in self.config.upstreams.items()}
        )
        for app, address in (
            (build_proxy_app(self.state), self.config.listen),
            (build_admin_app(self.state), self.config.admin_listen),
        ):
            runner = web.AppRunner(
                app,
                access_log=None,  # ProxyHandler writes the access log
                handle_signals=False,
                shutdown_timeout=self.config.drain_timeout,
                # A client that leaves cancels its request, and so the upstream request.
                handler_cancellation=True,
                # aiohttp has no separate header timeout: this bounds both the wait for a complete
                # request head (slowloris) and idle keep-alive connections.
                keepalive_timeout=self.config.header_timeout,
            )
            await runner.setup()
            self._runners.append(runner)
            self._guards.append(asyncio.create_task(reap_orphans(runner)))
            await web.TCPSite(runner, address.host, address.port).start()
        log.info(
            "listening",
            extra={
                "fields": {"proxy": str(self.config.listen), "admin": str(self.config.admin_listen)}
            },
        )

    def port(self, index: int = 0) -> int:
        """The bound port of listener ``index`` (0: proxy, 1: admin); useful with port 0."""
        address = self._runners[index].addresses[0]
        return int(address[1])

    async def stop(self) -> None:
        """Not ready at once; stop accepting; let in-flight requests finish within drain_timeout."""
        self.state.draining = True
        for guard in self._guards:
            guard.cancel()
        self._guards.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()


async def run(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    server = ProxyServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await stop.wait()
        log.info(
            "stopping: draining in-flight requests",
            extra={"fields": {"drain_timeout": config.drain_timeout}},
        )
    finally:
        await server.stop()
    log.info("stopped")
