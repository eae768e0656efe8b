"""Where and how to reach one upstream, built once at start: origin, TLS context, timeout.

Every path to an upstream uses it, so ``url``, ``ca_file`` and ``tls_server_name`` mean the same
everywhere: the REST relay builds its connection pool from it (relay.py), and the aiohttp side
(WebSockets, token exchange, Onramp) passes its ``ssl``, ``timeout`` and ``server_hostname`` to
aiohttp. A ``ca_file`` that cannot be used is a ConfigError naming the field.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import UpstreamConfig
from .errors import ConfigError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["UpstreamEndpoint"]


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """Per-upstream things built once: where to connect, TLS context, timeout."""

    config: UpstreamConfig
    origin: str  # scheme://host[:port] to connect to (http(s) form for REST)
    ssl: ssl.SSLContext | bool
    server_hostname: str | None = None  # tls_server_name: SNI and the name verified

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        """The upstream's timeout for aiohttp's client (only its users load aiohttp)."""
        import aiohttp

        return aiohttp.ClientTimeout(total=self.config.timeout)

    @classmethod
    def build(cls, config: UpstreamConfig) -> UpstreamEndpoint:
        context: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=str(config.ca_file))
            except (OSError, ssl.SSLError) as exc:  # missing, a directory, not PEM certificates
                reason = "no PEM certificate in it"
                if not isinstance(exc, ssl.SSLError):
                    reason = exc.strerror or type(exc).__name__
                raise ConfigError(
                    f"upstreams.{config.name}.ca_file: cannot use {config.ca_file} ({reason})"
                ) from None
        origin = config.url.replace("wss://", "https://", 1)
        return cls(config, origin, context, config.tls_server_name)
