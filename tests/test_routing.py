"""Routing and uri derivation, checked by property: what is sent is what is signed."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signing_proxy.config import parse_config
from signing_proxy.errors import RequestRejected
from signing_proxy.routing import Router, RouteTemplates, prefix_matches, split_target
from signing_proxy.signers import jwt_uri

PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
segment = st.text(alphabet=PCHAR, min_size=1, max_size=12).filter(
    lambda s: s not in {".", ".."}
) | st.builds(lambda b: f"%{b:02X}", st.integers(0, 255))
paths = st.lists(segment, min_size=1, max_size=6).map(lambda segs: "/" + "/".join(segs))
queries = st.text(alphabet=PCHAR + "/?%", max_size=30)


def _router(routes: list[dict[str, Any]] | None = None) -> Router:
    raw = {
        "upstreams": {
            "api.coinbase.com": {},
            "api.developer.coinbase.com": {},
            "advanced-trade-ws.coinbase.com": {},
        },
        "routes": routes
        or [
            {"prefix": "/onramp/", "upstream": "api.developer.coinbase.com"},
            {"prefix": "/ws", "upstream": "advanced-trade-ws.coinbase.com", "strip_prefix": True},
            {"prefix": "/", "upstream": "api.coinbase.com"},
        ],
    }
    return Router(parse_config(raw))


@settings(max_examples=300)
@given(path=paths, query=queries)
def test_uri_never_contains_query_and_path_is_kept_verbatim(path: str, query: str) -> None:
    raw = f"{path}?{query}" if query else path
    try:
        target = _router().resolve(raw)
    except RequestRejected as exc:
        assert exc.code == "bad_path"  # only dot-segment-like paths are refused
        return
    assert target.query == query
    if not prefix_matches("/ws", path):
        assert target.path == path  # percent-encoding and all, byte for byte
    uri = jwt_uri("get", target.upstream.name, target.path)
    assert uri == f"GET {target.upstream.name}{target.path}"
    assert "?" not in uri  # paths here never contain '?', so any '?' would be the query leaking


@settings(max_examples=300)
@given(path=paths, query=queries, scheme=st.sampled_from(["http", "https"]))
def test_absolute_form_sends_the_same_path_as_origin_form(
    path: str, query: str, scheme: str
) -> None:
    raw = f"{path}?{query}" if query else path
    router = _router([{"prefix": "/", "upstream": "api.coinbase.com"}])
    try:
        origin = router.resolve(raw)
    except RequestRejected:
        with pytest.raises(RequestRejected):
            router.resolve(f"{scheme}://api.coinbase.com{raw}")
        return
    absolute = router.resolve(f"{scheme}://api.coinbase.com{raw}")
    assert (absolute.path, absolute.query, absolute.upstream) == (
        origin.path,
        origin.query,
        origin.upstream,
    )


@given(prefix=paths, rest=st.text(alphabet=PCHAR + "/", max_size=10))
def test_prefix_match_is_segment_aware(prefix: str, rest: str) -> None:
    path = prefix + rest
    expected = rest == "" or rest.startswith("/") or prefix.endswith("/")
    assert prefix_matches(prefix, path) is expected


def test_first_matching_route_wins_and_strip_prefix() -> None:
    router = _router()
    assert router.resolve("/onramp/v1/token").upstream.name == "api.developer.coinbase.com"
    assert (
        router.resolve("/onramp").upstream.name == "api.coinbase.com"
    )  # '/onramp/' needs the slash
    ws = router.resolve("/ws")
    assert (ws.upstream.name, ws.path) == ("advanced-trade-ws.coinbase.com", "/")
    assert router.resolve("/ws/x/y?a=1").path == "/x/y"
    assert router.resolve("/wsx").upstream.name == "api.coinbase.com"


@pytest.mark.parametrize(
    "raw",
    [
        "/api/v3/../v2/accounts",
        "/a/./b",
        "/a/%2e%2E/b",
        "/..",
        "/a/%2E",
        "/a b",
        "/a\r\nX: y",
        "api.coinbase.com:443",
    ],
)
def test_refused_targets(raw: str) -> None:
    with pytest.raises(RequestRejected) as info:
        _router().resolve(raw)
    assert info.value.status == 400 and info.value.code == "bad_path"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("http://evil.com/x", "host_not_allowed"),
        ("http://api.coinbase.com:444/x", "host_not_allowed"),
        ("ftp://api.coinbase.com/x", "host_not_allowed"),
        ("http://api.coinbase.com.evil.com/x", "host_not_allowed"),
        ("http://user@evil.com/x", "host_not_allowed"),
    ],
)
def test_absolute_targets_refused(raw: str, code: str) -> None:
    with pytest.raises(RequestRejected) as info:
        _router().resolve(raw)
    assert info.value.status == 403 and info.value.code == code


def test_absolute_target_default_ports_and_case() -> None:
    router = _router()
    for raw in (
        "http://API.Coinbase.com:80/a",
        "https://api.coinbase.com:443/a",
        "http://api.coinbase.com./a",
    ):
        assert router.resolve(raw).upstream.name == "api.coinbase.com"
    assert router.resolve("http://api.coinbase.com").path == "/"
    assert router.resolve("http://api.coinbase.com?x=1").query == "x=1"


def test_route_templates_collapse_ids_and_are_bounded() -> None:
    templates = RouteTemplates(limit=50)
    assert (
        templates("/", "/api/v3/brokerage/accounts/f603f97c-37d7-4e58-b264-c27e9e393dd9")
        == "/api/v3/brokerage/accounts/{id}"
    )
    assert (
        templates("/", "/api/v3/brokerage/products/BTC-USD/ticker")
        == "/api/v3/brokerage/products/{id}/ticker"
    )
    assert templates("/", "/api/v3/brokerage/best_bid_ask") == "/api/v3/brokerage/best_bid_ask"
    assert templates("/", "/v2/accounts/12345/transactions") == "/v2/accounts/{id}/transactions"
    assert templates("/", "/a/b/c/d/e/f/g/h/i/j") == "/a/b/c/d/e/f/g/h/…"


@settings(max_examples=200)
@given(
    st.lists(
        st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8), min_size=1, max_size=4
    )
)
def test_route_labels_stay_within_limit(words: list[str]) -> None:
    templates = RouteTemplates(limit=10)
    labels = {templates("/", f"/{w}/{i}/{w}{w}") for i, w in enumerate(words * 10)}
    labels |= {templates("/", f"/random/{i}") for i in range(100)}
    assert len(labels) <= 11  # 10 templates + the shared {other}


def test_split_target() -> None:
    assert split_target("/a/b?c=d&e") == ("/a/b", "c=d&e")
    assert split_target("/a%2Fb") == ("/a%2Fb", "")


def test_routed_targets_are_kept_in_a_bounded_cache_and_refusals_are_not() -> None:
    router = _router()
    first = router.resolve("/api/v3/brokerage/accounts?limit=1")
    assert router.resolve("/api/v3/brokerage/accounts?limit=1") is first  # routed once
    assert router.resolve("/api/v3/brokerage/accounts?limit=2").query == "limit=2"
    for i in range(5000):  # a client sending ever-new paths cannot grow it without bound
        router.resolve(f"/api/v3/brokerage/orders/{i}")
    assert len(router._targets) <= 4096
    for _ in range(2):  # refused every time, never remembered
        with pytest.raises(RequestRejected):
            router.resolve("/a/%2e%2e/b")
    assert "/a/%2e%2e/b" not in router._targets
