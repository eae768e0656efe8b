"""The ``signing-proxy`` command: serve, check, jwt (see CONTRACT.md).

Exit codes: 0 fine, 1 a problem with credentials or a request, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import __version__
from .config import ENV_PREFIX, Config, env_overrides, load_config
from .errors import ConfigError, CredentialError

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
    return load_config(_config_path(args), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging

    config = _config(args)
    setup_logging(config.log_format, config.log_level)
    if config.workers > 1:
        from .workers import supervise, worker_command

        argv = [a for a in (args.argv or []) if a]
        stop_timeout = config.min_drain + config.drain_timeout + 5
        return supervise(config.workers, worker_command(argv), stop_timeout)

    import asyncio

    from .app import run
    from .workers import MULTIPROC_ENV, WORKER_ENV

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
    if config.inbound_token is not None:
        try:
            read_secret(config.inbound_token)
            print(f"inbound auth: token from {config.inbound_token.describe()}")
        except CredentialError as exc:
            problems.append(f"inbound_auth: {exc.message}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_jwt(args: argparse.Namespace) -> int:
    from .credentials import load_key_file, parse_private_key, public_fingerprint
    from .signers import CdpJwtSigner, jwt_uri

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
    p.add_argument("--key-file", required=True, help="CDP key JSON as downloaded from the portal")
    p.add_argument("--export", action="store_true", help="print `export JWT=<token>` for eval")
    p.add_argument("-v", "--verbose", action="store_true", help="print the signed uri to stderr")
    p.add_argument("method", metavar="METHOD", type=str.upper, help="HTTP method, e.g. GET")
    p.add_argument("url", metavar="URL", help="https://host/path?query or host/path")
    p.set_defaults(func=cmd_jwt)
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
    except CredentialError as exc:
        print(f"signing-proxy: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
