"""Malformed requests the HTTP parsers refuse: one short WARNING per kind, and a count.

The proxy listener's own server reports its refusals through ``refused(kind, status)`` (kind: the
error code it answered, e.g. ``bad_request``, ``headers_too_large``). On the admin listener:

aiohttp answers such a request with a plain 400 before any proxy code runs, and logs
``aiohttp.server`` ERROR "Error handling request" with a whole traceback each time: any client
could fill the error log. ``MalformedRequestFilter`` sits on that logger, drops those records,
counts each in ``signing_proxy_malformed_requests_total{kind}`` (kind: the parser's exception
class, a bounded set) and logs at most one concise WARNING per kind every ``INTERVAL`` seconds,
saying how many were suppressed since. Every other aiohttp.server record passes unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ["SERVER_LOGGER", "MalformedRequestFilter"]

SERVER_LOGGER: Final = "aiohttp.server"
INTERVAL: Final = 60.0  # seconds between two warnings of the same kind

log = logging.getLogger(__name__)


class MalformedRequestFilter(logging.Filter):
    def __init__(
        self,
        count: Callable[[str], None],
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__()
        self._count = count
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}  # kind -> when its last warning was written
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # Records of this logger exist only once aiohttp is loaded (a WebSocket was relayed).
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True  # not a parser refusal: aiohttp's record as it is
        client = record.args[0] if isinstance(record.args, tuple) and record.args else None
        self.refused(type(exc).__name__, exc.code or 400, client)
        return False

    def refused(self, kind: str, status: int, client: object = None) -> None:
        """Count one refusal of ``kind``; warn unless that kind warned within the interval."""
        self._count(kind)
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        fields: dict[str, object] = {"kind": kind, "status": status}
        if client is not None:
            fields["client"] = client
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        log.warning(
            "malformed request refused by the HTTP parser (at most one line per kind a minute)",
            extra={"fields": fields},
        )
