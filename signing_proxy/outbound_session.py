"""The aiohttp ClientSession for the calls off the REST hot path, made on first use.

WebSocket relays, token exchanges and the derivatives gateway's socket use aiohttp's client. A
proxy that relays REST only never needs it, so aiohttp is imported, and the session built, the
first time one of those asks: ~11 MiB of idle RSS and ~0.2 s of start-up it does not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

__all__ = ["OutboundSession"]


class OutboundSession:
    """``get()``: the one shared session (settings: aiohttp_client.create_session)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def started(self) -> bool:
        return self._session is not None

    def get(self) -> aiohttp.ClientSession:
        if self._session is None:
            from .aiohttp_client import create_session  # loads aiohttp: only now

            self._session = create_session()
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
