"""``ProxyState``: what the parts of one proxy process share, and what /readyz reports
(credentials loaded, token exchange usable, not draining; admin_answers.py serves it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from .config import Config
from .credentials import CredentialStore
from .metrics import ProxyMetrics
from .proxy import ProxyHandler
from .routing import Router
from .upstream_endpoint import UpstreamEndpoint

if TYPE_CHECKING:
    from .token_exchange import TokenBrokers

__all__ = ["ProxyState"]


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
