"""How servers might read a request path, and the paths no reading may turn into something else.

The proxy sends the path exactly as the client wrote it (the signature covers those bytes), but
the upstream, or a gateway in front of it, may read it differently: percent-decode it (once, or
again: ``%252e``), take ``%2F`` or ``\\`` for ``/``, drop ``;parameters`` from a segment
(``..;`` and ``orders;x``), collapse doubled slashes, ignore a trailing slash, resolve ``.`` and
``..``, or ignore letter case. Policies are therefore checked against every such reading
(``readings``), and a path with a dot-segment or a control character in *any* reading is refused
outright (``problem``), because the upstream could execute another path than the one signed.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

__all__ = ["problem", "readings"]

_MAX_DECODE_ROUNDS: Final = 4  # %25252e... deeper than this is refused, not unwrapped
# Spellings of '.', '/' and '\' that some decoders accept besides plain %XX: overlong UTF-8
# (%c0%ae) and IIS's %uXXXX.
_ODD_ESCAPES: Final = re.compile(
    r"%(?:c0%ae|e0%80%ae|c0%af|e0%80%af|c1%9c|u002e|u002f|u005c)", re.I
)
_ODD_MEANING: Final = {
    "c0%ae": ".", "e0%80%ae": ".", "u002e": ".",
    "c0%af": "/", "e0%80%af": "/", "u002f": "/",
    "c1%9c": "\\", "u005c": "\\",
}  # fmt: skip
_SLASHES: Final = re.compile(r"/{2,}")
_PARAMS: Final = re.compile(r";[^/]*")  # a segment's ;parameters, up to the next '/'
_DOTS_ONLY: Final = re.compile(r"\.+[ \t]*")  # '.', '..', '...', '.. ' as a whole segment
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# Nothing that any reading could change: the common case skips the work.
_PLAIN: Final = re.compile(r"[A-Za-z0-9_\-~:@!$&'()*+,=/]*")


def _decode_once(path: str) -> str:
    path = _ODD_ESCAPES.sub(lambda m: _ODD_MEANING[m.group(0)[1:].lower()], path)
    return unquote(path, errors="surrogateescape")


def _decodings(path: str) -> list[str]:
    """The path, then each further percent-decoding of it until nothing changes."""
    found = [path]
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in found[-1]:
            break
        decoded = _decode_once(found[-1])
        if decoded == found[-1]:
            break
        found.append(decoded)
    return found


def _resolve_dots(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/" + "/".join(out)


def readings(path: str) -> set[str]:
    """Every path a server could plausibly take ``path`` for (letter case aside: rules ignore it)."""
    if _PLAIN.fullmatch(path):
        collapsed = _SLASHES.sub("/", path)
        found = {path, collapsed}
        if len(collapsed) > 1 and collapsed.endswith("/"):
            found.add(collapsed.rstrip("/") or "/")
        return found
    found = set()
    for i, decoded in enumerate(_decodings(path)):
        variants = {decoded, decoded.replace("\\", "/")}
        if i:  # a decoded '?' or '#' may end the path for a server that decodes first
            variants |= {re.split(r"[?#]", v, maxsplit=1)[0] for v in variants}
        variants |= {_PARAMS.sub("", v) for v in variants}
        for variant in variants:
            collapsed = _SLASHES.sub("/", variant)
            found |= {variant, collapsed, _resolve_dots(collapsed)}
    for reading in list(found):
        if len(reading) > 1 and reading.endswith("/"):
            found.add(reading.rstrip("/") or "/")
    return found


def problem(path: str) -> str | None:
    """Why ``path`` must not be forwarded, or None: dot-segments or control characters in any
    decoding, or more layers of percent-encoding than any server would undo."""
    if _PLAIN.fullmatch(path):
        return None
    decodings = _decodings(path)
    if "%" in decodings[-1] and _decode_once(decodings[-1]) != decodings[-1]:
        return "the path is percent-encoded more times than any server decodes"
    for decoded in decodings:
        if _CONTROL.search(decoded):
            return "the path contains an encoded control character"
        for variant in {decoded, decoded.replace("\\", "/")}:
            for segment in variant.split("/"):
                if _DOTS_ONLY.fullmatch(segment.split(";", 1)[0]):
                    return (
                        "paths with '.' or '..' segments (in any spelling: %2e, %2f.., \\.., ..;) "
                        "are refused: the upstream could resolve them to a different path than "
                        "the one signed"
                    )
    return None
