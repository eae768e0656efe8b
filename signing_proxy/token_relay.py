"""REST calls to a ``token_exchange`` upstream (drb.coinbase.com): bearer token, one retry.

The gateway speaks JSON-RPC over HTTP: ``POST /api/v2/<method>`` with a JSON-RPC body (or
``GET /api/v2/<method>?params``). Private methods (``private/...``) carry
``Authorization: Bearer <access token>`` from the credential's TokenBroker; public methods go
without one. The method is read from the path and from the body's ``method``; when both are
given they must agree, a private method must be named in the path, and a private call's body
must be one plain JSON object with each key once, so that a policy on paths sees the call that
runs whichever of the two the gateway dispatches on.

The body is read whole (``max_body_bytes``, 413 above) because a private call the gateway
answers with "token rejected" (JSON-RPC 13004 or 13009: the call did not run) is sent once more,
with the same bytes and a fresh token. Every other answer, and the second rejection, passes
through unchanged; nothing else is ever sent twice (not even after a broken connection).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Final

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import strict_json
from .aiohttp_client import CLIENT_FAILURES, translate_client_error
from .answer import client_head, stream_body
from .errors import RequestRejected
from .http_request import Request
from .metrics import ProxyMetrics
from .request_body import read_capped_body
from .request_headers import filter_request_headers
from .request_record import Exchange
from .routing import Target
from .token_exchange import TOKEN_REJECTED_CODES, TokenBrokers
from .upstream_endpoint import UpstreamEndpoint

__all__ = ["TokenRelay", "is_token_rejected", "rpc_method"]

log = logging.getLogger(__name__)

_API_PREFIX: Final = "/api/v2/"
_PRIVATE: Final = "private/"
_PEEK_BYTES: Final = 64 * 1024  # answers up to this size are read whole (and checked)


def _refused(message: str, code: str = "jsonrpc_method_mismatch") -> RequestRejected:
    return RequestRejected(message, code=code)


def rpc_method(path: str, body: bytes) -> str | None:
    """The JSON-RPC method a call invokes, from its path and body; refuses ambiguous calls.

    The gateway could dispatch on either, so they must agree, a private method must be in the
    path (where policies look), and a private call's body must be one plain JSON object.
    """
    in_path = path[len(_API_PREFIX) :] if path.startswith(_API_PREFIX) else None
    private_path = in_path is not None and in_path.startswith(_PRIVATE)
    in_body: str | None = None
    if body.strip():
        try:
            call = strict_json.loads(body.decode())
        except strict_json.DuplicateKey:
            raise _refused("the JSON body has a key twice", "jsonrpc_body_refused") from None
        except (ValueError, RecursionError):
            call = None  # not JSON: the gateway will say so (unless it is a private call)
        if isinstance(call, list):
            raise _refused(
                "JSON-RPC batches are not relayed to a token_exchange upstream; send one call "
                "per request",
                "jsonrpc_batch_refused",
            )
        if private_path and not isinstance(call, dict):
            raise _refused(
                "the body of a private call must be one JSON-RPC object (plain JSON, not "
                "compressed)",
                "jsonrpc_body_refused",
            )
        if isinstance(call, dict) and "method" in call:
            if not isinstance(call["method"], str):
                raise _refused("the JSON-RPC method must be a string", "jsonrpc_body_refused")
            in_body = call["method"]
    if in_body is not None and in_path is not None and in_body != in_path:
        raise _refused(
            f"the JSON-RPC method in the body ({in_body[:80]!r}) differs from the one in the "
            f"path ({in_path[:80]!r}); send POST /api/v2/<method> with that same method"
        )
    if in_body is not None and in_path is None and in_body.startswith(_PRIVATE):
        raise _refused(f"name private methods in the path: POST /api/v2/{in_body[:80]}")
    return in_path if in_path is not None else in_body


def is_token_rejected(answer: bytes) -> bool:
    """Is this JSON-RPC answer the gateway's "access token rejected" error?"""
    if b"error" not in answer:
        return False
    try:
        data = json.loads(answer)
    except (ValueError, RecursionError):
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("code") in TOKEN_REJECTED_CODES


