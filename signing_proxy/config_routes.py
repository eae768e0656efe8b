"""The ``routes:`` section: path prefixes (base-URL mode) mapped to upstreams, and their parsing.

Routes are checked against the upstreams and credentials already parsed; routing.py compiles them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .config_credentials import CredentialConfig
from .config_reader import Reader
from .config_upstreams import UpstreamConfig
from .policy import Policy

__all__ = ["RouteConfig", "parse_route"]

_ROUTE_KEYS: Final = {"prefix", "upstream", "credential", "strip_prefix", "policy"}


@dataclass(frozen=True)
class RouteConfig:
    prefix: str
    upstream: str
    credential: str | None  # None: the upstream's credential
    strip_prefix: bool = False
    policy: Policy | None = None


def parse_route(
    r: Reader,
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
