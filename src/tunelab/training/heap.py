"""Keep freed memory in the process while training, so each step's buffers reuse the last step's pages.

A training step allocates and frees the same large buffers every time (activations, their gradients, the loss's
logit chunks). glibc's malloc serves a request over its mmap threshold (at most 32 MB) with a fresh mapping and
unmaps it on free, and trims the heap's free top back to the OS: the next step faults every page in again and the
kernel zeroes each one. glibc also raises that threshold as it goes, so the same buffers end up sometimes in the
heap and sometimes not.

`kept()` tells glibc, for the duration of the loop, to serve every request from the heap and never trim it; at the
end it restores glibc's defaults and trims, so the freed memory goes back to the OS once training is over.
Measured with the bench's 1B scenarios (`python -m bench --scenario lora-1b --scenario qlora-1b --runners tunelab`,
Intel Xeon, idle, 2026-12-07) against a fixed 4 MB mmap threshold and no trim: LoRA 70.7 against 58.8 tok/s at
8,724 against 8,330 MB peak RSS; QLoRA 66.3 against 46.4 tok/s at 5,733 against 5,239 MB. On the 58M model
(8 steps, one thread, a shared machine) it cut the page faults from 329k to 176k; after the loss stopped
allocating a copy of each logit chunk (ops/lm_loss.py) the difference there is within run-to-run noise.

Only where glibc's malloc serves the process (elsewhere, or under an LD_PRELOADed allocator, nothing changes),
and not when the user has set any MALLOC_* variable: that is their own tuning, which a library must not override.
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
        process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt does nothing)
    except (OSError, AttributeError):
        return None
    # A malloc put in front of glibc's (LD_PRELOAD of jemalloc, tcmalloc, mimalloc) serves the process; glibc's
    # mallopt would tune an allocator nobody calls
    address = lambda lib: ctypes.cast(lib.malloc, ctypes.c_void_p).value  # noqa: E731
    return libc if address(process) == address(libc) else None


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
