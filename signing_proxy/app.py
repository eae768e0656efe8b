"""The two listeners and their lifecycle.

- proxy listener (``listen``): the listener's own HTTP/1.1 server (http_server.py) hands every
  request to ProxyHandler, CONNECT and absolute-form targets included; WebSocket upgrades go on
  to aiohttp (ws_handoff.py);
- admin listener (``admin_listen``): /healthz, /readyz, /metrics (admin_answers.py), on the same
  kind of server with its own limits.

aiohttp is loaded only when something off the hot path needs it (outbound_session.py): a proxy
that relays REST only never imports it.

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
import errno
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TextIO

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from .admin_answers import AdminHandler
from .config import Config, ListenAddress
from .credentials import (
    Credential,
    CredentialInfo,
    CredentialStore,
    CredentialWatcher,
    read_secret,
)
from .errors import ConfigError, CredentialError
from .glibc_malloc import keep_read_buffers_on_heap, release_startup_memory
from .http_server import HttpServer, ServerLimits
from .logs import AccessLog
from .malformed import SERVER_LOGGER, MalformedRequestFilter
from .metrics import ProxyMetrics
from .outbound_session import OutboundSession
from .proxy import ProxyHandler
from .proxy_state import ProxyState
from .relay import Relay
from .routing import Router
from .signers import Clock
from .topper import TopperEndpoint
from .upstream_endpoint import UpstreamEndpoint

__all__ = ["ProxyServer", "ProxyState", "run"]

log = logging.getLogger(__name__)


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


class ProxyServer:
    """Both listeners of one process. ``start()`` binds; ``stop()`` drains and closes.

    ``start()`` registers the release of each part on one ``AsyncExitStack`` as it acquires it
    (aiohttp's cleanup_ctx, as a stack): a start that fails half-way releases what it had, and
    ``stop()`` unwinds the same stack, so the drain runs in the reverse order of start-up.
    """

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
            self.exposition.register(metrics.batch)  # this worker's pending counts go first
            MultiProcessCollector(self.exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        self._releases = contextlib.AsyncExitStack()  # what start() acquired, undone by stop()
        self._min_drain = 0.0  # stop()'s, read by _drain
        self._admin: asyncio.Server | None = None  # the admin listener
        self._http: HttpServer | None = None  # the proxy listener
        self._listener: asyncio.Server | None = None

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
        self, sessions: OutboundSession, topper: TopperEndpoint | None
    ) -> ProxyHandler:
        config = self.config
        relay = Relay(
            sessions, self.state.endpoints, config.max_body_bytes, config.max_stream_body_bytes
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
        async with contextlib.AsyncExitStack() as releases:  # unwinds if a step below fails
            await self._acquire(releases, topper)
            self._releases = releases.pop_all()
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

    async def _acquire(
        self, releases: contextlib.AsyncExitStack, topper: TopperEndpoint | None
    ) -> None:
        """Start each part and register its release at once; they run in reverse order."""
        config, state = self.config, self.state
        # Released last: the lines of requests that finished while draining.
        releases.callback(self._flush_access_log)
        releases.callback(self.metrics.flush)  # counts of requests that finished while draining
        sessions = OutboundSession()
        releases.push_async_callback(sessions.close)
        handler = state.handler = self._build_handler(sessions, topper)
        releases.push_async_callback(handler.relay.close)  # the pooled upstream connections
        if any(up.auth == "token_exchange" for up in config.upstreams.values()):
            from .token_exchange import TokenBrokers  # aiohttp's client: loaded only for these
            from .token_relay import TokenRelay

            session = sessions.get()
            brokers = state.token_brokers = TokenBrokers(
                state.credentials, state.endpoints, session, self.metrics
            )
            handler.relay.tokens = TokenRelay(
                session, state.endpoints, brokers, self.metrics, config.max_body_bytes
            )
            brokers.start(config)
            releases.push_async_callback(brokers.stop)  # after the drain: requests may need a token
        if handler.access_log is not None:
            state.on_shutdown.append(_flusher(handler.access_log))
        # Open WebSockets would hold the drain: close them with 1001 at the shutdown step.
        state.on_shutdown.append(handler.close_websockets)
        limits = ServerLimits(
            max_header_bytes=config.max_header_bytes,
            # One bound for a slow head (slowloris) and an idle keep-alive connection.
            header_timeout=config.header_timeout,
            idle_timeout=config.header_timeout,
        )
        admin = HttpServer(AdminHandler(state.readiness, self.exposition), limits)
        releases.push_async_callback(self._close_admin, admin)  # after the proxy's drain
        malformed = MalformedRequestFilter(
            lambda kind: self.metrics.malformed_requests.labels(kind).inc()
        )
        refused = malformed.refused
        http = HttpServer(handler, limits, on_refusal=lambda status, code: refused(code, status))
        address = config.listen
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                http, address.host, address.port, reuse_port=self.reuse_port or None
            )
        except OSError as exc:
            raise _listen_error("listen", address, exc) from None
        self._http = http
        releases.push_async_callback(self._drain, self._listener, http)
        # Parser refusals: one WARNING per kind a minute and a counter, not a traceback each.
        # In place before the listener serves anyone: nothing runs until the next await.
        server_log = logging.getLogger(SERVER_LOGGER)
        server_log.addFilter(malformed)
        releases.callback(server_log.removeFilter, malformed)  # removed before the drain begins
        address = config.admin_listen
        try:
            self._admin = await asyncio.get_running_loop().create_server(
                admin, address.host, address.port, reuse_port=self.reuse_port or None
            )  # closed by _close_admin
        except OSError as exc:
            raise _listen_error("admin_listen", address, exc) from None
        # Key rotation without restart: poll the key files, reload what changed.
        watcher = CredentialWatcher(state.credentials, lambda c, e: _on_reload(state, c, e))
        _background(releases, watcher.run(), name="credential-watcher")

    def port(self, index: int = 0) -> int:
        """The bound port of listener ``index`` (0: proxy, 1: admin); useful with port 0."""
        if index == 0:
            assert self._listener is not None
            return int(self._listener.sockets[0].getsockname()[1])
        assert index == 1 and self._admin is not None
        return int(self._admin.sockets[0].getsockname()[1])

    @property
    def http(self) -> HttpServer | None:
        """The proxy listener's server (connections, requests in flight)."""
        return self._http

    async def stop(self, *, min_drain: float = 0.0) -> None:
        """Not ready at once; keep accepting for ``min_drain`` s; then stop accepting and let
        in-flight requests finish within drain_timeout; then release the rest, newest first."""
        self.state.draining = True
        self._min_drain = min_drain
        await self._releases.aclose()  # a no-op once released

    async def _drain(self, listener: asyncio.Server, http: HttpServer) -> None:
        """The proxy listener's release: keep accepting for min_drain, then drain it."""
        if self._min_drain > 0:
            log.info(
                "draining: not ready, still accepting",
                extra={"fields": {"min_drain": self._min_drain}},
            )
            await asyncio.sleep(self._min_drain)
        listener.close()  # stop accepting
        http.stopping = True
        http.close_idle()
        for hook in self.state.on_shutdown:  # e.g. close WebSockets with GOING_AWAY
            await hook()
        await http.shutdown(self.config.drain_timeout)
        self._listener = self._http = None

    async def _close_admin(self, admin: HttpServer) -> None:
        """The admin listener's release: it answered /readyz (503) through the drain."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        await admin.shutdown(self.config.drain_timeout)

    def _flush_access_log(self) -> None:
        handler, self.state.handler = self.state.handler, None
        if handler is not None and handler.access_log is not None:
            handler.access_log.flush()  # lines of requests that finished while draining


def _background(
    releases: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str | None = None
) -> None:
    """Run ``work`` as a task until the release: cancelled, and awaited."""
    task = asyncio.create_task(work, name=name)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    releases.push_async_callback(cancel)


def _listen_error(field: str, address: ListenAddress, exc: OSError) -> ConfigError:
    """A busy port or a foreign address: one clear line, no trace."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += "; is another signing-proxy running?"
    return ConfigError(f"{field}: cannot listen on {address} ({reason})")


async def run(
    config: Config, *, reuse_port: bool = False, multiprocess_dir: str | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    server = ProxyServer(config, reuse_port=reuse_port, multiprocess_dir=multiprocess_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    keep_read_buffers_on_heap()
    try:
        await server.start()
        release_startup_memory()
        await stop.wait()
        log.info(
            "stopping: draining in-flight requests",
            extra={
                "fields": {"min_drain": config.min_drain, "drain_timeout": config.drain_timeout}
            },
        )
        await server.stop(min_drain=config.min_drain)
    finally:
        await server.stop()  # a no-op once stopped, or after a failed start (it released its parts)
    log.info("stopped")
