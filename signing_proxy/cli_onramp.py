"""``signing-proxy onramp-url``: a Coinbase Onramp (or Offramp) URL with a fresh session token.

v1 (default) asks ``POST /onramp/v1/token`` for a session token and builds the pay.coinbase.com
URL from it (``onramp``); ``--v2`` creates the session with ``POST /platform/v2/onramp/sessions``,
which answers the URL itself (``onramp_v2``). Both go through the configured upstream and its
credential.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli_config import config_from_args, usage_error

__all__ = ["cmd_onramp_url"]


def cmd_onramp_url(args: argparse.Namespace) -> int:
    from .onramp import build_offramp_url, build_onramp_url, session_token_for_config

    if args.v2:
        return _onramp_v2(args)
    if args.offramp:
        if not args.partner_user_id or not args.redirect_url:
            return usage_error("onramp-url", "--offramp needs --partner-user-id and --redirect-url")
        if args.default_payment_method:
            return usage_error(
                "onramp-url", "--default-payment-method is for onramp, not --offramp"
            )
    elif args.default_cashout_method:
        return usage_error("onramp-url", "--default-cashout-method is for --offramp")
    config = config_from_args(args)
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
            return usage_error("onramp-url", f"{flag} is not an Onramp v2 session option")
    if len(args.blockchains) != 1 or len(args.assets) != 1:
        return usage_error(
            "onramp-url", "--v2 takes one network (--blockchains) and one asset (--assets)"
        )
    config = config_from_args(args)
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
        return usage_error("onramp-url", str(exc))
    print(url)
    return 0
