"""The ``signing-proxy`` command: serve, check, jwt, onramp-url, keygen, topper-token (CONTRACT.md).

Exit codes: 0 fine, 1 a problem with credentials or a request, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .config import Config, load_config
from .credentials import CredentialStore, load_key_file, parse_private_key, public_fingerprint
from .errors import ConfigError, CredentialError, ProxyError
from .signers import CdpJwtSigner, jwt_uri

__all__ = ["main"]

_DESCRIPTION = """\
Authenticating forward proxy for Coinbase APIs. Apps send plain HTTP to it; it signs each
request (CDP JWT, ES256 or EdDSA, or legacy HMAC) and forwards it over TLS.
"""
_EPILOG = """\
examples:
  signing-proxy serve -c config.yaml
  signing-proxy check -c config.yaml
  signing-proxy jwt --key-file cdp_api_key.json GET https://api.coinbase.com/api/v3/brokerage/accounts
  eval $(signing-proxy jwt --export --key-file cdp_api_key.json GET api.coinbase.com/api/v3/brokerage/accounts)
  signing-proxy onramp-url -c config.yaml --address 0x4315d134aCd3221a02dD380ADE3aF39Ce219037c --blockchains base --assets USDC
  signing-proxy keygen > topper.jwk.json
  signing-proxy topper-token -c config.yaml --payload flow.json --url
