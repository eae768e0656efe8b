"""The docs keep their promises: every relative link and anchor resolves, and every curl example
reaches the host the README says it does, under both example configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from signing_proxy.config import load_config, parse_config
from signing_proxy.errors import RequestRejected
from signing_proxy.routing import Router

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
CONFIGS = [ROOT / "config.example.yaml", ROOT / "deploy" / "config.yaml"]
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_HOST = re.compile(r"`([a-z0-9.-]+\.coinbase\.com)`")
_PREFIX = re.compile(r"`(/[^`\s]*)`")
_CLAIM = re.compile(r"#\s*→\s*([a-z0-9.-]+)")  # an explicit claim: `curl ... # → host`
# Answered by the proxy itself (when `topper:` is configured), not routed to an upstream.
_LOCAL = ("/topper/",)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for line in text.splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = _slug(m[1])
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    broken = []
    for target in _LINK.findall(text):
        if urlsplit(target).scheme:  # https:, mailto:: not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / unquote(path)).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: {file} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def _claims() -> list[tuple[str, str]]:
    """(path prefix, host) from the README's "Supported Coinbase APIs" table, longest first."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Supported Coinbase APIs", 1)[1].split("\n## ", 1)[0]
    claims = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not (hosts := _HOST.findall(cells[2])) or len(hosts) != 1:
            continue
        claims.extend((prefix, hosts[0]) for prefix in _PREFIX.findall(cells[3]))
    assert claims, "the README lost its API table"
    return sorted(claims, key=lambda c: -len(c[0]))


def _curls() -> list[tuple[Path, str]]:
    """(doc, command) for every curl command in a code block of the README and docs/."""
    found = []
    for doc in DOCS:
        for block in _FENCE.findall(doc.read_text(encoding="utf-8")):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                if line.lstrip().startswith("curl "):
                    found.append((doc, line.strip()))
    return found


def _routers(doc: Path) -> dict[str, Router]:
    """The example configs, plus what the page itself configures: a page for an optional API
    (venues, derivatives) shows the upstreams and routes its curl examples rely on."""
    page: dict[str, Any] = {"credentials": {}, "upstreams": {}, "routes": []}
    for block in re.findall(r"^```yaml\n(.*?)^```", doc.read_text(encoding="utf-8"), re.M | re.S):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and ("upstreams" in data or "routes" in data):
            for key in ("credentials", "upstreams"):
                page[key].update(data.get(key) or {})
            page["routes"].extend(data.get("routes") or [])
    routers = {}
    for config in CONFIGS:
        if not page["upstreams"] and not page["routes"]:
            routers[config.name] = Router(load_config(config))
            continue
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        raw["credentials"] = {**(raw.get("credentials") or {}), **page["credentials"]}
        # Only where requests go is checked: a page's credential names need not exist here.
        upstreams = {
            host: {k: v for k, v in (entry or {}).items() if k not in ("credential", "auth")}
            for host, entry in page["upstreams"].items()
        }
        raw["upstreams"] = {**raw["upstreams"], **upstreams}
        raw["routes"] = [*page["routes"], *raw.get("routes", [])]
        routers[config.name] = Router(parse_config(raw, config))
    return routers


def _expected(url: str, proxy: str | None, comment: str, claims: list[tuple[str, str]]) -> str:
    claim = _CLAIM.search(comment)
    if proxy is not None:  # forward-proxy mode: the URL names the host
        host = urlsplit(url).hostname or ""
        assert claim is None or claim[1] == host
        return host
    if claim:
        return claim[1]
    path = urlsplit(url).path
    for prefix, host in claims:
        if path.startswith(prefix):
            return host
    raise AssertionError(f"{url}: no prefix in the README's API table says where it goes")


def test_every_curl_example_reaches_the_host_it_claims() -> None:
    claims = _claims()
    checked = 0
    problems = []
    for doc, line in _curls():
        where, routers = doc.name, _routers(doc)
        command, _, comment = line.partition(" #")
        proxy_flag = re.search(r"(?:-x|--proxy)\s+['\"]?(http://[^\s'\"]+)", command)
        proxy = proxy_flag[1] if proxy_flag else None
        urls = [u for u in re.findall(r"http://[^\s'\"]+", command) if u != proxy]
        for url in urls:
            parts = urlsplit(url)
            if proxy is None and parts.port != 8080:  # not through the proxy (admin, Coinbase)
                continue
            if any(parts.path.startswith(p) for p in _LOCAL):
                continue
            expected = _expected(url, proxy, "#" + comment, claims)
            target = (
                url
                if proxy is not None
                else parts.path + (f"?{parts.query}" if parts.query else "")
            )
            for name, router in routers.items():
                try:
                    got = router.resolve(target).upstream.name
                except RequestRejected as exc:
                    got = f"refused ({exc.code})"
                if got != expected:
                    problems.append(f"{where}: {line}\n  under {name}: {got}, claimed {expected}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 5, checked  # the quick start's examples at least


def test_docs_named_in_code_and_manifests_exist() -> None:
    """Comments cite docs/<page>.md (not notes outside the repo); each page must exist."""
    sources = [ROOT / "config.example.yaml", ROOT / "Makefile", ROOT / ".ci" / "run"]
    for folder in ("signing_proxy", "tests", "deploy", "bench"):
        sources.extend(
            p
            for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".yaml", ".json")
            and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
        )  # not git-ignored venvs and work folders (bench/.venv-*, bench/.work)
    missing = set()
    for path in sources:
        if path == Path(__file__):  # names the notes it forbids
            continue
        text = path.read_text(encoding="utf-8")
        assert "COINBASE_AUTH" not in text and "CONTRACT.md" not in text, path
        missing.update(
            f"{path.relative_to(ROOT)}: {ref}"
            for ref in re.findall(r"docs/[\w-]+\.md", text)
            if not (ROOT / ref).is_file()
        )
    assert not missing, "\n".join(sorted(missing))
