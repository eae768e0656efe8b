"""Key material: read a secret (file, env var, inline), parse a private key once, describe it safely.

Accepted formats are listed in docs/coinbase-auth.md ("Key formats"): CDP key JSON, EC P-256 PEM (SEC1 or PKCS8),
Ed25519 as base64 of 64 bytes (seed + public) or of the 32-byte seed, or Ed25519 PKCS8 PEM.
Pasted keys often carry literal ``\\n`` instead of newlines; they are repaired.

Every error names the source (file path, env var, config field) and what is wrong, and never
includes the secret itself, nor text from a parser that might quote it.

``FileState`` is what the credential watcher compares to see a key file change: its stat and a hash
of its content, never the content. Nothing here knows about signers or the credential store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .config import SecretSource
from .errors import CredentialError
from .signers import PrivateKey

__all__ = [
    "FileState",
    "load_key_file",
    "parse_private_key",
    "public_fingerprint",
    "read_secret",
    "repair_pasted",
]

_MAX_SECRET_BYTES: Final = 64 * 1024


def repair_pasted(text: str) -> str:
    """Undo the usual copy-paste damage: literal backslash-n, CRLF, surrounding quotes/space."""
    text = text.strip().strip('"').strip("'").strip()
    if "\\n" in text:
        text = text.replace("\\r\\n", "\n").replace("\\n", "\n")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_private_key(text: str, source: str) -> PrivateKey:
    """Parse a CDP private key; ``source`` names where it came from, for error messages."""
    text = repair_pasted(text)
    if not text:
        raise CredentialError(f"{source}: the private key is empty")
    if text.startswith("{"):
        raise CredentialError(
            f"{source}: this looks like the whole key JSON, not the private key; "
            "use key_file: for the downloaded JSON, or give only its privateKey value"
        )
    if "-----BEGIN" in text:
        return _parse_pem(text, source)
    if "PRIVATE KEY" in text or "PUBLIC KEY" in text:
        raise CredentialError(f"{source}: PEM armour is damaged (no '-----BEGIN' line)")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialError(
            f"{source}: not a PEM key and not base64; expected '-----BEGIN EC PRIVATE KEY-----' "
            "(ECDSA key) or the base64 Ed25519 key from the CDP portal"
        ) from None
    if len(raw) == 64:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public != raw[32:]:
            raise CredentialError(
                f"{source}: 64-byte Ed25519 key whose second half is not the public key of its first "
                "half; the key is corrupted or truncated"
            )
        return key
    if len(raw) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    raise CredentialError(
        f"{source}: base64 decodes to {len(raw)} bytes; an Ed25519 key is 64 bytes "
        "(seed + public key) or a 32-byte seed"
    )


def _parse_pem(text: str, source: str) -> PrivateKey:
    if "PUBLIC KEY-----" in text:
        raise CredentialError(
            f"{source}: this looks like a public key; the proxy needs the private key "
            "('-----BEGIN EC PRIVATE KEY-----')"
        )
    if "ENCRYPTED" in text:
        raise CredentialError(f"{source}: the key is password-protected; give an unencrypted key")
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message is not shown: it is not needed and must not quote key bytes.
        raise CredentialError(
            f"{source}: PEM private key could not be parsed (truncated, or newlines lost?)"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CredentialError(
                f"{source}: EC key is not P-256 (it is {key.curve.name}); CDP keys use P-256 (ES256)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise CredentialError(
        f"{source}: {type(key).__name__.removeprefix('_')} keys are not supported; "
        "CDP keys are EC P-256 or Ed25519"
    )


def public_fingerprint(key: PrivateKey) -> str:
    """SHA-256 of the public key (DER SubjectPublicKeyInfo), shortened; safe to print."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()[:32]


def _read_file(path: Path, what: str) -> str:
    try:
        size = path.stat().st_size
        if size > _MAX_SECRET_BYTES:
            raise CredentialError(f"{what} {path}: {size} bytes is too large for a key file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise CredentialError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise CredentialError(f"{what} {path}: cannot read ({exc.strerror})") from None


def read_secret(src: SecretSource) -> str:
    if src.kind == "inline":
        return src.ref
    if src.kind == "env":
        value = os.environ.get(src.ref)
        if value is None or not value.strip():
            raise CredentialError(f"env var {src.ref} (from {src.field}) is not set or empty")
        return value
    return _read_file(Path(src.ref), f"file {src.field}:").strip()


def load_key_file(path: Path) -> tuple[str, str]:
    """The (key name, private key text) from a CDP key JSON as downloaded from the portal."""
    if not path.exists():
        raise CredentialError(
            f"key_file {path} does not exist: create a Secret API key at portal.cdp.coinbase.com, "
            "download its JSON and save it at that path"
        )
    text = _read_file(path, "key_file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = (
            " (is it the PEM itself? use private_key_file: for that)"
            if "-----BEGIN" in text
            else ""
        )
        raise CredentialError(
            f"key_file {path}: not valid JSON at line {exc.lineno}, column {exc.colno}{hint}"
        ) from None
    if not isinstance(data, dict):
        raise CredentialError(
            f"key_file {path}: expected a JSON object with name/id and privateKey"
        )
    name = data.get("name") or data.get("id")
    secret = data.get("privateKey")
    if not isinstance(name, str) or not name.strip():
        raise CredentialError(f'key_file {path}: no "name" or "id" field (the API key name)')
    if not isinstance(secret, str) or not secret.strip():
        raise CredentialError(f'key_file {path}: no "privateKey" field')
    return name.strip(), secret


@dataclass(frozen=True)
class FileState:
    """Enough about one key file to notice any change; nothing secret (a digest, not content)."""

    stat: tuple[int, int, int, int] | None  # device, inode, size, mtime_ns; None: unreadable
    digest: bytes = b""

    @classmethod
    def of(cls, path: Path) -> FileState:
        try:
            st = path.stat()  # follows symlinks: a swapped ..data target has another inode
            with path.open("rb") as file:
                content = file.read(_MAX_SECRET_BYTES + 1)
        except OSError:
            return cls(None)
        stat = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return cls(stat, hashlib.sha256(content).digest())
