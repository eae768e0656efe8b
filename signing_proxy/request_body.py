"""The client's whole request body, read within a cap (413 above it).

For whoever must hold the body before sending it on: the REST relay when a signer signs the body
(HMAC), the token-exchange relay and the Topper endpoint. Everything else streams the body through.
"""

from __future__ import annotations

from .errors import RequestRejected
from .http_request import Request

__all__ = ["read_capped_body"]


async def read_capped_body(
    request: Request,
    cap: int,
    *,
    limit: str = "max_body_bytes",
    why: str = "signing must read the whole body",
) -> bytes:
    """The whole request body, refused with 413 above ``cap`` bytes (read no further than that)."""
    declared = request.content_length
    if declared is not None and declared > cap:
        raise RequestRejected(
            f"request body of {declared} bytes exceeds {limit} ({cap}); {why}",
            code="body_too_large",
            status=413,
        )
    parts: list[bytes] = []
    size = 0
    while chunk := await request.read_chunk():
        size += len(chunk)
        if size > cap:
            raise RequestRejected(
                f"request body exceeds {limit} ({cap}); {why}", code="body_too_large", status=413
            )
        parts.append(chunk)
    return b"".join(parts)
