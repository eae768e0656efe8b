"""Which of a client's request headers go upstream: header hygiene for every relay.

The REST relay (relay.py), the token-exchange relay (token_relay.py) and the WebSocket relay
(websocket.py) send the client's headers minus the hop-by-hop ones (RFC 9110 §7.6.1), minus
those a Connection header names, and minus every header the proxy owns (authentication and
framing), whatever its spelling; Host becomes the upstream's name. ``wire_request_headers`` is
the one filter (on the bytes as received, for the REST hot path); ``filter_request_headers`` is
the same for aiohttp's client.
"""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from .answer import HOP_BY_HOP, connection_names_raw, fold_name

__all__ = [
    "END_TO_END",
    "filter_request_headers",
    "wire_request_headers",
]

# Never forwarded from the client: the proxy owns authentication and framing.
_REQUEST_DROP: Final = HOP_BY_HOP | {
    "authorization",
    "host",
    "content-length",
    "expect",
    "x-signing-proxy-token",
}
# Request headers a client may not name in Connection: they describe the body or the target for
# every recipient (RFC 9110 §7.6.1), so dropping them would change what the upstream executes.
END_TO_END: Final = frozenset(
    {"content-length", "content-encoding", "content-type", "content-range", "host", "expect"}
)
# Owned by the proxy whatever the spelling: some servers read '_' as '-' (CGI, WSGI), so
# CB_ACCESS_SIGN must not slip past a filter on CB-ACCESS-*.
_OWNED_PREFIXES: Final = ("cb-access-", "x-cb-access-")
_OWNED: Final = _REQUEST_DROP | {"x-wallet-auth"}

_OWNED_RAW: Final = frozenset(name.encode() for name in _OWNED)
_OWNED_PREFIXES_RAW: Final = tuple(prefix.encode() for prefix in _OWNED_PREFIXES)


def wire_request_headers(raw: list[tuple[bytes, bytes]], host: str) -> list[tuple[bytes, bytes]]:
    """``filter_request_headers`` on the bytes as received (the hot path): the same headers
    dropped, the rest byte for byte in their order, then ``Host: host``."""
    lowered = [(fold_name(name), name, value) for name, value in raw]
    named: frozenset[bytes] = frozenset()
    for lower, _, value in lowered:
        if lower == b"connection":
            named |= connection_names_raw(value)
    out = []
    for lower, name, value in lowered:
        if b"_" in lower:
            lower = lower.replace(b"_", b"-")
        if lower in _OWNED_RAW or lower in named or lower.startswith(_OWNED_PREFIXES_RAW):
            continue
        out.append((name, value))
    out.append((b"Host", host.encode("latin-1")))
    return out


def filter_request_headers(headers: CIMultiDictProxy[str], host: str) -> CIMultiDict[str]:
    """Client headers fit to send upstream: no hop-by-hop, no client auth, Host = upstream name
    (``wire_request_headers`` on the latin-1 text, for aiohttp's client)."""
    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return CIMultiDict(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in wire_request_headers(raw, host)
    )
