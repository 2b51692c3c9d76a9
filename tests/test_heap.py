"""training.heap: inside `kept()` a freed buffer's pages are reused, not faulted in again; after it they go back."""

import os
import resource

import pytest
import torch

from tunelab.training import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc only (or MALLOC_* set): kept() changes nothing")
MB = 2**20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def churn(times: int, mb: int = 48) -> int:
    """Page faults while allocating, touching and freeing a buffer over glibc's largest mmap threshold (32 MB)."""
    before = faults()
    for _ in range(times):
        torch.empty(mb * MB // 4).fill_(1.0)
    return faults() - before


def test_a_freed_buffer_is_reused_inside_and_faulted_in_afresh_outside():
    churn(1)
    outside = churn(6)
    with heap.kept() as on:
        assert on
        churn(1)  # the first one comes from the OS either way
        inside = churn(6)
    assert outside >= 6  # each allocation was a fresh mapping
    assert inside < outside / 4, (inside, outside)


def test_the_kept_memory_goes_back_to_the_os_at_the_end():
    with heap.kept():
        start = resident()
        buffers = [torch.ones(8 * MB // 4) for _ in range(40)]  # 320 MB in pieces under the mmap threshold
        del buffers
        held = resident() - start
        assert held > 200 * MB  # freed, but kept
    assert resident() - start < held / 4
