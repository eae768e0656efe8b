"""Allow/deny rules on method + path, per credential or per route, checked before signing.

A rule is ``"METHOD /path/glob"`` (``*`` for any method, or the glob alone). In the glob, ``*``
matches within one path segment and ``**`` matches any number of segments (``/api/v3/**`` matches
``/api/v3`` and everything under it). The query string is not part of the match.

Deny wins. If an allow list is given, anything it does not match is denied.

Servers do not all read a path the same way, so a rule is checked against every reading of the
path a server might plausibly make (``paths.readings``: percent-decoded once or more, ``%2F`` and
``\\`` as ``/``, ``;parameters`` dropped, repeated slashes collapsed, a trailing slash dropped,
dot-segments resolved), in any letter case. A request is denied if *any* reading matches a deny
rule, and allowed only if *every* reading matches an allow rule. A ``GET`` rule covers ``HEAD``
too: HEAD answers with GET's headers, so it reveals what GET would.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .paths import readings as path_readings

__all__ = ["Policy", "PolicyError", "Rule", "path_readings"]

_METHOD: Final = re.compile(r"[A-Z]{1,16}|\*")


class PolicyError(ValueError):
    """A rule that cannot be compiled; config.py turns it into a ConfigError naming the field."""


def _glob_to_regex(glob: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("/**", i) and (i + 3 == len(glob) or glob[i + 3] == "/"):
            out.append("(?:/.*)?")  # a whole '**' segment: zero or more segments
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out), re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    text: str  # as written in the config, for messages
    method: str  # upper case, or "*"
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Rule:
        parts = text.split()
        if len(parts) == 1:
            method, glob = "*", parts[0]
        elif len(parts) == 2:
            method, glob = parts[0].upper(), parts[1]
        else:
            raise PolicyError(f"rule {text!r}: expected 'METHOD /path/glob' or '/path/glob'")
        if not _METHOD.fullmatch(method):
            raise PolicyError(f"rule {text!r}: {parts[0]!r} is not an HTTP method or '*'")
        if not glob.startswith("/"):
            raise PolicyError(f"rule {text!r}: the path glob must start with '/'")
        if "?" in glob:
            raise PolicyError(f"rule {text!r}: rules match the path only; drop the query")
        return cls(text, method, _glob_to_regex(glob))

    def matches(self, method: str, path: str) -> bool:
        applies = self.method in ("*", method) or (self.method == "GET" and method == "HEAD")
        return applies and bool(self.pattern.fullmatch(path))


@dataclass(frozen=True)
class Policy:
    allow: tuple[Rule, ...] | None  # None: everything not denied is allowed
    deny: tuple[Rule, ...]

    def describe(self) -> str:
        """The rules as configured, for `signing-proxy check`."""
        allow = (
            "everything not denied" if self.allow is None else ", ".join(r.text for r in self.allow)
        )
        deny = ", ".join(r.text for r in self.deny) or "nothing"
        return f"allow {allow}; deny {deny}"

    @classmethod
    def compile(cls, allow: Sequence[str] | None, deny: Iterable[str] = ()) -> Policy:
        return cls(
            tuple(Rule.parse(r) for r in allow) if allow is not None else None,
            tuple(Rule.parse(r) for r in deny),
        )

    def denial(self, method: str, path: str) -> str | None:
        """Why this request is refused, or None when it is allowed."""
        method = method.upper()
        readings = path_readings(path)
        for rule in self.deny:
            if any(rule.matches(method, p) for p in readings):
                return f"denied by rule {rule.text!r}"
        if self.allow is not None:
            for p in readings:
                if not any(rule.matches(method, p) for rule in self.allow):
                    return "not matched by any allow rule"
        return None
