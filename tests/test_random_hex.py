"""RandomHex: batched urandom for JWT nonces and request ids, never handed out twice."""

from __future__ import annotations

import os
import re

import pytest

from signing_proxy.random_hex import RandomHex


def test_values_are_hex_of_the_asked_width_and_all_distinct() -> None:
    source = RandomHex(16, batch=4)  # several batches
    values = [source() for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values)
    assert len(set(values)) == len(values)


def test_a_forked_child_never_reuses_the_parents_batch() -> None:
    source = RandomHex(8, batch=64)
    source()  # the batch is now in memory, with 63 values unread
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next value
        os.close(read)
        os.write(write, source().encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parent_next = [source() for _ in range(63)]
    assert re.fullmatch(r"[0-9a-f]{16}", child)
    assert child not in parent_next


@pytest.mark.parametrize(("nbytes", "batch"), [(0, 1), (1, 0)])
def test_sizes_must_be_positive(nbytes: int, batch: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        RandomHex(nbytes, batch)
