"""The ``credentials:`` section: one ``CredentialConfig`` per named key, and how each is parsed.

A credential is CDP (``key_file``, or ``key_name`` + ``private_key``; optionally a Wallet Secret),
legacy HMAC (``api_key`` + ``api_secret``), or another venue's HMAC with a passphrase (exchange,
prime, intx). Secrets stay ``SecretSource``s here: credentials.py reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from .config_reader import Reader, SecretSource
from .policy import Policy
from .ratelimit import RateLimit
from .wallet_rules import WalletRules

__all__ = ["CredentialConfig", "parse_credential"]

_CDP_KEYS: Final = {
    "type",
    "key_file",
    "policy",
    "rate_limit",
    *(
        f"{b}{s}"
        for b in ("key_name", "private_key", "wallet_secret")
        for s in ("", "_env", "_file")
    ),
}
_HMAC_KEYS: Final = {
    "type",
    "policy",
    "rate_limit",
    *(f"{b}{s}" for b in ("api_key", "api_secret") for s in ("", "_env", "_file")),
}
_VENUE_KEYS: Final = _HMAC_KEYS | {f"passphrase{s}" for s in ("", "_env", "_file")}
_VENUES: Final = ("exchange", "prime", "intx")  # other Coinbase venues: HMAC with a passphrase


@dataclass(frozen=True)
class CredentialConfig:
    name: str
    type: Literal["cdp", "hmac", "exchange", "prime", "intx"]
    key_file: Path | None = None  # CDP key JSON as downloaded
    key_name: SecretSource | None = None  # CDP, when not from key_file
    private_key: SecretSource | None = None
    api_key: SecretSource | None = None  # HMAC
    api_secret: SecretSource | None = None
    passphrase: SecretSource | None = None  # Exchange, Prime, INTX
    policy: Policy | None = None  # what requests this credential may sign
    rate_limit: RateLimit | None = None
    wallet_secret: SecretSource | None = None  # CDP v2 Server Wallets (X-Wallet-Auth)
    # Derived from the upstreams at load, for the CDP signer: hosts signed with the `uris` claim
    # form, and which requests get a wallet token.
    uris_hosts: frozenset[str] = frozenset()
    wallet_rules: WalletRules = field(default_factory=WalletRules)

    def files(self) -> tuple[Path, ...]:
        """Files this credential is read from (watched for rotation)."""
        found = [self.key_file] if self.key_file else []
        sources = (self.key_name, self.private_key, self.api_key, self.api_secret, self.passphrase)
        for src in (*sources, self.wallet_secret):
            if src is not None and src.kind == "file":
                found.append(Path(src.ref))
        return tuple(found)


def parse_credential(r: Reader, name: str, raw: Any) -> CredentialConfig:
    where = f"credentials.{name}"
    data = r.mapping(raw, where)
    kind = data.get("type", "cdp")
    policy = r.policy(data.get("policy"), f"{where}.policy")
    rate_limit = r.rate_limit(data.get("rate_limit"), f"{where}.rate_limit")
    if kind == "hmac":
        r.known(data, _HMAC_KEYS, where)
        api_key = r.secret(data, "api_key", where)
        api_secret = r.secret(data, "api_secret", where)
        if api_key is None or api_secret is None:
            raise r.fail(
                where,
                "an hmac credential needs api_key (or _env/_file) and api_secret (or _env/_file)",
            )
        return CredentialConfig(
            name,
            "hmac",
            api_key=api_key,
            api_secret=api_secret,
            policy=policy,
            rate_limit=rate_limit,
        )
    if kind in _VENUES:
        r.known(data, _VENUE_KEYS, where)
        fields = {f: r.secret(data, f, where) for f in ("api_key", "api_secret", "passphrase")}
        missing = [f"{f} (or {f}_env / {f}_file)" for f, src in fields.items() if src is None]
        if missing:
            raise r.fail(where, f"a {kind} credential needs {', '.join(missing)}")
        return CredentialConfig(
            name,
            kind,
            api_key=fields["api_key"],
            api_secret=fields["api_secret"],
            passphrase=fields["passphrase"],
            policy=policy,
            rate_limit=rate_limit,
        )
    if kind != "cdp":
        raise r.fail(
            f"{where}.type",
            f"expected one of cdp, hmac, {', '.join(_VENUES)}; got {kind!r}",
        )
    r.known(data, _CDP_KEYS, where)
    key_name = r.secret(data, "key_name", where)
    private_key = r.secret(data, "private_key", where)
    wallet_secret = r.secret(data, "wallet_secret", where)
    if "key_file" in data:
        if key_name or private_key:
            raise r.fail(where, "give key_file, or key_name + private_key, not both")
        return CredentialConfig(
            name,
            "cdp",
            key_file=r.file_path(data["key_file"], f"{where}.key_file"),
            policy=policy,
            rate_limit=rate_limit,
            wallet_secret=wallet_secret,
        )
    if key_name is None or private_key is None:
        raise r.fail(
            where,
            "a CDP credential needs key_file (the key JSON downloaded from the CDP portal), "
            "or key_name (or _env/_file) and private_key (or _env/_file)",
        )
    return CredentialConfig(
        name,
        "cdp",
        key_name=key_name,
        private_key=private_key,
        policy=policy,
        rate_limit=rate_limit,
        wallet_secret=wallet_secret,
    )
