"""glibc settings: 256 KiB TLS read buffers come from the heap, not from mmap."""

from __future__ import annotations

import subprocess
import sys

from signing_proxy.glibc_malloc import MMAP_THRESHOLD

# Run in a child: mallopt changes the allocator of the whole process.
CHILD = """
import ctypes, ctypes.util, sys
from signing_proxy.glibc_malloc import keep_read_buffers_on_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_read_buffers_on_heap()
held = [bytearray(256 * 1024) for _ in range(4)]  # what an SSL read of 256 KiB allocates
print(libc.mallinfo2().hblks)  # chunks served by mmap
"""


def _mmapped_chunks(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_large_read_buffers_stay_on_the_heap() -> None:
    assert _mmapped_chunks("default") >= 4  # glibc's own threshold: each one an mmap
    assert _mmapped_chunks("tuned") < 4
    assert MMAP_THRESHOLD > 256 * 1024
