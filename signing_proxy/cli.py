"""The ``signing-proxy`` command: serve, check, jwt, onramp-url, keygen, topper-token (README.md, "Commands").

Exit codes: 0 fine, 1 a problem with credentials or a request, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import __version__
from .config import ENV_PREFIX, Config, env_overrides, load_config
from .errors import ConfigError, CredentialError, ProxyError

if TYPE_CHECKING:
    from .credentials import CredentialInfo

# Commands import what they use: the --workers supervisor and `wait` stay small and start fast
# without the crypto and HTTP stacks.

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
  signing-proxy jwt --key-file cdp_api_key.json --wallet-secret-file ws.txt --body '{"name":"x"}' POST https://api.cdp.coinbase.com/platform/v2/evm/accounts
  signing-proxy onramp-url -c config.yaml --address 0x4315d134aCd3221a02dD380ADE3aF39Ce219037c --blockchains base --assets USDC
  signing-proxy keygen > topper.jwk.json
  signing-proxy topper-token -c config.yaml --payload flow.json --url
"""


_FLAG_FIELDS = {  # serve flags that override config fields (flags > env > file)
    "listen": "listen",
    "admin_listen": "admin_listen",
    "drain_timeout": "drain_timeout",
    "min_drain": "min_drain",
    "workers": "workers",
    "log_format": "log_format",
    "log_level": "log_level",
    "event_loop": "event_loop",
}


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if not path:
        raise ConfigError(f"no config file: give --config PATH (or set {ENV_PREFIX}CONFIG)")
    return path


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, tuple[Any, str]] = env_overrides(os.environ)
    for attr, field in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[field] = (value, f"--{attr.replace('_', '-')}")
    config = load_config(_config_path(args), overrides)
    from .topper import topper_settings

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
    from .logs import setup_logging
    from .workers import WORKER_ENV

    config = _config(args)
    setup_logging(config.log_format, config.log_level, worker=os.environ.get(WORKER_ENV))
    if config.workers > 1:
        from .workers import check_bindable, supervise, worker_command

        check_bindable([config.listen, config.admin_listen])  # a busy port: one line, not 5 crashes
        argv = [a for a in (args.argv or []) if a]
        stop_timeout = config.min_drain + config.drain_timeout + 5
        return supervise(config.workers, worker_command(argv), stop_timeout)

    import asyncio

    from .app import run
    from .workers import MULTIPROC_ENV

    worker = WORKER_ENV in os.environ
    coro = run(
        config,
        reuse_port=worker,
        multiprocess_dir=os.environ.get(MULTIPROC_ENV) if worker else None,
    )
    if config.event_loop != "asyncio":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            if config.event_loop == "uvloop":
                coro.close()
                raise ConfigError(
                    "event_loop: uvloop is not installed (pip install 'signing-proxy[uvloop]')"
                ) from None
        else:  # the optional extra: a faster event loop
            uvloop.run(coro)
            return 0
    asyncio.run(coro)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Poll /readyz until it answers 200; for startup ordering (app container after the sidecar)."""
    import urllib.error
    import urllib.request

    admin = args.admin
    if admin is None:
        if args.config or os.environ.get(f"{ENV_PREFIX}CONFIG"):
            address = _config(args).admin_listen
            host = "127.0.0.1" if address.host in ("0.0.0.0", "::", "") else address.host  # noqa: S104
            admin = f"http://{host}:{address.port}"
        else:
            admin = "http://127.0.0.1:9090"
    url = admin.rstrip("/") + "/readyz"
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - http(s) admin URL
                print(f"ready: {url}")
                return 0 if resp.status == 200 else 1
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            last = "; ".join(body.get("missing") or []) or (
                "draining" if body.get("draining") else f"HTTP {exc.code}"
            )
        except (urllib.error.URLError, OSError) as exc:
            last = f"no answer ({getattr(exc, 'reason', exc)})"
        if time.monotonic() >= deadline:
            print(
                f"signing-proxy: not ready after {args.timeout:g}s at {url}: {last}",
                file=sys.stderr,
            )
            return 1
        time.sleep(args.interval)


def cmd_check(args: argparse.Namespace) -> int:
    from .credentials import CredentialStore, read_secret
    from .routing import Router, describe_fence

    config = _config(args)
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
        _print_wallet(config, cred.name, cred.info)
        if cred.config.policy is not None:
            print(f"  policy: {cred.config.policy.describe()}")
        if cred.config.rate_limit is not None:
            limit = cred.config.rate_limit
            print(f"  rate limit: {limit.rate:g}/s, burst {limit.burst}")
    for up in config.upstreams.values():
        via = "" if up.url == f"https://{up.name}" else f" via {up.url}"
        if up.tls_server_name is not None:
            via += f" (TLS name {up.tls_server_name})"
        auth = ""
        if up.auth is not None and up.credential is not None:  # e.g. "ES256 → token_exchange"
            info = store[up.credential].info
            auth = f" ({info.scheme if info else 'key not loaded'} → {up.auth})"
        print(
            f"upstream {up.name}{via}: credential {up.credential or '(none: unsigned)'}{auth}, "
            f"timeout {up.timeout:g}s, retries {up.retries}"
        )
        if up.ca_file is not None:
            from .relay import UpstreamEndpoint

            try:
                UpstreamEndpoint.build(up)  # loads the CA bundle as serve will
            except ConfigError as exc:
                problems.append(exc.message)
    router = Router(config)
    fences = {fence.route: fence for fence in router.fences}
    for route in config.routes:
        signed_by = route.credential or config.upstreams[route.upstream].credential
        print(f"route {route.prefix} -> {route.upstream} (credential {signed_by or 'none'})")
        if route.policy is not None:
            print(f"  policy: {route.policy.describe()}")
            print("\n".join(describe_fence(router, fences[route.prefix])))
    print(
        "forward-proxy mode (absolute URLs, curl -x): "
        + ("on" if config.forward_proxy else "off (forward_proxy: false)")
    )
    if config.inbound_token is not None:
        try:
            read_secret(config.inbound_token)
            print(f"inbound auth: token from {config.inbound_token.describe()}")
        except CredentialError as exc:
            problems.append(f"inbound_auth: {exc.message}")
    problems.extend(_check_topper(config))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _print_wallet(config: Config, name: str, info: CredentialInfo | None) -> None:
    """The Wallet Secret's public fingerprint, and where its X-Wallet-Auth tokens are sent."""
    cfg = config.credentials[name]
    hosts = cfg.wallet_rules.hosts()
    if cfg.wallet_secret is None:
        signs = {up.name for up in config.upstreams.values() if up.credential == name} | {
            r.upstream for r in config.routes if r.credential == name
        }
        if signs & set(hosts):
            print(
                "  no wallet secret: Server Wallet writes through it answer 403 wallet_secret_required"
            )
        return
    if info is not None and info.wallet_fingerprint is not None:
        print(
            f"  wallet secret: ES256 fingerprint {info.wallet_fingerprint} ({info.wallet_source})"
        )
    used = [
        f"upstream {up.name} ({len(up.wallet_rules)} operations)"
        for up in config.upstreams.values()
        if up.credential == name and up.name in hosts
    ] + [
        f"route {r.prefix} -> {r.upstream}"
        for r in config.routes
        if (r.credential or config.upstreams[r.upstream].credential) == name and r.upstream in hosts
    ]
    print(f"  X-Wallet-Auth on: {', '.join(used) or 'nothing (no wallet_auth upstream uses it)'}")


