"""Logging set-up: one JSON object per line (default) or readable text.

Structured fields travel in ``extra={"fields": {...}}``. The access log (one line per request, logger
name ``signing_proxy.access``) is written by ``AccessLog`` straight to the stream in the same shape:
the logging module's per-record machinery costs ~26 µs a line, which every request would pay.
Callers never pass secrets here; tests check that they don't.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from typing import Any, Final, Literal, TextIO

__all__ = [
    "ACCESS_FIELDS",
    "ACCESS_LOGGER",
    "AccessLog",
    "AccessValues",
    "JsonFormatter",
    "TextFormatter",
    "json_members",
    "setup_logging",
]

ACCESS_LOGGER: Final = "signing_proxy.access"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# What may stand unquoted in a text line: no control or separator characters, quotes or '='.
_TEXT_SAFE: Final = re.compile(r'[^\x00-\x20\x7f-\xa0\u2028\u2029"=\\]+')


def text_value(value: Any) -> str:
    """A field value for a text line: as it is when plain, else JSON-quoted, so control characters
    are escaped and one line stays one line whatever a client put in a path or header."""
    text = value if isinstance(value, str) else str(value)
    return text if _TEXT_SAFE.fullmatch(text) else json.dumps(text)


# json's own C string encoder (ensure_ascii, as json.dumps): quotes and escapes a str.
_json_str: Final = json.encoder.encode_basestring_ascii
_JSON: Final = json.JSONEncoder(
    default=str
)  # built once: json.dumps(default=...) builds one a call
_KEYS: dict[str, str] = {}  # '"name": ' per field name seen (the access log's fixed few)
_MAX_KEYS: Final = 64
_FINITE_MAX: Final = sys.float_info.max
_FINITE_MIN: Final = -sys.float_info.max


def json_members(fields: dict[str, Any]) -> str:
    """``json.dumps(fields, default=str)`` without its braces, about four times as fast for the
    flat str/int/float/None fields of an access line (nested or other values go to json)."""
    parts = []
    for name, value in fields.items():
        key = _KEYS.get(name)
        if key is None:
            key = _json_str(name) + ": "
            if len(_KEYS) < _MAX_KEYS:
                _KEYS[name] = key
        kind = type(value)
        if kind is str:
            parts.append(key + _json_str(value))
        elif value is None:
            parts.append(key + "null")
        elif kind is int:
            parts.append(key + int.__repr__(value))
        elif kind is float and _FINITE_MIN <= value <= _FINITE_MAX:  # json: repr() if finite
            parts.append(key + float.__repr__(value))
        else:  # NaN and infinities (as json writes them), bools, anything else
            parts.append(key + _JSON.encode(value))
    return ", ".join(parts)


# With --workers N: {"worker": index, "pid": pid} on every line, so lines can be told apart.
_PROCESS: dict[str, Any] = {}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    if not _PROCESS:
        return fields if isinstance(fields, dict) else {}
    return {**_PROCESS, **fields} if isinstance(fields, dict) else dict(_PROCESS)


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
        if _CONTROL.search(line):  # a message quoting client input: escape, keep one line
            line = _CONTROL.sub(lambda m: json.dumps(m.group(0))[1:-1], line)
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={text_value(v)}" for k, v in fields.items())
        return line

    def formatException(self, ei: Any) -> str:
        # A traceback can quote local variables' reprs in some tools; keep only the type.
        return f"({ei[0].__name__})" if ei and ei[0] else ""


def setup_logging(
    fmt: Literal["json", "text"] = "json", level: str = "INFO", *, worker: str | None = None
) -> None:
    """``worker``: this process's index under ``--workers``; its lines then name it and the pid."""
    _PROCESS.clear()
    if worker is not None:
        _PROCESS.update(worker=int(worker) if worker.isdigit() else worker, pid=os.getpid())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would duplicate ours, without the fields that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# The fields of a proxied request's access line, in order (request_record.Ledger.finish).
ACCESS_FIELDS: Final = (
    "request_id", "method", "upstream", "route", "path", "credential", "status", "error",
    "bytes_out", "retries", "duration_ms", "upstream_ms", "sign_ms", "client",
)  # fmt: skip
AccessValues = tuple[
    str, str, str, str, str, str | None, int, str | None, int, int, float, float, float, str | None
]


def _opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


class AccessLog:
    """Writes one access-log line per request, shaped like JsonFormatter's or TextFormatter's.

    Lines are buffered and written together at most ``FLUSH_SECONDS`` later (or as soon as
    ``FLUSH_LINES`` are waiting, and at shutdown), like nginx's ``access_log ... buffer=``: a
    write() per request was the largest single cost left on the hot path (~20 µs here).
    """

    FLUSH_SECONDS: Final = 0.1
    FLUSH_LINES: Final = 256

    def __init__(self, fmt: Literal["json", "text"] = "json", stream: TextIO | None = None):
        self._json = fmt == "json"
        self._stream = stream  # None: sys.stderr at write time (follows redirection)
        self._second = -1
        self._stamp = ""
        self._pending: list[str] = []
        # The worker id and pid (--workers), fixed for the process: rendered once, here.
        self._process_json = "".join(
            f", {json.dumps(k)}: {json.dumps(v)}" for k, v in _PROCESS.items()
        )
        self._process_text = "".join(f"{k}={v} " for k, v in _PROCESS.items())
        self._timer: asyncio.TimerHandle | None = None

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def __call__(self, fields: dict[str, Any]) -> None:
        now = time.time()
        if self._json:
            head = f'{{"ts": "{self._timestamp(now)}", "level": "info", "logger": "{ACCESS_LOGGER}", "msg": "request"{self._process_json}'
            line = head + (", " + json_members(fields) + "}" if fields else "}")
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            stamp += f",{int((now % 1) * 1000):03d} INFO    {ACCESS_LOGGER}: request "
            line = (
                stamp
                + self._process_text
                + " ".join(f"{k}={text_value(v)}" for k, v in fields.items())
            )
        self._add(line)

    def request(self, values: AccessValues) -> None:
        """One proxied request's line: ``values`` in ``ACCESS_FIELDS`` order, the same line
        ``self(dict(zip(ACCESS_FIELDS, values)))`` writes, from one template (the per-request
        path: about three times cheaper than the general rendering)."""
        if not self._json:
            self(dict(zip(ACCESS_FIELDS, values, strict=True)))
            return
        (request_id, method, upstream, route, path, credential, status, error, bytes_out,
         retries, duration_ms, upstream_ms, sign_ms, client) = values  # fmt: skip
        q = _json_str
        self._add(
            f'{{"ts": "{self._timestamp(time.time())}", "level": "info", '
            f'"logger": "{ACCESS_LOGGER}", "msg": "request"{self._process_json}, '
            f'"request_id": {q(request_id)}, "method": {q(method)}, "upstream": {q(upstream)}, '
            f'"route": {q(route)}, "path": {q(path)}, "credential": {_opt(credential)}, '
            f'"status": {status:d}, "error": {_opt(error)}, "bytes_out": {bytes_out:d}, '
            f'"retries": {retries:d}, "duration_ms": {duration_ms!r}, '
            f'"upstream_ms": {upstream_ms!r}, "sign_ms": {sign_ms!r}, "client": {_opt(client)}}}'
        )

    def _add(self, line: str) -> None:
        self._pending.append(line)
        if len(self._pending) >= self.FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a caller outside the server): write at once
                self.flush()
            else:
                self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        try:
            stream = self._stream or sys.stderr
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not fail a request
            pass
