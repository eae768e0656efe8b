"""Coinbase Onramp / Offramp: a session token through the configured upstream, then the pay URL.

The token comes from ``POST api.developer.coinbase.com/onramp/v1/token`` (docs/coinbase-auth.md, "Onramp and Offramp"),
signed by that upstream's credential and sent where its ``url``, ``ca_file`` and ``timeout`` say,
exactly like a request through the proxy. It is single-use and expires after 5 minutes; the URL
builders put it, with the display options, into a pay.coinbase.com URL.

Apps embedding the package can call ``build_onramp_url`` / ``build_offramp_url`` with a token
they got elsewhere, or ``request_session_token`` with their own session, endpoint and signer.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from .aiohttp_client import CLIENT_FAILURES, create_session, translate_client_error
from .config import Config
from .credentials import CredentialStore
from .errors import ConfigError, ProxyError, UpstreamError
from .signers import Clock, Signer
from .upstream_endpoint import UpstreamEndpoint

__all__ = [
    "OFFRAMP_URL",
    "ONRAMP_HOST",
    "ONRAMP_URL",
    "TOKEN_PATH",
    "build_offramp_url",
    "build_onramp_url",
    "check_amount",
    "check_client_ip",
    "post_signed_json",
    "request_session_token",
    "session_token_for_config",
    "token_request_body",
]

ONRAMP_HOST: Final = "api.developer.coinbase.com"
TOKEN_PATH: Final = "/onramp/v1/token"  # noqa: S105 - a URL path
ONRAMP_URL: Final = "https://pay.coinbase.com/buy/select-asset"
OFFRAMP_URL: Final = "https://pay.coinbase.com/v3/sell/input"
_SHOWN_BODY: Final = 500  # characters of an upstream error body worth showing

Amount = str | int | float | Decimal


def check_amount(value: Amount | None, name: str = "the amount") -> str | None:
    """The amount as the URL carries it; ValueError unless it is a positive number."""
    if value is None:
        return None
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not number.is_finite() or number <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return str(value).strip() if isinstance(value, str) else format(number, "f")


def _pay_url(base: str, token: str, params: Mapping[str, str | None]) -> str:
    if not token or not token.strip():
        raise ValueError("the session token is empty")
    query = {"sessionToken": token} | {k: v for k, v in params.items() if v is not None}
    return f"{base}?{urlencode(query, quote_via=quote, safe='')}"


def build_onramp_url(
    token: str,
    *,
    default_network: str | None = None,
    default_asset: str | None = None,
    preset_fiat_amount: Amount | None = None,
    fiat_currency: str | None = None,
    default_payment_method: str | None = None,
    partner_user_id: str | None = None,
    redirect_url: str | None = None,
) -> str:
    """``https://pay.coinbase.com/buy/select-asset?sessionToken=…`` plus the options given."""
    return _pay_url(
        ONRAMP_URL,
        token,
        {
            "defaultNetwork": default_network,
            "defaultAsset": default_asset,
            "presetFiatAmount": check_amount(preset_fiat_amount, "preset_fiat_amount"),
            "fiatCurrency": fiat_currency,
            "defaultPaymentMethod": default_payment_method,
            **_partner_user(partner_user_id),
            "redirectUrl": redirect_url,
        },
    )


def build_offramp_url(
    token: str,
    *,
    partner_user_id: str,
    redirect_url: str,
    default_network: str | None = None,
    default_asset: str | None = None,
    preset_fiat_amount: Amount | None = None,
    fiat_currency: str | None = None,
    default_cashout_method: str | None = None,
) -> str:
    """``https://pay.coinbase.com/v3/sell/input?sessionToken=…``; Coinbase requires the user id
    (which its transaction-status API is queried by) and the URL the user returns to."""
    if not partner_user_id or not partner_user_id.strip():
        raise ValueError("offramp needs partner_user_id: your id for the user (under 50 chars)")
    if not redirect_url or not redirect_url.strip():
        raise ValueError("offramp needs redirect_url: where the user goes after sending crypto")
    return _pay_url(
        OFFRAMP_URL,
        token,
        {
            **_partner_user(partner_user_id),
            "redirectUrl": redirect_url,
            "defaultNetwork": default_network,
            "defaultAsset": default_asset,
            "presetFiatAmount": check_amount(preset_fiat_amount, "preset_fiat_amount"),
            "fiatCurrency": fiat_currency,
            "defaultCashoutMethod": default_cashout_method,
        },
    )


def _partner_user(value: str | None) -> dict[str, str | None]:
    # The Onramp docs name it partnerUserId; Coinbase's current URL reference calls the same
    # value partnerUserRef. Both are sent, so the URL works with either reading.
    return {"partnerUserId": value, "partnerUserRef": value}


