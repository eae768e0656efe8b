"""The header filter (one implementation, on raw bytes) against the rule written out plainly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from signing_proxy.request_headers import filter_request_headers, wire_request_headers

# Names the filter cares about, in odd spellings, plus arbitrary tokens and latin-1 bytes.
NAMES = st.sampled_from(
    [b"Connection", b"connection", b"Keep-Alive", b"X-Foo", b"x-foo", b"Authorization",
     b"CB-ACCESS-SIGN", b"cb_access_key", b"X_CB_ACCESS_KEY", b"X-Wallet-Auth", b"Host",
     b"Content-Length", b"Expect", b"Proxy-Authorization", b"TE", b"Upgrade",
     b"X-Signing-Proxy-Token", b"\xc0-Foo", b"Accept", b"Trailers"]
) | st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b)  # fmt: skip
VALUES = st.sampled_from(
    [b"x-foo", b"close, X-Foo", b" keep-alive ,te", b"\xa0x-foo", b"accept", b"", b"a,,b"]
) | st.binary(max_size=16)


# The rule, spelled out independently of the module: hop-by-hop headers (RFC 9110 §7.6.1), the
# proxy's own credentials and framing, whatever names Connection lists, every spelling of
# CB-ACCESS-* ('_' read as '-'); then Host last.
DROPPED = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "authorization", "host",
    "content-length",
    "expect", "x-signing-proxy-token", "x-wallet-auth",
}  # fmt: skip


def oracle(raw: list[tuple[bytes, bytes]], host: str) -> list[tuple[bytes, bytes]]:
    text = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
    named = {
        token.strip().lower()
        for name, value in text
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }
    kept = []
    for name, value in text:
        lower = name.lower().replace("_", "-")
        if lower in DROPPED or lower in named or lower.startswith(("cb-access-", "x-cb-access-")):
            continue
        kept.append((name.encode("latin-1"), value.encode("latin-1")))
    return [*kept, (b"Host", host.encode("latin-1"))]


@settings(max_examples=400)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=10))
def test_the_filter_keeps_exactly_what_the_rule_keeps(raw: list[tuple[bytes, bytes]]) -> None:
    assert wire_request_headers(raw, "api.coinbase.com") == oracle(raw, "api.coinbase.com")
    # The form aiohttp's client gets (WebSocket and token-exchange relays): the same headers.
    decoded = CIMultiDictProxy(
        CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)
    )
    assert [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in filter_request_headers(decoded, "api.coinbase.com").items()
    ] == oracle(raw, "api.coinbase.com")
