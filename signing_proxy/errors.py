"""The proxy's exception tree, and the JSON body every error the proxy makes itself carries.

    ProxyError                  anything the proxy refuses or fails at; has .status and .code
    ├── ConfigError             the config file is wrong (raised once, at start)
    ├── CredentialError         key material missing or unusable (names the source, never the secret)
    ├── SigningError            a signer could not produce a signature
    ├── RequestRejected         the client's request is refused (400/403/405/413/429/431, ...)
    └── UpstreamError           the upstream could not be reached or answered badly (502/504)

aiohttp's client exceptions are translated into UpstreamError in one place: aiohttp_client.py.
Messages are shown to clients and operators, so they must never contain secret material.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ConfigError",
    "CredentialError",
    "ProxyError",
    "RequestRejected",
    "SigningError",
    "UpstreamError",
    "error_body",
]

JSON_CONTENT_TYPE: Final = "application/json"


class ProxyError(Exception):
    """Base class: carries the HTTP status and stable error code used in JSON answers."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: Mapping[str, str] = headers or {}  # extra response headers (Retry-After)

    def body(self) -> bytes:
        return error_body(self.code, self.message)


class ConfigError(ProxyError):
    code = "config_error"


class CredentialError(ProxyError):
    status = 503
    code = "credential_unavailable"


class SigningError(ProxyError):
    status = 500
    code = "signing_failed"


class RequestRejected(ProxyError):
    status = 400
    code = "bad_request"


class UpstreamError(ProxyError):
    status = 502
    code = "upstream_error"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()
