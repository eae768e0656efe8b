"""The ``topper:`` section: the key, ids and defaults for Topper bootstrap tokens, and its parsing.

It names the private key (a JWK as ``signing-proxy keygen`` prints it, or a PEM; read by topper.py,
never here), the key id Topper issued for its public half, the widget (flow) id, the environment and
the flow kind. topper.py mints the tokens.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal

from .config_reader import Reader, SecretSource
from .ratelimit import RateLimit

__all__ = ["FLOWS", "START_URLS", "Environment", "Flow", "TopperSettings", "parse_topper"]

START_URLS: Final = {
    "production": "https://app.topperpay.com/",
    "sandbox": "https://app.sandbox.topperpay.com/",
}
FLOWS: Final = ("crypto_onramp", "crypto_offramp")
_KEYS: Final = {
    "private_key",
    "private_key_env",
    "private_key_file",
    "key_id",
    "widget_id",
    "environment",
    "flow",
    "rate_limit",
}

Environment = Literal["production", "sandbox"]
Flow = Literal["crypto_onramp", "crypto_offramp"]


@dataclass(frozen=True)
class TopperSettings:
    private_key: SecretSource
    key_id: str  # the key UUID Topper issued for the public key
    widget_id: str  # the flow/widget UUID: the token's `sub`
    environment: Environment = "production"
    flow: Flow = "crypto_onramp"
    rate_limit: RateLimit | None = None  # tokens per second for POST /topper/bootstrap-token

    @property
    def start_url(self) -> str:
        return START_URLS[self.environment]


def _uuid(r: Reader, value: Any, where: str, what: str) -> str:
    text = r.string(value, where)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise r.fail(where, f"expected {what} (a UUID), got {text!r}") from None


def parse_topper(r: Reader, raw: Any) -> TopperSettings:
    """The ``topper:`` block (present, possibly empty); ConfigError naming file and field."""
    data = r.mapping(raw, "topper")
    r.known(data, _KEYS, "topper")
    key = r.secret(data, "private_key", "topper")
    if key is None:
        raise r.fail(
            "topper",
            "give private_key_file (the private JWK or PEM; `signing-proxy keygen` makes a key) "
            "or private_key_env",
        )
    key_id = _uuid(r, data.get("key_id"), "topper.key_id", "the key id Topper gave you")
    widget_id = _uuid(r, data.get("widget_id"), "topper.widget_id", "the widget (flow) id")
    environment = data.get("environment", "production")
    if environment not in START_URLS:
        raise r.fail("topper.environment", "expected 'production' or 'sandbox'")
    flow = data.get("flow", "crypto_onramp")
    if flow not in FLOWS:
        raise r.fail("topper.flow", "expected 'crypto_onramp' or 'crypto_offramp'")
    rate_limit = r.rate_limit(data.get("rate_limit"), "topper.rate_limit")
    return TopperSettings(key, key_id, widget_id, environment, flow, rate_limit)