def check_client_ip(text: str) -> str:
    """The end user's IP as the token request carries it; ValueError unless it is public."""
    try:
        public = ipaddress.ip_address(text).is_global
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if not public:
        raise ValueError(f"{text} is not a public IP address (Coinbase requires one)")
    return text


def token_request_body(
    addresses: Mapping[str, Sequence[str]], assets: Sequence[str], client_ip: str | None = None
) -> dict[str, Any]:
    """The JSON body of a session-token request: ``{address: [blockchain, ...]}`` and assets."""
    if not addresses:
        raise ValueError("give at least one address")
    entries = []
    for address, blockchains in addresses.items():
        chains = [c for c in blockchains if c]
        if not address or not chains:
            raise ValueError(f"address {address!r} needs at least one blockchain, e.g. base")
        entries.append({"address": address, "blockchains": chains})
    body: dict[str, Any] = {"addresses": entries, "assets": [a for a in assets if a]}
    if client_ip is not None:
        body["clientIp"] = check_client_ip(client_ip)
    return body


def _coinbase_message(body: bytes) -> str:
    """What the upstream said: its JSON ``message`` when there is one, else its body, shortened."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        text = data["message"]
    text = " ".join(text.split())  # one line, no control characters
    return (text[:_SHOWN_BODY] + "…") if len(text) > _SHOWN_BODY else (text or "(empty body)")


async def post_signed_json(
    session: aiohttp.ClientSession,
    endpoint: UpstreamEndpoint,
    signer: Signer,
    path: str,
    payload: Any,
) -> tuple[int, str, bytes]:
    """POST ``payload`` as JSON to ``endpoint`` + ``path``, signed by ``signer``; the answer's
    status, reason and body. Connection failures become UpstreamError (the proxy's codes)."""
    host = endpoint.config.name
    body = json.dumps(payload).encode()
    headers = {"Host": host, "Content-Type": "application/json", "Accept": "application/json"}
    headers.update(signer.sign("POST", host, path, "", body))
    try:
        async with session.post(
            URL(endpoint.origin + path, encoded=True),
            data=body,
            headers=headers,
            ssl=endpoint.ssl,
            server_hostname=endpoint.server_hostname,
            timeout=endpoint.timeout,
            allow_redirects=False,
        ) as response:
            return response.status, response.reason or "", await response.read()
    except CLIENT_FAILURES as exc:
        raise translate_client_error(exc, host, endpoint.config.timeout) from None


async def request_session_token(
    session: aiohttp.ClientSession,
    endpoint: UpstreamEndpoint,
    signer: Signer,
    *,
    addresses: Mapping[str, Sequence[str]],
    assets: Sequence[str],
    client_ip: str | None = None,
) -> str:
    """POST /onramp/v1/token to ``endpoint``, signed by ``signer``; the token, or UpstreamError."""
    host = endpoint.config.name
    status, reason, answer = await post_signed_json(
        session, endpoint, signer, TOKEN_PATH, token_request_body(addresses, assets, client_ip)
    )
    if status != 200:
        raise UpstreamError(
            f"{host} answered {status} {reason}: {_coinbase_message(answer)}",
            code="upstream_rejected",
            status=status,
        )
    try:
        token = json.loads(answer).get("token")
    except (ValueError, AttributeError):
        token = None
    if not isinstance(token, str) or not token:
        raise UpstreamError(
            f"{host} answered 200 without a token: {_coinbase_message(answer)}",
            code="upstream_bad_response",
        )
    return token


async def session_token_for_config(
    config: Config,
    *,
    addresses: Mapping[str, Sequence[str]],
    assets: Sequence[str],
    client_ip: str | None = None,
    clock: Clock | None = None,
) -> str:
    """A session token through the config's ``api.developer.coinbase.com`` upstream and its key."""
    where = f"{config.path}: " if config.path else ""
    upstream = config.upstreams.get(ONRAMP_HOST)
    if upstream is None:
        raise ProxyError(
            f"{where}no upstream {ONRAMP_HOST} under upstreams:; add it with a CDP credential "
            "(a Secret API key) to request Onramp session tokens",
            code="onramp_not_configured",
        )
    name = upstream.credential
    if name is None:
        raise ProxyError(
            f"{where}upstream {ONRAMP_HOST} has no credential; session tokens need a CDP "
            "Secret API key: set upstreams.api.developer.coinbase.com.credential",
            code="onramp_not_configured",
        )
    store = CredentialStore({name: config.credentials[name]}, clock=clock)
    store[name].load()  # CredentialError names the credential and its source
    try:
        endpoint = UpstreamEndpoint.build(upstream)
    except (OSError, ssl.SSLError):
        raise ConfigError(
            f"{where}upstreams.{ONRAMP_HOST}.ca_file: cannot load {upstream.ca_file} as a CA bundle"
        ) from None
    async with create_session() as session:
        return await request_session_token(
            session,
            endpoint,
            store.signer(name),
            addresses=addresses,
            assets=assets,
            client_ip=client_ip,
        )
