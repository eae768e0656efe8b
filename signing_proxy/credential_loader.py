"""One configured credential: its secrets read, a signer built from them, and what may be shown.

``Credential.load()`` reads the sources (key_material.py), builds the signer for the credential's
type (a CDP JWT signer, with a Wallet Secret where configured; a legacy HMAC signer; an Exchange,
Prime or INTX signer) and swaps it in only if that worked, so a broken rotation keeps the last
good key. ``CredentialInfo`` is the safe description: names, scheme, fingerprints, no secret.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .config import CredentialConfig
from .errors import CredentialError
from .hmac_signers import VENUE_SIGNERS, KeyMaterialError, VenueSigner
from .key_material import (
    FileState,
    load_key_file,
    parse_private_key,
    public_fingerprint,
    read_secret,
    repair_pasted,
)
from .signers import CdpJwtSigner, Clock, HmacSigner, Signer
from .wallet_auth import WalletAuth, WalletSigner, parse_wallet_secret

__all__ = ["Credential", "CredentialInfo"]


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
            api_secret = repair_pasted(read_secret(cfg.api_secret))
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