"""


def _config(path: str) -> Config:
    from .topper import topper_settings

    config = load_config(path)
    topper_settings(config)  # the optional sections are checked at load, with the rest
    return config


def _usage(command: str, problem: str) -> int:
    print(f"signing-proxy {command}: error: {problem}", file=sys.stderr)
    return 2


def _csv(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. ethereum,base")
    return items


def _argument(text: str, check: Callable[[str], object]) -> str:
    """Run a library check that raises ValueError as an argparse type: one rule, one place."""
    try:
        check(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _amount(text: str) -> str:
    from .onramp import check_amount  # imported when used: onramp pulls in aiohttp

    return _argument(text, check_amount)


def _public_ip(text: str) -> str:
    from .onramp import check_client_ip

    return _argument(text, check_client_ip)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run
    from .logs import setup_logging

    config = _config(args.config)
    setup_logging(config.log_format, config.log_level)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        asyncio.run(run(config))
    else:  # optional extra: a faster event loop
        uvloop.run(run(config))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args.config)
    print(f"config {config.path}: ok")
    print(f"  listen {config.listen}, admin {config.admin_listen}")
    store = CredentialStore(config.credentials)
    problems = store.load_all()
    for cred in store:
        if cred.info is not None:
            i = cred.info
            print(
                f"credential {i.name}: {i.scheme} key {i.key_id} fingerprint {i.fingerprint} ({i.source})"
            )
        else:
            print(f"credential {cred.name}: NOT LOADED")
    for up in config.upstreams.values():
        via = "" if up.url == f"https://{up.name}" else f" via {up.url}"
        print(
            f"upstream {up.name}{via}: credential {up.credential or '(none: unsigned)'}, timeout {up.timeout:g}s"
        )
        if up.ca_file is not None and not up.ca_file.is_file():
            problems.append(f"upstreams.{up.name}.ca_file: {up.ca_file} does not exist")
    for route in config.routes:
        signed_by = route.credential or config.upstreams[route.upstream].credential
        print(f"route {route.prefix} -> {route.upstream} (credential {signed_by or 'none'})")
    problems.extend(_check_topper(config))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _check_topper(config: Config) -> list[str]:
    from .topper import load_topper_key, topper_settings

    settings = topper_settings(config)
    if settings is None:
        return []
    try:
        key = load_topper_key(settings)
    except CredentialError as exc:
        print("topper: NOT LOADED")
        return [exc.message]
    print(
        f"topper: ES256 key {settings.key_id} fingerprint {public_fingerprint(key)}, "
        f"widget {settings.widget_id} ({settings.flow}, {settings.environment})"
    )
    return []


def cmd_jwt(args: argparse.Namespace) -> int:
    target = args.url if "://" in args.url else f"https://{args.url}"
    parts = urlsplit(target)
    if not parts.hostname:
        raise CredentialError(
            f"cannot find a host in {args.url!r}; give https://HOST/PATH or HOST/PATH"
        )
    path = parts.path or "/"
    key_name, secret = load_key_file(Path(args.key_file))
    key = parse_private_key(secret, f"key_file {args.key_file} (privateKey)")
    token = CdpJwtSigner(key_name, key).token(jwt_uri(args.method, parts.hostname, path))
    print(f"export JWT={shlex.quote(token)}" if args.export else token)
    if args.verbose:
        print(
            f"# uri: {jwt_uri(args.method, parts.hostname, path)}; fingerprint {public_fingerprint(key)}",
            file=sys.stderr,
        )
    return 0


def cmd_onramp_url(args: argparse.Namespace) -> int:
    from .onramp import build_offramp_url, build_onramp_url, session_token_for_config

    if args.offramp:
        if not args.partner_user_id or not args.redirect_url:
            return _usage("onramp-url", "--offramp needs --partner-user-id and --redirect-url")
        if args.default_payment_method:
            return _usage("onramp-url", "--default-payment-method is for onramp, not --offramp")
    elif args.default_cashout_method:
        return _usage("onramp-url", "--default-cashout-method is for --offramp")
    config = _config(args.config)
    token = asyncio.run(
        session_token_for_config(
            config,
            addresses={args.address: args.blockchains},
            assets=args.assets,
            client_ip=args.client_ip,
        )
    )
    shown: dict[str, Any] = {
        "default_network": args.default_network,
        "default_asset": args.default_asset,
        "preset_fiat_amount": args.preset_fiat_amount,
        "fiat_currency": args.fiat_currency,
        "partner_user_id": args.partner_user_id,
        "redirect_url": args.redirect_url,
    }
    if args.offramp:
        url = build_offramp_url(token, default_cashout_method=args.default_cashout_method, **shown)
    else:
        url = build_onramp_url(token, default_payment_method=args.default_payment_method, **shown)
    print(url)
    return 0


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

    config = _config(args.config)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signing-proxy",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy and its admin listener until SIGTERM/SIGINT.",
    )
    p.add_argument("-c", "--config", required=True, help="config file (YAML)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check",
        help="validate the config and load every credential",
        description="Load the config and every credential; print names, schemes, key ids and public-key "
        "fingerprints (never secrets). Exits non-zero on any problem.",
    )
    p.add_argument("-c", "--config", required=True, help="config file (YAML)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "jwt",
        help="print one JWT for a request, for your own curl",
        description="Print a bare JWT for METHOD URL (valid 120 s, one request). The query string is "
        "not part of the signed uri.",
    )
    p.add_argument("--key-file", required=True, help="CDP key JSON as downloaded from the portal")
    p.add_argument("--export", action="store_true", help="print `export JWT=<token>` for eval")
    p.add_argument("-v", "--verbose", action="store_true", help="print the signed uri to stderr")
    p.add_argument("method", metavar="METHOD", type=str.upper, help="HTTP method, e.g. GET")
    p.add_argument("url", metavar="URL", help="https://host/path?query or host/path")
    p.set_defaults(func=cmd_jwt)

    p = sub.add_parser(
        "onramp-url",
        help="print a Coinbase Onramp (or Offramp) URL with a fresh session token",
        description="Request a session token (POST /onramp/v1/token) through the configured "
        "api.developer.coinbase.com upstream and its credential, and print the pay.coinbase.com "
        "URL that starts with it. The token is single-use and expires after 5 minutes.",
    )
    p.add_argument("-c", "--config", required=True, help="config file (YAML)")
    p.add_argument("--address", required=True, help="the wallet address funds go to (or come from)")
    p.add_argument("--blockchains", required=True, type=_csv, metavar="A,B",
                   help="networks of that address, e.g. ethereum,base")  # fmt: skip
    p.add_argument("--assets", required=True, type=_csv, metavar="X,Y",
                   help="assets offered, e.g. ETH,USDC")  # fmt: skip
    p.add_argument("--client-ip", type=_public_ip, metavar="IP",
                   help="the end user's public IP, bound into the token")  # fmt: skip
    p.add_argument("--default-network", metavar="N", help="network selected first, e.g. base")
    p.add_argument("--default-asset", metavar="X", help="asset selected first, e.g. USDC")
    p.add_argument("--preset-fiat-amount", type=_amount, metavar="N",
                   help="fiat amount filled in, e.g. 100")  # fmt: skip
    p.add_argument("--fiat-currency", metavar="CUR", help="e.g. USD, EUR, GBP")
    p.add_argument(
        "--default-payment-method", metavar="M", help="onramp: e.g. CARD, ACH_BANK_ACCOUNT"
    )
    p.add_argument("--offramp", action="store_true",
                   help="print an Offramp (sell) URL; needs --partner-user-id and --redirect-url")  # fmt: skip
    p.add_argument("--partner-user-id", metavar="ID",
                   help="your id for the user (required with --offramp)")  # fmt: skip
    p.add_argument("--redirect-url", metavar="URL",
                   help="where the user goes afterwards (required with --offramp)")  # fmt: skip
    p.add_argument("--default-cashout-method", metavar="M",
                   help="offramp: e.g. FIAT_WALLET, ACH_BANK_ACCOUNT, PAYPAL")  # fmt: skip
    p.set_defaults(func=cmd_onramp_url)

    p = sub.add_parser(
        "keygen",
        help="print a new P-256 key pair as JWKs (Topper onboarding)",
        description='Print {"privateKey": <JWK>, "publicKey": <JWK>} for a new P-256 key. Send '
        "publicKey to Topper, which answers with the key id; keep the output secret.",
    )
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "topper-token",
        help="print a Topper bootstrap token (or its start URL) for a flow",
        description="Sign the flow in FLOW.json (source, target, optional partner) with the "
        "topper: key, adding iat, a fresh jti and sub = the widget id; print the token.",
    )
    p.add_argument("-c", "--config", required=True, help="config file (YAML) with a topper: block")
    p.add_argument(
        "--payload", required=True, metavar="FLOW.json", help="the flow JSON ('-': stdin)"
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--url", action="store_true", help="print the URL that starts the session")
    shown.add_argument("--json", action="store_true", help='print {"token", "url", "jti"}')
    p.set_defaults(func=cmd_topper_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"signing-proxy: config error: {exc.message}", file=sys.stderr)
        return 2
    except ProxyError as exc:  # credentials, the upstream, the request: exit 1
        print(f"signing-proxy: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
