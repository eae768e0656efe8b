"""Keys and tokens printed for your own use: ``jwt``, ``keygen`` and ``topper-token``.

``jwt`` signs one request offline with a CDP key file (and, with ``--wallet-secret-file``, an
X-Wallet-Auth token); ``keygen`` prints a new P-256 key pair for Topper onboarding;
``topper-token`` signs a Topper flow with the config's ``topper:`` key.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .cli_config import config_from_args, usage_error
from .errors import ConfigError, CredentialError, ProxyError

__all__ = ["cmd_jwt", "cmd_keygen", "cmd_topper_token"]


def cmd_jwt(args: argparse.Namespace) -> int:
    from .config import URIS_CLAIM_HOSTS
    from .credentials import load_key_file, parse_private_key, public_fingerprint
    from .signers import CdpJwtSigner, jwt_uri

    target = args.url if "://" in args.url else f"https://{args.url}"
    parts = urlsplit(target)
    if not parts.hostname:
        raise CredentialError(
            f"cannot find a host in {args.url!r}; give https://HOST/PATH or HOST/PATH"
        )
    path = parts.path or "/"
    if args.body is not None and args.wallet_secret_file is None:
        return usage_error(
            "jwt", "--body is hashed into the wallet token: give --wallet-secret-file"
        )
    if args.key_file is None and args.wallet_secret_file is None:
        return usage_error(
            "jwt", "give --key-file (the API key JWT), --wallet-secret-file, or both"
        )
    uri = jwt_uri(args.method, parts.hostname, path)
    lines = []
    if args.key_file is not None:
        key_name, secret = load_key_file(Path(args.key_file))
        key = parse_private_key(secret, f"key_file {args.key_file} (privateKey)")
        claim = args.uri_claim or ("uris" if parts.hostname in URIS_CLAIM_HOSTS else "uri")
        token = CdpJwtSigner(key_name, key).token(uri, as_list=claim == "uris")
        if args.wallet_secret_file is None:  # the bare token, as always
            print(f"export JWT={shlex.quote(token)}" if args.export else token)
        else:  # two tokens: labelled, ready for curl -H (or eval)
            lines.append(
                f"export JWT={shlex.quote(token)}"
                if args.export
                else f"Authorization: Bearer {token}"
            )
    if args.wallet_secret_file is not None:
        wallet = _wallet_token(args, parts.hostname, path)
        lines.append(
            f"export WALLET_JWT={shlex.quote(wallet)}"
            if args.export
            else f"X-Wallet-Auth: {wallet}"
        )
        print("\n".join(lines))
    if args.verbose and args.key_file is not None:
        print(
            f"# uri: {jwt_uri(args.method, parts.hostname, path)}; fingerprint {public_fingerprint(key)}",
            file=sys.stderr,
        )
    return 0


def _wallet_token(args: argparse.Namespace, host: str, path: str) -> str:
    from .config import SecretSource
    from .credentials import read_secret
    from .wallet_auth import WalletSigner, parse_wallet_secret

    source = SecretSource("--wallet-secret-file", "file", args.wallet_secret_file)
    key = parse_wallet_secret(read_secret(source), f"--wallet-secret-file {source.ref}")
    body = None if args.body is None else args.body.encode()
    return WalletSigner(key).token(args.method, host, path, body)


def cmd_keygen(args: argparse.Namespace) -> int:
    from .topper import generate_keypair

    print(json.dumps(generate_keypair(), indent=2))
    print(
        "# send publicKey to Topper; keep this output secret: topper.private_key_file can "
        "point at it as it is",
        file=sys.stderr,
    )
    return 0


def _read_flow(path: str) -> Any:
    from .topper import InvalidFlow

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ProxyError(f"--payload {path}: cannot read ({reason})", code="bad_request") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidFlow(
            f"--payload {path}: not valid JSON at line {exc.lineno}, column {exc.colno}"
        ) from None


def cmd_topper_token(args: argparse.Namespace) -> int:
    from .topper import BootstrapSigner, load_topper_key, topper_settings

    config = config_from_args(args)
    settings = topper_settings(config)
    if settings is None:
        raise ConfigError(
            f"{config.path}: no topper: block; add private_key_file, key_id and widget_id"
        )
    minted = BootstrapSigner(settings, load_topper_key(settings)).mint(_read_flow(args.payload))
    if args.json:
        print(json.dumps(minted.as_dict()))
    else:
        print(minted.url if args.url else minted.token)
    return 0
