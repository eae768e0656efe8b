"""Which CDP v2 requests carry an ``X-Wallet-Auth`` token: the rules as data, and their matching.

Coinbase's OpenAPI description of the CDP v2 API (coinbase/cdp-sdk ``openapi.yaml``, server
``https://api.cdp.coinbase.com/platform``) marks the ``X-Wallet-Auth`` header *required* on the
Server Wallet write operations below and *optional* on some embedded-wallet ones. The proxy sends
the token on both kinds when the credential has a Wallet Secret; without one, a required
operation is refused before anything is sent, and an optional one goes with the API-key JWT only.

The defaults hold for the ``api.cdp.coinbase.com`` upstream; ``wallet_auth: {paths: [...]}`` on an
upstream adds rules (a new Coinbase endpoint does not need a release). A rule is
``"METHOD /path"`` where a ``{name}`` segment stands for any one segment. Rules match the path as
sent upstream, in every reading a server could make of it (``policy.path_readings``:
percent-decoded, repeated slashes collapsed, trailing slash dropped, any letter case), so a
spelling variant cannot skip the wallet token. See docs/coinbase-auth.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from .policy import path_readings

__all__ = [
    "CDP_HOST",
    "OPTIONAL_OPERATIONS",
    "REQUIRED_OPERATIONS",
    "WalletRule",
    "WalletRuleError",
    "WalletRules",
]

CDP_HOST: Final = "api.cdp.coinbase.com"
_BASE: Final = "/platform/v2"

# openapi.yaml: X-Wallet-Auth required: true (26 operations, all POST).
REQUIRED_OPERATIONS: Final = tuple(
    f"POST {_BASE}{path}"
    for path in (
        "/evm/accounts",
        "/evm/accounts/import",
        "/evm/accounts/{address}/sign",
        "/evm/accounts/{address}/sign/transaction",
        "/evm/accounts/{address}/sign/message",
        "/evm/accounts/{address}/sign/typed-data",
        "/evm/accounts/{address}/send/transaction",
        "/evm/accounts/{address}/eip7702/delegation",
        "/evm/accounts/{address}/export",
        "/evm/accounts/export/by-name/{name}",
        "/evm/smart-accounts/{address}/user-operations/prepare-and-send",
        "/evm/smart-accounts/{address}/spend-permissions",
        "/evm/smart-accounts/{address}/spend-permissions/revoke",
        "/solana/accounts",
        "/solana/accounts/import",
        "/solana/accounts/{address}/export",
        "/solana/accounts/export/by-name/{name}",
        "/solana/accounts/{address}/sign/transaction",
        "/solana/accounts/{address}/sign/message",
        "/solana/accounts/send/transaction",
        "/end-users",
        "/end-users/import",
        "/end-users/{userId}/evm",
        "/end-users/{userId}/evm-smart-account",
        "/end-users/{userId}/solana",
        "/embedded-wallet-api/end-users/{userId}/address/{address}/delegation",
    )
)

# openapi.yaml: X-Wallet-Auth accepted but not required (14 embedded-wallet operations).
_EMBEDDED: Final = f"{_BASE}/embedded-wallet-api/end-users/{{userId}}"
OPTIONAL_OPERATIONS: Final = (
    *(
        f"POST {_EMBEDDED}{path}"
        for path in (
            "/evm/sign/transaction",
            "/evm/send/transaction",
            "/evm/{address}/send/{asset}",
            "/evm/sign/message",
            "/evm/sign/typed-data",
            "/evm/eip7702/delegation",
            "/evm/smart-accounts/{address}/send",
            "/solana/sign/message",
            "/solana/sign/transaction",
            "/solana/sign/x402-payment",
            "/solana/send/transaction",
            "/solana/{address}/send/{asset}",
        )
    ),
    f"DELETE {_EMBEDDED}/delegation",
    f"DELETE {_EMBEDDED}/address/{{address}}/delegation",
)

_RULE: Final = re.compile(r"(?P<method>[A-Z]{1,16}) (?P<path>/\S*)")
_PARAM: Final = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

Need = Literal["required", "optional"]


class WalletRuleError(ValueError):
    """A rule that cannot be compiled; config.py turns it into a ConfigError naming the field."""


@dataclass(frozen=True)
class WalletRule:
    text: str  # as written, for messages and `check`
    method: str
    pattern: re.Pattern[str]
    need: Need

    @classmethod
    def parse(cls, text: str, need: Need = "required") -> WalletRule:
        parts = text.split()
        found = _RULE.fullmatch(f"{parts[0].upper()} {parts[1]}") if len(parts) == 2 else None
        if found is None:
            raise WalletRuleError(
                f"wallet rule {text!r}: expected 'METHOD /path', e.g. "
                "'POST /platform/v2/evm/accounts/{address}/sign'"
            )
        regex = []
        for segment in found["path"].split("/")[1:]:
            if _PARAM.fullmatch(segment):
                regex.append("[^/]+")
            elif _SEGMENT.fullmatch(segment):
                regex.append(re.escape(segment))
            else:
                raise WalletRuleError(
                    f"wallet rule {text!r}: segment {segment!r} is neither a literal nor a "
                    "{name} placeholder"
                )
        pattern = re.compile("/" + "/".join(regex), re.IGNORECASE)
        return cls(found.group(0), found["method"], pattern, need)


@dataclass(frozen=True)
class WalletRules:
    """The rules of every upstream (by host name); built once from the config.

    Matching uses one combined regex per host, method and need, built here once: a request costs
    two regex matches per path reading, however many rules there are.
    """

    by_host: Mapping[str, tuple[WalletRule, ...]] = field(default_factory=dict)
    _index: dict[tuple[str, str], tuple[re.Pattern[str] | None, re.Pattern[str] | None]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for host, rules in self.by_host.items():
            for method in {rule.method for rule in rules}:
                self._index[(host, method)] = (
                    _combined(r for r in rules if r.method == method and r.need == "required"),
                    _combined(r for r in rules if r.method == method and r.need == "optional"),
                )

    @classmethod
    def defaults(cls, host: str) -> tuple[WalletRule, ...]:
        if host != CDP_HOST:
            return ()
        return tuple(WalletRule.parse(r) for r in REQUIRED_OPERATIONS) + tuple(
            WalletRule.parse(r, "optional") for r in OPTIONAL_OPERATIONS
        )

    def need(self, method: str, host: str, path: str) -> Need | None:
        """Whether this request needs a wallet token (``required``), may carry one, or neither."""
        found = self._index.get((host, method.upper()))
        if found is None:  # most requests (other hosts, GET) stop here
            return None
        required, optional = found
        readings = path_readings(path)
        if required is not None and any(required.fullmatch(p) for p in readings):
            return "required"
        if optional is not None and any(optional.fullmatch(p) for p in readings):
            return "optional"
        return None

    def hosts(self) -> list[str]:
        return [host for host, rules in self.by_host.items() if rules]


def _combined(rules: Iterable[WalletRule]) -> re.Pattern[str] | None:
    patterns = [rule.pattern.pattern for rule in rules]
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None
