"""Random hex strings for the hot path, drawn from ``os.urandom`` a batch at a time.

A JWT nonce and a request id each cost a ``getrandom`` system call when drawn one by one;
``RandomHex`` reads one batch and slices it. The bytes are the operating system's CSPRNG output
either way. The batch is dropped in a forked child, so two processes never share one.
"""

from __future__ import annotations

import os
import weakref
from typing import Final

__all__ = ["RandomHex"]

_LIVE: Final[weakref.WeakSet[RandomHex]] = weakref.WeakSet()


class RandomHex:
    """``RandomHex(n)()``: ``2 * n`` random hex digits (``n`` random bytes), fresh on every call."""

    def __init__(self, nbytes: int, batch: int = 256):
        if nbytes <= 0 or batch <= 0:
            raise ValueError("nbytes and batch must be positive")
        self._width = 2 * nbytes
        self._batch_bytes = nbytes * batch
        self._hex = ""
        self._at = 0
        _LIVE.add(self)

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex, at = os.urandom(self._batch_bytes).hex(), 0
        end = at + self._width
        self._at = end
        return self._hex[at:end]

    def discard(self) -> None:
        """Forget the unread rest of the batch (never handed out twice)."""
        self._hex, self._at = "", 0


def _after_fork() -> None:
    for source in list(_LIVE):
        source.discard()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
