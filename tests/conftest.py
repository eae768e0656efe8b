"""Shared fixtures: a CA, CDP keys of both kinds, a verifying TLS upstream, and proxies under test."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from prometheus_client import CollectorRegistry

from signing_proxy.app import ProxyServer
from signing_proxy.config import parse_config

from .drb_upstream import DrbUpstream
from .upstream import VerifyingUpstream
from .wallet_upstream import WalletVerifier

EC_KEY_NAME = "organizations/0f6c7b5e-org/apiKeys/3d2f0f2a-ec-key"
ED_KEY_NAME = "9b1b2d4e-5f60-4a71-8c92-a3b4c5d6e7f8"
HMAC_KEY = "legacyApiKey42"
HMAC_SECRET = "Hm4cS3cretValue-never-logged-0123456789"
PUBLIC_HOST = "public.example.com"

MakeProxy = Callable[..., Awaitable[ProxyServer]]


def ec_pem(key: ec.EllipticCurvePrivateKey, fmt: str = "sec1") -> str:
    encoding = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if fmt == "sec1"
        else serialization.PrivateFormat.PKCS8
    )
    return key.private_bytes(
        serialization.Encoding.PEM, encoding, serialization.NoEncryption()
    ).decode()


def ed_base64_64(key: ed25519.Ed25519PrivateKey) -> str:
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(seed + public).decode()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secrets")


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, secrets_dir: Path) -> Path:
    path = secrets_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def ec_key_file(secrets_dir: Path, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    """The old portal format: name + SEC1 PEM, with the extra fields the portal adds."""
    path = secrets_dir / "cdp_api_key.json"
    path.write_text(
        json.dumps({"name": EC_KEY_NAME, "privateKey": ec_pem(ec_key), "nickname": "t"})
    )
    return path


@pytest.fixture(scope="session")
def ed_key_file(secrets_dir: Path, ed_key: ed25519.Ed25519PrivateKey) -> Path:
    """The new portal format: id + base64 Ed25519 (seed + public key)."""
    path = secrets_dir / "cdp_api_key_ed.json"
    path.write_text(json.dumps({"id": ED_KEY_NAME, "privateKey": ed_base64_64(ed_key)}))
    return path


@pytest.fixture(scope="session")
def wallet_key() -> ec.EllipticCurvePrivateKey:
    """The CDP v2 Wallet Secret's key (the portal gives it as base64 DER PKCS#8)."""
    return ec.generate_private_key(ec.SECP256R1())


def wallet_secret(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return base64.b64encode(der).decode()


@pytest.fixture
async def upstream(
    ca: trustme.CA,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    wallet_key: ec.EllipticCurvePrivateKey,
) -> AsyncIterator[VerifyingUpstream]:
    server = VerifyingUpstream(
        ca,
        keys={EC_KEY_NAME: ec_key.public_key(), ED_KEY_NAME: ed_key.public_key()},
        hmac_secrets={HMAC_KEY: HMAC_SECRET},
        anonymous_hosts=frozenset({PUBLIC_HOST}),
        wallet=WalletVerifier([wallet_key.public_key()]),
    )
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def drb(
    ca: trustme.CA, ec_key: ec.EllipticCurvePrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> AsyncIterator[DrbUpstream]:
    """The derivatives gateway stand-in (tests/drb_upstream.py), knowing both test keys."""
    server = DrbUpstream(
        ca, keys={EC_KEY_NAME: ec_key.public_key(), ED_KEY_NAME: ed_key.public_key()}
    )
    await server.start()
    yield server
    await server.close()


def base_config(
    upstream_url: str, ca_file: Path, ec_key_file: Path, ed_key_file: Path
) -> dict[str, Any]:
    def up(credential: str | None, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"url": upstream_url, "ca_file": str(ca_file), "timeout": 5}
        if credential:
            entry["credential"] = credential
        entry.update(extra)
        return entry

    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "drain_timeout": 2,
        "credentials": {
            "trading": {"key_file": str(ec_key_file)},
            "ed": {"key_file": str(ed_key_file)},
            "legacy": {"type": "hmac", "api_key": HMAC_KEY, "api_secret": HMAC_SECRET},
        },
        "upstreams": {
            "api.coinbase.com": up("trading"),
            "api.developer.coinbase.com": up("ed"),
            "api.cdp.coinbase.com": up("trading"),
            PUBLIC_HOST: up(None),
        },
        "routes": [
            {"prefix": "/onramp/", "upstream": "api.developer.coinbase.com"},
            {"prefix": "/platform/", "upstream": "api.cdp.coinbase.com"},
            {"prefix": "/v2/", "upstream": "api.coinbase.com", "credential": "legacy"},
            {
                "prefix": "/hmac",
                "upstream": "api.coinbase.com",
                "credential": "legacy",
                "strip_prefix": True,
            },
            {
                "prefix": "/ed",
                "upstream": "api.coinbase.com",
                "credential": "ed",
                "strip_prefix": True,
            },
            {"prefix": "/public/", "upstream": PUBLIC_HOST},
            {"prefix": "/", "upstream": "api.coinbase.com"},
        ],
    }


@pytest.fixture
def config_dict(
    upstream: VerifyingUpstream, ca_file: Path, ec_key_file: Path, ed_key_file: Path
) -> dict[str, Any]:
    return base_config(upstream.url, ca_file, ec_key_file, ed_key_file)


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    servers: list[ProxyServer] = []

    async def make(raw: dict[str, Any], **kwargs: Any) -> ProxyServer:
        config = parse_config(raw, tmp_path / "config.yaml")
        server = ProxyServer(config, registry=CollectorRegistry(), **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, config_dict: dict[str, Any]) -> ProxyServer:
    return await make_proxy(config_dict)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
