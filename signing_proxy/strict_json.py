"""JSON read strictly, for bodies whose meaning the proxy must be sure of before it signs or relays.

Parsers disagree on an object with a key twice (first wins, last wins, error), so such a body could
mean one thing to a policy check here and another to the upstream: ``loads`` refuses it with
``DuplicateKey``. Everything else is ``json``'s own grammar.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["DuplicateKey", "loads"]


class DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("a JSON object has a key twice")
    return found


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique)  # built once: json.loads(**kw) is not


def loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (``DuplicateKey``, a ValueError)."""
    return _DECODER.decode(text)
