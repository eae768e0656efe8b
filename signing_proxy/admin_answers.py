"""The admin listener's three answers: ``/healthz``, ``/readyz`` and ``/metrics``.

It runs on the same HTTP/1.1 server as the proxy listener (http_server.py), with its own limits,
so a process that relays no WebSocket and calls no Onramp API never loads aiohttp.
``/metrics`` is Prometheus text (or OpenMetrics when the scraper asks for it), gzip-compressed
when the scraper accepts it, and ``?name[]=...`` narrows it to those metric families, as
prometheus-client's own handlers do.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .errors import JSON_CONTENT_TYPE, error_body
from .http_request import Request

__all__ = ["AdminHandler"]

_JSON: Final = [(b"Content-Type", JSON_CONTENT_TYPE.encode())]
_ALLOW: Final = (b"Allow", b"GET, HEAD")
_METHODS: Final = frozenset({"GET", "HEAD"})

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class AdminHandler:
    """The handler the admin listener's HttpServer calls for every request."""

    def __init__(self, readiness: Readiness, exposition: CollectorRegistry):
        self._readiness = readiness
        self._exposition = exposition

    async def __call__(self, request: Request) -> None:
        path, _, query = request.target.partition("?")
        if path not in ("/healthz", "/readyz", "/metrics"):
            await _error(request, 404, "not_found", f"no such admin path {path[:100]!r}")
        elif request.method not in _METHODS:
            await _error(request, 405, "method_not_allowed", "the admin paths take GET", [_ALLOW])
        elif path == "/healthz":
            await _json(request, 200, {"status": "ok", "pid": os.getpid()})
        elif path == "/readyz":
            ready, body = self._readiness()
            await _json(request, 200 if ready else 503, body)
        else:
            await self._metrics(request, query)

    async def _metrics(self, request: Request, query: str) -> None:
        accept = b",".join(request.values(b"accept")).decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        registry: Any = self._exposition
        names = parse_qs(query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        output = encoder(registry)
        headers = [(b"Content-Type", content_type.encode("latin-1"))]
        encodings = b",".join(request.values(b"accept-encoding")).decode("latin-1")
        if gzip_accepted(encodings):
            output = gzip.compress(output)
            headers.append((b"Content-Encoding", b"gzip"))
        headers.append((b"Vary", b"Accept, Accept-Encoding"))
        await request.respond(200, "OK", headers, output)


async def _json(request: Request, status: int, data: dict[str, Any]) -> None:
    reason = "OK" if status == 200 else "Service Unavailable"
    await request.respond(status, reason, _JSON, json.dumps(data).encode())


async def _error(
    request: Request,
    status: int,
    code: str,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    reason = "Not Found" if status == 404 else "Method Not Allowed"
    await request.respond(status, reason, [*_JSON, *(extra or [])], error_body(code, message))
