"""The ``signing-proxy`` argument parser: every command, flag and help text (README.md, "Commands").

``build_parser`` wires each subcommand to its ``cmd_*`` function (``func``); the argument types
here turn a bad value into argparse's usage error (exit 2) before any command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final

from . import __version__
from .cli_check import cmd_check
from .cli_onramp import cmd_onramp_url
from .cli_serve import cmd_serve
from .cli_tokens import cmd_jwt, cmd_keygen, cmd_topper_token
from .cli_wait import cmd_wait
from .config import ENV_PREFIX

__all__ = ["build_parser"]

_DESCRIPTION: Final = """\
Authenticating forward proxy for Coinbase APIs. Apps send plain HTTP to it; it signs each
request (CDP JWT, ES256 or EdDSA, or legacy HMAC) and forwards it over TLS.
"""
_EPILOG: Final = """\
examples:
  signing-proxy serve -c config.yaml
  signing-proxy check -c config.yaml
  signing-proxy jwt --key-file cdp_api_key.json GET https://api.coinbase.com/api/v3/brokerage/accounts
  eval $(signing-proxy jwt --export --key-file cdp_api_key.json GET api.coinbase.com/api/v3/brokerage/accounts)
  signing-proxy jwt --key-file cdp_api_key.json --wallet-secret-file ws.txt --body '{"name":"x"}' POST https://api.cdp.coinbase.com/platform/v2/evm/accounts
  signing-proxy onramp-url -c config.yaml --address 0x4315d134aCd3221a02dD380ADE3aF39Ce219037c --blockchains base --assets USDC
  signing-proxy keygen > topper.jwk.json
  signing-proxy topper-token -c config.yaml --payload flow.json --url
"""


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
        description="Run the proxy and its admin listener until SIGTERM/SIGINT, then drain. "
        f"Settings come from flags, then {ENV_PREFIX}<FIELD> env vars (e.g. {ENV_PREFIX}LISTEN), "
        "then the config file.",
    )
    p.add_argument("-c", "--config", help=f"config file (YAML); default ${ENV_PREFIX}CONFIG")
    p.add_argument("--listen", metavar="HOST:PORT", help="proxy listener (config: listen)")
    p.add_argument(
        "--admin-listen", metavar="HOST:PORT", help="admin listener (config: admin_listen)"
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes sharing the port (default 1)"
    )
    p.add_argument(
        "--min-drain", type=float, metavar="SECONDS",
        help="after SIGTERM keep accepting this long while /readyz says 503 (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="time in-flight requests get (default 20)",
    )
    p.add_argument("--log-format", choices=["json", "text"], help="log format (default json)")
    p.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--event-loop", choices=["auto", "asyncio", "uvloop"],
        help="auto (default): uvloop when installed, else asyncio",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "wait",
        help="wait until a running proxy is ready",
        description="Poll the admin /readyz until it answers 200 (exit 0) or the timeout passes (exit 1, "
        "saying what is missing). For start-up ordering: run the app after `signing-proxy wait`.",
    )
    p.add_argument(
        "--admin",
        metavar="URL",
        help="admin base URL (default from --config, else http://127.0.0.1:9090)",
    )
    p.add_argument("-c", "--config", help="config file to read admin_listen from")
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up after this long (default 30)",
    )
    p.add_argument("--interval", type=float, default=0.2, metavar="SECONDS", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "check",
        help="validate the config and load every credential",
        description="Load the config and every credential; print names, schemes, key ids and public-key "
        "fingerprints (never secrets). Exits non-zero on any problem.",
    )
    p.add_argument("-c", "--config", help=f"config file (YAML); default ${ENV_PREFIX}CONFIG")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "jwt",
        help="print one JWT for a request, for your own curl",
        description="Print a bare JWT for METHOD URL (valid 120 s, one request). The query string is "
        "not part of the signed uri.",
    )
    p.add_argument("--key-file", help="CDP key JSON as downloaded from the portal")
    p.add_argument(
        "--export",
        action="store_true",
        help="print `export JWT=<token>` for eval (and WALLET_JWT with --wallet-secret-file)",
    )
    p.add_argument(
        "--uri-claim", choices=["uri", "uris"],
        help="claim form (default: uris for api.cdp.coinbase.com and api.developer.coinbase.com, "
        "as cdp-sdk signs; uri elsewhere)",
    )  # fmt: skip
    p.add_argument(
        "--wallet-secret-file", metavar="PATH",
        help="CDP v2 Wallet Secret: also print an X-Wallet-Auth token (prints both as headers)",
    )  # fmt: skip
    p.add_argument(
        "--body", metavar="JSON",
        help="the exact JSON body you will send; its hash goes into the wallet token",
    )  # fmt: skip
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
    p.add_argument("--v2", action="store_true",
                   help="Onramp v2: create a session with POST /platform/v2/onramp/sessions through "
                   "the api.cdp.coinbase.com upstream and print the URL it returns")  # fmt: skip
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
