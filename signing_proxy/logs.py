"""Logging set-up: one JSON object per line (default) or readable text.

Structured fields travel in ``extra={"fields": {...}}``. The access log (one line per request, logger
name ``signing_proxy.access``) is written by ``AccessLog`` straight to the stream in the same shape:
the logging module's per-record machinery costs ~26 µs a line, which every request would pay.
Callers never pass secrets here; tests check that they don't.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, Literal, TextIO

__all__ = ["ACCESS_LOGGER", "AccessLog", "JsonFormatter", "TextFormatter", "setup_logging"]

ACCESS_LOGGER: Final = "signing_proxy.access"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line

    def formatException(self, ei: Any) -> str:
        # A traceback can quote local variables' reprs in some tools; keep only the type.
        return f"({ei[0].__name__})" if ei and ei[0] else ""


def setup_logging(fmt: Literal["json", "text"] = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would duplicate ours, without the fields that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class AccessLog:
    """Writes one access-log line per request, shaped like JsonFormatter's or TextFormatter's."""

    def __init__(self, fmt: Literal["json", "text"] = "json", stream: TextIO | None = None):
        self._json = fmt == "json"
        self._stream = stream  # None: sys.stderr at write time (follows redirection)
        self._second = -1
        self._stamp = ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def __call__(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if self._json:
            head = f'{{"ts": "{self._timestamp(now)}", "level": "info", "logger": "{ACCESS_LOGGER}", "msg": "request"'
            line = head + (", " + json.dumps(fields, default=str)[1:] if fields else "}")
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            stamp += f",{int((now % 1) * 1000):03d} INFO    {ACCESS_LOGGER}: request "
            line = stamp + " ".join(f"{k}={v}" for k, v in fields.items())
        try:  # noqa: SIM105 - cheaper than contextlib.suppress on a per-request path
            (self._stream or sys.stderr).write(line + "\n")
        except (OSError, ValueError):  # a closed or broken stream must not fail the request
            pass
