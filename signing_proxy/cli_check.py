"""``signing-proxy check``: load the config and every credential, and say what serve would do.

Prints per credential its scheme, key id and public-key fingerprint (never secret material),
the wallet secret and where its tokens go, policies, rate limits, upstreams, routes and their
fences, inbound auth and the topper: key. Exit 1 when anything fails to load, each problem
named on stderr (a config that does not parse exits 2, from ``main``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .cli_config import config_from_args
from .config import Config
from .errors import ConfigError, CredentialError

if TYPE_CHECKING:
    from .credentials import CredentialInfo

__all__ = ["cmd_check"]


def cmd_check(args: argparse.Namespace) -> int:
    from .credentials import CredentialStore, read_secret
    from .routing import Router, describe_fence

    config = config_from_args(args)
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
            from .upstream_endpoint import UpstreamEndpoint

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