def _check_topper(config: Config) -> list[str]:
    from .credentials import public_fingerprint
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
        return _usage("jwt", "--body is hashed into the wallet token: give --wallet-secret-file")
    if args.key_file is None and args.wallet_secret_file is None:
        return _usage("jwt", "give --key-file (the API key JWT), --wallet-secret-file, or both")
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


def _without_workers(argv: Sequence[str]) -> list[str]:
    """The serve arguments minus --workers (the supervisor gives each worker --workers 1)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def cmd_onramp_url(args: argparse.Namespace) -> int:
    from .onramp import build_offramp_url, build_onramp_url, session_token_for_config

    if args.v2:
        return _onramp_v2(args)
    if args.offramp:
        if not args.partner_user_id or not args.redirect_url:
            return _usage("onramp-url", "--offramp needs --partner-user-id and --redirect-url")
        if args.default_payment_method:
            return _usage("onramp-url", "--default-payment-method is for onramp, not --offramp")
    elif args.default_cashout_method:
        return _usage("onramp-url", "--default-cashout-method is for --offramp")
    config = _config(args)
    import asyncio

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


def _onramp_v2(args: argparse.Namespace) -> int:
    """onramp-url --v2: one POST /platform/v2/onramp/sessions, which answers the URL itself."""
    from .onramp_v2 import onramp_session_for_config

    v1_only = {
        "--offramp": args.offramp,
        "--default-network": args.default_network,
        "--default-asset": args.default_asset,
        "--default-payment-method": args.default_payment_method,
        "--default-cashout-method": args.default_cashout_method,
    }
    for flag, given in v1_only.items():
        if given:
            return _usage("onramp-url", f"{flag} is not an Onramp v2 session option")
    if len(args.blockchains) != 1 or len(args.assets) != 1:
        return _usage(
            "onramp-url", "--v2 takes one network (--blockchains) and one asset (--assets)"
        )
    config = _config(args)
    import asyncio

    try:
        url = asyncio.run(
            onramp_session_for_config(
                config,
                destination_address=args.address,
                destination_network=args.blockchains[0],
                purchase_currency=args.assets[0],
                payment_amount=args.preset_fiat_amount,
                payment_currency=args.fiat_currency,
                client_ip=args.client_ip,
                partner_user_ref=args.partner_user_id,
                redirect_url=args.redirect_url,
            )
        )
    except ValueError as exc:
        return _usage("onramp-url", str(exc))
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

    config = _config(args)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = _without_workers(argv)
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
