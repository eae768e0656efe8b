"""A safety net under aiohttp's server: a connection whose aiohttp task died is answered and closed.

aiohttp (3.14.5, found by tests/test_fuzz.py) can crash the per-connection task before any
handler runs: the request line ``CONNECT  `` (no target) leaves the parsed URL unset and
``web.Request()`` fails on it. The connection is then neither answered nor closed, and keeps its
file descriptor until the client leaves: any client could exhaust the proxy's descriptors. Once a
second, this closes such connections with a plain 400, so nothing waits on them.

It reads ``RequestHandler._task_handler``, aiohttp's own attribute for that task; the tests in
tests/test_hostile.py fail if that ever stops working.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from .errors import error_body

__all__ = ["reap_orphans"]

log = logging.getLogger(__name__)

_BODY: Final = error_body("bad_request", "the request could not be parsed")
_ANSWER: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


def close_orphans(server: web.Server) -> int:
    """One pass: answer and close every connection whose aiohttp task has ended but left it open."""
    closed = 0
    for handler in server.connections:
        task = getattr(handler, "_task_handler", None)
        transport = handler.transport
        if task is None or not task.done() or transport is None or transport.is_closing():
            continue
        error = None if task.cancelled() else task.exception()  # retrieved: no asyncio warning
        # The task died before answering this request (earlier ones on the connection were
        # answered in full), so nothing is half-written: a whole response can go out.
        transport.write(_ANSWER)
        transport.close()
        closed += 1
        log.warning(
            "closed a connection whose aiohttp task crashed",
            extra={"fields": {"exc_type": type(error).__name__ if error else "cancelled"}},
        )
    return closed


async def reap_orphans(runner: web.BaseRunner, *, interval: float = 1.0) -> None:
    """Run ``close_orphans`` on the runner's server every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        server = runner.server
        if server is not None:
            close_orphans(server)
