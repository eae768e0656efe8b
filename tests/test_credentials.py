"""Key formats accepted, mistakes diagnosed, and no secret ever echoed in an error."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signing_proxy.config import CredentialConfig, SecretSource
from signing_proxy.credentials import CredentialStore, load_key_file, parse_private_key
from signing_proxy.errors import CredentialError
from signing_proxy.signers import CdpJwtSigner

from .conftest import ec_pem, ed_base64_64

EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def _pem(key: object, fmt: serialization.PrivateFormat) -> str:
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _same_key(
    parsed: object, original: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> bool:
    """Prove the parsed key is the original: a token it signs verifies with the original public key."""
    assert isinstance(parsed, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)
    signer = CdpJwtSigner("k", parsed)
    token = signer.token("GET h/p")
    jwt.decode(token, original.public_key(), algorithms=[signer.scheme])
    return True


ED_SEED = ED.private_bytes(
    serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
)


@pytest.mark.parametrize(
    ("text", "original"),
    [
        pytest.param(ec_pem(EC, "sec1"), EC, id="ec-sec1-pem"),
        pytest.param(ec_pem(EC, "pkcs8"), EC, id="ec-pkcs8-pem"),
        pytest.param(ec_pem(EC).replace("\n", "\\n"), EC, id="ec-literal-backslash-n"),
        pytest.param(ec_pem(EC).replace("\n", "\r\n"), EC, id="ec-crlf"),
        pytest.param('"' + ec_pem(EC).replace("\n", "\\n") + '"', EC, id="ec-quoted-escaped"),
        pytest.param(ed_base64_64(ED), ED, id="ed-base64-64"),
        pytest.param(base64.b64encode(ED_SEED).decode(), ED, id="ed-base64-seed"),
        pytest.param(_pem(ED, serialization.PrivateFormat.PKCS8), ED, id="ed-pkcs8-pem"),
        pytest.param(
            ed_base64_64(ED)[:40] + "\n" + ed_base64_64(ED)[40:], ED, id="ed-base64-wrapped"
        ),
    ],
)
def test_accepted_key_formats(
    text: str, original: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> None:
    assert _same_key(parse_private_key(text, "test"), original)


def _corrupted_ed() -> str:
    raw = bytearray(base64.b64decode(ed_base64_64(ED)))
    raw[40] ^= 0xFF
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            EC.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            "looks like a public key",
            id="public-key",
        ),
        pytest.param("this is not a key at all!", "not base64", id="garbage"),
        pytest.param(
            ec_pem(ec.generate_private_key(ec.SECP384R1())), "EC key is not P-256", id="p384"
        ),
        pytest.param(
            _pem(rsa.generate_private_key(65537, 2048), serialization.PrivateFormat.PKCS8),
            "RSAPrivateKey keys are not supported",
            id="rsa",
        ),
        pytest.param(
            json.dumps({"name": "x", "privateKey": ec_pem(EC)}), "whole key JSON", id="whole-json"
        ),
        pytest.param(
            base64.b64encode(b"x" * 48).decode(), "decodes to 48 bytes", id="wrong-length"
        ),
        pytest.param(_corrupted_ed(), "not the public key", id="ed-corrupted"),
        pytest.param(
            ec_pem(EC)[:150] + "\n-----END EC PRIVATE KEY-----\n",
            "could not be parsed",
            id="truncated-pem",
        ),
        pytest.param("   ", "empty", id="empty"),
    ],
)
def test_bad_keys_named_and_never_echoed(text: str, expected: str) -> None:
    with pytest.raises(CredentialError) as info:
        parse_private_key(text, "env var CDP_PRIVATE_KEY")
    message = info.value.message
    assert expected in message
    assert message.startswith("env var CDP_PRIVATE_KEY: ")
    body_lines = [
        ln for ln in text.splitlines() if ln.strip() and "-----" not in ln and len(ln) > 8
    ]
    for line in body_lines:
        assert line.strip()[:16] not in message


def test_key_file_name_or_id(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps(
            {
                "name": "organizations/o/apiKeys/k",
                "privateKey": ec_pem(EC),
                "nickname": "n",
                "scopes": [],
            }
        )
    )
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"id": "uuid-1", "privateKey": ed_base64_64(ED)}))
    assert load_key_file(old)[0] == "organizations/o/apiKeys/k"
    assert load_key_file(new)[0] == "uuid-1"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON at line 1"),
        (ec_pem(EC), "is it the PEM itself?"),
        (json.dumps({"privateKey": "x"}), 'no "name" or "id"'),
        (json.dumps({"name": "k"}), 'no "privateKey"'),
        (json.dumps(["x"]), "expected a JSON object"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "key.json"
    path.write_text(content)
    with pytest.raises(CredentialError, match=expected) as info:
        load_key_file(path)
    assert str(path) in info.value.message
    assert "MHcCAQEE" not in info.value.message  # the start of every SEC1 P-256 key body


def test_missing_key_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="download its JSON"):
        load_key_file(tmp_path / "absent.json")


def test_env_credential_with_literal_newlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_KEY_NAME", "organizations/o/apiKeys/env")
    monkeypatch.setenv("T_PRIVATE_KEY", ec_pem(EC).replace("\n", "\\n"))
    cfg = CredentialConfig(
        "env", "cdp", key_name=SecretSource("key_name_env", "env", "T_KEY_NAME"),
        private_key=SecretSource("private_key_env", "env", "T_PRIVATE_KEY"),
    )  # fmt: skip
    store = CredentialStore({"env": cfg})
    assert store.load_all() == []
    info = store["env"].info
    assert (
        info is not None and info.scheme == "ES256" and info.key_id == "organizations/o/apiKeys/env"
    )
    token = store.signer("env").sign("GET", "api.coinbase.com", "/p", "", None)["Authorization"][7:]
    assert (
        jwt.decode(token, EC.public_key(), algorithms=["ES256"])["sub"]
        == "organizations/o/apiKeys/env"
    )


def test_missing_env_var_names_it_and_store_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("T_ABSENT", raising=False)
    cfg = CredentialConfig(
        "c", "cdp", key_name=SecretSource("key_name", "inline", "k"),
        private_key=SecretSource("private_key_env", "env", "T_ABSENT"),
    )  # fmt: skip
    store = CredentialStore({"c": cfg})
    problems = store.load_all()
    assert problems == [
        "credential 'c': env var T_ABSENT (from private_key_env) is not set or empty"
    ]
    with pytest.raises(CredentialError, match="not forwarded"):
        store.signer("c")


def test_failed_reload_keeps_last_good_key(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps({"name": "k1", "privateKey": ec_pem(EC)}))
    store = CredentialStore({"c": CredentialConfig("c", "cdp", key_file=path)})
    assert store.load_all() == []
    good = store.signer("c")
    path.write_text("{broken")
    assert store.load_all() != []
    assert store.signer("c") is good


def test_hmac_secret_source_describe_hides_inline_value() -> None:
    src = SecretSource("api_secret", "inline", "super-secret-value")
    assert "super-secret-value" not in src.describe()
    assert "super-secret-value" not in repr(src)
