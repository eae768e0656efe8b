"""Key material: read it (file, env var, inline), parse it once, build signers, describe them safely.

Accepted formats are listed in docs/coinbase-auth.md ("Key formats"): CDP key JSON, EC P-256 PEM (SEC1 or PKCS8),
Ed25519 as base64 of 64 bytes (seed + public) or of the 32-byte seed, or Ed25519 PKCS8 PEM.
Pasted keys often carry literal ``\\n`` instead of newlines; they are repaired.

Every error names the source (file path, env var, config field) and what is wrong, and never
includes the secret itself, nor text from a parser that might quote it.

Key files are watched (``CredentialWatcher``): polled about once a second by stat (device, inode,
size, mtime, following symlinks, so a Kubernetes Secret volume's atomic ``..data`` swap is seen)
and by a hash of the content (an edit that keeps size and mtime is seen too). A changed file is
reloaded; a broken one keeps the last good key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from .config import CredentialConfig, SecretSource
from .errors import CredentialError
from .hmac_signers import VENUE_SIGNERS, KeyMaterialError, VenueSigner
from .signers import CdpJwtSigner, Clock, HmacSigner, PrivateKey, Signer
from .wallet_auth import WalletAuth, WalletSigner, parse_wallet_secret

__all__ = [
    "Credential",
    "CredentialInfo",
    "CredentialStore",
    "CredentialWatcher",
    "FileState",
    "load_key_file",
    "parse_private_key",
    "public_fingerprint",
]

log = logging.getLogger(__name__)

_MAX_SECRET_BYTES: Final = 64 * 1024


def _repair(text: str) -> str:
    """Undo the usual copy-paste damage: literal backslash-n, CRLF, surrounding quotes/space."""
    text = text.strip().strip('"').strip("'").strip()
    if "\\n" in text:
        text = text.replace("\\r\\n", "\n").replace("\\n", "\n")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_private_key(text: str, source: str) -> PrivateKey:
    """Parse a CDP private key; ``source`` names where it came from, for error messages."""
    text = _repair(text)
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


@dataclass(frozen=True)
class CredentialInfo:
    """What may be shown about a loaded credential: no secret material."""

    name: str
    scheme: str  # ES256 / EdDSA / HMAC / EXCHANGE / PRIME / INTX
    key_id: str  # CDP key name, or the HMAC API key (an identifier, not the secret)
    fingerprint: str
    source: str
    wallet_fingerprint: str | None = None  # the Wallet Secret's public key, when there is one
    wallet_source: str | None = None


class Credential:
    """One configured credential: its current signer, or why it has none.

    ``load()`` builds a new signer from the sources and swaps it in only if it worked, so a
    broken rotation keeps the last good key.
    """

    def __init__(self, config: CredentialConfig, *, clock: Clock | None = None):
        self.config = config
        self._clock = clock
        self.signer: Signer | None = None
        self.info: CredentialInfo | None = None
        self.error: str | None = None
        self.seen: tuple[FileState, ...] = ()  # the files as they were at the last load attempt

    @property
    def name(self) -> str:
        return self.config.name

    def files_state(self) -> tuple[FileState, ...]:
        return tuple(FileState.of(path) for path in self.config.files())

    def changed(self) -> bool:
        """Have the files this credential is read from changed since the last load attempt?"""
        return bool(self.config.files()) and self.files_state() != self.seen

    def load(self) -> CredentialInfo:
        """(Re)load from the sources; raises CredentialError and keeps the previous signer."""
        # Taken before reading: a file that changes while it is read differs at the next poll.
        self.seen = self.files_state()
        try:
            signer, info = self._build()
        except CredentialError as exc:
            self.error = f"credential '{self.name}': {exc.message}"
            raise CredentialError(self.error) from None
        self.signer, self.info, self.error = signer, info, None
        return info

    def _build(self) -> tuple[Signer, CredentialInfo]:
        cfg = self.config
        kwargs = {"clock": self._clock} if self._clock else {}
        if cfg.type in VENUE_SIGNERS:
            return self._build_venue(VENUE_SIGNERS[cfg.type], kwargs)
        if cfg.type == "hmac":
            assert cfg.api_key is not None and cfg.api_secret is not None
            api_key = read_secret(cfg.api_key).strip()
            api_secret = _repair(read_secret(cfg.api_secret))
            if not api_secret:
                raise CredentialError(f"{cfg.api_secret.describe()}: the API secret is empty")
            if "-----BEGIN" in api_secret:
                raise CredentialError(
                    f"{cfg.api_secret.describe()}: this is a PEM key, not a legacy API secret; "
                    "use a CDP credential (key_file) for it"
                )
            digest = hashlib.sha256(
                b"signing-proxy fingerprint\0" + api_secret.encode()
            ).hexdigest()
            info = CredentialInfo(
                self.name, "HMAC", api_key, "SHA256:" + digest[:16], cfg.api_secret.describe()
            )
            return HmacSigner(api_key, api_secret, **kwargs), info
        if cfg.key_file is not None:
            key_name, secret = load_key_file(cfg.key_file)
            source = f"key_file {cfg.key_file} (privateKey)"
        else:
            assert cfg.key_name is not None and cfg.private_key is not None
            key_name = read_secret(cfg.key_name).strip()
            secret = read_secret(cfg.private_key)
            source = cfg.private_key.describe()
        key = parse_private_key(secret, source)
        wallet_key = wallet_source = None
        if cfg.wallet_secret is not None:
            wallet_source = cfg.wallet_secret.describe()
            wallet_key = parse_wallet_secret(read_secret(cfg.wallet_secret), wallet_source)
        wallet = None
        if cfg.wallet_rules.hosts():  # the credential may sign Server Wallet operations
            wallet_signer = WalletSigner(wallet_key, **kwargs) if wallet_key else None
            wallet = WalletAuth(cfg.wallet_rules, wallet_signer, self.name)
        signer = CdpJwtSigner(key_name, key, uris_hosts=cfg.uris_hosts, wallet=wallet, **kwargs)
        return signer, CredentialInfo(
            self.name, signer.scheme, key_name, public_fingerprint(key), source,
            public_fingerprint(wallet_key) if wallet_key else None, wallet_source,
        )  # fmt: skip

    def _build_venue(
        self, kind: type[VenueSigner], kwargs: dict[str, Clock]
    ) -> tuple[Signer, CredentialInfo]:
        """Exchange, Prime or INTX: api_key, api_secret and passphrase, checked by the signer."""
        cfg = self.config
        sources = {
            "api_key": cfg.api_key,
            "api_secret": cfg.api_secret,
            "passphrase": cfg.passphrase,
        }
        values = {}
        for field, src in sources.items():
            assert src is not None
            values[field] = read_secret(src).strip()
        try:
            signer = kind(values["api_key"], values["api_secret"], values["passphrase"], **kwargs)
        except KeyMaterialError as exc:
            src = sources[exc.field]
            assert src is not None
            raise CredentialError(f"{src.describe()}: {exc.problem}") from None
        # Plain SHA-256 of the secret as configured: `printf %s "$SECRET" | sha256sum` matches.
        digest = hashlib.sha256(values["api_secret"].encode()).hexdigest()
        assert cfg.api_secret is not None
        info = CredentialInfo(
            self.name,
            signer.scheme,
            values["api_key"],
            "secret-SHA256:" + digest[:16],
            cfg.api_secret.describe(),
        )
        return signer, info


class CredentialStore:
    """All configured credentials by name; the relay asks it for a signer per request."""

    def __init__(self, configs: Mapping[str, CredentialConfig], *, clock: Clock | None = None):
        self._credentials = {name: Credential(cfg, clock=clock) for name, cfg in configs.items()}
        self.lock = threading.Lock()  # one load at a time: start-up and the watcher

    def __iter__(self) -> Iterator[Credential]:
        return iter(self._credentials.values())

    def __getitem__(self, name: str) -> Credential:
        return self._credentials[name]

    def load_all(self) -> list[str]:
        """Load every credential; returns the problems (empty when all loaded)."""
        problems = []
        with self.lock:
            for cred in self._credentials.values():
                try:
                    cred.load()
                except CredentialError as exc:
                    problems.append(exc.message)
        return problems

    def missing(self) -> list[str]:
        return [c.error or f"credential '{c.name}' not loaded" for c in self if c.signer is None]

    def signer(self, name: str) -> Signer:
        """The current signer, or a CredentialError that says what to configure. Fails closed."""
        cred = self._credentials[name]
        signer = cred.signer
        if signer is None:
            raise CredentialError(
                f"{cred.error or f'credential {name!r} is not loaded'}. "
                f"Configure credential '{name}' (see `signing-proxy check`); "
                "the request was not forwarded"
            )
        return signer


ReloadCallback = Callable[[Credential, CredentialError | None], None]


class CredentialWatcher:
    """Reloads credentials whose files changed; tells ``on_reload`` how each reload went."""

    def __init__(self, store: CredentialStore, on_reload: ReloadCallback, *, interval: float = 1.0):
        self.store = store
        self.on_reload = on_reload
        self.interval = interval

    def poll(self) -> list[str]:
        """One pass over every watched credential; returns the names reloaded (or tried)."""
        tried = []
        for cred in self.store:
            if not cred.changed():
                continue
            tried.append(cred.name)
            try:
                with self.store.lock:
                    cred.load()
            except CredentialError as exc:
                self.on_reload(cred, exc)
            else:
                self.on_reload(cred, None)
        return tried

    async def run(self) -> None:
        """Poll until cancelled. File I/O runs in a worker thread, off the event loop."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.poll)
            except Exception as exc:  # keep watching whatever happened; log the type only
                log.error(
                    "credential watcher pass failed",
                    extra={"fields": {"exc_type": type(exc).__name__}},
                )
