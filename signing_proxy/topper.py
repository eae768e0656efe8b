"""Topper bootstrap tokens: the ES256 JWT that starts a Topper session (docs/coinbase-auth.md, "Topper bootstrap tokens").

The ``topper:`` config block (parsed by config_topper.py) names the private key (a JWK as
``signing-proxy keygen`` prints it, or a PEM), the key id Topper issued for its public half, and the widget (flow) id. A flow config
(``source``, ``target``, optional ``partner``) is checked against the rules of Topper's flow
documents, then signed with ``iat``, a fresh UUID4 ``jti`` (Topper echoes it in webhooks as the
session id) and ``sub`` = the widget id; the header carries ``typ``, ``alg`` and ``kid``.

Served as ``POST /topper/bootstrap-token`` on the proxy listener and by ``signing-proxy topper-token``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric import ec

from .config import Config
from .config_topper import Flow, TopperSettings
from .credentials import FileState, parse_private_key, public_fingerprint, read_secret
from .errors import CredentialError, RequestRejected
from .http_request import Request
from .request_body import read_capped_body
from .signers import Clock

__all__ = [
    "ALGORITHM",
    "BOOTSTRAP_PATH",
    "CREDENTIAL_LABEL",
    "BootstrapSigner",
    "BootstrapToken",
    "InvalidFlow",
    "TopperEndpoint",
    "TopperSettings",
    "generate_keypair",
    "load_topper_key",
    "parse_topper_key",
    "topper_settings",
    "validate_flow",
]

log = logging.getLogger(__name__)

BOOTSTRAP_PATH: Final = "/topper/bootstrap-token"
ALGORITHM: Final = "ES256"
CREDENTIAL_LABEL: Final = "topper"  # the `credential` label of tokens_minted_total
MAX_FLOW_BYTES: Final = 64 * 1024
# What each flow's payload must name (uphold/topper-docs, docs/flows/*.mdx). The off-ramp leaves
# its assets to the user unless given; both flows need exactly one of source/target amount.
REQUIRED_FIELDS: Final = {
    "crypto_onramp": ("source.asset", "target.address", "target.asset", "target.network"),
    "crypto_offramp": (),
}
# Set by the proxy, never by the client's flow: the registered JWT claims (RFC 7519 §4.1) and the
# header's fields, so a client cannot stretch a token's life, re-address it or change its signer.
_PROXY_CLAIMS: Final = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti")
_HEADER_FIELDS: Final = ("header", "alg", "kid", "typ", "jku", "jwk", "x5u", "x5c", "crit")


class InvalidFlow(RequestRejected):
    """The flow config is not one Topper would accept; the message names the field."""

    code = "invalid_flow"


def topper_settings(config: Config) -> TopperSettings | None:
    """The ``topper:`` block, validated when the config was loaded; None without one."""
    return config.topper


def parse_topper_key(text: str, source: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from a JWK, ``keygen``'s whole output, or a PEM. Never echoes it."""
    text = text.strip()
    if not text.startswith("{"):
        if "-----BEGIN" not in text:
            raise CredentialError(f"{source}: expected a private JWK (JSON) or a PEM key")
        key = parse_private_key(text, source)  # PEM, with the usual copy-paste repairs
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialError(f"{source}: Topper keys are EC P-256 (ES256), not Ed25519")
        return key
    try:
        jwk = json.loads(text)
    except ValueError:
        raise CredentialError(f"{source}: not valid JSON (expected a private JWK)") from None
    if isinstance(jwk, dict) and "privateKey" in jwk:  # the file `signing-proxy keygen` wrote
        jwk = jwk["privateKey"]
    if isinstance(jwk, str):
        return parse_topper_key(jwk, source)
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise CredentialError(
            f'{source}: expected an EC P-256 JWK ({{"kty": "EC", "crv": "P-256"}})'
        )
    if "d" not in jwk:
        raise CredentialError(
            f'{source}: this JWK is a public key (no "d"); give the private key, and send '
            "Topper the public one"
        )
    import jwt  # PyJWT loads only when Topper is used (~1.2 MiB a proxy without it does not pay)
    from jwt.algorithms import ECAlgorithm

    try:
        parsed = ECAlgorithm.from_jwk(jwk)
    except (jwt.PyJWTError, ValueError, TypeError):
        # The parser's message is not shown: it is not needed and must not quote key bytes.
        raise CredentialError(
            f"{source}: the JWK could not be read (are x, y and d from the same key?)"
        ) from None
    if not isinstance(parsed, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{source}: expected a private key")
    return parsed


def load_topper_key(settings: TopperSettings) -> ec.EllipticCurvePrivateKey:
    source = f"topper {settings.private_key.describe()}"
    return parse_topper_key(read_secret(settings.private_key), source)


def generate_keypair() -> dict[str, dict[str, str]]:
    """A new P-256 key pair as JWKs: keep ``privateKey``, send ``publicKey`` to Topper."""
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    return {
        "privateKey": ECAlgorithm.to_jwk(key, as_dict=True),
        "publicKey": ECAlgorithm.to_jwk(key.public_key(), as_dict=True),
    }


def _positive_decimal(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        number = Decimal(value)
    except InvalidOperation:
        return False
    return number.is_finite() and number > 0


def validate_flow(flow: Any, kind: Flow = "crypto_onramp") -> dict[str, Any]:
    """The flow's claims, or InvalidFlow naming the first field that is wrong."""
    if not isinstance(flow, dict):
        raise InvalidFlow('the flow must be a JSON object: {"source": {...}, "target": {...}}')
    for claim in _PROXY_CLAIMS:
        if claim in flow:
            raise InvalidFlow(
                f"{claim} is set by the proxy, not by the flow (iat: now, jti: a fresh UUID, "
                "sub: the widget id; iss, aud, exp and nbf are not sent); leave it out"
            )
    for name in _HEADER_FIELDS:
        if name in flow:
            raise InvalidFlow(
                f"{name} belongs to the token's header, which the proxy sets (typ, alg, kid); "
                "leave it out of the flow"
            )
    for part in ("source", "target", "partner"):
        if part in flow and not isinstance(flow[part], dict):
            raise InvalidFlow(f"{part} must be an object")
    for path in REQUIRED_FIELDS[kind]:
        part, name = path.split(".")
        value = flow.get(part, {}).get(name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidFlow(f"{path} is required")
    given = [p for p in ("source", "target") if flow.get(p, {}).get("amount") is not None]
    if len(given) != 1:
        raise InvalidFlow(
            "give exactly one of source.amount and target.amount" + (", not both" if given else "")
        )
    if not _positive_decimal(flow[given[0]]["amount"]):
        raise InvalidFlow(f'{given[0]}.amount must be a positive decimal string, e.g. "100.00"')
    return dict(flow)


@dataclass(frozen=True, slots=True)
class BootstrapToken:
    token: str
    url: str  # where the user starts the session
    jti: str  # the session id Topper's webhooks carry

    def as_dict(self) -> dict[str, str]:
        return {"token": self.token, "url": self.url, "jti": self.jti}


class BootstrapSigner:
    """Signs flows with one parsed key; no I/O (like the request signers)."""

    def __init__(
        self, settings: TopperSettings, key: ec.EllipticCurvePrivateKey, *, clock: Clock = time.time
    ):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("ES256 needs a P-256 key")
        self.settings = settings
        self._key = key
        self._clock = clock
        self._headers = {"typ": "JWT", "kid": settings.key_id}
        import jwt

        self._encode = jwt.encode

    def mint(self, flow: Any) -> BootstrapToken:
        claims = validate_flow(flow, self.settings.flow)
        jti = str(uuid.uuid4())
        claims.update(iat=int(self._clock()), jti=jti, sub=self.settings.widget_id)
        token = self._encode(claims, self._key, algorithm=ALGORITHM, headers=self._headers)
        return BootstrapToken(token, f"{self.settings.start_url}?{urlencode({'bt': token})}", jti)


class TopperEndpoint:
    """``POST /topper/bootstrap-token``: a flow JSON body in, ``{"token", "url", "jti"}`` out.

    The key file is re-read when it changes (checked on each request: they are rare), like the
    CDP keys; a broken new file keeps the last good key.
    """

    def __init__(
        self,
        settings: TopperSettings,
        signer: BootstrapSigner | None,
        problem: str | None = None,
        *,
        clock: Clock | None = None,
    ):
        self.settings = settings
        self.signer = signer
        self.problem = problem  # why there is no signer: answered as 503, like a missing key
        self._clock = clock
        self._stamp = self._file_stamp()

    @classmethod
    def from_config(cls, config: Config, *, clock: Clock | None = None) -> TopperEndpoint | None:
        """None without a ``topper:`` block; a key that does not load is logged, not fatal."""
        settings = config.topper
        if settings is None:
            return None
        endpoint = cls(settings, None, clock=clock)
        try:
            endpoint.signer = endpoint._load()
        except CredentialError as exc:
            log.warning(
                "topper key not loaded; POST /topper/bootstrap-token answers 503 until it is fixed",
                extra={"fields": {"problem": exc.message}},
            )
            endpoint.problem = exc.message
        return endpoint

    def _load(self) -> BootstrapSigner:
        key = load_topper_key(self.settings)
        log.info(
            "topper key loaded",
            extra={"fields": {"key_id": self.settings.key_id, "fingerprint": public_fingerprint(key),
                              "environment": self.settings.environment}},
        )  # fmt: skip
        kwargs: Mapping[str, Clock] = {"clock": self._clock} if self._clock else {}
        return BootstrapSigner(self.settings, key, **kwargs)

    def _file_stamp(self) -> FileState | None:
        source = self.settings.private_key
        return FileState.of(Path(source.ref)) if source.kind == "file" else None

    def refresh(self) -> None:
        """Reload the key if its file changed since it was last read."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.signer, self.problem = self._load(), None
        except CredentialError as exc:
            keeping = "keeping the last good key" if self.signer else "still not loaded"
            log.error(
                f"topper key file changed but could not be loaded; {keeping}",
                extra={"fields": {"problem": exc.message}},
            )
            if self.signer is None:
                self.problem = exc.message

    @staticmethod
    def handles(request: Request) -> bool:
        return request.target.partition("?")[0] == BOOTSTRAP_PATH

    async def __call__(self, request: Request) -> bytes:
        """The bootstrap token for the flow in the request's body, as a JSON body."""
        if request.method != "POST":
            raise RequestRejected(
                f"{BOOTSTRAP_PATH} takes POST with a flow JSON body",
                code="method_not_allowed",
                status=405,
            )
        self.refresh()
        if self.signer is None:
            raise CredentialError(f"{self.problem}; no bootstrap token was made")
        if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            # Nothing is decompressed on the proxy (an inflating body costs CPU before any check).
            raise RequestRejected(
                "send the flow uncompressed (no Content-Encoding)",
                code="unsupported_content_encoding",
                status=415,
            )
        body = await read_capped_body(
            request, MAX_FLOW_BYTES, limit="the flow size limit", why="a flow is a small object"
        )
        try:
            flow = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidFlow("the body must be a flow JSON object") from None
        return json.dumps(self.signer.mint(flow).as_dict()).encode()
