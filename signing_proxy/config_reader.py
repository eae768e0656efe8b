"""The field reader every config section is parsed with, and the small values it reads.

``Reader`` knows the config file's name (and who overrode which top-level field), so every problem
becomes one ConfigError naming file and field. ``SecretSource`` (where a secret comes from, never
the secret itself) and ``ListenAddress`` are the values it builds besides plain strings and numbers.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError
from .policy import Policy, PolicyError
from .ratelimit import RateLimit

__all__ = ["ListenAddress", "Reader", "SecretSource"]


@dataclass(frozen=True)
class SecretSource:
    """Where one secret value comes from; ``describe()`` is safe to show, the value is not."""

    field: str  # the config field that named it, e.g. "private_key_env"
    kind: Literal["inline", "env", "file"]
    ref: str  # the inline value, the env var's name, or the file path

    def describe(self) -> str:
        if self.kind == "env":
            return f"env var {self.ref}"
        if self.kind == "file":
            return f"file {self.ref}"
        return f"inline config field '{self.field}'"

    def __repr__(self) -> str:  # never let an inline secret reach a log through repr()
        shown = "<inline>" if self.kind == "inline" else self.ref
        return f"SecretSource({self.field!r}, {self.kind!r}, {shown!r})"


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Reader:
    """Helpers that know the file name, so every error names file and field."""

    def __init__(self, path: Path | None, origins: Mapping[str, str] | None = None):
        self.path = path
        self.base = path.parent if path else Path.cwd()
        self.origins = origins or {}

    def fail(self, where: str, problem: str) -> ConfigError:
        origin = f"{self.path}: " if self.path else ""
        top = where.split(".")[0].split("[")[0]
        setter = f" (set by {self.origins[top]})" if top in self.origins else ""
        return ConfigError(f"{origin}{where}{setter}: {problem}")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def known(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.fail(where, f"unknown field '{key}'{hint}")

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, "expected a non-empty string")
        return value.strip()

    def number(self, value: Any, where: str, *, allow_zero: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.fail(where, "expected a number")
        if value < 0 or (value == 0 and not allow_zero):
            raise self.fail(
                where, "must not be negative" if allow_zero else "must be greater than 0"
            )
        return float(value)

    def count(self, value: Any, where: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"expected a whole number >= {minimum}")
        return value

    def policy(self, value: Any, where: str) -> Policy | None:
        if value is None:
            return None
        data = self.mapping(value, where)
        self.known(data, {"allow", "deny"}, where)
        lists: dict[str, list[str] | None] = {}
        for key in ("allow", "deny"):
            rules = data.get(key)
            if rules is not None and (
                not isinstance(rules, list) or not all(isinstance(r, str) for r in rules)
            ):
                raise self.fail(f"{where}.{key}", 'expected a list of rules like "GET /api/v3/**"')
            lists[key] = rules
        try:
            return Policy.compile(lists["allow"], lists["deny"] or ())
        except PolicyError as exc:
            raise self.fail(where, str(exc)) from None

    def rate_limit(self, value: Any, where: str) -> RateLimit | None:
        if value is None:
            return None
        data = self.mapping(value, where)
        self.known(data, {"rate", "burst"}, where)
        rate = self.number(data.get("rate"), f"{where}.rate")
        burst = self.count(data.get("burst", max(1, math.ceil(rate))), f"{where}.burst", minimum=1)
        return RateLimit(rate, burst)

    def file_path(self, value: Any, where: str) -> Path:
        path = Path(os.path.expanduser(self.string(value, where)))
        return path if path.is_absolute() else self.base / path

    def listen(self, value: Any, where: str) -> ListenAddress:
        text = self.string(str(value) if isinstance(value, int) else value, where)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
            raise self.fail(where, f"expected HOST:PORT, got {text!r}")
        host = host.strip("[]") or "127.0.0.1"
        return ListenAddress(host, int(port))

    def secret(self, data: Mapping[str, Any], base: str, where: str) -> SecretSource | None:
        """One secret from exactly one of BASE, BASE_env, BASE_file."""
        given = [k for k in (base, f"{base}_env", f"{base}_file") if data.get(k) is not None]
        if not given:
            return None
        if len(given) > 1:
            raise self.fail(where, f"give only one of {', '.join(given)}")
        key = given[0]
        if key == base:
            return SecretSource(key, "inline", self.string(data[key], f"{where}.{key}"))
        if key.endswith("_env"):
            return SecretSource(key, "env", self.string(data[key], f"{where}.{key}"))
        return SecretSource(key, "file", str(self.file_path(data[key], f"{where}.{key}")))
