"""Coinbase Onramp v2: ``POST api.cdp.coinbase.com/platform/v2/onramp/sessions`` → a ready URL.

The v2 API creates the whole session in one call and answers ``{"session": {"onrampUrl": ...}}``
(coinbase/cdp-sdk ``openapi.yaml``, ``createOnrampSession``; docs/cdp-v2.md). It is signed with the
API-key JWT only, by the configured ``api.cdp.coinbase.com`` upstream's credential, and sent where
that upstream's ``url``, ``ca_file`` and ``timeout`` say, like a request through the proxy.

``clientIp`` is the end user's public IP as the caller knows it; it is never taken from a
client's ``X-Forwarded-For`` (Coinbase warns that header can be forged).
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Final

import aiohttp

from .aiohttp_client import create_session
from .config import Config
from .credentials import CredentialStore
from .errors import ConfigError, ProxyError, UpstreamError
from .onramp import Amount, check_amount, check_client_ip, post_signed_json
from .signers import Clock, Signer
from .upstream_endpoint import UpstreamEndpoint
from .wallet_rules import CDP_HOST

__all__ = [
    "SESSIONS_PATH",
    "create_onramp_session",
    "onramp_session_for_config",
    "session_request_body",
]

SESSIONS_PATH: Final = "/platform/v2/onramp/sessions"
_SHOWN: Final = 500


def session_request_body(
    *,
    destination_address: str,
    destination_network: str,
    purchase_currency: str,
    payment_amount: Amount | None = None,
    payment_currency: str | None = None,
    client_ip: str | None = None,
    partner_user_ref: str | None = None,
    redirect_url: str | None = None,
) -> dict[str, Any]:
    """The JSON body of a session request; ValueError for what Coinbase would refuse."""
    for name, value in (
        ("destination_address", destination_address),
        ("destination_network", destination_network),
        ("purchase_currency", purchase_currency),
    ):
        if not value or not value.strip():
            raise ValueError(f"{name} is required")
    body: dict[str, Any] = {
        "destinationAddress": destination_address,
        "destinationNetwork": destination_network,
        "purchaseCurrency": purchase_currency,
    }
    optional = {
        "paymentAmount": check_amount(payment_amount, "payment_amount"),
        "paymentCurrency": payment_currency,
        "clientIp": None if client_ip is None else check_client_ip(client_ip),
        "partnerUserRef": partner_user_ref,
        "redirectUrl": redirect_url,
    }
    if optional["paymentAmount"] is not None and not payment_currency:
        raise ValueError("payment_amount needs payment_currency (e.g. USD)")
    return body | {k: v for k, v in optional.items() if v is not None}


def _message(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("errorMessage"), str):
        text = data["errorMessage"]
    text = " ".join(text.split())
    return (text[:_SHOWN] + "…") if len(text) > _SHOWN else (text or "(empty body)")


async def create_onramp_session(
    session: aiohttp.ClientSession, endpoint: UpstreamEndpoint, signer: Signer, **fields: Any
) -> str:
    """POST the session request to ``endpoint``, signed by ``signer``; the onramp URL it returns.

    ``fields`` are ``session_request_body``'s arguments.
    """
    host = endpoint.config.name
    status, reason, answer = await post_signed_json(
        session, endpoint, signer, SESSIONS_PATH, session_request_body(**fields)
    )
    if status not in (200, 201):
        raise UpstreamError(
            f"{host} answered {status} {reason}: {_message(answer)}",
            code="upstream_rejected",
            status=status,
        )
    try:
        url = json.loads(answer)["session"]["onrampUrl"]
    except (ValueError, KeyError, TypeError):
        url = None
    if not isinstance(url, str) or not url.startswith("https://"):
        raise UpstreamError(
            f"{host} answered {status} without session.onrampUrl: {_message(answer)}",
            code="upstream_bad_response",
        )
    return url


async def onramp_session_for_config(
    config: Config, *, clock: Clock | None = None, **fields: Any
) -> str:
    """An onramp URL through the config's ``api.cdp.coinbase.com`` upstream and its credential."""
    where = f"{config.path}: " if config.path else ""
    upstream = config.upstreams.get(CDP_HOST)
    if upstream is None or upstream.credential is None:
        raise ProxyError(
            f"{where}Onramp v2 sessions need the upstream {CDP_HOST} with a credential (a CDP "
            f"Secret API key): set upstreams.{CDP_HOST}.credential",
            code="onramp_not_configured",
        )
    name = upstream.credential
    session_request_body(**fields)  # ValueError for bad input, before any key is loaded
    store = CredentialStore({name: config.credentials[name]}, clock=clock)
    store[name].load()
    try:
        endpoint = UpstreamEndpoint.build(upstream)
    except (OSError, ssl.SSLError):
        raise ConfigError(
            f"{where}upstreams.{CDP_HOST}.ca_file: cannot load {upstream.ca_file} as a CA bundle"
        ) from None
    async with create_session() as session:
        return await create_onramp_session(session, endpoint, store.signer(name), **fields)
