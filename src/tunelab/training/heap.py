"""Keep freed memory in the process while training, so each step's buffers reuse the last step's pages.

A training step allocates and frees the same large buffers every time (activations, their gradients, the loss's
logit chunks). glibc's malloc serves a request over its mmap threshold (at most 32 MB) with a fresh mapping and
unmaps it on free, and trims the heap's free top back to the OS: the next step faults every page in again and the
kernel zeroes each one. On the bench's 58M data (8 steps, one thread) `kept()` around the loop cut the process's
page faults from 329k to 176k with LoRA and from 418k to 245k with full fine-tuning: 5-15 % of the step time.

`kept()` tells glibc, for the duration of the loop, to serve every request from the heap and never trim it; at the
end it restores glibc's defaults and trims, so the freed memory goes back to the OS once training is over. Peak
RSS barely moves (the memory was in use at the peak anyway): on that LoRA run 1,725 -> 1,772-1,807 MB.

Only with glibc (elsewhere nothing changes), and not when the user has set any MALLOC_* variable: that is their
own tuning, which a library must not override.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

# mallopt parameters (malloc.h) and glibc's defaults for the two this changes
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: 2 GB of free heap top before a trim


def _glibc():
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def kept() -> Iterator[bool]:
    """Inside: freed memory stays in the process for reuse. Yields whether glibc was told so."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    try:
        yield True
    finally:
        # glibc's defaults again (its mmap threshold stays where it is, no longer adjusted dynamically); the heap's
        # free top goes back to the OS now
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
