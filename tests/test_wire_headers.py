"""The hot path's header filter on raw bytes drops exactly what the str filter drops."""

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
     b"X-Signing-Proxy-Token", b"\xc0-Foo", b"Accept"]
) | st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b)  # fmt: skip
VALUES = st.sampled_from(
    [b"x-foo", b"close, X-Foo", b" keep-alive ,te", b"\xa0x-foo", b"accept", b"", b"a,,b"]
) | st.binary(max_size=16)


@settings(max_examples=400)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=10))
def test_raw_filter_matches_the_str_filter_byte_for_byte(raw: list[tuple[bytes, bytes]]) -> None:
    decoded = CIMultiDictProxy(
        CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)
    )
    expected = [
        (n.encode("latin-1"), v.encode("latin-1"))
        for n, v in filter_request_headers(decoded, "api.coinbase.com").items()
    ]
    assert wire_request_headers(raw, "api.coinbase.com") == expected
