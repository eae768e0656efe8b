"""The config file: YAML parsed once into frozen dataclasses, validated, or one ConfigError.

Secrets are not read here: a secret field is kept as a ``SecretSource`` (inline value, env var or
file) and read by credentials.py, which can re-read it when the file changes. Relative file paths
are resolved against the config file's folder. Nothing here knows about HTTP.

This module holds ``Config`` (the top level), ``parse_config`` and ``load_config``; each section
has its own module, whose public names are re-exported here: ``config_reader`` (the field reader,
``SecretSource``, ``ListenAddress``), ``config_credentials``, ``config_upstreams``,
``config_routes`` and ``config_topper``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from .config_credentials import CredentialConfig, parse_credential
from .config_reader import ListenAddress, Reader, SecretSource
from .config_routes import RouteConfig, parse_route
from .config_topper import TopperSettings, parse_topper
from .config_upstreams import (
    DEFAULT_UPSTREAM_TIMEOUT,
    URIS_CLAIM_HOSTS,
    WEBSOCKET_HOSTS,
    UpstreamConfig,
    parse_upstream,
)
from .errors import ConfigError
from .wallet_rules import WalletRules

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_UPSTREAM_TIMEOUT",
    "ENV_PREFIX",
    "OVERRIDABLE",
    "URIS_CLAIM_HOSTS",
    "WEBSOCKET_HOSTS",
    "Config",
    "CredentialConfig",
    "ListenAddress",
    "RouteConfig",
    "SecretSource",
    "TopperSettings",
    "UpstreamConfig",
    "env_overrides",
    "load_config",
    "parse_config",
]

DEFAULT_MAX_BODY_BYTES: Final = 10 * 1024 * 1024
DEFAULT_HEADER_TIMEOUT: Final = 60.0
DEFAULT_MAX_HEADER_BYTES: Final = 32 * 1024


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
    topper: TopperSettings | None = None  # Topper bootstrap tokens; None: no topper: section


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
    "topper",
}
_LOG_LEVELS: Final = {"DEBUG", "INFO", "WARNING", "ERROR"}


def _workers(r: Reader, value: Any) -> int:
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
    r = Reader(path, origins)
    data = r.mapping(raw, "top level")
    r.known(data, _TOP_KEYS, "top level")

    credentials: dict[str, CredentialConfig] = {}
    for name, value in r.mapping(data.get("credentials"), "credentials").items():
        credentials[str(name)] = parse_credential(r, str(name), value)

    upstreams: dict[str, UpstreamConfig] = {}
    for name, value in r.mapping(data.get("upstreams"), "upstreams").items():
        up = parse_upstream(r, name, value, credentials)
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
    routes = tuple(
        parse_route(r, i, item, upstreams, credentials) for i, item in enumerate(raw_routes)
    )

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
        # Last: a problem in the core fields is named before one in this optional section.
        topper=parse_topper(r, data["topper"]) if "topper" in data else None,
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
