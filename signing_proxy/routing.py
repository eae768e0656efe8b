"""Where a request goes: which upstream, which credential, which path is sent and signed.

Two ways in:
- base-URL mode, origin-form targets (``GET /api/v3/...``): the first route whose prefix matches;
- forward-proxy mode, absolute-form targets (``GET http://api.coinbase.com/api/v3/...``): the
  URL's host, which must be a configured upstream on its default port.

The path is kept exactly as the client wrote it (percent-encoding untouched), because the upstream
checks the signature against the path it receives. Paths that a server could resolve to something
else than what was signed (dot-segments and control characters, in any encoding: paths.py) are
refused instead.

Policies are fences, not URL spellings. A request gets the policy of its credential and every
route policy that holds where it goes (``Fence``): a route without ``strip_prefix`` fences the
upstream paths under its prefix (in any reading of the path) for every request to that upstream;
a route with ``strip_prefix`` can produce any upstream path, so it fences everything its
credential signs for that upstream — whichever route or proxy mode the request came by. So a
second route, a ``//v2`` or ``/V2`` spelling that falls through to ``/``, or ``curl -x`` reach no
signature that a route's policy forbids.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from yarl import URL

from .config import Config, RouteConfig, UpstreamConfig
from .errors import RequestRejected
from .paths import problem, readings
from .policy import Policy

__all__ = [
    "MAX_ROUTE_LABELS",
    "Fence",
    "RouteTemplates",
    "Router",
    "Target",
    "describe_fence",
    "prefix_matches",
    "split_target",
]

MAX_ROUTE_LABELS: Final = 200  # with histogram buckets, ~4k series per upstream at most
_PATH_CACHE: Final = 4096
_TARGET_CACHE: Final = 4096  # routed origin-form targets kept (oldest dropped first)
_MAX_TEMPLATE_DEPTH: Final = 8
_WORD: Final = re.compile(r"[a-z][a-z_]{0,39}|v[0-9]{1,2}")
_BAD_CHARS: Final = re.compile(r"[\x00-\x20\x7f#]")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True)
class Target:
    upstream: UpstreamConfig
    credential: str | None
    path: str  # as sent upstream and signed, percent-encoding untouched
    query: str  # raw, without '?'
    route: str  # bounded label for metrics: a route template
    policies: tuple[Policy, ...] = ()  # the route's and the credential's, all must allow


def split_target(raw: str) -> tuple[str, str]:
    """Split a raw origin-form target into (path, query), refusing paths that are not what they seem."""
    path, _, query = raw.partition("?")
    if not path.startswith("/"):
        raise RequestRejected(
            f"request target must start with '/', got {path[:64]!r}", code="bad_path"
        )
    if _BAD_CHARS.search(raw):
        raise RequestRejected(
            "request target contains control characters, spaces or '#'", code="bad_path"
        )
    why = problem(path)
    if why is not None:
        raise RequestRejected(why, code="bad_path")
    return path, query


def prefix_matches(prefix: str, path: str) -> bool:
    """Segment-aware prefix match: '/ws' matches '/ws' and '/ws/x' but not '/wsx'; '/' matches all."""
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] == "/"


@dataclass(frozen=True, slots=True)
class Fence:
    """A route's policy, held around the upstream paths its route can reach (module docstring).

    A route that keeps its prefix reaches the upstream paths under it: the fence holds there for
    every request, whatever its credential. A ``strip_prefix`` route can reach any upstream path:
    the fence holds for every request its credential signs for that upstream.
    """

    route: str  # the route's prefix, for messages and `check`
    upstream: str
    credential: str | None
    covers: str | None  # upstream paths under this prefix (any reading); None: all of them
    policy: Policy

    def applies(self, upstream: str, credential: str | None, path: str) -> bool:
        if upstream != self.upstream:
            return False
        if self.covers is None:
            return credential == self.credential
        covers = self.covers.lower()
        return any(prefix_matches(covers, reading.lower()) for reading in readings(path))


class RouteTemplates:
    """Turns raw paths into bounded metric labels.

    A segment stays only if it reads like a fixed API word (``accounts``, ``best_bid_ask``, ``v3``);
    anything else (ids, UUIDs, product ids, numbers) becomes ``{id}``. Depth is capped, and so is
    the number of distinct templates: past the cap, new shapes share one ``{other}`` label per
    route, so random paths cannot grow the series count without bound.
    """

    def __init__(self, limit: int = MAX_ROUTE_LABELS):
        self._limit = limit
        self._seen: dict[str, str] = {}
        self._by_path: dict[tuple[str, str], str] = {}  # most paths repeat: skip the regexes

    def __call__(self, route_prefix: str, path: str) -> str:
        key = (route_prefix, path)
        label = self._by_path.get(key)
        if label is None:
            if len(self._by_path) >= _PATH_CACHE:
                self._by_path.clear()
            label = self._by_path[key] = self._template(route_prefix, path)
        return label

    def _template(self, route_prefix: str, path: str) -> str:
        segments = path.split("/")[1 : _MAX_TEMPLATE_DEPTH + 1]
        # An empty segment (the root, a trailing slash) stays empty: it is not an id.
        shaped = "/" + "/".join(s if not s or _WORD.fullmatch(s) else "{id}" for s in segments)
        if len(path.split("/")) > _MAX_TEMPLATE_DEPTH + 1:
            shaped += "/…"
        known = self._seen.get(shaped)
        if known is not None:
            return known
        if len(self._seen) >= self._limit:
            return f"{route_prefix}{{other}}"
        self._seen[shaped] = shaped
        return shaped


class Router:
    """Compiled once from the config; answers Target or raises RequestRejected."""

    def __init__(self, config: Config):
        self.upstreams: Mapping[str, UpstreamConfig] = config.upstreams
        self.routes: tuple[RouteConfig, ...] = config.routes
        self.templates = RouteTemplates()
        self.forward_proxy = config.forward_proxy
        self._targets: dict[str, Target] = {}  # raw origin-form target -> its Target
        self._credential_policy = {
            name: cred.policy for name, cred in config.credentials.items() if cred.policy
        }
        self.fences = tuple(
            Fence(
                route.prefix,
                route.upstream,
                route.credential or self.upstreams[route.upstream].credential,
                None if route.strip_prefix else route.prefix,
                route.policy,
            )
            for route in self.routes
            if route.policy is not None
        )

    def _policies(self, upstream: str, credential: str | None, path: str) -> tuple[Policy, ...]:
        """Every policy that holds for this credential at this upstream path (module docstring)."""
        found = [f.policy for f in self.fences if f.applies(upstream, credential, path)]
        if credential is not None and credential in self._credential_policy:
            found.append(self._credential_policy[credential])
        return tuple(found)

    def resolve(self, raw_target: str) -> Target:
        """Route a request target as it appeared on the request line."""
        if raw_target.startswith("/"):
            return self.resolve_origin(raw_target)
        try:
            url = URL(raw_target, encoded=True)
        except ValueError:
            raise RequestRejected("request target is not a valid URL", code="bad_path") from None
        if not url.is_absolute():
            raise RequestRejected(
                f"request target must be a path or an absolute http:// URL, got {raw_target[:64]!r}",
                code="bad_path",
            )
        return self.resolve_absolute(url, raw_target)

    def resolve_origin(self, raw_target: str) -> Target:
        """Route an origin-form target; most targets repeat, so answers are kept (not refusals)."""
        cache = self._targets
        target = cache.get(raw_target)
        if target is None:
            target = self._route_origin(raw_target)
            if len(cache) >= _TARGET_CACHE:
                del cache[next(iter(cache))]  # the oldest
            cache[raw_target] = target
        return target

    def _route_origin(self, raw_target: str) -> Target:
        path, query = split_target(raw_target)
        for route in self.routes:
            if prefix_matches(route.prefix, path):
                upstream = self.upstreams[route.upstream]
                sent = path
                if route.strip_prefix:
                    sent = "/" + path[len(route.prefix) :].lstrip("/")
                credential = route.credential or upstream.credential
                return Target(
                    upstream, credential, sent, query, self.templates(route.prefix, sent),
                    self._policies(upstream.name, credential, sent),
                )  # fmt: skip
        raise RequestRejected(
            f"no route matches {path[:200]!r}; add a routes: entry, or send an absolute URL "
            "through the proxy (curl -x)",
            code="no_route",
            status=404,
        )

    def resolve_absolute(self, url: URL, raw_target: str) -> Target:
        if not self.forward_proxy:
            raise RequestRejected(
                "forward-proxy requests (absolute URLs, curl -x) are turned off on this proxy "
                "(forward_proxy: false); send origin-form requests to its routes instead",
                code="forward_proxy_disabled",
                status=403,
            )
        if url.raw_user is not None or url.raw_password is not None:
            # "http://api.coinbase.com@evil.com/": parsers disagree on such authorities; none is ours.
            raise RequestRejected(
                "absolute URLs with user information ('user@host') are not proxied",
                code="host_not_allowed",
                status=403,
            )
        host = (url.raw_host or "").lower()
        host = host[:-1] if host.endswith(".") else host  # one trailing dot: the same DNS name
        upstream = self.upstreams.get(host)
        if upstream is None:
            raise RequestRejected(
                f"host {host[:255]!r} is not a configured upstream; this proxy only reaches "
                f"{', '.join(sorted(self.upstreams))}",
                code="host_not_allowed",
                status=403,
            )
        scheme = url.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise RequestRejected(
                f"scheme {scheme!r} is not proxied", code="host_not_allowed", status=403
            )
        if url.explicit_port is not None and url.explicit_port != _DEFAULT_PORTS[scheme]:
            raise RequestRejected(
                f"port {url.explicit_port} is not allowed for {host}: the upstream is always reached at "
                "its configured address",
                code="host_not_allowed",
                status=403,
            )
        # The raw target is "scheme://authority/path?query": keep the path exactly as written.
        after_scheme = raw_target.split("://", 1)[1] if "://" in raw_target else ""
        slash = after_scheme.find("/")
        origin_form = after_scheme[slash:] if slash >= 0 else "/"
        if "?" in after_scheme and (slash < 0 or after_scheme.find("?") < slash):
            origin_form = "/" + after_scheme[after_scheme.find("?") :]
        path, query = split_target(origin_form)
        return Target(
            upstream, upstream.credential, path, query, self.templates(f"{host}/", path),
            self._policies(host, upstream.credential, path),
        )  # fmt: skip


def describe_fence(router: Router, fence: Fence) -> list[str]:
    """How a route policy combines with the rest of the config, for `signing-proxy check`."""
    upstream = router.upstreams[fence.upstream]
    if fence.covers is not None:
        return [
            f"  enforced on every request to {fence.upstream} whose path is under {fence.covers} "
            "(in any spelling), whichever route, mode or credential it comes by, together with "
            "the signing credential's own policy"
        ]
    signed = f"signed with credential {fence.credential}" if fence.credential else "unsigned"
    ways = [
        f"route {route.prefix}"
        for route in router.routes
        if route.upstream == fence.upstream
        and (route.credential or upstream.credential) == fence.credential
    ]
    if router.forward_proxy and upstream.credential == fence.credential:
        ways.append(f"forward proxy http://{fence.upstream}/")
    lines = [
        f"  enforced on every request {signed} to {fence.upstream} (strip_prefix reaches any "
        f"path), whichever way it comes ({', '.join(ways)}), together with the credential's own "
        "policy"
    ]
    others = {
        route.credential or upstream.credential or "none (unsigned)"
        for route in router.routes
        if route.upstream == fence.upstream
        and (route.credential or upstream.credential) != fence.credential
    }
    if router.forward_proxy and upstream.credential != fence.credential:
        others.add(upstream.credential or "none (unsigned)")
    if others:
        lines.append(
            f"  warning: {fence.upstream} is also reachable with credential "
            f"{', '.join(sorted(others))}, where this policy does not apply; give those their own "
            "policy, or use a route without strip_prefix"
        )
    return lines
