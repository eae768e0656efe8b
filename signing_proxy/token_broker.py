"""The access token of one (credential, upstream) on the derivatives gateway: exchanged, cached, refreshed.

An upstream with ``auth: token_exchange`` is not signed per request. Its CDP key signs a JWT
without ``uri`` (re-signed for every exchange), the gateway's ``public/auth`` method exchanges it
for a short-lived access token, and private calls carry ``Authorization: Bearer <token>``
(docs/coinbase-auth.md, "Derivatives gateway"). One ``TokenBroker`` per (credential, upstream):

- the token lives in memory only; it is never logged, counted, or put in an error;
- exchanged at start, refreshed in the background at 80 % of its lifetime; exactly one exchange
  is in flight however many requests wait for it (they share one task);
- failures back off (doubling from 1 s to 60 s, jittered); while no valid token exists, requests
  get a 503 that names the failure (HTTP status, JSON-RPC code), never waiting past their timeout;
- ``refresh(rejected)`` drops a token the gateway refused and gets a new one, once for all callers;
- a rotated key file (a new signer in the credential store) triggers a fresh exchange; a broken
  new file keeps the last good key, and so the last good token.

The exchange is I/O, so it lives here and not among the signers; it uses the proxy's
ClientSession and the upstream's url, TLS settings and timeout. The call and its answer are in
public_auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any, Final

import aiohttp
from yarl import URL

from . import __version__
from .aiohttp_client import CLIENT_FAILURES, translate_client_error
from .credential_loader import Credential
from .errors import CredentialError, SigningError, UpstreamError
from .metrics import ProxyMetrics
from .public_auth import (
    AUTH_PATH,
    BACKOFF_CAP,
    BACKOFF_FIRST,
    REFRESH_RATIO,
    ExchangeFailed,
    Grant,
    auth_call,
    parse_auth_answer,
)
from .signers import Clock, Signer
from .upstream_endpoint import UpstreamEndpoint

__all__ = ["MIN_REJECTED_AGE", "TokenBroker", "TokenUnavailable"]

# The broker's log lines keep the logger name they had before token_exchange was split.
log = logging.getLogger("signing_proxy.token_exchange")

MIN_REJECTED_AGE: Final = 1.0  # a token younger than this is not dropped on one rejection
_MAX_ANSWER_BYTES: Final = 64 * 1024
_KEY_POLL: Final = 1.0  # how often the background task looks for a (rotated) key


class TokenUnavailable(UpstreamError):
    """No valid access token can be had now: the last exchange failed (503, Retry-After)."""

    status = 503
    code = "token_exchange_failed"


class TokenBroker:
    """The access token of one (credential, upstream); see the module docstring."""

    def __init__(
        self,
        credential: Credential,
        endpoint: UpstreamEndpoint,
        session: aiohttp.ClientSession,
        metrics: ProxyMetrics,
        *,
        clock: Clock = time.monotonic,
    ):
        self.credential = credential
        self.endpoint = endpoint
        self.upstream = endpoint.config.name
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self.backoff_first = BACKOFF_FIRST
        self.backoff_cap = BACKOFF_CAP
        self.min_rejected_age = MIN_REJECTED_AGE
        self._token: str | None = None
        self._obtained_at = 0.0
        self._expires_at = 0.0
        self._refresh_at = 0.0  # 0: due now
        self._seen: Signer | None = None  # the signer last seen in the store (rotation check)
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.exchanges = 0  # attempts made (shown by /readyz)
        self._inflight: asyncio.Task[str | None] | None = None
        self._task: asyncio.Task[None] | None = None

    # --- what requests call -------------------------------------------------------------------

    async def token(self, within: float) -> str:
        """A valid access token, waiting at most ``within`` seconds for an exchange."""
        self._check_rotation()
        now = self._clock()
        token = self._token
        if token is not None and now < self._expires_at:
            return token
        if self._seen is None:
            raise CredentialError(
                self.credential.error or f"credential '{self.credential.name}' is not loaded"
            )
        if self._inflight is None and self._failures and now < self._retry_at:
            raise self._unavailable()
        task = self._start()
        try:
            async with asyncio.timeout(max(within, 0.001)):
                token = await asyncio.shield(task)
        except TimeoutError:
            raise UpstreamError(
                f"the access-token exchange with {self.upstream} for credential "
                f"'{self.credential.name}' did not finish within {max(within, 0):.3g}s",
                code="token_exchange_timeout",
                status=504,
            ) from None
        if token is None:
            raise self._unavailable()
        return token

    async def refresh(self, rejected: str, within: float) -> str:
        """A token other than ``rejected`` (unless that one is brand new): one exchange for all."""
        if rejected == self._token and self._clock() - self._obtained_at >= self.min_rejected_age:
            self._token = None
            self._refresh_at = 0.0
        return await self.token(within)

    # --- state ----------------------------------------------------------------------------------

    def usable(self) -> bool:
        """False when requests that need a token would fail: no valid token, last exchange failed."""
        valid = self._token is not None and self._clock() < self._expires_at
        return valid or not self._failures

    def describe(self) -> dict[str, Any]:
        """For /readyz: whether a token is held and how the exchanges went; never the token."""
        now = self._clock()
        valid = self._token is not None and now < self._expires_at
        return {
            "credential": self.credential.name,
            "upstream": self.upstream,
            "token": "valid" if valid else "none",
            "expires_in": round(self._expires_at - now, 1) if valid else 0,
            "exchanges": self.exchanges,
            "failures": self._failures,
            "last_error": self.last_error,
        }

    # --- exchanging -----------------------------------------------------------------------------

    def _check_rotation(self) -> None:
        signer = self.credential.signer
        if signer is not self._seen:
            self._seen = signer
            if signer is not None:  # a new key (or the first): exchange with it now
                self._refresh_at = 0.0
                self._failures = 0

    def _due_in(self) -> float:
        """Seconds until the next exchange is due (inf: no key to exchange)."""
        self._check_rotation()
        if self._seen is None:
            return float("inf")
        due = self._retry_at if self._failures else self._refresh_at
        return due - self._clock()

    def _start(self) -> asyncio.Task[str | None]:
        if self._inflight is None:
            task = asyncio.get_running_loop().create_task(self._exchange())
            self._inflight = task
            task.add_done_callback(self._finished)
        return self._inflight

    def _finished(self, task: asyncio.Task[str | None]) -> None:
        if self._inflight is task:
            self._inflight = None

    def _unavailable(self) -> TokenUnavailable:
        wait = max(0, int(self._retry_at - self._clock() + 0.999))
        return TokenUnavailable(
            f"no access token for credential '{self.credential.name}': the token exchange with "
            f"{self.upstream} failed ({self.last_error}); next attempt in {wait}s",
            headers={"Retry-After": str(max(wait, 1))},
        )

    async def _exchange(self) -> str | None:
        signer = self._seen
        jwt = signer.exchange_jwt() if signer is not None else None  # fresh for every exchange
        if jwt is None:
            raise SigningError(f"credential '{self.credential.name}' is not a CDP key")
        started = self._clock()
        self.exchanges += 1
        try:
            grant = await self._post(jwt)
        except ExchangeFailed as exc:
            self._failures += 1
            delay = min(self.backoff_cap, self.backoff_first * 2 ** (self._failures - 1))
            self._retry_at = self._clock() + delay * random.uniform(0.5, 1.0)  # noqa: S311
            self.last_error = exc.reason
            self._metrics.token_exchanges.labels(self.credential.name, "http", exc.outcome).inc()
            log.warning(
                "access-token exchange failed",
                extra={"fields": {"credential": self.credential.name, "upstream": self.upstream,
                                  "reason": exc.reason, "failures": self._failures,
                                  "retry_in": round(self._retry_at - self._clock(), 2)}},
            )  # fmt: skip
            return None
        # Lifetime counted from before the request: the gateway started its clock no earlier.
        self._token, self._obtained_at = grant.token, started
        self._expires_at = started + grant.expires_in
        self._refresh_at = started + grant.expires_in * REFRESH_RATIO
        if self._seen is not signer:  # the key rotated meanwhile: exchange again with the new one
            self._refresh_at = 0.0
        self._failures, self.last_error = 0, None
        self._metrics.token_exchanges.labels(self.credential.name, "http", "ok").inc()
        self._show_expiry()
        log.info(
            "access token obtained",
            extra={"fields": {"credential": self.credential.name, "upstream": self.upstream,
                              "expires_in": grant.expires_in}},
        )  # fmt: skip
        return grant.token

    async def _post(self, jwt: str) -> Grant:
        endpoint = self.endpoint
        url = URL(endpoint.origin + AUTH_PATH, encoded=True)
        headers = {
            "Host": self.upstream,
            "Content-Type": "application/json",
            "User-Agent": f"signing-proxy/{__version__}",
        }
        try:
            async with self._session.post(
                url, data=auth_call(jwt).encode(), headers=headers, ssl=endpoint.ssl,
                timeout=endpoint.timeout, allow_redirects=False,
            ) as response:  # fmt: skip
                size = response.content_length
                if size is not None and size > _MAX_ANSWER_BYTES:
                    raise ExchangeFailed(f"HTTP {response.status}, answer too large", "bad_answer")
                raw = await response.read()
                status = response.status
        except CLIENT_FAILURES as exc:
            error = translate_client_error(exc, self.upstream, endpoint.config.timeout)
            outcome = "timeout" if error.status == 504 else "unreachable"
            raise ExchangeFailed(error.message, outcome) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        return parse_auth_answer(data, status)

    # --- background refresh ---------------------------------------------------------------------

    def _show_expiry(self) -> None:
        left = self._expires_at - self._clock() if self._token is not None else 0.0
        self._metrics.token_expiry.labels(self.credential.name).set(max(left, 0.0))

    async def run(self) -> None:
        """Exchange when due (start, 80 % of the lifetime, after a backoff, after rotation)."""
        while True:
            self._show_expiry()  # the loop wakes at least once a second
            wait = self._due_in()
            if wait > 0:
                await asyncio.sleep(min(wait, _KEY_POLL))
                continue
            try:
                await asyncio.shield(self._start())
            except Exception as exc:  # keep refreshing whatever happened; log the type only
                log.error(
                    "access-token exchange crashed",
                    extra={"fields": {"credential": self.credential.name,
                                      "exc_type": type(exc).__name__}},
                )  # fmt: skip
                await asyncio.sleep(_KEY_POLL)

    def start(self) -> None:
        if self._task is None:
            name = f"token-broker-{self.credential.name}-{self.upstream}"
            self._task = asyncio.get_running_loop().create_task(self.run(), name=name)

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
