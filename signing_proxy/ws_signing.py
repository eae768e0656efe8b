"""What the WebSocket relay writes into client→upstream messages: the signer's auth fields.

When a relayed route has a credential, every client→upstream JSON text message whose ``type`` the
signer authenticates (``Signer.websocket_messages``) gets the signer's fields
(``Signer.websocket_auth``): a fresh ``jwt`` for a CDP key in each ``subscribe``/``unsubscribe``
(docs/coinbase-auth.md, "Advanced Trade WebSocket"), key, passphrase, timestamp and signature for
an Exchange key in each ``subscribe``. They replace any the client sent under those names; every
other message passes unchanged. Each signed message counts against the credential's rate limit,
like a request; one over it is not forwarded, and the client gets an error frame instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final

from .credentials import CredentialStore
from .metrics import ProxyMetrics
from .ratelimit import TokenBucket

__all__ = ["MessageSigner", "SubscribeRateLimited", "inject_auth", "inject_jwt"]

_SIGNED_TYPES: Final = frozenset({"subscribe", "unsubscribe"})


def inject_auth(
    text: str, types: frozenset[str], fields: Callable[[], dict[str, str]]
) -> str | None:
    """``text`` with ``fields()`` set in it if it is a JSON object whose ``type`` is in ``types``.

    The fields replace any the client sent under those names. None means "send the message as
    it is": not JSON, not an object, or another ``type``.
    """
    if not types:
        return None
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("type") not in types:
        return None
    message.update(fields())
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def inject_jwt(text: str, mint: Callable[[], str]) -> str | None:
    """``text`` with ``jwt`` set to ``mint()`` if it is a JSON subscribe/unsubscribe object."""
    return inject_auth(text, _SIGNED_TYPES, lambda: {"jwt": mint()})


class SubscribeRateLimited(Exception):
    """A subscribe message over its credential's rate limit: answered with an error frame."""

    def __init__(self, credential: str, bucket: TokenBucket, wait: float):
        super().__init__(credential)
        self.credential, self.bucket, self.wait = credential, bucket, wait

    def frame(self) -> str:
        limit = self.bucket.limit
        return json.dumps(
            {
                "type": "error",
                "error": "rate_limited",
                "message": f"rate limit of credential {self.credential!r} reached "
                f"({limit.rate:g}/s, burst {limit.burst}); this message was not forwarded, "
                f"send it again in {TokenBucket.retry_after(self.wait)}s",
            }
        )


class MessageSigner:
    """Signs one relay's client→upstream messages with one credential's WebSocket form."""

    def __init__(
        self,
        credentials: CredentialStore,
        credential: str,
        buckets: Mapping[str, TokenBucket],
        metrics: ProxyMetrics,
    ):
        self.credentials = credentials
        self.credential = credential
        self.buckets = buckets
        self.metrics = metrics

    def __call__(self, text: str) -> str | None:
        """``text`` with the signer's WebSocket auth fields set, if it is a message it signs.

        Raises SubscribeRateLimited for a message over the credential's rate limit.
        """
        credential = self.credential
        # Asked per message, so a key rotated while the socket is open is used from then on.
        signer = self.credentials.signer(credential)

        def fields() -> dict[str, str]:
            # Each signed message counts against the credential's rate limit, like a request.
            bucket = self.buckets.get(credential)
            if bucket is not None and (wait := bucket.acquire()) > 0:
                self.metrics.rate_limited.labels(credential).inc()
                raise SubscribeRateLimited(credential, bucket, wait)
            auth = signer.websocket_auth()
            self.metrics.ws_jwts.labels(credential).inc()
            self.metrics.tokens.labels(credential, signer.scheme).inc()
            return auth

        return inject_auth(text, signer.websocket_messages, fields)
