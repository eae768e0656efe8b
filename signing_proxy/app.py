"""The two listeners and their lifecycle.

- proxy listener (``listen``): the listener's own HTTP/1.1 server (http_server.py) hands every
  request to ProxyHandler, CONNECT and absolute-form targets included; WebSocket upgrades go on
  to aiohttp (ws_handoff.py);
- admin listener (``admin_listen``): /healthz, /readyz, /metrics.

``ProxyServer`` starts both and stops them gracefully: readiness turns 503 at once; the listener
keeps accepting for ``min_drain`` seconds (for load balancers still routing here); then it stops
accepting and closes idle connections, on_shutdown hooks close WebSockets (1001), in-flight
requests get up to ``drain_timeout`` to finish, and everything is cleaned up.

With ``--workers N`` each worker process runs one ProxyServer with ``reuse_port`` (the kernel
spreads connections over them) and serves metrics aggregated over all workers from
prometheus-client's multiprocess directory (workers.py supervises them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.multiprocess import MultiProcessCollector

from .aiohttp_client import create_session
from .config import Config, ListenAddress
from .credentials import (
    Credential,
    CredentialInfo,
    CredentialStore,
    CredentialWatcher,
    read_secret,
)
from .errors import JSON_CONTENT_TYPE, ConfigError, CredentialError
from .guard import reap_orphans
from .http_server import HttpServer, ServerLimits
from .logs import AccessLog
from .malformed import SERVER_LOGGER, MalformedRequestFilter
from .metrics import ProxyMetrics
from .proxy import ProxyHandler
from .relay import Relay
from .routing import Router
from .signers import Clock
from .token_exchange import TokenBrokers
from .token_relay import TokenRelay
from .topper import TopperEndpoint
from .upstream_endpoint import UpstreamEndpoint

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
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    access_log_stream: TextIO | None = None  # None: stderr
    endpoints: dict[str, UpstreamEndpoint] = field(default_factory=dict)
    token_brokers: TokenBrokers | None = None  # access tokens of token_exchange upstreams

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        missing = self.credentials.missing()
        ready = not missing and not self.draining and self.handler is not None
        body: dict[str, Any] = {"ready": ready, "draining": self.draining, "missing": missing}
        if self.token_brokers is not None:
            tokens_ok, body["token_exchange"] = self.token_brokers.readiness()
            body["ready"] = ready = ready and tokens_ok
        return ready, body


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type=JSON_CONTENT_TYPE)


def _flusher(access_log: AccessLog) -> Callable[[], Awaitable[None]]:
    async def flush() -> None:
        access_log.flush()

    return flush


def _described(info: CredentialInfo) -> dict[str, Any]:
    """Log fields that identify a loaded key: names and a public fingerprint, nothing secret."""
    fields = {
        "credential": info.name,
        "scheme": info.scheme,
        "key_id": info.key_id,
        "fingerprint": info.fingerprint,
    }
    if info.wallet_fingerprint is not None:  # CDP v2: the Wallet Secret's public key
        fields["wallet_fingerprint"] = info.wallet_fingerprint
    return {"fields": fields}


def _on_reload(state: ProxyState, cred: Credential, error: CredentialError | None) -> None:
    metrics = state.metrics
    metrics.credential_loaded.labels(cred.name).set(1 if cred.signer else 0)
    if error is None and cred.info is not None:
        metrics.credential_last_reload.labels(cred.name).set(time.time())
        log.info("credential reloaded: its key file changed", extra=_described(cred.info))
    elif error is not None:
        metrics.credential_reload_errors.labels(cred.name).inc()
        keeping = "keeping the last good key" if cred.signer else "the credential stays unloaded"
        log.error(
            f"credential file changed but could not be loaded; {keeping}",
            extra={"fields": {"credential": cred.name, "problem": error.message}},
        )


def build_admin_app(state: ProxyState, exposition: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok", "pid": os.getpid()})

    async def readyz(_: web.Request) -> web.Response:
        ready, body = state.readiness()
        return _json(body, 200 if ready else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(exposition))
    return app


class ProxyServer:
    """Both listeners of one process. ``start()`` binds; ``stop()`` drains and closes."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        reuse_port: bool = False,
        multiprocess_dir: str | None = None,
        access_log_stream: TextIO | None = None,
    ):
        self.config = config
        self.reuse_port = reuse_port
        credentials = CredentialStore(config.credentials, clock=clock)
        metrics = ProxyMetrics(registry or CollectorRegistry())
        self.state = ProxyState(config, credentials, metrics, Router(config))
        self.state.access_log_stream = access_log_stream
        self.exposition = metrics.registry
        if multiprocess_dir is not None:  # metrics of every worker, read from their mmap files
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        self._runners: list[web.BaseRunner] = []  # the admin listener
        self._http: HttpServer | None = None  # the proxy listener
        self._listener: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._guards: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._malformed: MalformedRequestFilter | None = None

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
                log.info("credential loaded", extra=_described(cred.info))
        for problem in problems:
            log.warning(
                "credential not loaded; requests that need it answer 503 until it is fixed",
                extra={"fields": {"problem": problem}},
            )
        return problems

    def _build_handler(
        self, session: aiohttp.ClientSession, topper: TopperEndpoint | None
    ) -> ProxyHandler:
        config = self.config
        relay = Relay(
            session, self.state.endpoints, config.max_body_bytes, config.max_stream_body_bytes
        )
        token = read_secret(config.inbound_token) if config.inbound_token else None
        access_log = None
        if config.access_log and logging.getLevelName(config.log_level) <= logging.INFO:
            access_log = AccessLog(config.log_format, self.state.access_log_stream)
        return ProxyHandler(
            self.state.router, self.state.credentials, relay, self.metrics, token, access_log,
            topper=topper,
        )  # fmt: skip

    async def start(self) -> None:
        self.load_credentials()
        self.state.endpoints.update(
            {name: UpstreamEndpoint.build(cfg) for name, cfg in self.config.upstreams.items()}
        )
        topper = TopperEndpoint.from_config(self.config)  # None without a topper: block
        self._session = create_session()
        handler = self.state.handler = self._build_handler(self._session, topper)
        if any(up.auth == "token_exchange" for up in self.config.upstreams.values()):
            brokers = self.state.token_brokers = TokenBrokers(
                self.state.credentials, self.state.endpoints, self._session, self.metrics
            )
            handler.relay.tokens = TokenRelay(
                self._session, self.state.endpoints, brokers, self.metrics,
                self.config.max_body_bytes,
            )  # fmt: skip
            brokers.start(self.config)
        if handler.access_log is not None:
            self.state.on_shutdown.append(_flusher(handler.access_log))
        # Open WebSockets would hold the drain: close them with 1001 at the shutdown step.
        self.state.on_shutdown.append(handler.websockets.close_all)
        # Parser refusals: one WARNING per kind a minute and a counter, not a traceback each.
        self._malformed = MalformedRequestFilter(
            lambda kind: self.metrics.malformed_requests.labels(kind).inc()
        )
        logging.getLogger(SERVER_LOGGER).addFilter(self._malformed)
        refused = self._malformed.refused
        self._http = HttpServer(
            handler,
            ServerLimits(
                max_header_bytes=self.config.max_header_bytes,
                # One bound for a slow head (slowloris) and an idle keep-alive connection.
                header_timeout=self.config.header_timeout,
                idle_timeout=self.config.header_timeout,
            ),
            on_refusal=lambda status, code: refused(code, status),
        )
        loop = asyncio.get_running_loop()
        address = self.config.listen
        try:
            self._listener = await loop.create_server(
                self._http, address.host, address.port, reuse_port=self.reuse_port or None
            )
        except OSError as exc:
            raise _listen_error("listen", address, exc) from None
        admin = web.AppRunner(
            build_admin_app(self.state, self.exposition),
            access_log=None,
            shutdown_timeout=self.config.drain_timeout,
            handler_cancellation=True,
            keepalive_timeout=self.config.header_timeout,
            auto_decompress=False,
        )
        await admin.setup()
        self._runners.append(admin)
        self._guards.append(asyncio.create_task(reap_orphans(admin)))
        address = self.config.admin_listen
        site = web.TCPSite(admin, address.host, address.port, reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise _listen_error("admin_listen", address, exc) from None
        # Key rotation without restart: poll the key files, reload what changed.
        watcher = CredentialWatcher(
            self.state.credentials, lambda c, e: _on_reload(self.state, c, e)
        )
        self._watcher = asyncio.create_task(watcher.run(), name="credential-watcher")
        log.info(
            "listening",
            extra={
                "fields": {
                    "proxy": str(self.config.listen),
                    "admin": str(self.config.admin_listen),
                    "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                }
            },
        )

    def port(self, index: int = 0) -> int:
        """The bound port of listener ``index`` (0: proxy, 1: admin); useful with port 0."""
        if index == 0:
            assert self._listener is not None
            return int(self._listener.sockets[0].getsockname()[1])
        address = self._runners[index - 1].addresses[0]
        return int(address[1])

    @property
    def http(self) -> HttpServer | None:
        """The proxy listener's server (connections, requests in flight)."""
        return self._http

    async def stop(self, *, min_drain: float = 0.0) -> None:
        """Not ready at once; keep accepting for ``min_drain`` s; then stop accepting and let
        in-flight requests finish within drain_timeout."""
        self.state.draining = True
        for task in [*self._guards, *([self._watcher] if self._watcher else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._guards.clear()
        self._watcher = None
        if self._malformed is not None:
            logging.getLogger(SERVER_LOGGER).removeFilter(self._malformed)
            self._malformed = None
        if min_drain > 0 and self._listener is not None:
            log.info(
                "draining: not ready, still accepting", extra={"fields": {"min_drain": min_drain}}
            )
            await asyncio.sleep(min_drain)
        if self._listener is not None and self._http is not None:
            self._listener.close()  # stop accepting
            self._http.stopping = True
            self._http.close_idle()
            for hook in self.state.on_shutdown:  # e.g. close WebSockets with GOING_AWAY
                await hook()
            await self._http.shutdown(self.config.drain_timeout)
        self._listener = self._http = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self.state.token_brokers is not None:  # after the drain: requests may need a token
            await self.state.token_brokers.stop()
        if self.state.handler is not None:
            await self.state.handler.relay.close()  # the pooled upstream connections
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.state.handler is not None and self.state.handler.access_log is not None:
            self.state.handler.access_log.flush()  # lines of requests that finished while draining
        self.state.handler = None


def _listen_error(field: str, address: ListenAddress, exc: OSError) -> ConfigError:
    """A busy port or a foreign address: one clear line, no trace."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += "; is another signing-proxy running?"
    return ConfigError(f"{field}: cannot listen on {address} ({reason})")


def _release_startup_memory() -> None:
    """Give the heap that start-up freed (imports, config, key parsing) back to the OS.

    glibc keeps freed memory mapped; malloc_trim returns it (~1 MiB of idle RSS here).
    """
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


async def run(
    config: Config, *, reuse_port: bool = False, multiprocess_dir: str | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    server = ProxyServer(config, reuse_port=reuse_port, multiprocess_dir=multiprocess_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        _release_startup_memory()
        await stop.wait()
        log.info(
            "stopping: draining in-flight requests",
            extra={
                "fields": {"min_drain": config.min_drain, "drain_timeout": config.drain_timeout}
            },
        )
        await server.stop(min_drain=config.min_drain)
    finally:
        await server.stop()  # a no-op after a clean stop; cleans up after a failed start
    log.info("stopped")
