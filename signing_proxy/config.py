"""The config file: YAML parsed once into frozen dataclasses, validated, or one ConfigError.

Secrets are not read here: a secret field is kept as a ``SecretSource`` (inline value, env var or
file) and read by credentials.py, which can re-read it when the file changes. Relative file paths
are resolved against the config file's folder. Nothing here knows about HTTP.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError
from .policy import Policy, PolicyError
from .ratelimit import RateLimit
from .wallet_rules import CDP_HOST, WalletRule, WalletRuleError, WalletRules

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "Config",
    "CredentialConfig",
    "ListenAddress",
    "RouteConfig",
    "SecretSource",
    "UpstreamConfig",
    "env_overrides",
    "load_config",
    "parse_config",
]

DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
DEFAULT_UPSTREAM_TIMEOUT: Final = 30.0
DEFAULT_HEADER_TIMEOUT: Final = 60.0
DEFAULT_MAX_HEADER_BYTES: Final = 32 * 1024
# Hosts whose official SDK (cdp-sdk) signs `uris: [...]`; coinbase-advanced-py signs `uri` for the
# others (docs/coinbase-auth.md, "The uri claim").
URIS_CLAIM_HOSTS: Final = frozenset({CDP_HOST, "api.developer.coinbase.com"})


@dataclass(frozen=True)
class SecretSource:
    """Where one secret value comes from; ``describe()`` is safe to show, the value is not."""

    field: str  # the config field that named it, e.g. "private_key_env"
    kind: Literal["inline", "env", "file"]
    ref: str  # the inline value, the env var's name, or the file path

    def describe(self) -> str:
        if self.kind == "env":
            return f"env var {self.ref}"
        if self.kind == "file":
            return f"file {self.ref}"
        return f"inline config field '{self.field}'"

    def __repr__(self) -> str:  # never let an inline secret reach a log through repr()
        shown = "<inline>" if self.kind == "inline" else self.ref
        return f"SecretSource({self.field!r}, {self.kind!r}, {shown!r})"


@dataclass(frozen=True)
class CredentialConfig:
    name: str
    type: Literal["cdp", "hmac", "exchange", "prime", "intx"]
    key_file: Path | None = None  # CDP key JSON as downloaded
    key_name: SecretSource | None = None  # CDP, when not from key_file
    private_key: SecretSource | None = None
    api_key: SecretSource | None = None  # HMAC
    api_secret: SecretSource | None = None
    passphrase: SecretSource | None = None  # Exchange, Prime, INTX
    policy: Policy | None = None  # what requests this credential may sign
    rate_limit: RateLimit | None = None
    wallet_secret: SecretSource | None = None  # CDP v2 Server Wallets (X-Wallet-Auth)
    # Derived from the upstreams at load, for the CDP signer: hosts signed with the `uris` claim
    # form, and which requests get a wallet token.
    uris_hosts: frozenset[str] = frozenset()
    wallet_rules: WalletRules = field(default_factory=WalletRules)

    def files(self) -> tuple[Path, ...]:
        """Files this credential is read from (watched for rotation)."""
        found = [self.key_file] if self.key_file else []
        sources = (self.key_name, self.private_key, self.api_key, self.api_secret, self.passphrase)
        for src in (*sources, self.wallet_secret):
            if src is not None and src.kind == "file":
                found.append(Path(src.ref))
        return tuple(found)


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


@dataclass(frozen=True)
class RouteConfig:
    prefix: str
    upstream: str
    credential: str | None  # None: the upstream's credential
    strip_prefix: bool = False
    policy: Policy | None = None


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    path: Path | None
    listen: ListenAddress
    admin_listen: ListenAddress
    drain_timeout: float
    min_drain: float
    workers: int
    credentials: Mapping[str, CredentialConfig]
    upstreams: Mapping[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_stream_body_bytes: int | None = None  # streamed (unsigned-body) uploads; None: no cap
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    inbound_token: SecretSource | None = None
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    access_log: bool = True
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    forward_proxy: bool = True  # absolute-form (curl -x) requests; false: refused
    extra: Mapping[str, Any] = field(default_factory=dict)  # sections owned by optional features


# Top-level fields that flags and SIGNING_PROXY_<FIELD> env vars may set (flags > env > file).
OVERRIDABLE: Final = (
    "listen",
    "admin_listen",
    "drain_timeout",
    "min_drain",
    "workers",
    "log_format",
    "log_level",
    "access_log",
    "event_loop",
    "max_body_bytes",
    "forward_proxy",
)
ENV_PREFIX: Final = "SIGNING_PROXY_"

_TOP_KEYS: Final = {
    *OVERRIDABLE,
    "credentials",
    "upstreams",
    "routes",
    "max_body_bytes",
    "max_stream_body_bytes",
    "max_header_bytes",
    "header_timeout",
    "inbound_auth",
    "log_format",
    "log_level",
    "forward_proxy",
}
_EXTRA_KEYS: Final = {"topper"}  # parsed by the feature that owns them
_CDP_KEYS: Final = {
    "type",
    "key_file",
    "policy",
    "rate_limit",
    *(
        f"{b}{s}"
        for b in ("key_name", "private_key", "wallet_secret")
        for s in ("", "_env", "_file")
    ),
}
_HMAC_KEYS: Final = {
    "type",
    "policy",
    "rate_limit",
    *(f"{b}{s}" for b in ("api_key", "api_secret") for s in ("", "_env", "_file")),
}
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
_VENUE_KEYS: Final = _HMAC_KEYS | {f"passphrase{s}" for s in ("", "_env", "_file")}
_VENUES: Final = ("exchange", "prime", "intx")  # other Coinbase venues: HMAC with a passphrase
_UPSTREAM_AUTH: Final = ("token_exchange",)
_ROUTE_KEYS: Final = {"prefix", "upstream", "credential", "strip_prefix", "policy"}
_LOG_LEVELS: Final = {"DEBUG", "INFO", "WARNING", "ERROR"}


class _Reader:
    """Helpers that know the file name, so every error names file and field."""

    def __init__(self, path: Path | None, origins: Mapping[str, str] | None = None):
        self.path = path
        self.base = path.parent if path else Path.cwd()
        self.origins = origins or {}

    def fail(self, where: str, problem: str) -> ConfigError:
        origin = f"{self.path}: " if self.path else ""
        top = where.split(".")[0].split("[")[0]
        setter = f" (set by {self.origins[top]})" if top in self.origins else ""
        return ConfigError(f"{origin}{where}{setter}: {problem}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def known(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.fail(where, f"unknown field '{key}'{hint}")

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, "expected a non-empty string")
        return value.strip()

    def number(self, value: Any, where: str, *, allow_zero: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(where, "expected a number")
        if value < 0 or (value == 0 and not allow_zero):
            raise self.fail(
                where, "must not be negative" if allow_zero else "must be greater than 0"
            )
        return float(value)

    def count(self, value: Any, where: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"expected a whole number >= {minimum}")
        return value

    def policy(self, value: Any, where: str) -> Policy | None:
        if value is None:
            return None
        data = self.mapping(value, where)
        self.known(data, {"allow", "deny"}, where)
        lists: dict[str, list[str] | None] = {}
        for key in ("allow", "deny"):
            rules = data.get(key)
            if rules is not None and (
                not isinstance(rules, list) or not all(isinstance(r, str) for r in rules)
            ):
                raise self.fail(f"{where}.{key}", 'expected a list of rules like "GET /api/v3/**"')
            lists[key] = rules
        try:
            return Policy.compile(lists["allow"], lists["deny"] or ())
        except PolicyError as exc:
            raise self.fail(where, str(exc)) from None

    def rate_limit(self, value: Any, where: str) -> RateLimit | None:
        if value is None:
            return None
        data = self.mapping(value, where)
        self.known(data, {"rate", "burst"}, where)
        rate = self.number(data.get("rate"), f"{where}.rate")
        burst = self.count(data.get("burst", max(1, math.ceil(rate))), f"{where}.burst", minimum=1)
        return RateLimit(rate, burst)

    def file_path(self, value: Any, where: str) -> Path:
        path = Path(os.path.expanduser(self.string(value, where)))
        return path if path.is_absolute() else self.base / path

    def listen(self, value: Any, where: str) -> ListenAddress:
        text = self.string(str(value) if isinstance(value, int) else value, where)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
            raise self.fail(where, f"expected HOST:PORT, got {text!r}")
        host = host.strip("[]") or "127.0.0.1"
        return ListenAddress(host, int(port))

    def secret(self, data: Mapping[str, Any], base: str, where: str) -> SecretSource | None:
        """One secret from exactly one of BASE, BASE_env, BASE_file."""
        given = [k for k in (base, f"{base}_env", f"{base}_file") if data.get(k) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise self.fail(where, f"give only one of {', '.join(given)}")
        key = given[0]
        if key == base:
            return SecretSource(key, "inline", self.string(data[key], f"{where}.{key}"))
        if key.endswith("_env"):
            return SecretSource(key, "env", self.string(data[key], f"{where}.{key}"))
        return SecretSource(key, "file", str(self.file_path(data[key], f"{where}.{key}")))


def _credential(r: _Reader, name: str, raw: Any) -> CredentialConfig:
    where = f"credentials.{name}"
    data = r.mapping(raw, where)
    kind = data.get("type", "cdp")
    policy = r.policy(data.get("policy"), f"{where}.policy")
    rate_limit = r.rate_limit(data.get("rate_limit"), f"{where}.rate_limit")
    if kind == "hmac":
        r.known(data, _HMAC_KEYS, where)
        api_key = r.secret(data, "api_key", where)
        api_secret = r.secret(data, "api_secret", where)
        if api_key is None or api_secret is None:
            raise r.fail(
                where,
                "an hmac credential needs api_key (or _env/_file) and api_secret (or _env/_file)",
            )
        return CredentialConfig(
            name,
            "hmac",
            api_key=api_key,
            api_secret=api_secret,
            policy=policy,
            rate_limit=rate_limit,
        )
    if kind in _VENUES:
        r.known(data, _VENUE_KEYS, where)
        fields = {f: r.secret(data, f, where) for f in ("api_key", "api_secret", "passphrase")}
        missing = [f"{f} (or {f}_env / {f}_file)" for f, src in fields.items() if src is None]
        if missing:
            raise r.fail(where, f"a {kind} credential needs {', '.join(missing)}")
        return CredentialConfig(
            name,
            kind,
            api_key=fields["api_key"],
            api_secret=fields["api_secret"],
            passphrase=fields["passphrase"],
            policy=policy,
            rate_limit=rate_limit,
        )
    if kind != "cdp":
        raise r.fail(
            f"{where}.type",
            f"expected one of cdp, hmac, {', '.join(_VENUES)}; got {kind!r}",
        )
    r.known(data, _CDP_KEYS, where)
    key_name = r.secret(data, "key_name", where)
    private_key = r.secret(data, "private_key", where)
    wallet_secret = r.secret(data, "wallet_secret", where)
    if "key_file" in data:
        if key_name or private_key:
            raise r.fail(where, "give key_file, or key_name + private_key, not both")
        return CredentialConfig(
            name,
            "cdp",
            key_file=r.file_path(data["key_file"], f"{where}.key_file"),
            policy=policy,
            rate_limit=rate_limit,
            wallet_secret=wallet_secret,
        )
    if key_name is None or private_key is None:
        raise r.fail(
            where,
            "a CDP credential needs key_file (the key JSON downloaded from the CDP portal), "
            "or key_name (or _env/_file) and private_key (or _env/_file)",
        )
    return CredentialConfig(
        name,
        "cdp",
        key_name=key_name,
        private_key=private_key,
        policy=policy,
        rate_limit=rate_limit,
        wallet_secret=wallet_secret,
    )


def _upstream(
    r: _Reader, name: Any, raw: Any, credentials: Mapping[str, CredentialConfig]
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


def _wallet_paths(r: _Reader, data: Mapping[str, Any], where: str) -> tuple[WalletRule, ...]:
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


def _route(
    r: _Reader,
    index: int,
    raw: Any,
    cfg_upstreams: Mapping[str, UpstreamConfig],
    credentials: Mapping[str, CredentialConfig],
) -> RouteConfig:
    where = f"routes[{index}]"
    data = r.mapping(raw, where)
    r.known(data, _ROUTE_KEYS, where)
    prefix = r.string(data.get("prefix"), f"{where}.prefix")
    if not prefix.startswith("/"):
        raise r.fail(f"{where}.prefix", f"must start with '/', got {prefix!r}")
    upstream = str(data.get("upstream", "")).lower()
    if upstream not in cfg_upstreams:
        raise r.fail(
            f"{where}.upstream",
            f"{data.get('upstream')!r} is not one of upstreams: ({', '.join(cfg_upstreams) or 'none configured'})",
        )
    credential = data.get("credential")
    if credential is not None and credential not in credentials:
        raise r.fail(
            f"{where}.credential", f"no credential named {credential!r} under credentials:"
        )
    if (
        credential is not None
        and cfg_upstreams[upstream].auth == "token_exchange"
        and credentials[credential].type != "cdp"
    ):
        raise r.fail(
            f"{where}.credential",
            f"upstream {upstream} uses token_exchange, which needs a CDP credential",
        )
    strip = data.get("strip_prefix", False)
    if not isinstance(strip, bool):
        raise r.fail(f"{where}.strip_prefix", "expected true or false")
    return RouteConfig(
        prefix, upstream, credential, strip, r.policy(data.get("policy"), f"{where}.policy")
    )


def _workers(r: _Reader, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise r.fail("workers", "expected a whole number from 1 to 64")
    return value


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """SIGNING_PROXY_<FIELD> env vars, as {field: (value, "env var NAME")}; values parsed as YAML."""
    found = {}
    for name in OVERRIDABLE:
        var = ENV_PREFIX + name.upper()
        if environ.get(var, "").strip():
            try:
                value = yaml.safe_load(environ[var])
            except yaml.YAMLError:
                value = environ[var]
            found[name] = (value, f"env var {var}")
    return found


def parse_config(
    raw: Any, path: Path | None = None, origins: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-loaded YAML document; ``origins`` names who set overridden fields."""
    r = _Reader(path, origins)
    data = r.mapping(raw, "top level")
    r.known(data, _TOP_KEYS | _EXTRA_KEYS, "top level")

    credentials: dict[str, CredentialConfig] = {}
    for name, value in r.mapping(data.get("credentials"), "credentials").items():
        credentials[str(name)] = _credential(r, str(name), value)

    upstreams: dict[str, UpstreamConfig] = {}
    for name, value in r.mapping(data.get("upstreams"), "upstreams").items():
        up = _upstream(r, name, value, credentials)
        upstreams[up.name] = up
    if not upstreams:
        raise r.fail("upstreams", "configure at least one upstream host, e.g. api.coinbase.com")

    # What the CDP signer must know of the upstreams: the claim form and the wallet rules per host.
    uris_hosts = frozenset(up.name for up in upstreams.values() if up.jwt_uri_claim == "uris")
    rules = WalletRules({up.name: up.wallet_rules for up in upstreams.values() if up.wallet_rules})
    for name, cred in credentials.items():
        if cred.type == "cdp":
            credentials[name] = replace(cred, uris_hosts=uris_hosts, wallet_rules=rules)

    raw_routes = data.get("routes") or []
    if not isinstance(raw_routes, list):
        raise r.fail("routes", "expected a list of {prefix, upstream} entries")
    routes = tuple(_route(r, i, item, upstreams, credentials) for i, item in enumerate(raw_routes))

    inbound = r.mapping(data.get("inbound_auth"), "inbound_auth")
    r.known(inbound, {"token", "token_env", "token_file"}, "inbound_auth")
    inbound_token = r.secret(inbound, "token", "inbound_auth")
    if inbound and inbound_token is None:
        raise r.fail("inbound_auth", "give token_env, token_file or token")

    listen = r.listen(data.get("listen", "127.0.0.1:8080"), "listen")
    admin = r.listen(data.get("admin_listen", "127.0.0.1:9090"), "admin_listen")
    if not listen.is_loopback and inbound_token is None:
        raise r.fail(
            "listen",
            f"{listen} is not a loopback address: anyone who can reach it could spend with your keys. "
            "Configure inbound_auth (token_env/token_file) or listen on 127.0.0.1",
        )
    if listen.port and (listen.host, listen.port) == (admin.host, admin.port):
        raise r.fail("admin_listen", "must differ from listen")

    log_format = data.get("log_format", "json")
    if log_format not in ("json", "text"):
        raise r.fail("log_format", "expected 'json' or 'text'")
    event_loop = data.get("event_loop", "auto")
    if event_loop not in ("auto", "asyncio", "uvloop"):
        raise r.fail("event_loop", "expected auto (uvloop when installed), asyncio or uvloop")
    access_log = data.get("access_log", True)
    if not isinstance(access_log, bool):
        raise r.fail("access_log", "expected true or false")
    forward_proxy = data.get("forward_proxy", True)
    if not isinstance(forward_proxy, bool):
        raise r.fail("forward_proxy", "expected true or false")
    log_level = str(data.get("log_level", "INFO")).upper()
    if log_level not in _LOG_LEVELS:
        raise r.fail("log_level", f"expected one of {', '.join(sorted(_LOG_LEVELS))}")

    return Config(
        path=path,
        listen=listen,
        admin_listen=admin,
        drain_timeout=r.number(data.get("drain_timeout", 20), "drain_timeout"),
        min_drain=r.number(data.get("min_drain", 0), "min_drain", allow_zero=True),
        workers=_workers(r, data.get("workers", 1)),
        credentials=credentials,
        upstreams=upstreams,
        routes=routes,
        max_body_bytes=int(
            r.number(data.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES), "max_body_bytes")
        ),
        max_stream_body_bytes=(
            None
            if data.get("max_stream_body_bytes") is None
            else r.count(data["max_stream_body_bytes"], "max_stream_body_bytes", minimum=1)
        ),
        max_header_bytes=r.count(
            data.get("max_header_bytes", DEFAULT_MAX_HEADER_BYTES), "max_header_bytes", minimum=1024
        ),
        header_timeout=r.number(
            data.get("header_timeout", DEFAULT_HEADER_TIMEOUT), "header_timeout"
        ),
        inbound_token=inbound_token,
        log_format=log_format,
        log_level=log_level,
        access_log=access_log,
        event_loop=event_loop,
        forward_proxy=forward_proxy,
        extra={k: data[k] for k in _EXTRA_KEYS if k in data},
    )


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, tuple[Any, str]] | None = None
) -> Config:
    """Read and validate a config file; every problem is one ConfigError naming file and field.

    ``overrides`` maps top-level fields to (value, who set it), e.g. from flags or env vars.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a config file (not UTF-8 text)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{file}: not valid YAML at {at}") from None
    if overrides:
        if raw is None:
            raw = {}
        if isinstance(raw, dict):
            raw = {**raw, **{k: v for k, (v, _) in overrides.items()}}
    origins = {k: who for k, (_, who) in (overrides or {}).items()}
    return parse_config(raw, file.resolve(), origins)
