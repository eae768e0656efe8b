"""Key rotation without restart: changed key files are picked up within seconds, broken ones keep
the last good key, missing ones become ready when they appear. Includes the Kubernetes Secret
volume layout, whose files are symlinks through an atomically swapped ``..data`` link."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signing_proxy.config import CredentialConfig, SecretSource
from signing_proxy.credentials import CredentialStore, CredentialWatcher, FileState
from signing_proxy.errors import CredentialError

from .conftest import EC_KEY_NAME, MakeProxy, ec_pem
from .helpers import admin, base, fetch, metric, wait_for
from .upstream import VerifyingUpstream

NEW_KEY_NAME = "organizations/0f6c7b5e-org/apiKeys/rotated-key-0002"
ROTATION_DEADLINE = 5.0


class SecretVolume:
    """A Kubernetes Secret volume: ``..<ts>/file``, ``..data -> ..<ts>``, ``file -> ..data/file``."""

    def __init__(self, root: Path, filename: str = "cdp_api_key.json"):
        self.root = root
        self.filename = filename
        self.generation = 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.root / self.filename

    def publish(self, content: str) -> None:
        """What the kubelet does: write a new timestamped dir, then swap ..data in one rename."""
        self.generation += 1
        new_dir = self.root / f"..2026_01_01_00_00_{self.generation:02d}.000000001"
        new_dir.mkdir()
        (new_dir / self.filename).write_text(content)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(new_dir.name)
        tmp_link.rename(self.root / "..data")  # atomic
        if not self.path.is_symlink():
            self.path.symlink_to(Path("..data") / self.filename)
        if old is not None:
            for child in (self.root / old).iterdir():
                child.unlink()
            (self.root / old).rmdir()


def key_json(name: str, key: ec.EllipticCurvePrivateKey) -> str:
    return json.dumps({"name": name, "privateKey": ec_pem(key)})


async def _kid(client: aiohttp.ClientSession, proxy: Any, upstream: VerifyingUpstream) -> str:
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 200, (data, upstream.rejections)
    kid = upstream.received[-1].jwt_header["kid"]
    assert isinstance(kid, str)
    return kid


async def _wait_kid(
    client: aiohttp.ClientSession, proxy: Any, upstream: VerifyingUpstream, kid: str
) -> float:
    """Send requests until they are signed with ``kid``; the seconds that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen = ""
    while loop.time() - start < ROTATION_DEADLINE:
        seen = await _kid(client, proxy, upstream)
        if seen == kid:
            return loop.time() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"still signing with {seen!r} after {ROTATION_DEADLINE}s")


async def test_kubernetes_secret_volume_rotation(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO)
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(key_json(EC_KEY_NAME, ec_key))
    config_dict["credentials"]["trading"] = {"key_file": str(volume.path)}
    proxy = await make_proxy(config_dict)
    assert await _kid(client, proxy, upstream) == EC_KEY_NAME
    first_load = metric(
        proxy, "signing_proxy_credential_last_reload_timestamp_seconds", credential="trading"
    )
    assert first_load > 0

    new_key = ec.generate_private_key(ec.SECP256R1())
    upstream.keys[NEW_KEY_NAME] = new_key.public_key()
    volume.publish(key_json(NEW_KEY_NAME, new_key))
    took = await _wait_kid(client, proxy, upstream, NEW_KEY_NAME)
    assert took < ROTATION_DEADLINE
    assert upstream.rejections == []  # every request in between was signed by a valid key
    assert metric(proxy, "signing_proxy_credential_loaded", credential="trading") == 1
    assert (
        metric(
            proxy, "signing_proxy_credential_last_reload_timestamp_seconds", credential="trading"
        )
        >= first_load
    )
    assert metric(proxy, "signing_proxy_credential_reload_errors_total", credential="trading") == 0
    assert any(r.getMessage().startswith("credential reloaded") for r in caplog.records)


