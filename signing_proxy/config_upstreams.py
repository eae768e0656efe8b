"""The ``upstreams:`` section: one ``UpstreamConfig`` per host the proxy may contact, and its parsing.

An upstream is named by the host Coinbase knows (signed into the JWT and sent as Host); ``url:``
may point the connection elsewhere. The per-host defaults live here: which hosts take the JWT's
``uris`` claim form and which are WebSocket-only; ``wallet_auth.paths`` adds requests to the
X-Wallet-Auth rules of wallet_rules.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from .config_credentials import CredentialConfig
from .config_reader import Reader
from .wallet_rules import CDP_HOST, WalletRule, WalletRuleError, WalletRules

__all__ = [
    "DEFAULT_UPSTREAM_TIMEOUT",
    "URIS_CLAIM_HOSTS",
    "WEBSOCKET_HOSTS",
    "UpstreamConfig",
    "parse_upstream",
]

DEFAULT_UPSTREAM_TIMEOUT: Final = 30.0
# Hosts whose official SDK (cdp-sdk) signs `uris: [...]`; coinbase-advanced-py signs `uri` for the
# others (docs/coinbase-auth.md, "The uri claim").
URIS_CLAIM_HOSTS: Final = frozenset({CDP_HOST, "api.developer.coinbase.com"})
_HOST_NAME: Final = re.compile(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
_UPSTREAM_KEYS: Final = {
    "credential",
    "url",
    "ca_file",
    "timeout",
    "retries",
    "tls_server_name",
    "websocket",
    "jwt_uri_claim",
    "wallet_auth",
    "auth",
}
# Coinbase's WebSocket-only hosts: upgrades are relayed to them without a wss:// url or a flag.
WEBSOCKET_HOSTS: Final = frozenset(
    {
        "advanced-trade-ws.coinbase.com",
        "advanced-trade-ws-user.coinbase.com",
        "ws-feed.exchange.coinbase.com",
        "ws-direct.exchange.coinbase.com",
        "ws-feed-public.sandbox.exchange.coinbase.com",
        "ws-direct.sandbox.exchange.coinbase.com",
        "streams.drb.coinbase.com",
    }
)
_UPSTREAM_AUTH: Final = ("token_exchange",)


@dataclass(frozen=True)
class UpstreamConfig:
    name: str  # the host Coinbase knows: signed into `uri` and sent as Host
    credential: str | None
    url: str  # where to connect: scheme://host[:port], no path
    ca_file: Path | None
    timeout: float
    retries: int = 1  # re-signed retries of requests that failed before reaching the upstream
    websocket: bool = False  # WebSocket upgrades are relayed here (wss:// url, or websocket: true)
    # The name the upstream's certificate is verified against (and sent as SNI) when url: points
    # at an IP or a gateway; None: url:'s own host.
    tls_server_name: str | None = None
    jwt_uri_claim: Literal["uri", "uris"] = "uri"  # the CDP JWT's claim form for this host
    wallet_rules: tuple[WalletRule, ...] = ()  # requests that get X-Wallet-Auth
    auth: str | None = None  # "token_exchange": the key is exchanged for an access token


def parse_upstream(
    r: Reader, name: Any, raw: Any, credentials: Mapping[str, CredentialConfig]
) -> UpstreamConfig:
    where = f"upstreams.{name}"
    if not isinstance(name, str) or "/" in name or ":" in name or not name.strip():
        raise r.fail(
            where,
            "an upstream is named by its host name, e.g. api.coinbase.com (no scheme, no port)",
        )
    host = name.strip().lower()
    data = r.mapping(raw, where)
    r.known(data, _UPSTREAM_KEYS, where)
    credential = data.get("credential")
    if credential is not None and credential not in credentials:
        raise r.fail(
            f"{where}.credential", f"no credential named {credential!r} under credentials:"
        )
    url = f"https://{host}"
    if data.get("url") is not None:
        text = r.string(data["url"], f"{where}.url")
        parts = urlsplit(text)
        if parts.scheme not in ("https", "wss") or not parts.hostname:
            raise r.fail(
                f"{where}.url",
                "must be https://HOST[:PORT] (or wss:// for WebSocket hosts): the upstream is always reached over TLS",
            )
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise r.fail(
                f"{where}.url",
                "give only scheme, host and port; the request path comes from the client",
            )
        try:
            port = parts.port
        except ValueError:  # urlsplit: not a number, or outside 0-65535
            port = 0
        if port == 0 and ":" in parts.netloc.rsplit("]", 1)[-1]:
            raise r.fail(f"{where}.url", f"the port in {text!r} must be a number from 1 to 65535")
        url = f"{parts.scheme}://{parts.netloc}"
    tls_server_name = None
    if data.get("tls_server_name") is not None:
        tls_server_name = r.string(data["tls_server_name"], f"{where}.tls_server_name").lower()
        if not _HOST_NAME.fullmatch(tls_server_name):
            raise r.fail(
                f"{where}.tls_server_name",
                f"expected a host name such as {host} (no scheme, port or path)",
            )
    ca_file = r.file_path(data["ca_file"], f"{where}.ca_file") if data.get("ca_file") else None
    timeout = r.number(data.get("timeout", DEFAULT_UPSTREAM_TIMEOUT), f"{where}.timeout")
    retries = r.count(data.get("retries", 1), f"{where}.retries")
    auth = data.get("auth")
    if auth is not None and auth not in _UPSTREAM_AUTH:
        raise r.fail(
            f"{where}.auth",
            f"expected {' or '.join(_UPSTREAM_AUTH)} (or leave it out: each request is signed)",
        )
    if auth == "token_exchange" and (credential is None or credentials[credential].type != "cdp"):
        raise r.fail(
            f"{where}.auth",
            "token_exchange needs a CDP credential (key_file or key_name + private_key) "
            "on this upstream: its key is exchanged for the access token",
        )
    # A token_exchange gateway serves its in-band-authenticated socket on the same host.
    websocket = data.get(
        "websocket", url.startswith("wss://") or host in WEBSOCKET_HOSTS or auth is not None
    )
    if not isinstance(websocket, bool):
        raise r.fail(f"{where}.websocket", "expected true or false")
    claim = data.get("jwt_uri_claim", "uris" if host in URIS_CLAIM_HOSTS else "uri")
    if claim not in ("uri", "uris"):
        raise r.fail(f"{where}.jwt_uri_claim", "expected uri or uris")
    wallet_rules = WalletRules.defaults(host) + _wallet_paths(r, data, where)
    return UpstreamConfig(
        host, credential, url, ca_file, timeout, retries, websocket,
        tls_server_name=tls_server_name, jwt_uri_claim=claim, wallet_rules=wallet_rules, auth=auth,
    )  # fmt: skip


def _wallet_paths(r: Reader, data: Mapping[str, Any], where: str) -> tuple[WalletRule, ...]:
    """``wallet_auth: {paths: [...]}``: more requests that need an X-Wallet-Auth token."""
    section = r.mapping(data.get("wallet_auth"), f"{where}.wallet_auth")
    r.known(section, {"paths"}, f"{where}.wallet_auth")
    paths = section.get("paths") or []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise r.fail(f"{where}.wallet_auth.paths", 'expected a list like ["POST /platform/v2/..."]')
    try:
        return tuple(WalletRule.parse(p) for p in paths)
    except WalletRuleError as exc:
        raise r.fail(f"{where}.wallet_auth.paths", str(exc)) from None
