"""``ProxyState``: what the parts of one proxy process share, and what /readyz reports
(credentials loaded, token exchange usable, not draining); and the admin listener's aiohttp
application that serves /healthz, /readyz and /metrics from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .config import Config
from .credentials import CredentialStore
from .errors import JSON_CONTENT_TYPE
from .metrics import ProxyMetrics
from .proxy import ProxyHandler
from .routing import Router
from .token_exchange import TokenBrokers
from .upstream_endpoint import UpstreamEndpoint

__all__ = ["ProxyState", "build_admin_app"]


@dataclass
class ProxyState:
    """What the listeners of one process share; ``readiness()`` is what /readyz answers."""

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
