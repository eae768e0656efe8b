"""Two settings of glibc's allocator that the proxy's memory use depends on.

- ``keep_read_buffers_on_heap``: the TLS layer reads each upstream record into a fresh 256 KiB
  buffer and shrinks it to the bytes read. glibc serves an allocation that large with ``mmap``
  (its threshold is 128 KiB, and a buffer shrunk with ``mremap`` never raises it), so every
  response cost ``mmap``, ``mremap`` and ``munmap`` system calls, page faults and a TLB flush
  that slowed everything after it. A fixed 1 MiB threshold (and a trim threshold above it, so
  freeing such a buffer does not shrink the heap each time) keeps them on the heap.
- ``release_startup_memory``: give back what start-up freed (imports, config, key parsing).

On another C library both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Final

__all__ = ["keep_read_buffers_on_heap", "release_startup_memory"]

_M_TRIM_THRESHOLD: Final = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 1024 * 1024
TRIM_THRESHOLD: Final = 4 * 1024 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_read_buffers_on_heap() -> bool:
    """True if glibc took both settings."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_startup_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (~1 MiB of idle RSS here)."""
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