async def test_broken_new_key_keeps_last_good_key_and_says_so_without_secrets(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "cdp_api_key.json"
    key_file.write_text(key_json(EC_KEY_NAME, ec_key))
    config_dict["credentials"]["trading"] = {"key_file": str(key_file)}
    proxy = await make_proxy(config_dict)
    assert await _kid(client, proxy, upstream) == EC_KEY_NAME

    # A half-written rotation: the PEM is cut short, so it cannot be parsed.
    new_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_pem(new_key)
    broken = json.dumps({"name": NEW_KEY_NAME, "privateKey": pem[: len(pem) // 2]})
    key_file.write_text(broken)
    await wait_for(
        lambda: (
            metric(proxy, "signing_proxy_credential_reload_errors_total", credential="trading") == 1
        ),
        within=ROTATION_DEADLINE,
        what="reload error counted",
    )
    assert metric(proxy, "signing_proxy_credential_loaded", credential="trading") == 1
    assert await _kid(client, proxy, upstream) == EC_KEY_NAME  # the last good key, still working
    status, ready, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 200 and ready is not None and ready["ready"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "keeping the last good key" in errors[-1].getMessage()
    fields = errors[-1].fields  # type: ignore[attr-defined]
    assert fields["credential"] == "trading" and str(key_file) in fields["problem"]
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for line in pem.splitlines()[1:-1]:
        assert line[:20] not in logged

    # Fixed: the new key is picked up.
    upstream.keys[NEW_KEY_NAME] = new_key.public_key()
    key_file.write_text(key_json(NEW_KEY_NAME, new_key))
    await _wait_kid(client, proxy, upstream, NEW_KEY_NAME)
    assert metric(proxy, "signing_proxy_credential_reload_errors_total", credential="trading") == 1


async def test_credential_missing_at_start_becomes_ready_when_its_file_appears(
    make_proxy: MakeProxy, config_dict: dict[str, Any], client: aiohttp.ClientSession,
    upstream: VerifyingUpstream, tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
) -> None:  # fmt: skip
    key_file = tmp_path / "later" / "cdp_api_key.json"
    config_dict["credentials"]["trading"] = {"key_file": str(key_file)}
    proxy = await make_proxy(config_dict)
    status, data, _, _ = await fetch(client, "GET", f"{base(proxy)}/api/v3/brokerage/accounts")
    assert status == 503 and data is not None and data["error"] == "credential_unavailable"
    status, _, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 503
    assert metric(proxy, "signing_proxy_credential_loaded", credential="trading") == 0

    key_file.parent.mkdir()
    key_file.write_text(key_json(EC_KEY_NAME, ec_key))
    await wait_for(
        lambda: metric(proxy, "signing_proxy_credential_loaded", credential="trading") == 1,
        within=ROTATION_DEADLINE,
        what="credential loaded",
    )
    status, _, _, _ = await fetch(client, "GET", f"{admin(proxy)}/readyz")
    assert status == 200
    assert await _kid(client, proxy, upstream) == EC_KEY_NAME


# --- the watcher itself, without sleeping ----------------------------------------------------------


def test_hmac_secret_file_rotation_and_unchanged_files_are_not_reloaded(tmp_path: Path) -> None:
    secret = tmp_path / "api_secret"
    secret.write_text("first-secret")
    cfg = CredentialConfig(
        "legacy",
        "hmac",
        api_key=SecretSource("api_key", "inline", "k"),
        api_secret=SecretSource("api_secret_file", "file", str(secret)),
    )
    store = CredentialStore({"legacy": cfg}, clock=lambda: 1700000000.0)
    assert store.load_all() == []
    reloads: list[tuple[str, CredentialError | None]] = []
    watcher = CredentialWatcher(store, lambda c, e: reloads.append((c.name, e)))
    before = store.signer("legacy").sign("GET", "h", "/p", "", b"")

    assert watcher.poll() == []  # nothing changed: nothing re-read or re-parsed
    secret.write_text("second-secret")
    assert watcher.poll() == ["legacy"] and reloads == [("legacy", None)]
    after = store.signer("legacy").sign("GET", "h", "/p", "", b"")
    assert after["CB-ACCESS-SIGN"] != before["CB-ACCESS-SIGN"]
    assert watcher.poll() == []


def test_same_size_same_mtime_edit_is_still_seen(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("aaaa")
    before = FileState.of(path)
    stat = path.stat()
    path.write_text("bbbb")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime, same inode
    after = FileState.of(path)
    assert after.stat == before.stat and after != before
    assert FileState.of(tmp_path / "missing") == FileState(None)


def test_failed_load_is_not_retried_until_the_file_changes_again(tmp_path: Path) -> None:
    key_file = tmp_path / "k.json"
    key_file.write_text("{not json")
    store = CredentialStore({"c": CredentialConfig("c", "cdp", key_file=key_file)})
    assert len(store.load_all()) == 1
    reloads: list[CredentialError | None] = []
    watcher = CredentialWatcher(store, lambda c, e: reloads.append(e))
    assert watcher.poll() == []  # still the same broken file: no error storm
    key_file.write_text("{still not json")
    assert watcher.poll() == ["c"]
    assert len(reloads) == 1 and isinstance(reloads[0], CredentialError)
    assert store["c"].signer is None
