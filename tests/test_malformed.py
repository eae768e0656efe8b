"""Requests the listener's parser refuses: one concise WARNING per kind (rate limited) and a
counter, never an ERROR with a traceback per request (any client could flood the log)."""

from __future__ import annotations

import logging

import pytest

from signing_proxy.app import ProxyServer
from signing_proxy.malformed import MalformedRequestFilter

from .helpers import metric, raw_exchange

DUPLICATE_LENGTH = (
    b"GET /api/v3/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
)
CONTROL_IN_TARGET = b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n"
LONG_LINE = b"GET /api/v3/x HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
LOWER_CASE_METHOD = b"get /api/v3/x HTTP/1.1\r\nHost: a\r\n\r\n"


async def test_parser_refusals_are_one_warning_per_kind_and_counted(
    proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # kind: the error code the listener's server answered with (http_server.py refuses these
    # itself, before the proxy's handler runs).
    sent = {"bad_request": [DUPLICATE_LENGTH] * 3 + [CONTROL_IN_TARGET] * 2 + [LONG_LINE]}
    sent["bad_method"] = [LOWER_CASE_METHOD]
    for requests in sent.values():
        for request in requests:
            answer = await raw_exchange(proxy.port(0), request)
            assert answer.startswith(b"HTTP/1.1 400")
    for kind, requests in sent.items():
        assert metric(proxy, "signing_proxy_malformed_requests_total", kind=kind) == len(requests)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no ERROR, no traceback
    warnings = [r for r in caplog.records if r.name == "signing_proxy.malformed"]
    assert sorted(r.fields["kind"] for r in warnings) == sorted(sent)  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)


def test_a_kind_warns_again_after_the_interval_saying_how_many_were_suppressed() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    now = [0.0]
    counted: list[str] = []
    flt = MalformedRequestFilter(counted.append, interval=60, clock=lambda: now[0])
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    logger = logging.getLogger("signing_proxy.malformed")
    logger.addHandler(handler)
    try:
        exc = BadHttpMessage("bad")
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
            ("10.0.0.1",), (type(exc), exc, None),
        )  # fmt: skip
        results = []
        for at in (0.0, 1.0, 59.0, 61.0):
            now[0] = at
            results.append(flt.filter(record))
        other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "x", (), None)
        assert flt.filter(other) is True  # anything else passes untouched
    finally:
        logger.removeHandler(handler)
    assert results == [False] * 4 and counted == ["BadHttpMessage"] * 4
    assert [getattr(r, "fields", {}).get("suppressed") for r in logged] == [None, 2]
