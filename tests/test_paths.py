"""paths.py: the readings a server could make of a path, and the paths refused outright."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signing_proxy.paths import problem, readings


@pytest.mark.parametrize(
    "path",
    [
        "/a/%2e%2e/b", "/a/%2E./b", "/a/.%2e", "/a%2f..%2fb", "/a%5C..%5Cb", "/a\\..\\b",
        "/a/..;/b", "/a/..%3B/b", "/a/%252e%252e/b", "/a/%25252e%25252e/b", "/a/%c0%ae%c0%ae/b",
        "/a/%e0%80%ae./b", "/a/%u002e%u002e/b", "/a/.%20/b", "/a/...", "/a/./b", "/a/%2e",
        "/a/%00", "/a/%0a", "/a/%7f", "/a/%2525252e",
    ],
)  # fmt: skip
def test_refused_spellings(path: str) -> None:
    assert problem(path) is not None


@pytest.mark.parametrize(
    "path",
    ["/", "/api/v3/brokerage/accounts", "/a..b/c", "/a/.b", "/a/b.", "/a%2Fb", "/a;x=1/b", "/%41"],
)
def test_ordinary_paths_pass(path: str) -> None:
    assert problem(path) is None


def test_readings_cover_what_servers_do() -> None:
    found = readings("/api/V3//brokerage/%6frders;jsessionid=1/")
    assert "/api/V3/brokerage/orders" in found
    assert "/api/v3/x" in readings("/api/v3/x%3Fy=1") | readings("/api/v3\\x")
    assert "/api/v3/x" in readings("/api/v3\\x")
    assert "/a/orders" in readings("/a/%256frders")


segments = st.lists(
    st.one_of(
        st.sampled_from(
            [".", "..", "%2e", "%2E%2e", "x", "orders", "%2f", "%5c", ";p", "%3b", "%25"]
        ),
        st.text(alphabet="ab.%25;/\\", max_size=6),
    ),
    max_size=6,
)


@settings(deadline=None)  # pure CPU; a loaded machine must not fail it
@given(segments)
def test_an_accepted_path_has_no_dot_segment_in_any_decoding(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    if problem(path) is not None:
        return
    text = path
    for _ in range(5):  # however many times a server decodes it, and however it reads '\' and ';'
        for variant in (text, text.replace("\\", "/")):
            for segment in variant.split("/"):
                assert segment.split(";")[0].strip(" ") not in (".", ".."), path
        text = unquote(text)