class TokenRelay:
    """Forwards requests for ``token_exchange`` upstreams; the relay hands them over."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: dict[str, UpstreamEndpoint],
        brokers: TokenBrokers,
        metrics: ProxyMetrics,
        max_body_bytes: int,
    ):
        self.session = session
        self.endpoints = endpoints
        self.brokers = brokers
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def forward(self, request: Request, target: Target, ex: Exchange) -> None:
        host = target.upstream.name
        timeout = target.upstream.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                body = await read_capped_body(
                    request, self.max_body_bytes,
                    why="calls to a token_exchange upstream are read whole, to be resent once "
                    "if the gateway rejects the access token",
                )  # fmt: skip
        except TimeoutError:
            raise RequestRejected(
                f"the request body did not arrive within {timeout:g}s",
                code="body_timeout",
                status=408,
            ) from None
        method = rpc_method(target.path, body)
        headers = filter_request_headers(request.headers, host)
        if method is None or not method.startswith(_PRIVATE):
            upstream, answer = await self._send(request, target, headers, body, ex, deadline)
            await self._respond(request, target, upstream, answer, ex)
            return
        assert target.credential is not None  # config: token_exchange needs a credential
        broker = self.brokers.get(target.credential, host)
        token = await broker.token(deadline - loop.time())
        headers["Authorization"] = f"Bearer {token}"
        upstream, answer = await self._send(request, target, headers, body, ex, deadline)
        if answer is not None and is_token_rejected(answer):
            upstream.release()
            ex.retries += 1
            self.metrics.token_rejected_retries.labels(target.credential).inc()
            log.info(
                "access token rejected by the gateway; sending the call again with a fresh one",
                extra={"fields": {"request_id": ex.request_id, "upstream": host,
                                  "credential": target.credential}},
            )  # fmt: skip
            token = await broker.refresh(token, deadline - loop.time())
            headers["Authorization"] = f"Bearer {token}"
            upstream, answer = await self._send(request, target, headers, body, ex, deadline)
        await self._respond(request, target, upstream, answer, ex)

    async def _send(
        self,
        request: Request,
        target: Target,
        headers: CIMultiDict[str],
        body: bytes,
        ex: Exchange,
        deadline: float,
    ) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """Send once; the answer is read whole when it is small (None: stream it)."""
        endpoint = self.endpoints[target.upstream.name]
        host = target.upstream.name
        raw = endpoint.origin + target.path + ("?" + target.query if target.query else "")
        left = deadline - asyncio.get_running_loop().time()
        timeout = aiohttp.ClientTimeout(total=max(left, 0.001))
        started = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method, URL(raw, encoded=True), headers=headers,
                data=body if body or request.body_exists else None,
                allow_redirects=False, ssl=endpoint.ssl, timeout=timeout,
            )  # fmt: skip
            ex.upstream_seconds += time.perf_counter() - started
            size = upstream.content_length
            if request.method == "HEAD" or size is None or size > _PEEK_BYTES:
                return upstream, None
            try:
                return upstream, await upstream.read()
            except BaseException:  # never pool a half-read connection
                upstream.close()
                raise
        except CLIENT_FAILURES as exc:
            raise translate_client_error(exc, host, endpoint.config.timeout) from None

    async def _respond(
        self,
        request: Request,
        target: Target,
        upstream: aiohttp.ClientResponse,
        answer: bytes | None,
        ex: Exchange,
    ) -> None:
        head = client_head(upstream.raw_headers, ex.request_id)
        ex.upstream_date = head.date
        ex.status = upstream.status
        reason = upstream.reason or ""
        if answer is not None:
            upstream.release()
            ex.bytes_out = len(answer)
            await request.respond(upstream.status, reason, head.headers, answer)
            return
        length = head.declared if request.method == "HEAD" else upstream.content_length
        request.start(upstream.status, reason, head.headers, content_length=length)
        upstream_name, timeout = target.upstream.name, target.upstream.timeout

        def failure(exc: BaseException) -> str | None:
            if isinstance(exc, CLIENT_FAILURES):  # only the upstream's body is read here
                return translate_client_error(exc, upstream_name, timeout).code
            return None

        error: str | None = "client_disconnected"
        try:
            ex.bytes_out, error = await stream_body(
                request, upstream.content.iter_any(), failure, upstream_name
            )
            ex.error = error or ex.error
        finally:
            if error is None:
                upstream.release()
            else:
                upstream.close()
