"""Logging set-up: one JSON object per line (default) or readable text.

Structured fields travel in ``extra={"fields": {...}}``; the access log puts one line per request on
the ``signing_proxy.access`` logger. Callers never pass secrets here; tests check that they don't.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, Literal

__all__ = ["ACCESS_LOGGER", "JsonFormatter", "TextFormatter", "setup_logging"]

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
